package backend

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

// StateLogs live per app in segment files, apps/<app>/logs/<first seq>.jsonl,
// one LogEntry a line, written only by the log writer goroutine. It stores
// them in groups (group commit): it collects what the connections hand it
// for a few milliseconds, writes each app's share with one write, fsyncs
// once and only then acknowledges protocol-2 agents. Old segments are
// deleted whole (retention by bytes and age), so storage stays bounded and a
// page of the API reads one or two segments, found by name.

const (
	logsDirName      = "logs"
	segmentExt       = ".jsonl"
	streamsFileName  = "streams.json"
	legacyLogFile    = "logs.jsonl" // the single file of earlier versions
	maxBatchEntries  = 1024
	maxBatchBytes    = 4 << 20
	submitQueue      = 512      // StateLogs waiting for the writer; bounds their memory
	maxLogLine       = 64 << 20 // longer lines are garbage, not a reason to buffer more
	minOutputBytes   = 64       // room for the truncation marker
	seqPrefix        = `{"seq":`
	defaultSegment   = 16 << 20
	defaultRetention = 1 << 30
	defaultAge       = 30 * 24 * time.Hour
	defaultOutput    = 64 << 10
	defaultCommit    = 2 * time.Millisecond
	maxPageBytes     = 4 << 20 // stored StateLogs per API page; a larger single StateLog is served alone
	streamsEvery     = time.Second
)

var errLogsClosed = errors.New("the StateLog store is closed (the backend is shutting down)")

// logOptions are the Options of the log store, defaults applied.
type logOptions struct {
	segmentBytes   int64
	retentionBytes int64
	retentionAge   time.Duration
	maxOutput      int
	commitDelay    time.Duration
}

// logStore owns every app's StateLog segments.
type logStore struct {
	root string // <data>/apps
	opts logOptions
	log  *slog.Logger
	in   chan *logReq
	done chan struct{} // closed when the writer has flushed and exited

	submitMu sync.RWMutex // held for reading while a StateLog is handed over
	closed   bool

	// mu guards apps and, in each appLog, the fields marked (mu). The
	// writer is the only goroutine that changes them, so it may read them
	// without mu.
	mu   sync.Mutex
	apps map[string]*appLog

	dirty    map[*appLog]struct{} // writer only: apps whose streams.json is stale
	closeErr error                // set by the writer before done is closed
	// errLog spaces the lines about StateLogs that could not be stored
	// (writer only): on a full disk every agent's resend would log one.
	errLog logLimiter

	// segmentOpens counts segment files opened for reading, so tests can
	// prove that a listing reads none and a page reads few.
	segmentOpens atomic.Int64
}

// logReq is one StateLog handed to the writer.
type logReq struct {
	app   string
	entry LogEntry // Seq still 0; field caps applied
	rest  []byte   // entry's JSON line after `{"seq":0`, encoded by the reader goroutine
	ack   acker    // the protocol-2 connection to acknowledge, or nil
}

// appLog is one app's segments and summaries.
type appLog struct {
	id, dir string

	segs     []*segment              // (mu) oldest first; the last is the active one
	lastSeq  int64                   // (mu) last backend seq durably stored; readers stop there
	assigned int64                   // (mu) last backend seq handed out
	insts    map[string]*instSummary // (mu)

	// Writer only.
	active       *os.File // the last segment, open for appending
	newFile      bool     // a segment was created since the last directory fsync
	rotated      bool     // a segment was added in this batch: check retention
	dirReady     bool     // logs/ exists and its creation is durable
	streamsDirty bool
	streamsSaved time.Time
}

// segment is one file of an app's log. first and path never change; the
// rest belongs to the writer.
type segment struct {
	first   int64
	path    string
	size    int64
	modTime time.Time
	counts  map[string]int64 // instance → StateLogs in this segment
	torn    bool             // ends in a torn line that could not be cut off: never appended to
}

// item is a StateLog of a batch that is to be stored.
type item struct {
	req *logReq
	seq int64
	seg *segment // where it was written
}

func newLogStore(root string, opts logOptions, log *slog.Logger) *logStore {
	return &logStore{
		root: root, opts: opts, log: log,
		in:     make(chan *logReq, submitQueue),
		done:   make(chan struct{}),
		apps:   map[string]*appLog{},
		dirty:  map[*appLog]struct{}{},
		errLog: logLimiter{every: 10 * time.Second},
	}
}

// load opens one app's StateLogs and hands them to the writer. It reads
// on the caller's goroutine: the writer sees the app only once it is
// registered here, so it goes on storing other apps' StateLogs meanwhile.
// On error nothing is registered, and a later load reads everything again.
func (ls *logStore) load(id string) error {
	a, err := ls.openApp(id)
	if err != nil {
		return err
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.apps[id] != nil || ls.closed {
		if a.active != nil {
			_ = a.active.Close()
		}
		if ls.closed {
			return errLogsClosed
		}
		return fmt.Errorf("app %s: its StateLogs are already open", id)
	}
	ls.apps[id] = a
	return nil
}

// submit hands a StateLog to the writer, after capping and encoding it on
// the caller's goroutine. It blocks only while the writer's queue is full.
// ack, when not nil, is the connection to acknowledge once it is stored.
func (ls *logStore) submit(app string, e LogEntry, ack acker) error {
	capEntry(&e, ls.opts.maxOutput)
	rest, err := encodeRest(e)
	if err != nil {
		return err
	}
	ls.submitMu.RLock()
	defer ls.submitMu.RUnlock()
	if ls.closed {
		return errLogsClosed
	}
	ls.in <- &logReq{app: app, entry: e, rest: rest, ack: ack}
	return nil
}

// close stores what was handed over, saves streams.json and stops the
// writer.
func (ls *logStore) close() error {
	ls.submitMu.Lock()
	ls.mu.Lock() // load checks closed under mu
	if !ls.closed {
		ls.closed = true
		close(ls.in) // no submit can be sending: they hold submitMu
	}
	ls.mu.Unlock()
	ls.submitMu.Unlock()
	<-ls.done
	return ls.closeErr
}

// run is the writer goroutine.
func (ls *logStore) run() {
	defer close(ls.done)
	timer := time.NewTimer(ls.opts.commitDelay)
	var flushC <-chan time.Time
	for {
		select {
		case r, ok := <-ls.in:
			if !ok {
				ls.finish()
				return
			}
			batch, open := ls.collect(r, timer)
			ls.commit(batch)
			if !open {
				ls.finish()
				return
			}
		case <-flushC:
			flushC = nil
		}
		if !ls.saveStreamsDue(time.Now()) {
			flushC = nil
		} else if flushC == nil {
			flushC = time.After(streamsEvery)
		}
	}
}

// collect gathers StateLogs for one commit: whatever arrives within the
// commit delay, up to a full batch. open is false once the store closed.
func (ls *logStore) collect(first *logReq, timer *time.Timer) (batch []*logReq, open bool) {
	batch = []*logReq{first}
	size := len(first.rest)
	timer.Reset(ls.opts.commitDelay)
	for len(batch) < maxBatchEntries && size < maxBatchBytes {
		select {
		case r, ok := <-ls.in:
			if !ok {
				return batch, false
			}
			batch = append(batch, r)
			size += len(r.rest)
		case <-timer.C:
			return batch, true
		}
	}
	return batch, true
}

// finish runs when the store closes: every batch is already fsynced, so
// what is left is streams.json and the open files.
func (ls *logStore) finish() {
	var errs []error
	for a := range ls.dirty {
		if err := ls.saveStreams(a); err != nil {
			errs = append(errs, err)
		}
	}
	ls.mu.Lock() // load registers apps from other goroutines
	for _, a := range ls.apps {
		if a.active != nil {
			_ = a.active.Close()
			a.active = nil
		}
	}
	ls.mu.Unlock()
	ls.closeErr = errors.Join(errs...)
}

// appBatch is one app's share of a commit.
type appBatch struct {
	a     *appLog
	items []item
}

// ackTo is where a connection's acknowledgement points.
type ackTo struct {
	a                *appLog
	instance, stream string
}

// errNotLoaded refuses a StateLog of an app whose StateLogs are not open.
var errNotLoaded = errors.New("the app's StateLogs are not loaded")

type streamKey struct{ app, instance, stream string }

// commit stores a batch: dedup, write and fsync per app, publish to
// readers, then one StateLogAck per protocol-2 connection.
func (ls *logStore) commit(batch []*logReq) {
	apps, acks := ls.plan(batch)
	var rotated []*appLog
	for _, ab := range apps {
		if len(ab.items) == 0 {
			continue
		}
		n, err := ls.writeApp(ab.a, ab.items)
		ls.publish(ab.a, ab.items[:n])
		ls.logStored(ab.items[:n])
		if err != nil {
			ls.failed(ab.a, ab.items[n:], err)
		}
		if ab.a.rotated {
			ab.a.rotated = false
			rotated = append(rotated, ab.a)
		}
	}
	// Retention runs only when a segment was added (every segmentBytes),
	// so doing it before the acks costs them little, and an acknowledged
	// agent sees the store already trimmed.
	for _, a := range rotated {
		ls.retain(a, time.Now())
	}
	for c, to := range acks {
		if !c.refused() {
			c.ack(to.stream, ls.high(to.a, to.instance, to.stream))
		}
	}
}

// plan drops duplicates and hands out backend seqs. A StateLog is a
// duplicate when its stream already has its seq or a higher one, stored or
// earlier in this batch.
func (ls *logStore) plan(batch []*logReq) (map[string]*appBatch, map[acker]ackTo) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	apps := map[string]*appBatch{}
	acks := map[acker]ackTo{}
	pending := map[streamKey]int64{}
	for _, r := range batch {
		if r.ack != nil && r.ack.refused() {
			continue // its connection is closing; the agent sends it again
		}
		ab := apps[r.app]
		if ab == nil {
			a := ls.apps[r.app]
			if a == nil {
				// Never opened afresh: whatever is stored of the app has
				// not been read, so nothing may be written next to it.
				ls.refuse(r, errNotLoaded)
				continue
			}
			ab = &appBatch{a: a}
			apps[r.app] = ab
		}
		e := &r.entry
		if r.ack != nil {
			acks[r.ack] = ackTo{ab.a, e.InstanceID, e.LogStream}
		}
		if e.LogStream != "" && e.AgentSeq > 0 {
			k := streamKey{r.app, e.InstanceID, e.LogStream}
			high, ok := pending[k]
			if !ok {
				high = ab.a.high(e.InstanceID, e.LogStream)
			}
			if e.AgentSeq <= high {
				continue
			}
			pending[k] = e.AgentSeq
		}
		ab.a.assigned++
		ab.items = append(ab.items, item{req: r, seq: ab.a.assigned})
	}
	return apps, acks
}

// publish makes durably stored items visible: summaries, stream highs and
// the readers' bound.
func (ls *logStore) publish(a *appLog, items []item) {
	if len(items) == 0 {
		return
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	for _, it := range items {
		e := it.req.entry
		e.Seq = it.seq
		a.noteStored(it.seg, e.meta(), &e)
	}
	a.lastSeq = items[len(items)-1].seq
	if a.streamsDirty {
		ls.dirty[a] = struct{}{}
	}
}

// failed handles items that could not be stored. Their seqs stay used, so
// no later entry can collide with a partly written one. Protocol-2
// connections are closed without acknowledgement: a later ack would cover
// the lost seqs, while after a reconnect the agent sends them again.
func (ls *logStore) failed(a *appLog, items []item, err error) {
	lost := 0
	for _, it := range items {
		c := it.req.ack
		if c == nil {
			lost++
			continue
		}
		c.refuse("backend could not store StateLogs; reconnect to send them again")
	}
	ls.logError("cannot store StateLogs: check the disk (full? read-only?); protocol-2 agents were disconnected and will resend theirs",
		"app_id", a.id, "dir", a.dir, "statelogs", len(items), "lost_protocol1", lost, "err", err)
}

// refuse turns away one StateLog that cannot be stored, and says so.
func (ls *logStore) refuse(r *logReq, err error) {
	if r.ack != nil {
		r.ack.refuse("backend could not store StateLogs; reconnect to send them again")
	}
	ls.logError("StateLog refused", "app_id", r.app, "instance_id", r.entry.InstanceID, "lost_protocol1", r.ack == nil, "err", err)
}

// logError logs one line per interval about StateLogs not stored, and how
// many such lines were held back.
func (ls *logStore) logError(msg string, args ...any) {
	ok, suppressed := ls.errLog.allow(time.Now())
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed_since_last", suppressed)
	}
	ls.log.Error(msg, args...)
}

func (ls *logStore) logStored(items []item) {
	for _, it := range items {
		e := &it.req.entry
		lvl := slog.LevelInfo
		if !e.Result {
			lvl = slog.LevelWarn
		}
		comment := ""
		if e.Comment != nil {
			comment = clip(firstLine(*e.Comment))
		}
		ls.log.Log(context.Background(), lvl, "StateLog", "app_id", it.req.app, "instance_id", e.InstanceID, "recipe_version", e.RecipeVersion,
			"state_id", clip(e.StateID), "result", e.Result, "comment", comment, "seq", it.seq)
	}
}

// writeApp appends items to the app's active segment, rotating when it
// would outgrow segmentBytes, and makes them durable. n is how many items
// (a prefix) are durably stored.
func (ls *logStore) writeApp(a *appLog, items []item) (n int, err error) {
	var buf []byte
	pending := 0
	for i := range items {
		it := &items[i]
		if a.needsRotation(int64(len(buf)), int64(lineLen(it.seq, it.req.rest)), ls.opts.segmentBytes) {
			if err := ls.flush(a, buf); err != nil {
				return n, err
			}
			n, pending, buf = n+pending, 0, buf[:0]
			if err := ls.rotate(a, it.seq); err != nil {
				return n, err
			}
		}
		buf = appendLine(buf, it.seq, it.req.rest)
		it.seg = a.segs[len(a.segs)-1]
		pending++
	}
	if err := ls.flush(a, buf); err != nil {
		return n, err
	}
	return n + pending, nil
}

// needsRotation reports whether a line must start a new segment: there is
// no active one, or the line would take a non-empty one (pending bytes
// included) over limit.
func (a *appLog) needsRotation(pending, line, limit int64) bool {
	if a.active == nil {
		return true
	}
	used := a.segs[len(a.segs)-1].size + pending
	return used > 0 && used+line > limit
}

// flush writes buf to the active segment and fsyncs it (and the directory
// when a segment was created). On failure the segment is cut back and
// abandoned: the next StateLog starts a new one.
func (ls *logStore) flush(a *appLog, buf []byte) error {
	if a.active == nil {
		return nil
	}
	seg := a.segs[len(a.segs)-1]
	err := writeSync(a.active, buf)
	if err == nil && a.newFile {
		err = fsutil.SyncDir(a.dir)
	}
	if err != nil {
		_ = a.active.Truncate(seg.size)
		_ = a.active.Close()
		a.active = nil
		return fmt.Errorf("segment %s: %w", seg.path, err)
	}
	a.newFile = false
	seg.size += int64(len(buf))
	seg.modTime = time.Now()
	return nil
}

func writeSync(f *os.File, buf []byte) error {
	if len(buf) > 0 {
		if _, err := f.Write(buf); err != nil {
			return err
		}
	}
	return f.Sync()
}

// rotate closes the active segment and starts one named by seq.
func (ls *logStore) rotate(a *appLog, seq int64) error {
	if a.active != nil {
		_ = a.active.Close() // flush fsynced it
		a.active = nil
	}
	if err := a.prepareDir(); err != nil {
		return err
	}
	path := segmentPath(a.dir, seq)
	if n := len(a.segs); n > 0 && a.segs[n-1].first == seq {
		// A segment this writer created, left empty by a failed write:
		// reuse it, if it still is what the writer knows of it.
		return ls.reopen(a, a.segs[n-1])
	}
	// O_EXCL: a file already there was never read, so it is not ours to
	// append to (nor, on a failed write, to cut back).
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("new segment: %w", err)
	}
	a.active, a.newFile, a.rotated = f, true, true
	ls.mu.Lock()
	a.segs = append(a.segs, &segment{first: seq, path: path, modTime: time.Now(), counts: map[string]int64{}})
	ls.mu.Unlock()
	return nil
}

// reopen opens a known segment for appending, after checking that its
// size is what the writer last wrote or read there.
func (ls *logStore) reopen(a *appLog, seg *segment) error {
	f, err := os.OpenFile(seg.path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("StateLog segment: %w", err)
	}
	st, err := f.Stat()
	if err == nil && st.Size() != seg.size {
		err = fmt.Errorf("%d bytes, %d expected: it changed behind the backend's back", st.Size(), seg.size)
	}
	if err != nil {
		_ = f.Close()
		return fmt.Errorf("StateLog segment %s: %w", seg.path, err)
	}
	a.active, a.newFile = f, true
	return nil
}

// prepareDir creates logs/ durably the first time.
func (a *appLog) prepareDir() error {
	if a.dirReady {
		return nil
	}
	if err := os.MkdirAll(a.dir, 0o700); err != nil {
		return fmt.Errorf("StateLog directory: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(a.dir)); err != nil {
		return err
	}
	a.dirReady = true
	return nil
}

// retain deletes the oldest segments while the app's log is over
// retentionBytes or they are older than retentionAge; the active segment
// always stays. streams.json is saved first: the stream highs must outlive
// the StateLogs that set them.
func (ls *logStore) retain(a *appLog, now time.Time) {
	n := retentionVictims(a.segs, ls.opts.retentionBytes, ls.opts.segmentBytes, ls.opts.retentionAge, now)
	if n == 0 {
		return
	}
	if a.streamsDirty {
		if err := ls.saveStreams(a); err != nil {
			ls.log.Error("cannot save the stream highs; old StateLog segments are kept until it works", "app_id", a.id, "err", err)
			return
		}
	}
	ls.mu.Lock()
	victims := a.segs[:n]
	a.segs = slices.Clone(a.segs[n:])
	var bytes int64
	for _, seg := range victims {
		a.forget(seg)
		bytes += seg.size
	}
	ls.mu.Unlock()
	for _, seg := range victims {
		if err := os.Remove(seg.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			ls.log.Warn("cannot delete an old StateLog segment; remove it by hand", "path", seg.path, "err", err)
		}
	}
	ls.log.Info("StateLog retention deleted old segments", "app_id", a.id, "segments", n, "bytes", bytes)
}

// retentionVictims is how many of the oldest segments to delete. Room is
// kept for the active (last) segment to fill up to segmentBytes before the
// next rotation trims again, so that the log on disk never exceeds
// maxBytes, whenever it is looked at.
func retentionVictims(segs []*segment, maxBytes, segmentBytes int64, maxAge time.Duration, now time.Time) int {
	var total int64
	for _, s := range segs {
		total += s.size
	}
	if len(segs) > 0 {
		total += max(0, segmentBytes-segs[len(segs)-1].size)
	}
	n := 0
	for ; n < len(segs)-1; n++ {
		s := segs[n]
		if total <= maxBytes && now.Sub(s.modTime) <= maxAge {
			break
		}
		total -= s.size
	}
	return n
}

// pageLimit bounds one read: at most limit entries and, past the first
// entry, at most maxBytes of them as stored (JSONL lines).
type pageLimit struct {
	limit    int
	maxBytes int
	bytes    int // stored bytes of the entries taken so far
}

// full reports whether an entry of n stored bytes no longer fits.
func (p *pageLimit) full(taken, n int) bool {
	return taken >= p.limit || taken > 0 && p.bytes+n > p.maxBytes
}

// read returns the entries with seq > after that fit one page: at most
// limit of them and at most maxBytes as stored, but always at least one
// when there is one, however large. more reports that the page ends before
// the last stored entry. It opens only the segment holding after+1 (found
// by name) and those after it.
func (ls *logStore) read(app string, after int64, limit, maxBytes int) (out []LogEntry, more bool, err error) {
	segs, last := ls.snapshot(app)
	out = []LogEntry{}
	if after >= last || len(segs) == 0 {
		return out, false, nil
	}
	p := &pageLimit{limit: limit, maxBytes: maxBytes}
	i := sort.Search(len(segs), func(i int) bool { return segs[i].first > after+1 }) - 1
	for i = max(i, 0); i < len(segs) && len(out) < limit; i++ {
		done, err := ls.readSegment(segs[i].path, after, last, p, &out)
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted by retention since the snapshot
		}
		if err != nil {
			return nil, false, err
		}
		if done {
			break
		}
	}
	return out, len(out) > 0 && out[len(out)-1].Seq < last, nil
}

// snapshot is the app's segment list and the last readable seq.
func (ls *logStore) snapshot(app string) ([]*segment, int64) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	a := ls.apps[app]
	if a == nil {
		return nil, 0
	}
	return slices.Clone(a.segs), a.lastSeq
}

// readSegment appends the entries of one segment with after < seq <= last
// to out while they fit the page; done means nothing further is wanted.
func (ls *logStore) readSegment(path string, after, last int64, p *pageLimit, out *[]LogEntry) (done bool, err error) {
	f, err := ls.openSegment(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	lr := newLineReader(f)
	for {
		line, complete, err := lr.next()
		if errors.Is(err, io.EOF) || err == nil && !complete {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("segment %s: %w", path, err)
		}
		seq, ok := lineSeq(line)
		if ok && seq <= after {
			continue
		}
		if ok && seq > last {
			return true, nil // not yet durable, or being written
		}
		if p.full(len(*out), len(line)) {
			return true, nil // checked before decoding what is left out
		}
		var e LogEntry
		if json.Unmarshal(line, &e) != nil || e.Seq <= after {
			continue // a garbage line left by a crash
		}
		if e.Seq > last {
			return true, nil
		}
		*out = append(*out, e)
		p.bytes += len(line)
		if len(*out) >= p.limit {
			return true, nil
		}
	}
}

func (ls *logStore) openSegment(path string) (*os.File, error) {
	ls.segmentOpens.Add(1)
	return os.Open(path)
}

// lineSeq reads the seq at the start of a stored line without decoding the
// rest, so skipping to a page's start is cheap.
func lineSeq(line []byte) (int64, bool) {
	rest, ok := bytes.CutPrefix(line, []byte(seqPrefix))
	if !ok {
		return 0, false
	}
	end := bytes.IndexByte(rest, ',')
	if end < 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(string(rest[:end]), 10, 64)
	return n, err == nil
}

func lineLen(seq int64, rest []byte) int {
	var num [20]byte
	return len(seqPrefix) + len(strconv.AppendInt(num[:0], seq, 10)) + len(rest)
}

func appendLine(buf []byte, seq int64, rest []byte) []byte {
	buf = append(buf, seqPrefix...)
	buf = strconv.AppendInt(buf, seq, 10)
	return append(buf, rest...)
}

// encodeRest renders e (its Seq ignored) as a stored line less its
// `{"seq":N` start, which the writer adds once it knows N. Encoding here,
// on the connection's goroutine, keeps the single writer lean.
func encodeRest(e LogEntry) ([]byte, error) {
	e.Seq = 0
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // stdout is often HTML or shell: keep it readable and small
	if err := enc.Encode(&e); err != nil {
		return nil, fmt.Errorf("encode StateLog: %w", err)
	}
	rest, ok := bytes.CutPrefix(buf.Bytes(), []byte(seqPrefix+"0"))
	if !ok {
		return nil, errors.New("encode StateLog: seq is not the first field of LogEntry")
	}
	return rest, nil
}

// capEntry bounds what one StateLog may store: comment and stdout at
// maxOutput bytes each (the agent's own output limit), state_id at the
// protocol's limit.
func capEntry(e *LogEntry, maxOutput int) {
	e.StateID = textcut.Prefix(e.StateID, protocol.MaxStateIDBytes)
	e.Comment = capOutput(e.Comment, maxOutput)
	e.Stdout = capOutput(e.Stdout, maxOutput)
}

func capOutput(s *string, limit int) *string {
	if s == nil || len(*s) <= limit {
		return s
	}
	t := truncateOutput(*s, limit)
	return &t
}

// truncateOutput cuts s on a character boundary and says how much was cut;
// the result, marker included, is at most limit bytes.
func truncateOutput(s string, limit int) string {
	// The marker for len(s) dropped bytes is at least as long as the real one.
	keep := textcut.Prefix(s, max(limit-len(truncMarker(len(s))), 0))
	return keep + truncMarker(len(s)-len(keep))
}

func truncMarker(n int) string { return "[… truncated " + strconv.Itoa(n) + " bytes]" }

func segmentPath(dir string, first int64) string {
	return filepath.Join(dir, fmt.Sprintf("%020d%s", first, segmentExt))
}

func (ls *logStore) appLogsDir(app string) string { return filepath.Join(ls.root, app, logsDirName) }

func newAppLog(id, dir string) *appLog {
	return &appLog{id: id, dir: dir, insts: map[string]*instSummary{}}
}

// openApp loads one app's log at start: stream highs, every retained
// segment (one streaming pass, torn tails cut off), the old logs.jsonl
// migrated, retention applied.
func (ls *logStore) openApp(id string) (*appLog, error) {
	a := newAppLog(id, ls.appLogsDir(id))
	if err := ls.loadStreams(a); err != nil {
		return nil, err
	}
	segs, err := listSegments(a.dir)
	if err != nil {
		return nil, err
	}
	a.segs = segs
	if err := ls.scan(a); err != nil {
		return nil, err
	}
	a.assigned = a.lastSeq
	if err := ls.migrateLegacy(a); err != nil {
		return nil, err
	}
	if err := ls.openActive(a); err != nil {
		return nil, err
	}
	a.rotated = false
	ls.retain(a, time.Now())
	if a.streamsDirty {
		// Not fatal: the highs are in the segments, and the writer saves
		// them with the next StateLogs. Loading must not need a write (a
		// full disk would keep the app from loading at all).
		if err := ls.saveStreams(a); err != nil {
			ls.log.Warn("cannot save the stream highs; saved with the next StateLogs", "app_id", a.id, "err", err)
		}
	}
	return a, nil
}

// openActive reopens the newest segment for appending, unless its torn
// tail could not be cut off: then the next StateLog starts a new segment.
func (ls *logStore) openActive(a *appLog) error {
	if len(a.segs) == 0 || a.active != nil {
		return nil
	}
	a.dirReady = true
	last := a.segs[len(a.segs)-1]
	if last.torn {
		return nil
	}
	f, err := os.OpenFile(last.path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("StateLog segment: %w (fix its permissions)", err)
	}
	a.active = f
	return nil
}

// listSegments finds <first seq>.jsonl files, oldest first.
func listSegments(dir string) ([]*segment, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("StateLog directory: %w (fix its permissions)", err)
	}
	var segs []*segment
	for _, e := range entries {
		num, ok := strings.CutSuffix(e.Name(), segmentExt)
		first, err := strconv.ParseInt(num, 10, 64)
		if !ok || err != nil || first <= 0 || !e.Type().IsRegular() {
			continue // temporary or foreign files
		}
		info, err := e.Info()
		if err != nil {
			return nil, fmt.Errorf("StateLog segment %s: %w", e.Name(), err)
		}
		segs = append(segs, &segment{first: first, path: filepath.Join(dir, e.Name()), size: info.Size(), modTime: info.ModTime(), counts: map[string]int64{}})
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].first < segs[j].first })
	return segs, nil
}

// migrateLegacy moves <app>/logs.jsonl of earlier versions into segments,
// keeping its seqs (API cursors stay valid), then deletes it. Entries at
// or below the segments' last seq were migrated before a crash.
func (ls *logStore) migrateLegacy(a *appLog) error {
	path := filepath.Join(filepath.Dir(a.dir), legacyLogFile)
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("old StateLog file %s: %w (fix its permissions)", path, err)
	}
	defer f.Close()
	moved, err := ls.migrateLines(a, newLineReader(f))
	if err != nil {
		return fmt.Errorf("migrate %s: %w", path, err)
	}
	_ = f.Close()
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("migrated %s but cannot delete it: %w", path, err)
	}
	ls.log.Info("migrated StateLogs from the old single file into segments", "app_id", a.id, "statelogs", moved, "file", path)
	return fsutil.SyncDir(filepath.Dir(a.dir))
}

func (ls *logStore) migrateLines(a *appLog, lr *lineReader) (int, error) {
	var items []item
	moved := 0
	store := func() error {
		n, err := ls.writeApp(a, items)
		ls.publish(a, items[:n])
		moved += n
		items = items[:0]
		return err
	}
	for {
		line, complete, err := lr.next()
		if errors.Is(err, io.EOF) || err == nil && !complete {
			break
		}
		if err != nil {
			return moved, err
		}
		var e LogEntry
		if json.Unmarshal(line, &e) != nil || e.Seq <= a.assigned {
			continue // torn, garbage, or already migrated
		}
		capEntry(&e, ls.opts.maxOutput)
		rest, err := encodeRest(e)
		if err != nil {
			return moved, err
		}
		a.assigned = e.Seq
		items = append(items, item{req: &logReq{app: a.id, entry: e, rest: rest}, seq: e.Seq})
		if len(items) == maxBatchEntries {
			if err := store(); err != nil {
				return moved, err
			}
		}
	}
	if len(items) == 0 {
		return moved, nil
	}
	return moved, store()
}

// lineReader reads a segment line by line, tracking the offset.
type lineReader struct {
	br  *bufio.Reader
	off int64 // offset just after the last line returned
	buf []byte
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{br: bufio.NewReaderSize(r, 256<<10)}
}

// next returns the next line without its '\n' (valid until the next call)
// and whether it had one; io.EOF when nothing is left. A line over
// maxLogLine comes back empty, so that it reads as garbage.
func (r *lineReader) next() (line []byte, complete bool, err error) {
	r.buf = r.buf[:0]
	long := false
	for {
		chunk, rerr := r.br.ReadSlice('\n')
		r.off += int64(len(chunk))
		if rerr == nil && len(r.buf) == 0 && !long {
			return chunk[:len(chunk)-1], true, nil // the common case: no copy
		}
		if rerr != nil && !errors.Is(rerr, bufio.ErrBufferFull) && !errors.Is(rerr, io.EOF) {
			return nil, false, rerr
		}
		if long || len(r.buf)+len(chunk) > maxLogLine {
			long, r.buf = true, r.buf[:0]
		} else {
			r.buf = append(r.buf, chunk...)
		}
		switch {
		case rerr == nil && long:
			return r.buf, true, nil
		case rerr == nil:
			return r.buf[:len(r.buf)-1], true, nil
		case errors.Is(rerr, io.EOF) && len(r.buf) == 0 && !long:
			return nil, false, io.EOF
		case errors.Is(rerr, io.EOF):
			return r.buf, false, nil // an unterminated tail
		}
	}
}
