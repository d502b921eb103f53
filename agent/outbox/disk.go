package outbox

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// The file is a sequence of records: a 4-byte length, a 4-byte CRC-32C of
// the payload, and the payload, a JSON object whose "t" says what it is:
//
//	h  header: the log stream and the next seq (first record; a rewrite
//	   writes a new one)
//	e  a queued StateLog with its seq and push time
//	a  everything up to seq is gone (acknowledged, sent, or dropped)
//	s  a new recipe version: entries of other versions are gone
//
// Replaying the records in order rebuilds the queue. A record that is
// short, too long or fails its checksum ends the file: everything from it
// on is cut off (a torn write at a crash, or damage).
//
// The file is kept near the size of what it holds: when the records of
// entries that are gone (dead bytes) outweigh those still queued (live
// bytes), the flusher rewrites the file as a header and the live entries
// (a temporary file, synced, renamed over; see rewrite). So it stays under
// about twice the byte bound, plus compactAbove.
const (
	recHeader    = "h"
	recEntry     = "e"
	recAck       = "a"
	recSupersede = "s"

	// maxRecord bounds one record: a StateLog with two outputs at the
	// largest output limit the config allows, and some.
	maxRecord = 64 << 20
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

type record struct {
	T      string     `json:"t"`
	Stream string     `json:"stream,omitempty"`
	Next   int64      `json:"next,omitempty"`
	Seq    int64      `json:"seq,omitempty"`
	At     int64      `json:"at,omitempty"` // Unix nanoseconds
	V      int64      `json:"v,omitempty"`
	Log    *storedLog `json:"log,omitempty"`
}

// storedLog is a StateLog as the outbox keeps it.
type storedLog struct {
	InstanceID    string  `json:"instance_id,omitempty"`
	AppID         string  `json:"app_id,omitempty"`
	RecipeVersion int64   `json:"recipe_version"`
	StateID       string  `json:"state_id"`
	Result        bool    `json:"result"`
	Comment       *string `json:"comment,omitempty"`
	Stdout        *string `json:"stdout,omitempty"`
}

// skimmed is a record read for its bookkeeping only: decoding into it
// skips a StateLog's strings without allocating them, so that the first
// pass over a file costs memory for what is kept, not for what is there.
type skimmed struct {
	T      string `json:"t"`
	Stream string `json:"stream"`
	Next   int64  `json:"next"`
	Seq    int64  `json:"seq"`
	V      int64  `json:"v"`
	Log    *struct {
		RecipeVersion int64 `json:"recipe_version"`
	} `json:"log"`
}

func frame(r record) []byte {
	payload, _ := json.Marshal(r)
	buf := make([]byte, 8+len(payload))
	binary.LittleEndian.PutUint32(buf[0:4], uint32(len(payload)))
	binary.LittleEndian.PutUint32(buf[4:8], crc32.Checksum(payload, crcTable))
	copy(buf[8:], payload)
	return buf
}

func headerRecord(stream string, next int64) []byte {
	return frame(record{T: recHeader, Stream: stream, Next: next})
}

func entryRecord(e Entry) []byte {
	l := e.Log
	return frame(record{T: recEntry, Seq: e.Seq, At: e.At.UnixNano(), Log: &storedLog{
		InstanceID: l.InstanceID, AppID: l.AppID, RecipeVersion: l.RecipeVersion, StateID: l.StateID,
		Result: l.Result, Comment: l.Comment, Stdout: l.Stdout,
	}})
}

func ackRecord(seq int64) []byte { return frame(record{T: recAck, Seq: seq}) }

func supersedeRecord(v int64) []byte { return frame(record{T: recSupersede, V: v}) }

// replayed is the queue a file describes.
type replayed struct {
	stream  string
	next    int64
	entries []Entry
}

// place is where a live entry's record is in the file.
type place struct {
	seq, version int64
	off, size    int64
}

// ledger is the first pass's state: the queue as places, not entries.
type ledger struct {
	stream string
	next   int64
	seen   int64 // highest entry seq seen: a repeated entry is ignored
	live   []place
	head   int // live[:head] are gone
}

func (l *ledger) apply(r *skimmed, off, size int64) {
	switch r.T {
	case recHeader:
		l.stream = r.Stream
		l.next = max(l.next, r.Next)
	case recEntry:
		if r.Log == nil || r.Seq <= l.seen {
			return // written twice (around a rewrite): once is enough
		}
		l.seen = r.Seq
		l.live = append(l.live, place{seq: r.Seq, version: r.Log.RecipeVersion, off: off, size: size})
		l.next = max(l.next, r.Seq+1)
	case recAck:
		for l.head < len(l.live) && l.live[l.head].seq <= r.Seq {
			l.head++
		}
		// Let go of the dead prefix once it is the larger part, so that
		// a long file costs memory for what is still queued.
		if l.head > 64 && 2*l.head > len(l.live) {
			l.live = append(l.live[:0:0], l.live[l.head:]...)
			l.head = 0
		}
		l.next = max(l.next, r.Seq+1)
		l.seen = max(l.seen, r.Seq)
	case recSupersede:
		kept := l.live[:0:0]
		for _, p := range l.live[l.head:] {
			if p.version == r.V {
				kept = append(kept, p)
			}
		}
		l.live, l.head = kept, 0
	}
}

// replay reads f in two passes: the first follows every record until the
// end or the first bad one, keeping only where the live entries are; the
// second reads those entries. Memory goes with what is queued, not with
// the size of the file. It returns the queue, the offset where the good
// records end, what is wrong with the tail when something is (a torn or
// corrupt record: what follows it is to be cut off), and err when the file
// could not be read (then nothing may be cut).
func replay(f io.ReaderAt) (st replayed, good int64, tail, err error) {
	l := ledger{next: 1}
	var buf []byte
	br := bufio.NewReaderSize(io.NewSectionReader(f, 0, math.MaxInt64), 64<<10)
	var head [8]byte
	short := func(what string, err error) error {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return errors.New(what + " is cut short")
		}
		return nil
	}
	for {
		if _, rerr := io.ReadFull(br, head[:]); rerr != nil {
			if errors.Is(rerr, io.EOF) {
				break
			}
			if tail = short("a record header", rerr); tail == nil {
				return replayed{}, 0, nil, rerr
			}
			break
		}
		n := binary.LittleEndian.Uint32(head[0:4])
		if n == 0 || n > maxRecord {
			tail = fmt.Errorf("a record claims %d bytes", n)
			break
		}
		if cap(buf) < int(n) {
			buf = make([]byte, n)
		}
		payload := buf[:n]
		if _, rerr := io.ReadFull(br, payload); rerr != nil {
			if tail = short("a record", rerr); tail == nil {
				return replayed{}, 0, nil, rerr
			}
			break
		}
		if crc32.Checksum(payload, crcTable) != binary.LittleEndian.Uint32(head[4:8]) {
			tail = errors.New("a record fails its checksum")
			break
		}
		var rec skimmed
		if jerr := json.Unmarshal(payload, &rec); jerr != nil {
			tail = fmt.Errorf("a record is not JSON: %v", jerr)
			break
		}
		l.apply(&rec, good, int64(8+n))
		good += int64(8 + n)
	}
	st = replayed{stream: l.stream, next: l.next}
	live := l.live[l.head:]
	if len(live) > 0 {
		st.entries = make([]Entry, 0, len(live))
	}
	for _, p := range live {
		if cap(buf) < int(p.size) {
			buf = make([]byte, p.size)
		}
		b := buf[:p.size]
		if _, rerr := f.ReadAt(b, p.off); rerr != nil {
			return replayed{}, 0, nil, fmt.Errorf("read the entry of seq %d again: %w", p.seq, rerr)
		}
		var rec record
		if crc32.Checksum(b[8:], crcTable) != binary.LittleEndian.Uint32(b[4:8]) || json.Unmarshal(b[8:], &rec) != nil || rec.Log == nil {
			return replayed{}, 0, nil, fmt.Errorf("the entry of seq %d changed between two reads", p.seq)
		}
		lg := rec.Log
		st.entries = append(st.entries, Entry{Seq: rec.Seq, At: time.Unix(0, rec.At), size: p.size, Log: protocol.StateLog{
			InstanceID: lg.InstanceID, AppID: lg.AppID, RecipeVersion: lg.RecipeVersion, StateID: lg.StateID,
			Result: lg.Result, Comment: lg.Comment, Stdout: lg.Stdout, Seq: rec.Seq,
		}})
	}
	return st, good, tail, nil
}

// snapshot is what a rewritten file holds: the header and the live
// entries.
type snapshot struct {
	stream  string
	next    int64
	entries []Entry
}

// source is the outbox as the flusher sees it.
type source interface {
	// cut returns what the file should hold now, calling during while
	// nothing can be enqueued.
	cut(during func()) snapshot
	liveBytes() int64
}

// diskLog is the append-only file and its flusher.
type diskLog struct {
	path string
	log  *slog.Logger
	src  source

	// f and size belong to the flusher goroutine (and to whoever starts
	// or closes it).
	f       *os.File
	size    int64
	retryAt int64 // after a failed compaction, the size at which to try again

	mu       sync.Mutex
	cond     *sync.Cond
	pending  [][]byte
	oldest   time.Time // when the oldest pending record was enqueued
	queued   uint64    // records enqueued so far
	written  uint64    // records written and fsynced so far
	rewrites uint64    // rewrites asked for (renumbering)
	rewrote  uint64    // rewrites done
	closed   bool
	err      error
	wake     chan struct{}
	done     chan struct{}
	// exposure is the longest time a record waited in memory before it
	// was written: what a kill -9 could lose.
	exposure time.Duration
}

func newDiskLog(path string, log *slog.Logger, src source) *diskLog {
	d := &diskLog{path: path, log: log, src: src, wake: make(chan struct{}, 1), done: make(chan struct{})}
	d.cond = sync.NewCond(&d.mu)
	return d
}

// openDisk opens (or creates) the file, replays it and cuts a bad tail.
func openDisk(path string, log *slog.Logger, src source) (*diskLog, replayed, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, replayed{}, fmt.Errorf("outbox directory: %w", err)
	}
	removeTemporaries(path, log)
	// Only a regular file of our own: a FIFO there would block the
	// replay's first read forever, a link would be written through.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, replayed{}, fmt.Errorf("outbox %s is a symbolic link: remove it", path)
	}
	if err != nil {
		return nil, replayed{}, fmt.Errorf("outbox %s: %w", path, err)
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		if err == nil {
			err = fmt.Errorf("not a regular file (%s): remove it", fi.Mode().Type())
		}
		return nil, replayed{}, fmt.Errorf("outbox %s: %w", path, err)
	}
	st, good, tail, err := replay(f)
	if err != nil {
		f.Close()
		return nil, replayed{}, fmt.Errorf("outbox %s: read: %w", path, err)
	}
	if tail != nil {
		end, _ := f.Seek(0, io.SeekEnd)
		log.Warn("outbox: a torn or corrupt tail was cut off (a crash mid-write, or damage); the StateLogs before it are kept",
			"file", path, "problem", tail, "kept_bytes", good, "cut_bytes", end-good)
		if err := f.Truncate(good); err != nil {
			f.Close()
			return nil, replayed{}, fmt.Errorf("outbox %s: cut the corrupt tail: %w", path, err)
		}
	}
	if _, err := f.Seek(good, io.SeekStart); err != nil {
		f.Close()
		return nil, replayed{}, fmt.Errorf("outbox %s: %w", path, err)
	}
	d := newDiskLog(path, log, src)
	d.f, d.size = f, good
	return d, st, nil
}

// removeTemporaries deletes what a rewrite cut short by a crash left.
func removeTemporaries(path string, log *slog.Logger) {
	dir := filepath.Dir(path)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), tempPrefix(path)) {
			continue
		}
		t := filepath.Join(dir, e.Name())
		if err := os.Remove(t); err == nil {
			log.Info("outbox: removed the temporary file of an unfinished rewrite", "file", t)
		}
	}
}

func tempPrefix(path string) string { return "." + filepath.Base(path) + ".tmp-" }

// enqueue hands a record to the flusher.
func (d *diskLog) enqueue(rec []byte) {
	d.mu.Lock()
	if len(d.pending) == 0 {
		d.oldest = time.Now()
	}
	d.pending = append(d.pending, rec)
	d.queued++
	d.mu.Unlock()
	d.poke()
}

func (d *diskLog) poke() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// compactAbove is the file size under which a compaction is not worth it.
const compactAbove = 1 << 20

// compactionDue: the dead records outweigh the live ones.
func (d *diskLog) compactionDue() bool {
	if d.size <= compactAbove || d.size < d.retryAt {
		return false
	}
	live := d.src.liveBytes()
	return d.size-live > live
}

// flusher writes batches until closed, and rewrites the file when asked
// or when it is mostly dead; onError switches the outbox to memory after a
// write that failed (the file no longer says what the queue holds).
func (d *diskLog) flusher(onError func(error)) {
	defer close(d.done)
	for range d.wake {
		d.mu.Lock()
		asked, rewrote := d.rewrites, d.rewrote
		closed := d.closed
		d.mu.Unlock()
		var err error
		switch {
		case asked > rewrote:
			// The outbox changed what it holds in a way records cannot
			// say (renumbering): the file must be rewritten, or it is
			// no longer the queue.
			if err = d.rewriteAsked(); err == nil {
				d.mu.Lock()
				d.rewrote = asked
				d.cond.Broadcast()
				d.mu.Unlock()
			}
		default:
			err = d.writePending()
		}
		if err != nil {
			d.fail(err, onError)
			return
		}
		if closed {
			return
		}
	}
}

// writePending writes and fsyncs what was enqueued (group commit).
func (d *diskLog) writePending() error {
	d.mu.Lock()
	batch, oldest, upto := d.pending, d.oldest, d.queued
	d.pending = nil
	d.mu.Unlock()
	if len(batch) == 0 {
		return d.maybeCompact()
	}
	if err := d.write(batch); err != nil {
		return err
	}
	d.markWritten(upto, oldest)
	// A compaction is checked after each batch: the batch is durable
	// whatever comes of it.
	return d.maybeCompact()
}

func (d *diskLog) maybeCompact() error {
	if d.compactionDue() {
		return d.compact()
	}
	return nil
}

// markWritten records that every record enqueued up to upto is on disk;
// oldest is when the oldest of them was enqueued (zero: none was).
func (d *diskLog) markWritten(upto uint64, oldest time.Time) {
	d.mu.Lock()
	d.written = upto
	if !oldest.IsZero() {
		d.exposure = max(d.exposure, time.Since(oldest))
	}
	d.cond.Broadcast()
	d.mu.Unlock()
}

// cut takes what the file should hold now and the records enqueued so far,
// at one instant: nothing can be enqueued meanwhile (the outbox's lock is
// held), so every record taken is reflected in the snapshot and none
// enqueued later is. The rewritten file then replaces those records; the
// later ones are appended to it.
func (d *diskLog) cut() (snap snapshot, recs [][]byte, upto uint64, oldest time.Time) {
	snap = d.src.cut(func() {
		d.mu.Lock()
		recs, upto, oldest = d.pending, d.queued, d.oldest
		d.pending = nil
		d.mu.Unlock()
	})
	if len(recs) == 0 {
		oldest = time.Time{} // d.oldest is that of an earlier batch
	}
	return snap, recs, upto, oldest
}

// compact rewrites the file as what is live. When that fails before the
// new file took the old one's place (a full disk), the records taken are
// appended to the old file instead, and the next try waits until the file
// grew by compactAbove.
func (d *diskLog) compact() error {
	size := d.size
	snap, recs, upto, oldest := d.cut()
	err := d.rewrite(snap)
	var late *lateError
	switch {
	case err == nil:
	case errors.As(err, &late):
		return err
	default:
		d.retryAt = size + compactAbove
		d.log.Warn("outbox: compaction failed; the file keeps growing until the next try", "file", d.path, "size", size, "err", err)
		if err := d.write(recs); err != nil {
			return err
		}
	}
	d.markWritten(upto, oldest)
	return nil
}

// rewriteAsked is an asked-for rewrite: any failure is the disk's.
func (d *diskLog) rewriteAsked() error {
	snap, _, upto, oldest := d.cut()
	if err := d.rewrite(snap); err != nil {
		return err
	}
	d.markWritten(upto, oldest)
	return nil
}

// fail records a write error, closes the file and tells the outbox.
func (d *diskLog) fail(err error, onError func(error)) {
	d.mu.Lock()
	if d.err == nil {
		d.err = err
	}
	d.pending = nil
	d.cond.Broadcast()
	d.mu.Unlock()
	if d.f != nil {
		_ = d.f.Close()
		d.f = nil
	}
	if onError != nil {
		onError(err)
	}
}

func (d *diskLog) write(batch [][]byte) error {
	var n int
	for _, r := range batch {
		n += len(r)
	}
	buf := make([]byte, 0, n)
	for _, r := range batch {
		buf = append(buf, r...)
	}
	if _, err := d.f.Write(buf); err != nil {
		return fmt.Errorf("outbox %s: write: %w", d.path, err)
	}
	if err := d.f.Sync(); err != nil {
		return fmt.Errorf("outbox %s: sync: %w", d.path, err)
	}
	d.size += int64(len(buf))
	return nil
}

// lateError is a rewrite that failed after its file took the place of the
// old one: the outbox cannot tell what is on disk.
type lateError struct{ err error }

func (e *lateError) Error() string { return e.err.Error() }
func (e *lateError) Unwrap() error { return e.err }

// rewrite replaces the file with s: written record by record (never the
// whole queue in one buffer) to a temporary file in the same directory,
// synced, renamed over the file, and the directory synced before anything
// more is appended, so that a crash at any moment leaves the old file or
// the new one, each complete. The new file's descriptor then takes the old
// one's place.
//
// The snapshot comes from cut: records enqueued while it runs are appended
// afterwards, and none of them is reflected in it (a supersede applied
// twice would drop the entries of a later version).
func (d *diskLog) rewrite(s snapshot) error {
	dir := filepath.Dir(d.path)
	tmp, err := os.CreateTemp(dir, tempPrefix(d.path)+"*")
	if err != nil {
		return fmt.Errorf("outbox %s: rewrite: %w", d.path, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	w := bufio.NewWriterSize(tmp, 256<<10)
	n, _ := w.Write(headerRecord(s.stream, s.next))
	size := int64(n)
	for _, e := range s.entries {
		n, err := w.Write(entryRecord(e))
		if err != nil {
			return fmt.Errorf("outbox %s: rewrite: %w", d.path, err)
		}
		size += int64(n)
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("outbox %s: rewrite: %w", d.path, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("outbox %s: rewrite: sync: %w", d.path, err)
	}
	if err := os.Rename(tmp.Name(), d.path); err != nil {
		return fmt.Errorf("outbox %s: rewrite: %w", d.path, err)
	}
	ok = true
	if d.f != nil {
		_ = d.f.Close()
	}
	d.f, d.size, d.retryAt = tmp, size, 0
	if err := fsutil.SyncDir(dir); err != nil {
		return &lateError{fmt.Errorf("outbox %s: rewrite: %w", d.path, err)}
	}
	return nil
}

// rewriteNow asks the flusher for a rewrite and waits for it.
func (d *diskLog) rewriteNow() error {
	d.mu.Lock()
	d.rewrites++
	target := d.rewrites
	d.mu.Unlock()
	d.poke()
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.rewrote < target && d.err == nil && !d.closed {
		d.cond.Wait()
	}
	if d.rewrote >= target {
		return nil
	}
	if d.err != nil {
		return d.err
	}
	return errors.New("outbox closed before the rewrite")
}

// flush waits until every record enqueued before the call is written.
func (d *diskLog) flush(ctx context.Context) error {
	d.mu.Lock()
	target := d.queued
	d.mu.Unlock()
	d.poke()
	stop := context.AfterFunc(ctx, func() {
		d.mu.Lock()
		d.cond.Broadcast()
		d.mu.Unlock()
	})
	defer stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.written < target && d.err == nil && ctx.Err() == nil {
		d.cond.Wait()
	}
	if d.err != nil {
		return d.err
	}
	return ctx.Err()
}

// close stops the flusher (after its last batch) and closes the file.
func (d *diskLog) close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.cond.Broadcast()
	d.mu.Unlock()
	d.poke()
	<-d.done
	if d.f != nil {
		return d.f.Close()
	}
	return nil
}
