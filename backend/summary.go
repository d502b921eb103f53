package backend

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
)

// instSummary is what GET /api/apps/{app}/instances shows about one
// instance's StateLogs. It is kept in memory and rebuilt at start, so that
// a listing never reads the logs however large they are.
type instSummary struct {
	last     *LogEntry // newest retained StateLog; never changed once published
	count    int64     // retained StateLogs
	lastRecv time.Time
	// streams maps log stream → highest agent seq stored. It outlives
	// retention (streams.json), as it decides what is a duplicate.
	streams map[string]int64
}

// entryMeta is the part of a stored line the start-up scan needs; decoding
// only these fields skips the large strings without allocating them.
type entryMeta struct {
	Seq        int64     `json:"seq"`
	ReceivedAt time.Time `json:"received_at"`
	InstanceID string    `json:"instance_id"`
	LogStream  string    `json:"log_stream"`
	AgentSeq   int64     `json:"agent_seq"`
}

// summaryOutput bounds what a summary keeps of a StateLog's comment and
// output: the listing shows the last StateLog at a glance, and the whole
// one is in the logs. Without it 10 000 instances could pin gigabytes.
const summaryOutput = 1 << 10

func summaryCopy(e *LogEntry) *LogEntry {
	cp := *e
	cp.Comment = capOutput(cp.Comment, summaryOutput)
	cp.Stdout = capOutput(cp.Stdout, summaryOutput)
	return &cp
}

func (e *LogEntry) meta() entryMeta {
	return entryMeta{Seq: e.Seq, ReceivedAt: e.ReceivedAt, InstanceID: e.InstanceID, LogStream: e.LogStream, AgentSeq: e.AgentSeq}
}

func (a *appLog) inst(id string) *instSummary {
	in := a.insts[id]
	if in == nil {
		in = &instSummary{streams: map[string]int64{}}
		a.insts[id] = in
	}
	return in
}

// noteStored counts one stored StateLog in its segment and its instance's
// summary; last is the entry itself when known (the start-up scan fills it
// in afterwards).
func (a *appLog) noteStored(seg *segment, m entryMeta, last *LogEntry) {
	seg.counts[m.InstanceID]++
	in := a.inst(m.InstanceID)
	in.count++
	in.lastRecv = m.ReceivedAt
	if last != nil {
		in.last = summaryCopy(last)
	}
	if m.LogStream != "" && m.AgentSeq > in.streams[m.LogStream] {
		in.streams[m.LogStream] = m.AgentSeq
		a.streamsDirty = true
	}
}

// forget uncounts a segment deleted by retention. An instance left with no
// StateLog shows none, as it would after a restart; its stream highs stay.
func (a *appLog) forget(seg *segment) {
	for id, n := range seg.counts {
		in := a.insts[id]
		if in == nil {
			continue
		}
		if in.count -= n; in.count <= 0 {
			in.count, in.last, in.lastRecv = 0, nil, time.Time{}
		}
	}
}

// high is the highest seq stored for an instance's stream (0: none).
func (a *appLog) high(instance, stream string) int64 {
	if in := a.insts[instance]; in != nil {
		return in.streams[stream]
	}
	return 0
}

func (ls *logStore) high(a *appLog, instance, stream string) int64 {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return a.high(instance, stream)
}

// highSeq is what a protocol-2 Handshake is acknowledged with.
func (ls *logStore) highSeq(app, instance, stream string) int64 {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if a := ls.apps[app]; a != nil {
		return a.high(instance, stream)
	}
	return 0
}

// summaries copies an app's instance summaries for a listing.
func (ls *logStore) summaries(app string) map[string]instSummary {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	out := map[string]instSummary{}
	a := ls.apps[app]
	if a == nil {
		return out
	}
	for id, in := range a.insts {
		cp := *in
		cp.streams = maps.Clone(in.streams)
		out[id] = cp
	}
	return out
}

// lastSeq is the app's last stored backend seq.
func (ls *logStore) lastSeq(app string) int64 {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if a := ls.apps[app]; a != nil {
		return a.lastSeq
	}
	return 0
}

// lineLoc is where an instance's newest line is, found by the scan.
type lineLoc struct {
	seg *segment
	off int64
	n   int
}

// scan rebuilds the summaries from every segment in one streaming pass,
// then reads each instance's newest line.
func (ls *logStore) scan(a *appLog) error {
	locs := map[string]lineLoc{}
	var prev int64
	for _, seg := range a.segs {
		if err := ls.scanSegment(a, seg, &prev, locs); err != nil {
			return err
		}
	}
	a.lastSeq = max(a.lastSeq, prev)
	if n := len(a.segs); n > 0 {
		a.lastSeq = max(a.lastSeq, a.segs[n-1].first-1)
	}
	return ls.loadLastEntries(a, locs)
}

// scanSegment counts a segment's lines. Lines that are not JSON, or out of
// seq order, are skipped; when they end the file (a crash mid-write: never
// acknowledged) the file is cut back to its last good line, so that the
// next append starts on a clean line.
func (ls *logStore) scanSegment(a *appLog, seg *segment, prev *int64, locs map[string]lineLoc) error {
	f, err := os.OpenFile(seg.path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("StateLog segment: %w (fix its permissions)", err)
	}
	defer f.Close()
	lr := newLineReader(f)
	var good int64
	bad := 0
	for {
		start := lr.off
		line, complete, err := lr.next()
		if errors.Is(err, io.EOF) || err == nil && !complete {
			break
		}
		if err != nil {
			return fmt.Errorf("StateLog segment %s: %w", seg.path, err)
		}
		var m entryMeta
		if json.Unmarshal(line, &m) != nil || m.Seq <= *prev {
			bad++
			continue
		}
		*prev, good = m.Seq, lr.off
		a.noteStored(seg, m, nil)
		locs[m.InstanceID] = lineLoc{seg, start, len(line)}
	}
	if bad > 0 {
		ls.log.Warn("skipped unreadable lines in a StateLog segment", "path", seg.path, "lines", bad)
	}
	if good == seg.size {
		return nil
	}
	// Cutting it off is a write, which a full or read-only disk may
	// refuse: then the segment is left as it is and not appended to.
	err = f.Truncate(good)
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		ls.log.Warn("cannot cut a torn tail off a StateLog segment; the next StateLogs go to a new one", "path", seg.path, "err", err)
		seg.torn = true
		return nil
	}
	ls.log.Warn("cut a torn tail off a StateLog segment (a crash mid-write; none of it was acknowledged)", "path", seg.path, "bytes", seg.size-good)
	seg.size = good
	return nil
}

// loadLastEntries decodes each instance's newest line in full.
func (ls *logStore) loadLastEntries(a *appLog, locs map[string]lineLoc) error {
	bySeg := map[*segment][]string{}
	for id, loc := range locs {
		bySeg[loc.seg] = append(bySeg[loc.seg], id)
	}
	for seg, ids := range bySeg {
		if err := readLastEntries(a, seg, ids, locs); err != nil {
			return err
		}
	}
	return nil
}

func readLastEntries(a *appLog, seg *segment, ids []string, locs map[string]lineLoc) error {
	f, err := os.Open(seg.path)
	if err != nil {
		return fmt.Errorf("StateLog segment: %w", err)
	}
	defer f.Close()
	for _, id := range ids {
		loc := locs[id]
		buf := make([]byte, loc.n)
		if _, err := f.ReadAt(buf, loc.off); err != nil {
			return fmt.Errorf("StateLog segment %s: %w", seg.path, err)
		}
		var e LogEntry
		if err := json.Unmarshal(buf, &e); err != nil {
			return fmt.Errorf("StateLog segment %s at %d: %w", seg.path, loc.off, err)
		}
		a.insts[id].last = summaryCopy(&e)
	}
	return nil
}

// streamsDoc is apps/<app>/streams.json: the highest seq stored per
// instance and stream, which must survive the segments holding them, and
// the last backend seq, so that API cursors never go back.
type streamsDoc struct {
	LogSeq  int64                       `json:"log_seq"`
	Streams map[string]map[string]int64 `json:"streams"`
}

func (ls *logStore) streamsPath(app string) string {
	return filepath.Join(ls.root, app, streamsFileName)
}

// loadStreams reads streams.json; the scan then raises what the segments
// say. An unreadable file is rebuilt from the segments.
func (ls *logStore) loadStreams(a *appLog) error {
	path := ls.streamsPath(a.id)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w (fix its permissions)", path, err)
	}
	var doc streamsDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		ls.log.Warn("stream highs unreadable; rebuilt from the StateLog segments (deleted ones are forgotten)", "path", path, "err", err)
		a.streamsDirty = true
		return nil
	}
	a.lastSeq = doc.LogSeq
	for id, streams := range doc.Streams {
		in := a.inst(id)
		for st, seq := range streams {
			in.streams[st] = max(in.streams[st], seq)
		}
	}
	return nil
}

// saveStreams rewrites streams.json atomically. Writer (or start) only.
func (ls *logStore) saveStreams(a *appLog) error {
	doc := streamsDoc{LogSeq: a.lastSeq, Streams: map[string]map[string]int64{}}
	for id, in := range a.insts {
		if len(in.streams) > 0 {
			doc.Streams[id] = in.streams
		}
	}
	data, err := json.Marshal(&doc)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(ls.streamsPath(a.id), data, 0o600); err != nil {
		return fmt.Errorf("stream highs: %w", err)
	}
	a.streamsDirty, a.streamsSaved = false, time.Now()
	return nil
}

// saveStreamsDue saves the stale streams.json files last saved over a
// second ago, and reports whether some are still stale.
func (ls *logStore) saveStreamsDue(now time.Time) bool {
	for a := range ls.dirty {
		if now.Sub(a.streamsSaved) < streamsEvery {
			continue
		}
		if err := ls.saveStreams(a); err != nil {
			ls.log.Error("cannot save the stream highs; retrying", "app_id", a.id, "err", err)
			continue
		}
		delete(ls.dirty, a)
	}
	return len(ls.dirty) > 0
}
