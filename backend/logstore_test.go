package backend

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

func logsDir(dataDir, app string) string { return filepath.Join(dataDir, "apps", app, logsDirName) }

// segments lists an app's segment files, oldest first.
func segments(t *testing.T, dataDir, app string) []*segment {
	t.Helper()
	segs, err := listSegments(logsDir(dataDir, app))
	if err != nil {
		t.Fatal(err)
	}
	return segs
}

// push sends StateLogs from..to with stdout over protocol 2 and waits for
// their acknowledgement.
func (a *agent) push(instance, stream string, from, to int64, stdout string) {
	a.t.Helper()
	for seq := from; seq <= to; seq++ {
		m := stateLog(instance, seq)
		m.Stdout = &stdout
		a.send(m)
	}
	a.waitAck(stream, to)
}

// stop ends a Server as a shutdown would, so the data dir can be reopened.
func (e *env) stop() { e.halt() }

func TestTornTailTolerated(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.push("i-1", "s1", 1, 3, "out")
	e.stop()
	seg := segmentPath(logsDir(dir, "app1"), 1)
	before, _ := os.Stat(seg)
	f, _ := os.OpenFile(seg, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("garbage\n" + `{"seq":9,"instance_id":"i-1","rec`)
	f.Close()

	e2 := newEnv(t, dir, nil)
	if after, _ := os.Stat(seg); after.Size() != before.Size() {
		t.Fatalf("segment is %d bytes after restart, want the %d before the torn tail", after.Size(), before.Size())
	}
	b := e2.connect2("i-1", "app1", "tok", "s1")
	if seq := b.expectAck("s1"); seq != 3 {
		t.Fatalf("first StateLogAck %d, want 3", seq)
	}
	b.expectRecipe()
	b.push("i-1", "s1", 4, 4, "out")
	logs := e2.storedLogs("app1", 100)
	if got := agentSeqs(logs, "i-1", "s1"); fmt.Sprint(got) != "[1 2 3 4]" || logs[3].Seq != 4 {
		t.Fatalf("after a torn tail: %+v", logs)
	}
}

// smallSegments makes segments of ~3 StateLogs of 900 bytes, and keeps 16 KiB.
func smallSegments(o *Options) { o.LogSegmentBytes = 4096; o.LogRetentionBytes = 16 << 10 }

func TestRotationRetentionAndPaging(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, smallSegments)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.push("i-1", "s1", 1, 120, strings.Repeat("x", 900))

	segs := segments(t, dir, "app1")
	var total int64
	for _, s := range segs {
		total += s.size
		if s.size > 4096 {
			t.Errorf("segment %s is %d bytes, over LogSegmentBytes", s.path, s.size)
		}
	}
	if total > 16<<10 || len(segs) < 3 || segs[0].first == 1 {
		t.Fatalf("%d segments, %d bytes, oldest from seq %d: retention did not keep the newest 16 KiB", len(segs), total, segs[0].first)
	}
	logs := e.storedLogs("app1", 7)
	if got := agentSeqs(logs, "i-1", "s1"); fmt.Sprint(got) != fmt.Sprint(seqRange(segs[0].first, 120)) {
		t.Fatalf("paged %v, want %d..120", got, segs[0].first)
	}
	if in := e.instance("app1", "i-1"); in.StateLogs != int64(len(logs)) || in.LogStreams["s1"] != 120 {
		t.Fatalf("summary counts %d StateLogs (stream %v), %d retained", in.StateLogs, in.LogStreams, len(logs))
	}
	// A page is found by segment name: it opens the segment holding its
	// first seq, and the next one at most.
	opens := fileLogs(e.srv).segmentOpens.Load()
	var p logPage
	e.getJSON(fmt.Sprintf("/api/apps/app1/logs?after=%d&limit=2", segs[len(segs)/2].first), &p)
	if n := fileLogs(e.srv).segmentOpens.Load() - opens; n > 2 || len(p.Logs) != 2 || p.Logs[0].Seq != segs[len(segs)/2].first+1 {
		t.Fatalf("a middle page opened %d of %d segments and got %+v", n, len(segs), p.Logs)
	}
	// A cursor in deleted StateLogs resumes at the oldest retained.
	e.getJSON("/api/apps/app1/logs?after=1&limit=1", &p)
	if len(p.Logs) != 1 || p.Logs[0].Seq != segs[0].first {
		t.Fatalf("after=1 gave %+v, want seq %d", p.Logs, segs[0].first)
	}
}

func TestStreamHighOutlivesRetention(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, smallSegments)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok1", "a")
	a.expectAck("a")
	a.expectRecipe()
	a.push("i-1", "a", 1, 10, strings.Repeat("x", 900))
	b := e.connect2("i-2", "app1", "tok2", "b")
	b.expectAck("b")
	b.expectRecipe()
	b.push("i-2", "b", 1, 100, strings.Repeat("y", 900))
	if got := agentSeqs(e.storedLogs("app1", 1000), "i-1", "a"); len(got) != 0 {
		t.Fatalf("i-1's StateLogs %v should all be deleted by retention", got)
	}
	if in := e.instance("app1", "i-1"); in.StateLogs != 0 || in.LastStateLog != nil || in.LogStreams["a"] != 10 {
		t.Fatalf("i-1 after retention: %+v", in)
	}
	e.stop()

	e2 := newEnv(t, dir, smallSegments)
	if seq := e2.connect2("i-1", "app1", "tok1", "a").expectAck("a"); seq != 10 {
		t.Fatalf("after retention and restart: first StateLogAck %d, want 10", seq)
	}
	if in := e2.instance("app1", "i-1"); in.StateLogs != 0 || in.LogStreams["a"] != 10 {
		t.Fatalf("i-1 after restart: %+v", in)
	}
}

func TestRetentionByAgeAtStart(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, smallSegments)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.push("i-1", "s1", 1, 12, strings.Repeat("x", 900))
	e.stop()
	segs := segments(t, dir, "app1")
	old := time.Now().Add(-40 * 24 * time.Hour)
	for _, s := range segs[:len(segs)-2] {
		if err := os.Chtimes(s.path, old, old); err != nil {
			t.Fatal(err)
		}
	}
	e2 := newEnv(t, dir, func(o *Options) { o.LogSegmentBytes = 4096 }) // default age: 30 days
	kept := segments(t, dir, "app1")
	if len(kept) != 2 || kept[0].first != segs[len(segs)-2].first {
		t.Fatalf("kept %d segments from seq %d; want the 2 recent ones", len(kept), kept[0].first)
	}
	if logs := e2.storedLogs("app1", 100); logs[0].Seq != kept[0].first || logs[len(logs)-1].Seq != 12 {
		t.Fatalf("served %d..%d", logs[0].Seq, logs[len(logs)-1].Seq)
	}
}

func TestLogsPageBoundedByBytes(t *testing.T) {
	// Fat StateLogs (64 KiB comment and stdout: 128 KiB each), then one
	// of 6 MiB, larger than a page, then a small one.
	e := newEnv(t, "", func(o *Options) { o.MaxOutputBytes = 3 << 20 })
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
		case size > 4<<20: // maxPageBytes
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

func TestListingInstancesReadsNoLogs(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, func(o *Options) { o.LogSegmentBytes = 256 << 10 })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	big := strings.Repeat("z", 32<<10)
	for i := range 4 {
		inst := fmt.Sprintf("i-%d", i)
		a := e.connect2(inst, "app1", "tok"+inst, "s")
		a.expectAck("s")
		a.expectRecipe()
		a.push(inst, "s", 1, 25, big)
	}
	check := func(when string) {
		t.Helper()
		opens := fileLogs(e.srv).segmentOpens.Load()
		for i := range 4 {
			in := e.instance("app1", fmt.Sprintf("i-%d", i))
			// The listing shows the last StateLog with its output cut to
			// summaryOutput; the logs API has it whole.
			if in.StateLogs != 25 || in.LastStateLog == nil || in.LastStateLog.AgentSeq != 25 || len(*in.LastStateLog.Stdout) > summaryOutput ||
				!strings.HasPrefix(*in.LastStateLog.Stdout, "zzz") || !strings.Contains(*in.LastStateLog.Stdout, "truncated") {
				t.Fatalf("%s: summary %+v", when, in)
			}
		}
		if n := fileLogs(e.srv).segmentOpens.Load() - opens; n != 0 {
			t.Fatalf("%s: listing instances opened %d segments", when, n)
		}
	}
	check("with the logs")
	opens := fileLogs(e.srv).segmentOpens.Load()
	e.storedLogs("app1", 10000)
	if fileLogs(e.srv).segmentOpens.Load() == opens {
		t.Fatal("the segment counter does not count: this test proves nothing")
	}
	if err := os.RemoveAll(logsDir(dir, "app1")); err != nil {
		t.Fatal(err)
	}
	check("with the segments deleted")
}

func TestMigrateLegacyLogsJSONL(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	e.connect("i-1", "app1", "tok", "2.1").expectRecipe() // enrolled
	e.stop()
	at := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	out := "<b>done</b>\n"
	var legacy []byte
	var want []LogEntry
	for i, id := range []string{"a", "b", "c"} {
		l := LogEntry{Seq: int64(i + 1), ReceivedAt: at.Add(time.Duration(i) * time.Minute), InstanceID: "i-1", RecipeVersion: 1, StateID: id, Result: i != 1, Stdout: &out}
		line, _ := json.Marshal(l) // the old writer: HTML escaped, no agent_seq
		legacy = append(append(legacy, line...), '\n')
		want = append(want, l)
	}
	legacy = append(legacy, `{"seq":4,"instance_id":"i-`...) // torn by a crash
	legacyPath := filepath.Join(dir, "apps", "app1", legacyLogFile)
	if err := os.WriteFile(legacyPath, legacy, 0o600); err != nil {
		t.Fatal(err)
	}

	e2 := newEnv(t, dir, nil)
	got := e2.storedLogs("app1", 100)
	if len(got) != 3 {
		t.Fatalf("migrated %+v", got)
	}
	for i := range want {
		w, g := want[i], got[i]
		if g.Seq != w.Seq || g.StateID != w.StateID || g.Result != w.Result || !g.ReceivedAt.Equal(w.ReceivedAt) || *g.Stdout != out || g.InstanceID != "i-1" {
			t.Errorf("entry %d: %+v, want %+v", i, g, w)
		}
	}
	if _, err := os.Stat(legacyPath); !os.IsNotExist(err) {
		t.Errorf("logs.jsonl still there after migration: %v", err)
	}
	if in := e2.instance("app1", "i-1"); in.StateLogs != 3 || in.LastStateLog == nil || in.LastStateLog.StateID != "c" {
		t.Errorf("summary after migration: %+v", in)
	}
	a := e2.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	a.send(stateLog("i-1", 0))
	eventually(t, "a new StateLog after the migrated ones", func() bool { return len(e2.storedLogs("app1", 100)) == 4 })
	if last := e2.storedLogs("app1", 100)[3]; last.Seq != 4 {
		t.Errorf("next seq %d, want 4", last.Seq)
	}
	e2.stop()
	if n := len(newEnv(t, dir, nil).storedLogs("app1", 100)); n != 4 {
		t.Errorf("%d StateLogs after a second start, want 4", n)
	}
}

func TestMaxOutputBytesChecked(t *testing.T) {
	_, err := New(Options{DataDir: t.TempDir(), MaxOutputBytes: 10})
	if err == nil || !strings.Contains(err.Error(), "MaxOutputBytes") {
		t.Fatalf("MaxOutputBytes 10: %v", err)
	}
}

func TestStoreFailureClosesWithoutAck(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.push("i-1", "s1", 1, 3, "out")
	// Break the active segment under the writer (mu orders this after its
	// last use and before its next).
	ls := fileLogs(e.srv)
	ls.mu.Lock()
	ls.apps["app1"].active.Close()
	ls.mu.Unlock()
	a.sendLogs("i-1", 4, 5)
	for {
		m, err := a.next()
		var ce *websocket.CloseError
		if errors.As(err, &ce) && ce.Code == websocket.CloseInternalServerErr {
			break
		}
		if err != nil {
			t.Fatalf("after a failed write: %v, want close 1011", err)
		}
		if ack, ok := m.(*protocol.StateLogAck); ok && ack.Seq > 3 {
			t.Fatalf("StateLogAck %d covers StateLogs that were not stored", ack.Seq)
		}
	}
	// The agent reconnects and sends them again; the store recovers on a
	// new segment.
	b := e.connect2("i-1", "app1", "tok", "s1")
	if seq := b.expectAck("s1"); seq != 3 {
		t.Fatalf("reconnect: first StateLogAck %d, want 3", seq)
	}
	b.expectRecipe()
	b.push("i-1", "s1", 4, 5, "out")
	if got := agentSeqs(e.storedLogs("app1", 100), "i-1", "s1"); fmt.Sprint(got) != "[1 2 3 4 5]" {
		t.Fatalf("stored %v", got)
	}
}

// TestRetentionLeavesRoomForTheActiveSegment: retention runs when a
// segment is added, so it keeps room for the new one to fill; a log of
// four full segments and a fresh one under a four-segment limit loses its
// oldest at once, not one segment too late.
func TestRetentionLeavesRoomForTheActiveSegment(t *testing.T) {
	now := time.Now()
	segs := func(sizes ...int64) []*segment {
		var out []*segment
		for i, size := range sizes {
			out = append(out, &segment{first: int64(i + 1), size: size, modTime: now})
		}
		return out
	}
	for _, c := range []struct {
		sizes []int64
		want  int
	}{
		{[]int64{4000, 4000, 4000, 4000, 100}, 1}, // 16 100 bytes now, 19 996 once the active fills
		{[]int64{4000, 4000, 4000, 100}, 0},       // 15 996 once full: within 16 KiB
		{[]int64{4000, 4000, 4000, 4096}, 0},      // the active is full: no room to keep
		{[]int64{100}, 0},                         // the active always stays
	} {
		if got := retentionVictims(segs(c.sizes...), 16<<10, 4096, time.Hour, now); got != c.want {
			t.Errorf("segments %v: %d victims, want %d", c.sizes, got, c.want)
		}
	}
}

// TestNewSegmentNeverOpensAFileItDidNotRead: a new segment is created
// exclusively. A link (or any file) planted where the next segment goes
// was never read by the store, so it is neither appended to nor cut back
// on a failed write: the StateLogs are refused, not acknowledged, and the
// link's target is untouched; once it is gone they are stored.
func TestNewSegmentNeverOpensAFileItDidNotRead(t *testing.T) {
	// Segments of one StateLog each: the next segment's name is known.
	e := newEnv(t, "", func(o *Options) { o.LogSegmentBytes = 4096 })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	out := strings.Repeat("o", 3000)
	a.push("i-1", "s1", 1, 3, out)
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("someone else's file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	next := segmentPath(logsDir(e.dir, "app1"), 4)
	if err := os.Symlink(victim, next); err != nil {
		t.Fatal(err)
	}
	m4 := stateLog("i-1", 4)
	m4.Stdout = &out
	a.send(m4)
	for {
		m, err := a.next()
		var ce *websocket.CloseError
		if errors.As(err, &ce) && ce.Code == websocket.CloseInternalServerErr {
			break
		}
		if err != nil {
			t.Fatalf("StateLog 4: %v, want close 1011", err)
		}
		if ack, ok := m.(*protocol.StateLogAck); ok && ack.Seq > 3 {
			t.Fatalf("StateLogAck %d: StateLog 4 was acknowledged", ack.Seq)
		}
	}
	if data, _ := os.ReadFile(victim); string(data) != "someone else's file\n" {
		t.Fatalf("the link's target was written: %q", data)
	}
	if err := os.Remove(next); err != nil {
		t.Fatal(err)
	}
	b := e.connect2("i-1", "app1", "tok", "s1")
	if seq := b.expectAck("s1"); seq != 3 {
		t.Fatalf("first StateLogAck %d, want 3", seq)
	}
	b.expectRecipe()
	b.push("i-1", "s1", 4, 4, out)
	if got := agentSeqs(e.storedLogs("app1", 100), "i-1", "s1"); fmt.Sprint(got) != "[1 2 3 4]" {
		t.Fatalf("stored %v", got)
	}
}
