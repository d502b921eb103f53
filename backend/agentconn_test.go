package backend

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/protocol"
)

// logBuffer collects a Server's log lines.
type logBuffer struct{ syncbuf.Buffer }

// count is the number of lines containing s.
func (l *logBuffer) count(s string) int {
	n := 0
	for _, line := range strings.Split(l.String(), "\n") {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

// longest is the length of the longest line.
func (l *logBuffer) longest() int {
	n := 0
	for _, line := range strings.Split(l.String(), "\n") {
		n = max(n, len(line))
	}
	return n
}

func (l *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// eventually polls cond (the backend reacts on its own goroutines).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: still not true after 5 s", what)
}

func TestChattySocketWithoutHandshakeIsClosed(t *testing.T) {
	// DeadAfter is far away: only the handshake deadline can close it.
	e := newEnv(t, "", func(o *Options) { o.HandshakeTimeout = 200 * time.Millisecond; o.DeadAfter = time.Hour })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.dial()
	closed := make(chan error, 1)
	go func() {
		_, _, err := a.ws.ReadMessage()
		closed <- err
	}()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	frames := [][]byte{[]byte("garbage"), []byte(`{"code":"WaitQuery","instance_id":"i-1","app_id":"app1","recipe_version":1}`)}
	for i := 0; ; i++ {
		select {
		case err := <-closed:
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.ClosePolicyViolation || !strings.Contains(ce.Text, "no Handshake within") {
				t.Fatalf("closed with %v, want 1008 naming the missing Handshake", err)
			}
			return
		case <-tick.C:
			if i == 500 {
				t.Fatal("a socket that never handshakes stayed open through 500 frames")
			}
			_ = a.ws.WriteMessage(websocket.TextMessage, frames[i%2])
		}
	}
}

func TestAppNotReadyDoesNotExtendTheHandshakeDeadline(t *testing.T) {
	// DeadAfter is far away: an AppNotReady answer must not move the
	// deadline there. The agent closes the socket on AppNotReady and comes
	// back later, so only a client squatting on the socket is cut off.
	e := newEnv(t, "", func(o *Options) { o.HandshakeTimeout = 300 * time.Millisecond; o.DeadAfter = time.Hour })
	a := e.connect("i-1", "later", "tok", "2.1")
	if _, ok := a.expect().(*protocol.AppNotReady); !ok {
		t.Fatal("want AppNotReady")
	}
	a.expectClose(websocket.ClosePolicyViolation, "no Handshake within")
}

func TestRepeatedAppNotReadyClosesTheConnection(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) { o.Logger = logs.logger() })
	a := e.dial()
	hs := func(i int) {
		a.send(&protocol.Handshake{Identity: identity("i-1", fmt.Sprintf("absent-%d", i), tok("tok"), "2.1", "")})
	}
	for i := range 3 {
		hs(i)
		if m := a.expect(); m.MessageCode() != protocol.CodeAppNotReady {
			t.Fatalf("Handshake %d: got %#v, want AppNotReady", i, m)
		}
	}
	hs(3)
	a.expectClose(websocket.ClosePolicyViolation, "the app does not exist")
	// Counted, not logged one by one (anyone may send them): one summary.
	e.srv.refusals.flush()
	if n, m := logs.count("level=WARN"), logs.count("by_kind.app_unknown=3 by_kind.no_handshake=1"); n != 1 || m != 1 {
		t.Errorf("%d warnings, %d summaries of 3 AppNotReady answers and a close, want one:\n%s", n, m, logs.String())
	}
}

func TestBigFrameBeforeHandshakeClosed(t *testing.T) {
	// The default 16 MiB frame limit applies once a Handshake is accepted;
	// before, 64 KiB (plenty for a Handshake).
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	comment := strings.Repeat("x", 100<<10)
	big := &protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: "s1", Result: true, Comment: &comment}
	early := e.dial()
	frame, err := protocol.Encode(big)
	if err != nil {
		t.Fatal(err)
	}
	// The backend may close before the frame is all written.
	_ = early.ws.WriteMessage(websocket.TextMessage, frame)
	early.expectClose(websocket.CloseMessageTooBig, "before the Handshake")

	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	a.send(big)
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if ans, ok := a.expect().(*protocol.TestAns); !ok || !ans.Result {
		t.Fatalf("after a 100 KiB frame from a registered agent: %#v", ans)
	}

	// Memory: 4 sockets sending one 15 MiB frame each before any
	// Handshake cost the backend little (it reads 64 KiB of each).
	comment = strings.Repeat("h", 15<<20)
	frame, err = protocol.Encode(&protocol.StateLog{InstanceID: "i-x", AppID: "app1", StateID: "s", Comment: &comment})
	if err != nil {
		t.Fatal(err)
	}
	socks := make([]*agent, 4)
	for i := range socks {
		socks[i] = e.dial()
	}
	peak := peakHeap(func() {
		var wg sync.WaitGroup
		for _, s := range socks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = s.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
				_ = s.ws.WriteMessage(websocket.TextMessage, frame)
			}()
		}
		for _, s := range socks {
			_, err := s.next()
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.CloseMessageTooBig {
				t.Errorf("15 MiB frame before a Handshake: %v, want close 1009", err)
			}
		}
		wg.Wait()
	})
	if peak > 16<<20 {
		t.Errorf("4 unauthenticated 15 MiB frames raised the heap by %d KiB, want under 16 MiB", peak>>10)
	}
	t.Logf("4 unauthenticated 15 MiB frames: heap peak +%d KiB", peak>>10)
}

func TestForgedStateLogsLoggedRateLimitedAndClipped(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) { o.Logger = logs.logger(); o.badFrameEvery = time.Hour })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	long := strings.Repeat("Z", 1<<20)
	for range 10 {
		a.send(&protocol.StateLog{InstanceID: long, AppID: "app1", RecipeVersion: 1, StateID: "forged", Result: true})
		a.send(&protocol.StateLog{InstanceID: "i-2", AppID: "app1", RecipeVersion: 1, StateID: "forged", Result: true})
	}
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if _, ok := a.expect().(*protocol.TestAns); !ok {
		t.Fatal("connection did not survive forged StateLogs")
	}
	if n := logs.count("StateLog names another instance or app"); n != 1 {
		t.Errorf("%d warnings for 20 forged StateLogs, want 1", n)
	}
	if n := logs.count("…(1048576 bytes)"); n != 1 {
		t.Errorf("the 1 MiB instance id is not logged clipped (%d lines mark it)", n)
	}
	if l := logs.longest(); l > 1<<10 {
		t.Errorf("a log line of %d bytes, want under 1 KiB", l)
	}
	a.ws.Close()
	eventually(t, "the suppressed count logged at disconnect", func() bool { return logs.count("suppressed=19") == 1 })
}

func TestClientStringsClippedInLogs(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) { o.Logger = logs.logger() })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	long := strings.Repeat("L", 16<<10) // twice in a Handshake, under the 64 KiB limit of a first frame
	// Refused Handshakes: the ids are logged before they are checked.
	e.handshake(identity(long, "app1", tok("t"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "instance_id")
	e.handshake(identity("i-1", long, tok("t"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "app_id")
	// A registered agent: its version, init errors, a second identity, the
	// comment and state id of a StateLog.
	id := identity("i-1", "app1", tok("t"), long, secret)
	id.InitErrors = &long
	a := e.handshake(id)
	a.expectRecipe()
	a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: strings.Repeat("s", 200), Result: true, Comment: &long})
	eventually(t, "the StateLog stored", func() bool { return logs.count("msg=StateLog") == 1 })
	a.send(&protocol.Handshake{Identity: identity(long, "app1", tok("t"), "2.1", secret)})
	a.expectClose(websocket.ClosePolicyViolation, "one connection serves one instance")
	e.srv.refusals.flush() // the summary of the refused Handshakes, with the last as a sample
	for _, want := range []string{"by_kind.bad_identity=2", "agent connected", "msg=StateLog", "second Handshake"} {
		if logs.count(want) == 0 {
			t.Errorf("no log line %q:\n%.2000s", want, logs.String())
		}
	}
	if n := logs.count("…(16384 bytes)"); n != 4 {
		t.Errorf("%d lines mark a clipped 16 KiB string, want 4 (the refusals' summary, agent connected, StateLog, second Handshake):\n%.3000s", n, logs.String())
	}
	if l := logs.longest(); l > 1<<10 {
		t.Errorf("a log line of %d bytes, want under 1 KiB", l)
	}
}

func TestSecondHandshakeOnOneSocket(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	// The same identity again is ignored: no second recipe, still served.
	a.send(&protocol.Handshake{Identity: identity("i-1", "app1", tok("tok"), "2.1", secret)})
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if ans, ok := a.expect().(*protocol.TestAns); !ok || !ans.Result {
		t.Fatalf("after a repeated Handshake: %#v", ans)
	}
	// Another identity ends the connection, and neither identity stays
	// listed as connected.
	a.send(&protocol.Handshake{Identity: identity("i-2", "app1", tok("tok2"), "2.1", secret)})
	a.expectClose(websocket.ClosePolicyViolation, "one connection serves one instance")
	eventually(t, "i-1 shown as disconnected", func() bool {
		got := e.instances("app1")
		return !got["i-1"] && !got["i-2"]
	})
	// The same for another app.
	e.api("PUT", "/api/apps/app2/recipe", recipeJSON)
	b := e.connect("i-1", "app1", "tok", "2.1")
	b.expectRecipe()
	b.send(&protocol.Handshake{Identity: identity("i-1", "app2", tok("tok"), "2.1", e.secret("app2"))})
	b.expectClose(websocket.ClosePolicyViolation, "one connection serves one instance")
	eventually(t, "no instance shown as connected", func() bool {
		return !e.instances("app1")["i-1"] && !e.instances("app2")["i-1"]
	})
}

func TestBadFramesLoggedRateLimited(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) { o.Logger = logs.logger(); o.badFrameEvery = time.Hour })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	for range 20 {
		_ = a.ws.WriteMessage(websocket.TextMessage, []byte("garbage"))
		a.send(&protocol.AppNotReady{}) // a backend-to-agent message
	}
	// Frames are handled in order: once the Test is answered, all 40 bad
	// frames have been seen.
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if _, ok := a.expect().(*protocol.TestAns); !ok {
		t.Fatal("connection did not survive bad frames")
	}
	if n := logs.count("level=WARN"); n != 1 {
		t.Errorf("%d warnings for 40 bad frames, want 1:\n%s", n, logs.String())
	}
	a.ws.Close()
	eventually(t, "the suppressed count logged at disconnect", func() bool { return logs.count("suppressed=39") == 1 })
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{every: 10 * time.Second}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	steps := []struct {
		at         time.Duration
		ok         bool
		suppressed int
	}{{0, true, 0}, {time.Second, false, 0}, {9 * time.Second, false, 0}, {10 * time.Second, true, 2}, {11 * time.Second, false, 0}, {time.Minute, true, 1}}
	for _, s := range steps {
		ok, n := l.allow(t0.Add(s.at))
		if ok != s.ok || n != s.suppressed {
			t.Errorf("at %v: allow = %v, %d; want %v, %d", s.at, ok, n, s.ok, s.suppressed)
		}
	}
}
