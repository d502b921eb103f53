package clock

import (
	"testing"
	"time"
)

func TestFakeTimers(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f := NewFake(start)
	a := f.NewTimer(10 * time.Second)
	b := f.NewTimer(5 * time.Second)
	c := f.NewTimer(time.Minute)
	if p := f.Pending(); len(p) != 3 || p[0] != 5*time.Second || p[2] != time.Minute {
		t.Fatalf("pending %v", p)
	}
	if !c.Stop() || c.Stop() {
		t.Error("Stop of a pending timer must report true once")
	}
	f.Advance(7 * time.Second)
	select {
	case at := <-b.C():
		if !at.Equal(start.Add(7 * time.Second)) {
			t.Errorf("fired at %v", at)
		}
	default:
		t.Fatal("due timer did not fire")
	}
	select {
	case <-a.C():
		t.Fatal("timer fired early")
	default:
	}
	f.Advance(3 * time.Second)
	<-a.C()
	if len(f.Pending()) != 0 || !f.Now().Equal(start.Add(10*time.Second)) {
		t.Errorf("pending %v now %v", f.Pending(), f.Now())
	}
	if z := f.NewTimer(0); len(z.C()) != 1 {
		t.Error("a zero timer fires at once")
	}
}

func TestWaitForTimer(t *testing.T) {
	f := NewFake(time.Unix(0, 0))
	got := make(chan time.Duration)
	go func() { d, _ := f.WaitForTimer(nil); got <- d }()
	time.Sleep(10 * time.Millisecond)
	f.NewTimer(3 * time.Second)
	if d := <-got; d != 3*time.Second {
		t.Errorf("WaitForTimer = %v", d)
	}
	done := make(chan struct{})
	close(done)
	f2 := NewFake(time.Unix(0, 0))
	if _, ok := f2.WaitForTimer(done); ok {
		t.Error("WaitForTimer with done closed reported a timer")
	}
}

func TestReal(t *testing.T) {
	var c Clock = Real{}
	tm := c.NewTimer(time.Millisecond)
	<-tm.C()
	if c.Now().IsZero() || tm.Stop() {
		t.Error("real clock")
	}
}
