package outbox

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/wait"
)

// sized is a StateLog whose record is about n bytes.
func sized(id string, n int) Entry {
	out := strings.Repeat("x", n)
	l := stateLog(1, id)
	l.Stdout = &out
	return Entry{Log: l}
}

func fileSize(t *testing.T, dir string) int64 {
	t.Helper()
	st, err := os.Stat(filepath.Join(dir, fileName))
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestDiskStaysNearTheByteBound: over a long run the file never holds much
// more than twice outbox_max_bytes (plus compactAbove), whether the backend
// is down (the byte bound drops the oldest, nothing is acknowledged) or
// acknowledges with a lag. Sizes are checked after every Flush, in bytes;
// 785 MB for a 64 MiB bound was what the first case did before.
func TestDiskStaysNearTheByteBound(t *testing.T) {
	const maxBytes = 256 << 10
	const every = 100 // pushes between checks
	for _, tc := range []struct {
		name string
		ack  func(o *Outbox, seq int64)
	}{
		{"backend down: the byte bound drops", func(*Outbox, int64) {}},
		{"acknowledged with a lag", func(o *Outbox, seq int64) {
			if seq%10 == 0 {
				o.AckThrough(seq - 150)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			o, _ := open(t, dir, func(o *Options) { o.MaxBytes = maxBytes })
			e := sized("s", 1000)
			var written, biggest, recSize int64
			for i := 1; i <= 20000; i++ {
				seq := o.Push(e.Log)
				if recSize == 0 {
					recSize = o.Status().Bytes
				}
				written += recSize
				tc.ack(o, seq)
				if i%every == 0 {
					if err := o.Flush(context.Background()); err != nil {
						t.Fatal(err)
					}
					biggest = max(biggest, fileSize(t, dir))
				}
			}
			// The flusher compacts after the batch it wrote, so a check
			// can come between the two: allow what was pushed since.
			bound := int64(2*maxBytes+compactAbove) + 2*every*recSize
			t.Logf("%d bytes of StateLogs pushed; the file peaked at %d bytes (bound %d)", written, biggest, bound)
			if biggest > bound {
				t.Fatalf("the outbox file reached %d bytes for a %d-byte bound (allowed %d)", biggest, maxBytes, bound)
			}
			if st := o.Status(); st.Bytes > maxBytes || st.Storage != "disk" {
				t.Fatalf("status %+v", st)
			}
		})
	}
}

// TestReopenMemoryFollowsWhatIsKept: a file of about 40 MB whose entries are
// all acknowledged but the last two (a backend that came back after a
// long outage) is opened with allocations in proportion to the two, not
// to the file; it is compacted at once. Before, replay held every entry of
// the file until the acknowledgement at its end.
func TestReopenMemoryFollowsWhatIsKept(t *testing.T) {
	dir := t.TempDir()
	const n, size = 600, 64 << 10
	writeMostlyDead(t, dir, n, size)
	fileBytes := fileSize(t, dir)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	o := Open(Options{Dir: dir, MaxBytes: 1 << 30})
	runtime.ReadMemStats(&after)
	t.Cleanup(func() { o.Close() })
	allocated := after.TotalAlloc - before.TotalAlloc
	const bound = 16 << 20 // the two entries are 128 KiB
	t.Logf("opening a %d-byte file holding 2 live entries allocated %d bytes", fileBytes, allocated)
	if allocated > bound {
		t.Errorf("opening allocated %d bytes for a %d-byte file with 2 live entries (bound %d): memory follows the file, not what is kept", allocated, fileBytes, bound)
	}
	if got := strings.Join(ids(o), " "); got != fmt.Sprintf("%d:s%d %d:s%d", n-1, n-1, n, n) {
		t.Fatalf("queue %s", got)
	}
	if e, _ := o.After(n - 2); e.Log.Stdout == nil || len(*e.Log.Stdout) != size {
		t.Fatalf("entry content lost")
	}
	wait.Eventually(t, "the mostly dead file compacted at open", func() bool { return fileSize(t, dir) < 1<<20 })
	if seq := o.Push(stateLog(1, "next")); seq != n+1 || o.Stream() != "0123456789abcdef" {
		t.Fatalf("after the compaction: seq %d stream %s", seq, o.Stream())
	}
}

// writeMostlyDead writes an outbox file of n entries of about size bytes
// each, all acknowledged but the last two.
func writeMostlyDead(t testing.TB, dir string, n int64, size int) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, fileName))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := bufio.NewWriter(f)
	w.Write(headerRecord("0123456789abcdef", 1))
	for i := int64(1); i <= n; i++ {
		e := sized(fmt.Sprintf("s%d", i), size)
		e.Seq, e.At = i, time.Now()
		w.Write(entryRecord(e))
	}
	w.Write(ackRecord(n - 2))
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkReopenMostlyDead is the cost of opening a 40 MB file that holds
// two live entries: allocations follow what is kept.
func BenchmarkReopenMostlyDead(b *testing.B) {
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dir := b.TempDir()
		writeMostlyDead(b, dir, 600, 64<<10)
		b.StartTimer()
		o := Open(Options{Dir: dir, MaxBytes: 1 << 30})
		b.StopTimer()
		if len(ids(o)) != 2 {
			b.Fatal("wrong queue")
		}
		o.Close()
		b.StartTimer()
	}
}

// TestUnfinishedRewriteIsCleanedUp: the temporary file of a rewrite cut
// short by a crash is removed at open; the file itself is untouched.
func TestUnfinishedRewriteIsCleanedUp(t *testing.T) {
	dir := t.TempDir()
	o, _ := open(t, dir, nil)
	o.Push(stateLog(1, "a"))
	o.Close()
	tmp := filepath.Join(dir, tempPrefix(filepath.Join(dir, fileName))+"123")
	if err := os.WriteFile(tmp, []byte("half a rewrite"), 0o600); err != nil {
		t.Fatal(err)
	}
	o2, _ := open(t, dir, nil)
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Errorf("temporary file still there: %v", err)
	}
	if got := ids(o2); len(got) != 1 || got[0] != "1:a" {
		t.Errorf("queue %v", got)
	}
}

// TestKill9DuringCompactions: a child pushes 1 KB StateLogs and
// acknowledges them with a lag, so that the file is rewritten every
// megabyte or so, and is killed with SIGKILL at some moment; five times,
// each child taking up what the last one left. Each reopened queue has no
// gap and no repeat, keeps everything written and fsynced that was not
// acknowledged, and brings back nothing acknowledged durably.
func TestKill9DuringCompactions(t *testing.T) {
	if dir := os.Getenv("OUTBOX_COMPACT_CHILD_DIR"); dir != "" {
		compactingChild(dir)
		return
	}
	dir := t.TempDir()
	for round := 1; round <= 5; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestKill9DuringCompactions$")
		cmd.Env = append(os.Environ(), "OUTBOX_COMPACT_CHILD_DIR="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		var durable, durableAck int64
		// Kill after a different number of reports each round, so that
		// the kill lands at different points of the rewrite cycle.
		for lines := 0; lines < 10+7*round && sc.Scan(); {
			f := strings.Fields(sc.Text())
			if len(f) != 3 || f[0] != "durable" {
				continue
			}
			lines++
			durable, _ = strconv.ParseInt(f[1], 10, 64)
			durableAck, _ = strconv.ParseInt(f[2], 10, 64)
		}
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
		size := fileSize(t, dir)
		o := Open(Options{Dir: dir})
		got := ids(o)
		if len(got) == 0 {
			t.Fatalf("round %d: nothing survived; %d was durable, acknowledged through %d", round, durable, durableAck)
		}
		var first, last int64
		for i, s := range got {
			seq, _ := strconv.ParseInt(s[:strings.IndexByte(s, ':')], 10, 64)
			if i == 0 {
				first = seq
			} else if seq != last+1 {
				t.Fatalf("round %d: seq %d after %d: a gap or a repeat", round, seq, last)
			}
			last = seq
		}
		t.Logf("round %d: killed after %d durable (acknowledged through %d); the file was %d bytes; the queue reopened as %d..%d", round, durable, durableAck, size, first, last)
		if size > 4<<20 {
			t.Errorf("round %d: the file is %d bytes: it was not compacted", round, size)
		}
		if last < durable {
			t.Errorf("round %d: lost StateLogs that were written and fsynced: the queue ends at %d, %d was durable", round, last, durable)
		}
		if first <= durableAck {
			t.Errorf("round %d: seq %d is back though its acknowledgement (through %d) was durable", round, first, durableAck)
		}
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func compactingChild(dir string) {
	o := Open(Options{Dir: dir})
	w := bufio.NewWriter(os.Stdout)
	l := sized("s", 1000).Log
	var acked int64
	for {
		seq := o.Push(l)
		if seq%10 == 0 && seq > 100 {
			acked = max(acked, seq-100)
			o.AckThrough(acked)
		}
		if seq%200 == 0 {
			if err := o.Flush(context.Background()); err == nil {
				fmt.Fprintln(w, "durable", seq, acked)
				w.Flush()
			}
		}
	}
}

// TestCompactionTakesPendingRecordsWithItsSnapshot: records enqueued before
// a compaction's snapshot are in it and are not appended again after it. A
// recipe replaced twice in that window (supersede 2, an entry of 2,
// supersede 3, an entry of 3) would otherwise replay as: the entry of 3
// from the snapshot, then "supersede 2", which drops it.
func TestCompactionTakesPendingRecordsWithItsSnapshot(t *testing.T) {
	dir := t.TempDir()
	o := Open(Options{Dir: dir, manualFlush: true})
	d := o.disk
	for i := 1; i <= 3; i++ {
		o.Push(stateLog(1, fmt.Sprintf("v1-%d", i)))
	}
	if err := d.writePending(); err != nil {
		t.Fatal(err)
	}
	o.Supersede(2)
	o.Push(stateLog(2, "v2"))
	o.Supersede(3)
	o.Push(stateLog(3, "v3"))
	if err := d.compact(); err != nil { // with all four records pending
		t.Fatal(err)
	}
	o.Push(stateLog(3, "after"))
	go d.flusher(o.onDiskError(d))
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o2, _ := open(t, dir, nil)
	if got := strings.Join(ids(o2), " "); got != "5:v3 6:after" {
		t.Fatalf("after the compaction and a restart: %s", got)
	}
}
