package outbox

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
)

func stateLog(version int64, id string) protocol.StateLog {
	c := "comment of " + id
	return protocol.StateLog{RecipeVersion: version, StateID: id, Result: true, Comment: &c}
}

func open(t *testing.T, dir string, tweak func(*Options)) (*Outbox, *bytes.Buffer) {
	t.Helper()
	var logs bytes.Buffer
	o := Options{Dir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	if tweak != nil {
		tweak(&o)
	}
	ob := Open(o)
	t.Cleanup(func() { _ = ob.Close() })
	return ob, &logs
}

// ids lists the queued entries as seq:state.
func ids(o *Outbox) []string {
	var out []string
	var after int64
	for {
		e, ok := o.After(after)
		if !ok {
			return out
		}
		out = append(out, fmt.Sprintf("%d:%s", e.Seq, e.Log.StateID))
		after = e.Seq
	}
}

func TestQueueOrderAckAndSupersede(t *testing.T) {
	o, _ := open(t, t.TempDir(), nil)
	for i := 1; i <= 5; i++ {
		if seq := o.Push(stateLog(1, fmt.Sprintf("s%d", i))); seq != int64(i) {
			t.Fatalf("seq %d, want %d", seq, i)
		}
	}
	o.AckThrough(2)
	if got := strings.Join(ids(o), " "); got != "3:s3 4:s4 5:s5" {
		t.Fatalf("after ack 2: %s", got)
	}
	o.Push(stateLog(2, "n1"))
	if n := o.Supersede(2); n != 3 {
		t.Errorf("supersede dropped %d, want 3", n)
	}
	if got := strings.Join(ids(o), " "); got != "6:n1" {
		t.Fatalf("after supersede: %s", got)
	}
	if st := o.Status(); st.Depth != 1 || st.Storage != "disk" || len(st.Stream) != 16 {
		t.Errorf("status %+v", st)
	}
}

// Everything queued survives a restart, in order, with its seq; the
// counter and the stream survive even when nothing is queued.
func TestSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	o, _ := open(t, dir, nil)
	for i := 1; i <= 100; i++ {
		o.Push(stateLog(7, fmt.Sprintf("s%d", i)))
	}
	o.AckThrough(40)
	stream := o.Stream()
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o2, _ := open(t, dir, nil)
	got := ids(o2)
	if len(got) != 60 || got[0] != "41:s41" || got[59] != "100:s100" || o2.Stream() != stream {
		t.Fatalf("after restart: %d entries %v… stream %s (was %s)", len(got), got[:min(3, len(got))], o2.Stream(), stream)
	}
	e, _ := o2.After(40)
	if e.Log.Comment == nil || *e.Log.Comment != "comment of s41" || e.Log.RecipeVersion != 7 || e.Log.Seq != 41 {
		t.Errorf("entry content %+v", e.Log)
	}
	o2.AckThrough(100)
	o2.Close()
	o3, _ := open(t, dir, nil)
	if seq := o3.Push(stateLog(7, "next")); seq != 101 || o3.Stream() != stream {
		t.Fatalf("counter after everything was acknowledged: %d, stream %s", seq, o3.Stream())
	}
}

// A torn or corrupt tail (a crash mid-write, garbage appended) is cut off
// and logged; what came before is kept.
func TestCorruptTailCutOff(t *testing.T) {
	for name, damage := range map[string]func(path string, size int64){
		"truncated mid-record": func(p string, size int64) { _ = os.Truncate(p, size-5) },
		"garbage appended": func(p string, _ int64) {
			f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			f.Write([]byte("\x00\x01garbage that is not a record"))
			f.Close()
		},
		"bad checksum": func(p string, size int64) {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			f.WriteAt([]byte{'X'}, size-3)
			f.Close()
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			o, _ := open(t, dir, nil)
			for i := 1; i <= 3; i++ {
				o.Push(stateLog(1, fmt.Sprintf("s%d", i)))
			}
			o.Close()
			p := filepath.Join(dir, fileName)
			st, _ := os.Stat(p)
			damage(p, st.Size())
			o2, logs := open(t, dir, nil)
			got := ids(o2)
			if name == "garbage appended" {
				if len(got) != 3 {
					t.Fatalf("entries %v", got)
				}
			} else if len(got) != 2 || got[1] != "2:s2" {
				t.Fatalf("entries %v", got)
			}
			if !strings.Contains(logs.String(), "tail was cut off") {
				t.Errorf("no log line:\n%s", logs)
			}
			// The file is usable again: new entries follow.
			seq := o2.Push(stateLog(1, "after"))
			o2.Close()
			o3, _ := open(t, dir, nil)
			if all := ids(o3); all[len(all)-1] != fmt.Sprintf("%d:after", seq) {
				t.Fatalf("after repair: %v", all)
			}
		})
	}
}

// An unusable directory: the outbox works in memory and says so.
func TestUnwritableDirectoryFallsBackToMemory(t *testing.T) {
	parent := t.TempDir()
	blocker := filepath.Join(parent, "not-a-dir")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	o, logs := open(t, filepath.Join(blocker, "outbox"), nil)
	o.Push(stateLog(1, "a"))
	if st := o.Status(); !strings.HasPrefix(st.Storage, "memory: ") || st.Depth != 1 {
		t.Fatalf("status %+v", st)
	}
	if !strings.Contains(logs.String(), "keeping them in memory") {
		t.Errorf("log:\n%s", logs)
	}
}

// A disk that fails later (the file removed from under us is not enough;
// a read-only remount is simulated by closing the descriptor) switches to
// memory without losing the queue.
func TestWriteFailureFallsBackToMemory(t *testing.T) {
	o, _ := open(t, t.TempDir(), nil)
	o.Push(stateLog(1, "a"))
	if err := o.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	_ = o.disk.f.Close()
	o.mu.Unlock()
	o.Push(stateLog(1, "b"))
	wait.Eventually(t, "the switch to memory", func() bool { return strings.HasPrefix(o.Status().Storage, "memory: ") })
	if got := ids(o); len(got) != 2 {
		t.Fatalf("queue after the failure: %v", got)
	}
}

func TestBoundsDropOldestFirst(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	o, _ := open(t, t.TempDir(), func(o *Options) { o.MaxEntries = 3; o.Clock = clk })
	for i := 1; i <= 5; i++ {
		o.Push(stateLog(1, fmt.Sprintf("s%d", i)))
	}
	if got := strings.Join(ids(o), " "); got != "3:s3 4:s4 5:s5" || o.Status().Dropped != 2 {
		t.Fatalf("entry bound: %s, dropped %d", got, o.Status().Dropped)
	}
	big := strings.Repeat("x", 10<<10)
	o2, _ := open(t, t.TempDir(), func(o *Options) { o.MaxBytes = 25 << 10; o.Clock = clk })
	for i := 1; i <= 4; i++ {
		l := stateLog(1, fmt.Sprintf("b%d", i))
		l.Stdout = &big
		o2.Push(l)
	}
	if st := o2.Status(); st.Depth != 2 || st.Bytes > 25<<10 || st.Dropped != 2 {
		t.Fatalf("byte bound: %+v", st)
	}
	o3, _ := open(t, t.TempDir(), func(o *Options) { o.MaxAge = time.Hour; o.Clock = clk })
	o3.Push(stateLog(1, "old"))
	clk.Advance(2 * time.Hour)
	o3.Push(stateLog(1, "new"))
	if got := strings.Join(ids(o3), " "); got != "2:new" || o3.Status().Dropped != 1 {
		t.Fatalf("age bound: %s", got)
	}
}

// Acknowledged entries do not make the file grow without end.
func TestCompaction(t *testing.T) {
	dir := t.TempDir()
	o, _ := open(t, dir, nil)
	big := strings.Repeat("y", 4<<10)
	for i := 1; i <= 2000; i++ {
		l := stateLog(1, fmt.Sprintf("s%d", i))
		l.Stdout = &big
		o.Push(l)
		if i%100 == 0 {
			o.AckThrough(int64(i - 5))
		}
	}
	if err := o.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	o.Push(stateLog(1, "last")) // wakes the flusher for a compaction check
	wait.Eventually(t, "the file compacted", func() bool {
		st, err := os.Stat(filepath.Join(dir, fileName))
		return err == nil && st.Size() < 2<<20
	})
	o.Close()
	o2, _ := open(t, dir, nil)
	got := ids(o2)
	if len(got) != 6 || got[0] != "1996:s1996" || got[5] != "2001:last" {
		t.Fatalf("after compaction and restart: %v", got)
	}
}

// TestKill9LosesOnlyTheUnwrittenTail runs a child that pushes StateLogs as
// fast as it can, reporting each 50th pushed seq and, every 500, a seq it
// has seen written and fsynced (Flush); it is killed with SIGKILL. The
// reopened outbox holds 1..K with no gap, and K is at least the last seq
// reported durable: only what the flusher had not written yet can be
// lost. How long that is (the "few milliseconds") is measured, not
// asserted: BenchmarkPush reports it as max-unwritten-ms.
func TestKill9LosesOnlyTheUnwrittenTail(t *testing.T) {
	if dir := os.Getenv("OUTBOX_CHILD_DIR"); dir != "" {
		child(dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKill9LosesOnlyTheUnwrittenTail$")
	cmd.Env = append(os.Environ(), "OUTBOX_CHILD_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	var pushed, durable int64
	for sc.Scan() {
		kind, num, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			continue
		}
		switch kind {
		case "pushed":
			pushed = n
		case "durable":
			durable = n
		}
		if pushed >= 3000 && durable > 0 {
			break
		}
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	_ = cmd.Wait()
	o, _ := open(t, dir, nil)
	got := ids(o)
	for i, s := range got {
		if want := fmt.Sprintf("%d:", i+1); !strings.HasPrefix(s, want) {
			t.Fatalf("gap or disorder at %d: %s", i, s)
		}
	}
	t.Logf("child reported %d pushed, %d written and fsynced; %d survived the kill -9", pushed, durable, len(got))
	if int64(len(got)) < durable {
		t.Errorf("lost StateLogs that were written and fsynced: %d survived, %d were durable", len(got), durable)
	}
}

func child(dir string) {
	o := Open(Options{Dir: dir})
	w := bufio.NewWriter(os.Stdout)
	for i := 1; ; i++ {
		seq := o.Push(stateLog(1, fmt.Sprintf("s%d", i)))
		switch {
		case seq%500 == 0:
			if err := o.Flush(context.Background()); err == nil {
				fmt.Fprintln(w, "durable", seq)
			}
			w.Flush()
		case seq%50 == 0:
			// Report only what is certainly pushed; the parent kills us
			// at some later moment.
			fmt.Fprintln(w, "pushed", seq)
			w.Flush()
		}
	}
}

// FuzzReplay: whatever the file holds, replay never panics, and the queue
// it yields is in strictly increasing seq order.
func FuzzReplay(f *testing.F) {
	var good bytes.Buffer
	good.Write(headerRecord("abcd", 1))
	for i := int64(1); i <= 3; i++ {
		good.Write(entryRecord(Entry{Seq: i, At: time.Unix(0, 0), Log: stateLog(1, "s")}))
	}
	good.Write(ackRecord(1))
	good.Write(supersedeRecord(1))
	f.Add(good.Bytes())
	f.Add(good.Bytes()[:good.Len()-3])
	f.Add([]byte("\xff\xff\xff\xff garbage"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		st, off, _, _ := replay(bytes.NewReader(data))
		if off < 0 || off > int64(len(data)) {
			t.Fatalf("offset %d of %d", off, len(data))
		}
		var last int64
		for _, e := range st.entries {
			if e.Seq <= last {
				t.Fatalf("seq %d after %d", e.Seq, last)
			}
			last = e.Seq
		}
		if len(st.entries) > 0 && st.next <= last {
			t.Fatalf("next %d not above the last entry %d", st.next, last)
		}
	})
}

// BenchmarkPush is what the engine pays per StateLog with the durable
// outbox (group commit: Push never waits for the disk) and in memory.
func BenchmarkPush(b *testing.B) {
	for _, mode := range []string{"disk", "memory"} {
		b.Run(mode, func(b *testing.B) {
			dir := b.TempDir()
			if mode == "memory" {
				dir = ""
			}
			o := Open(Options{Dir: dir, MaxEntries: 1 << 30, MaxBytes: 1 << 40})
			defer o.Close()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				o.Push(stateLog(1, "s"))
				if i%1000 == 999 {
					o.AckThrough(int64(i))
				}
			}
			b.StopTimer()
			if err := o.Flush(context.Background()); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(o.Status().Exposure.Microseconds())/1000, "max-unwritten-ms")
			if dir != "" {
				// What the file holds for at most 1000 live entries: it is
				// compacted as acknowledgements come, never the whole run.
				st, _ := os.Stat(filepath.Join(dir, fileName))
				b.ReportMetric(float64(st.Size())/(1<<20), "file-MiB")
			}
		})
	}
}

// TestEveryDropCountedWithItsReason: whatever takes a StateLog out of the
// queue without the backend having it is counted in Dropped, by reason: the
// three bounds, a replaced recipe (which used to go uncounted), and
// StateLogs kept in memory when the outbox is closed (which used to
// vanish, with status saying 0 dropped).
func TestEveryDropCountedWithItsReason(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	o, _ := open(t, "", func(o *Options) { o.MaxEntries = 4; o.MaxAge = time.Hour; o.Clock = clk })
	o.Push(stateLog(1, "old"))
	clk.Advance(2 * time.Hour)
	for i := 1; i <= 5; i++ { // "old" goes for its age, n1 for the count
		o.Push(stateLog(1, fmt.Sprintf("n%d", i)))
	}
	one := o.Status().Bytes / 4
	o.SetLimits(4, 2*one, time.Hour) // a reload with a smaller byte bound: n2, n3 go
	if got := strings.Join(ids(o), " "); got != "5:n4 6:n5" {
		t.Fatalf("after the new byte bound: %s", got)
	}
	o.Supersede(2) // n4, n5 go with their recipe
	o.Push(stateLog(2, "k1"))
	o.Push(stateLog(2, "k2"))
	if err := o.Close(); err != nil { // k1, k2 were only in memory
		t.Fatal(err)
	}
	want := map[string]int64{DroppedMaxAge: 1, DroppedLimit: 1, DroppedMaxBytes: 2, DroppedReplaced: 2, DroppedInMemory: 2}
	st := o.Status()
	var sum int64
	for k, v := range want {
		if st.DroppedBy[k] != v {
			t.Errorf("dropped for %s: %d, want %d (all: %v)", k, st.DroppedBy[k], v, st.DroppedBy)
		}
		sum += v
	}
	if st.Dropped != sum || st.Depth != 0 {
		t.Errorf("dropped %d (want %d), depth %d", st.Dropped, sum, st.Depth)
	}
}

// TestRetryDiskAfterAWriteFailure: after the disk failed (memory mode),
// RetryDisk writes the whole queue back, with its stream and counter; a
// restart then finds every StateLog, including those pushed in memory,
// and the counter goes on after them.
func TestRetryDiskAfterAWriteFailure(t *testing.T) {
	dir := t.TempDir()
	o, _ := open(t, dir, nil)
	o.Push(stateLog(1, "a"))
	if err := o.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	_ = o.disk.f.Close() // the next write fails, as on a full disk
	o.mu.Unlock()
	o.Push(stateLog(1, "b"))
	wait.Eventually(t, "the switch to memory", func() bool { return strings.HasPrefix(o.Status().Storage, "memory: ") })
	o.Push(stateLog(1, "c"))
	o.AckThrough(1)
	if err := o.RetryDisk(); err != nil {
		t.Fatal(err)
	}
	if st := o.Status(); st.Storage != "disk" {
		t.Fatalf("storage after RetryDisk: %s", st.Storage)
	}
	o.Push(stateLog(1, "d"))
	stream := o.Stream()
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o2, _ := open(t, dir, nil)
	if got := strings.Join(ids(o2), " "); got != "2:b 3:c 4:d" || o2.Stream() != stream {
		t.Fatalf("after a restart: %s (stream %s, was %s)", got, o2.Stream(), stream)
	}
	if seq := o2.Push(stateLog(1, "e")); seq != 5 {
		t.Fatalf("counter after a restart: %d", seq)
	}
}

// TestOutboxFileThatIsNotAFile: a FIFO (or a link) at outbox.log is
// refused at open, without blocking (a FIFO opened read-write blocked the
// first read forever), and the outbox works in memory; RetryDisk never
// overwrites what it could not read: that takes a restart.
func TestOutboxFileThatIsNotAFile(t *testing.T) {
	for name, plant := range map[string]func(p string) error{
		"fifo":    func(p string) error { return syscall.Mkfifo(p, 0o600) },
		"symlink": func(p string) error { return os.Symlink("/etc/passwd", p) },
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, fileName)
			if err := plant(p); err != nil {
				t.Fatal(err)
			}
			opened := make(chan *Outbox, 1)
			go func() { opened <- Open(Options{Dir: dir}) }()
			var o *Outbox
			select {
			case o = <-opened:
				t.Cleanup(func() { o.Close() })
			case <-time.After(20 * time.Second):
				if w, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
					w.Write(make([]byte, 8)) // releases the blocked replay
					w.Close()
				}
				t.Fatal("Open blocked on what is at outbox.log")
			}
			if st := o.Status(); !strings.HasPrefix(st.Storage, "memory: ") || !strings.Contains(st.Storage, p) {
				t.Fatalf("storage %q", st.Storage)
			}
			o.Push(stateLog(1, "in memory"))
			if err := o.RetryDisk(); err == nil || !strings.Contains(err.Error(), "restart the agent") {
				t.Fatalf("RetryDisk over an unread file: %v", err)
			}
			if fi, err := os.Lstat(p); err != nil || fi.Mode().IsRegular() {
				t.Fatalf("what was planted was replaced: %v %v", fi, err)
			}
		})
	}
}

// TestHandshakeAboveTheCounterRenumbers: an earlier run kept StateLogs in
// memory (its disk had failed), they reached the backend, and the run
// ended; this run opened the stale file and handed out the same seqs
// again. The backend's first acknowledgement shows it: this run's entries
// are renumbered after the backend's seq (else the backend drops them as
// duplicates), the file says so, and later acknowledgements are normal.
func TestHandshakeAboveTheCounterRenumbers(t *testing.T) {
	dir := t.TempDir()
	o, _ := open(t, dir, nil)
	for i := 1; i <= 3; i++ {
		o.Push(stateLog(1, fmt.Sprintf("a%d", i)))
	}
	o.Close()
	p := filepath.Join(dir, fileName)
	stale, _ := os.ReadFile(p)
	// The earlier run: seqs 4..10 reach the backend but not the file.
	o, _ = open(t, dir, nil)
	for i := 4; i <= 10; i++ {
		o.Push(stateLog(1, fmt.Sprintf("mem%d", i)))
	}
	o.Close()
	if err := os.WriteFile(p, stale, 0o600); err != nil {
		t.Fatal(err)
	}

	o, logs := open(t, dir, nil)
	o.Push(stateLog(1, "b1")) // seq 4 again
	o.Push(stateLog(1, "b2")) // seq 5 again
	o.AckHandshake(10)
	if got := strings.Join(ids(o), " "); got != "11:b1 12:b2" {
		t.Fatalf("after the handshake: %s", got)
	}
	if e, _ := o.After(10); e.Log.Seq != 11 {
		t.Errorf("the StateLog's own seq is %d", e.Log.Seq)
	}
	if !strings.Contains(logs.String(), "renumbered") {
		t.Errorf("no log line:\n%s", logs)
	}
	if seq := o.Push(stateLog(1, "b3")); seq != 13 {
		t.Errorf("next seq %d, want 13", seq)
	}
	// Later handshakes at or above this run's first seq are normal.
	o.AckHandshake(11)
	if got := strings.Join(ids(o), " "); got != "12:b2 13:b3" {
		t.Fatalf("after a second handshake: %s", got)
	}
	o.Close()
	o2, _ := open(t, dir, nil)
	if got := strings.Join(ids(o2), " "); got != "12:b2 13:b3" {
		t.Fatalf("after a restart: %s", got)
	}
	// A first handshake below this run's first seq changes nothing.
	o2.AckHandshake(12)
	if got := strings.Join(ids(o2), " "); got != "13:b3" {
		t.Fatalf("normal handshake: %s", got)
	}
}
