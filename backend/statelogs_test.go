package backend

import (
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/visualops/opsagent/internal/testutil/natscluster"
	"github.com/visualops/opsagent/protocol"
)

// smallRetention keeps 16 KiB of StateLogs per app, checked often.
func smallRetention(o *Options) {
	o.LogRetentionBytes, o.retainEvery = 16<<10, 50*time.Millisecond
}

func TestRetentionBySizeAndPaging(t *testing.T) {
	e := newEnv(t, "", smallRetention)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.push("i-1", "s1", 1, 120, strings.Repeat("x", 900))
	// Retention settles: a read of every page is under 16 KiB and the
	// same as a read made after a few more retention passes. (Paging is
	// no snapshot: a purge between two pages shows a torn list, such as
	// 20..22 then 109..120, so one read alone proves nothing.)
	var logs []LogEntry
	eventually(t, "retention down to 16 KiB, and settled", func() bool {
		logs = e.storedLogs("app1", 7)
		size := 0
		for _, l := range logs {
			size += len(*l.Stdout)
		}
		if size > 16<<10 {
			return false
		}
		time.Sleep(3 * 50 * time.Millisecond)
		again := e.storedLogs("app1", 7)
		return slices.Equal(agentSeqs(logs, "i-1", "s1"), agentSeqs(again, "i-1", "s1"))
	})
	got := agentSeqs(logs, "i-1", "s1")
	if len(got) < 10 || !slices.Equal(got, seqRange(got[0], 120)) {
		t.Fatalf("kept %v: want the newest ones, 120 last", got)
	}
	if in := e.instance("app1", "i-1"); in.StateLogs != int64(len(logs)) || in.LogStreams["s1"] != 120 || in.LastStateLog.AgentSeq != 120 {
		t.Fatalf("summary counts %d StateLogs (stream %v, last %+v), %d retained", in.StateLogs, in.LogStreams, in.LastStateLog, len(logs))
	}
	// A cursor in deleted StateLogs resumes at the oldest retained.
	var p logPage
	e.getJSON("/api/apps/app1/logs?after=1&limit=1", &p)
	if len(p.Logs) != 1 || p.Logs[0].Seq != logs[0].Seq {
		t.Fatalf("after=1 gave %+v, want seq %d", p.Logs, logs[0].Seq)
	}
	// A page in the middle starts right after its cursor.
	mid := logs[len(logs)/2]
	e.getJSON(fmt.Sprintf("/api/apps/app1/logs?after=%d&limit=2", mid.Seq), &p)
	if len(p.Logs) != 2 || p.Logs[0].AgentSeq != mid.AgentSeq+1 {
		t.Fatalf("a middle page: %+v", p.Logs)
	}
}

// TestStreamHighOutlivesRetention: once retention deleted every StateLog
// of a log stream, its high-water mark still says what was stored, so an
// agent that sends them again (after hours, say) is acknowledged and none
// is stored twice.
func TestStreamHighOutlivesRetention(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, smallRetention)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok1", "a")
	a.expectAck("a")
	a.expectRecipe()
	a.push("i-1", "a", 1, 10, strings.Repeat("x", 900))
	b := e.connect2("i-2", "app1", "tok2", "b")
	b.expectAck("b")
	b.expectRecipe()
	b.push("i-2", "b", 1, 100, strings.Repeat("y", 900))
	eventually(t, "i-1's StateLogs deleted by retention", func() bool {
		return len(agentSeqs(e.storedLogs("app1", 1000), "i-1", "a")) == 0
	})
	if in := e.instance("app1", "i-1"); in.StateLogs != 0 || in.LastStateLog != nil || in.LogStreams["a"] != 10 {
		t.Fatalf("i-1 after retention: %+v", in)
	}
	e.stop()

	e2 := newEnv(t, dir, smallRetention)
	c := e2.connect2("i-1", "app1", "tok1", "a")
	if seq := c.expectAck("a"); seq != 10 {
		t.Fatalf("after retention and restart: first StateLogAck %d, want 10", seq)
	}
	c.expectRecipe()
	c.sendLogs("i-1", 1, 10) // sent again, long after
	c.push("i-1", "a", 11, 11, "new")
	if got := agentSeqs(e2.storedLogs("app1", 1000), "i-1", "a"); !slices.Equal(got, []int64{11}) {
		t.Fatalf("stored for i-1: %v, want only 11 (1..10 were duplicates)", got)
	}
}

func TestLogsPageBoundedByBytes(t *testing.T) {
	// Fat StateLogs (64 KiB comment and stdout: 128 KiB each), then one
	// of 6 MiB, larger than a page, then a small one. NATS runs in its own
	// process, so that the heap measured is the backend's alone.
	c := natscluster.Start(t, 1)
	e := newEnv(t, "", func(o *Options) { o.MaxOutputBytes, o.NATS.URLs = 3<<20, []string{c.URLs()} })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	const fatN = 80 // 10 MiB: more than two pages
	fat, huge, small := strings.Repeat("f", 64<<10), strings.Repeat("h", 3<<20), "small"
	for i := range fatN {
		a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: fmt.Sprintf("f%d", i), Result: true, Comment: &fat, Stdout: &fat})
	}
	a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: "huge", Result: true, Comment: &huge, Stdout: &huge})
	a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: "small", Result: true, Comment: &small})
	eventually(t, "every StateLog stored", func() bool { return e.instance("app1", "i-1").StateLogs == fatN+2 })

	// One page at the largest limit: its memory is bounded by bytes.
	peak := peakHeap(func() {
		resp, err := http.DefaultClient.Do(e.request("GET", "/api/apps/app1/logs?limit=10000", ""))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	})
	t.Logf("a page of fat StateLogs at limit=10000: heap peak +%d KiB", peak>>10)
	if peak > 40<<20 { // the whole 16 MiB at once cost +75 MiB
		t.Errorf("one page of %d fat StateLogs raised the heap by %d KiB, want under 40 MiB", fatN, peak>>10)
	}

	type page struct {
		Logs []LogEntry `json:"logs"`
		Next int64      `json:"next"`
		More *bool      `json:"more"`
	}
	var pages []page
	for after := int64(0); len(pages) < 100; {
		var p page
		e.getJSON(fmt.Sprintf("/api/apps/app1/logs?after=%d&limit=10000", after), &p)
		if p.More == nil {
			t.Fatalf("page after %d: no \"more\" field", after)
		}
		pages = append(pages, p)
		if !*p.More {
			break
		}
		if len(p.Logs) == 0 || p.Next != p.Logs[len(p.Logs)-1].Seq {
			t.Fatalf("page after %d: %d StateLogs, next %d, more", after, len(p.Logs), p.Next)
		}
		after = p.Next
	}
	var ids []string
	for i, p := range pages {
		size := 0
		for _, l := range p.Logs {
			ids = append(ids, l.StateID)
			size += len(*l.Comment)
			if l.Stdout != nil {
				size += len(*l.Stdout)
			}
		}
		switch {
		case len(p.Logs) == 1 && p.Logs[0].StateID == "huge":
			// Larger than a page alone: served alone.
		case size > maxPageBytes:
			t.Errorf("page %d holds %d StateLogs with %d KiB of output, over the 4 MiB page", i, len(p.Logs), size>>10)
		}
		if i == 0 && len(p.Logs) >= fatN {
			t.Errorf("the first page holds %d fat StateLogs (%d KiB of output)", len(p.Logs), size>>10)
		}
	}
	if len(ids) != fatN+2 || ids[fatN] != "huge" || ids[fatN+1] != "small" {
		t.Fatalf("paged %d StateLogs (%v…), want %d ending with huge, small", len(ids), ids[:min(len(ids), 3)], fatN+2)
	}
	if last := pages[len(pages)-1]; len(last.Logs) == 0 || last.Logs[len(last.Logs)-1].StateID != "small" {
		t.Errorf("the last page (more false) is %d StateLogs, want it to end with the last one", len(last.Logs))
	}
	// Caught up: an empty page, more false, the cursor unchanged.
	var p page
	e.getJSON(fmt.Sprintf("/api/apps/app1/logs?after=%d", pages[len(pages)-1].Next), &p)
	if len(p.Logs) != 0 || p.More == nil || *p.More || p.Next != pages[len(pages)-1].Next {
		t.Errorf("after the last StateLog: %d StateLogs, next %d, more %v", len(p.Logs), p.Next, p.More)
	}
}

func TestFieldCaps(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.MaxOutputBytes = 100 })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	stdout, comment := strings.Repeat("é", 250), "ok"
	a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: strings.Repeat("s", 300), Result: true, Comment: &comment, Stdout: &stdout})
	eventually(t, "the StateLog stored", func() bool { return len(e.storedLogs("app1", 10)) == 1 })
	got := e.storedLogs("app1", 10)[0]
	out := *got.Stdout
	kept, _, _ := strings.Cut(out, "[…")
	if len(out) > 100 || !utf8.ValidString(out) || !strings.HasPrefix(stdout, kept) ||
		!strings.HasSuffix(out, fmt.Sprintf("[… truncated %d bytes]", len(stdout)-len(kept))) {
		t.Errorf("stdout stored as %q (%d bytes)", out, len(out))
	}
	if len(got.StateID) != protocol.MaxStateIDBytes || *got.Comment != "ok" {
		t.Errorf("state_id %d bytes, comment %q", len(got.StateID), *got.Comment)
	}
}

func TestTruncateOutput(t *testing.T) {
	for _, unit := range []string{"x", "é", "日", "🙂"} {
		for n := range 300 {
			s := strings.Repeat(unit, n)
			for _, limit := range []int{64, 65, 66, 67, 100, 255} {
				got := *capOutput(&s, limit)
				if len(s) <= limit {
					if got != s {
						t.Fatalf("%q under %d changed to %q", s, limit, got)
					}
					continue
				}
				kept, _, _ := strings.Cut(got, "[… truncated ")
				if len(got) > limit || !utf8.ValidString(got) || !strings.HasPrefix(s, kept) || got != kept+truncMarker(len(s)-len(kept)) {
					t.Fatalf("cap(%d × %q, %d) = %q", n, unit, limit, got)
				}
			}
		}
	}
}

func TestMaxOutputBytesChecked(t *testing.T) {
	if _, err := New(Options{DataDir: t.TempDir(), MaxOutputBytes: 10}); err == nil || !strings.Contains(err.Error(), "MaxOutputBytes") {
		t.Fatalf("MaxOutputBytes 10: %v", err)
	}
}

// peakHeap is the highest HeapInuse above the starting point while f runs,
// sampled every millisecond.
func peakHeap(f func()) uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak atomic.Uint64
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > base && ms.HeapInuse-base > peak.Load() {
				peak.Store(ms.HeapInuse - base)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	f()
	close(stop)
	<-stopped
	return peak.Load()
}
