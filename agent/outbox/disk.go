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
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// The file is a sequence of records: a 4-byte length, a 4-byte CRC-32C of
// the payload, and the payload, a JSON object whose "t" says what it is:
//
//	h  header: the log stream and the next seq (first record; compaction
//	   rewrites it)
//	e  a queued StateLog with its seq and push time
//	a  everything up to seq is gone (acknowledged, sent, or dropped)
//	s  a new recipe version: entries of other versions are gone
//
// Replaying the records in order rebuilds the queue. A record that is
// short, too long or fails its checksum ends the file: everything from it
// on is cut off (a torn write at a crash, or damage).
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
	seen    int64 // highest entry seq seen: a repeated entry is ignored
}

// replay reads records until the end or the first bad one, and returns
// the queue and the offset where the good records end.
func replay(r io.Reader) (replayed, int64, error) {
	st := replayed{next: 1}
	br := bufio.NewReaderSize(r, 64<<10)
	var off int64
	var head [8]byte
	for {
		if _, err := io.ReadFull(br, head[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return st, off, nil
			}
			return st, off, errors.New("a record header is cut short")
		}
		n := binary.LittleEndian.Uint32(head[0:4])
		if n == 0 || n > maxRecord {
			return st, off, fmt.Errorf("a record claims %d bytes", n)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(br, payload); err != nil {
			return st, off, errors.New("a record is cut short")
		}
		if crc32.Checksum(payload, crcTable) != binary.LittleEndian.Uint32(head[4:8]) {
			return st, off, errors.New("a record fails its checksum")
		}
		var rec record
		if err := json.Unmarshal(payload, &rec); err != nil {
			return st, off, fmt.Errorf("a record is not JSON: %v", err)
		}
		st.apply(rec, int64(8+n))
		off += int64(8 + n)
	}
}

func (st *replayed) apply(rec record, size int64) {
	switch rec.T {
	case recHeader:
		st.stream = rec.Stream
		st.next = max(st.next, rec.Next)
	case recEntry:
		if rec.Log == nil || rec.Seq <= st.seen {
			return // written twice (around a compaction): once is enough
		}
		st.seen = rec.Seq
		l := rec.Log
		st.entries = append(st.entries, Entry{Seq: rec.Seq, At: time.Unix(0, rec.At), size: size, Log: protocol.StateLog{
			InstanceID: l.InstanceID, AppID: l.AppID, RecipeVersion: l.RecipeVersion, StateID: l.StateID,
			Result: l.Result, Comment: l.Comment, Stdout: l.Stdout, Seq: rec.Seq,
		}})
		st.next = max(st.next, rec.Seq+1)
	case recAck:
		n := 0
		for n < len(st.entries) && st.entries[n].Seq <= rec.Seq {
			n++
		}
		st.entries = st.entries[n:]
		st.next = max(st.next, rec.Seq+1)
		st.seen = max(st.seen, rec.Seq)
	case recSupersede:
		kept := st.entries[:0]
		for _, e := range st.entries {
			if e.Log.RecipeVersion == rec.V {
				kept = append(kept, e)
			}
		}
		st.entries = kept
	}
}

// diskLog is the append-only file and its flusher.
type diskLog struct {
	path string
	log  *slog.Logger

	mu      sync.Mutex
	cond    *sync.Cond
	f       *os.File
	size    int64
	pending [][]byte
	oldest  time.Time // when the oldest pending record was enqueued
	queued  uint64    // records enqueued so far
	written uint64    // records written and fsynced so far
	compact func() [][]byte
	closed  bool
	err     error
	wake    chan struct{}
	done    chan struct{}
	// exposure is the longest time a record waited in memory before it
	// was written: what a kill -9 could lose.
	exposure time.Duration
}

// openDisk opens (or creates) the file, replays it and cuts a bad tail.
func openDisk(path string, log *slog.Logger) (*diskLog, replayed, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, replayed{}, fmt.Errorf("outbox directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, replayed{}, fmt.Errorf("outbox %s: %w", path, err)
	}
	st, good, rerr := replay(f)
	if rerr != nil {
		end, _ := f.Seek(0, io.SeekEnd)
		log.Warn("outbox: a torn or corrupt tail was cut off (a crash mid-write, or damage); the StateLogs before it are kept",
			"file", path, "problem", rerr, "kept_bytes", good, "cut_bytes", end-good)
		if err := f.Truncate(good); err != nil {
			f.Close()
			return nil, replayed{}, fmt.Errorf("outbox %s: cut the corrupt tail: %w", path, err)
		}
	}
	if _, err := f.Seek(good, io.SeekStart); err != nil {
		f.Close()
		return nil, replayed{}, fmt.Errorf("outbox %s: %w", path, err)
	}
	d := &diskLog{path: path, log: log, f: f, size: good, wake: make(chan struct{}, 1), done: make(chan struct{})}
	d.cond = sync.NewCond(&d.mu)
	return d, st, nil
}

// enqueue hands a record to the flusher.
func (d *diskLog) enqueue(rec []byte) {
	d.mu.Lock()
	if len(d.pending) == 0 {
		d.oldest = time.Now()
	}
	d.pending = append(d.pending, rec)
	d.queued++
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// maybeCompact asks the flusher to rewrite the file with live's records
// when it has grown well past them.
func (d *diskLog) maybeCompact(live func() [][]byte) {
	d.mu.Lock()
	d.compact = live
	d.mu.Unlock()
}

// compactAbove is the file size under which compaction is not worth it.
const compactAbove = 1 << 20

// flusher writes batches until closed; onError switches the outbox to
// memory after a failed write.
func (d *diskLog) flusher(onError func(error)) {
	defer close(d.done)
	for range d.wake {
		d.mu.Lock()
		batch, oldest, upto := d.pending, d.oldest, d.queued
		d.pending = nil
		compact := d.compact
		closed := d.closed
		d.mu.Unlock()
		if len(batch) > 0 {
			err := d.write(batch)
			d.mu.Lock()
			if err != nil && d.err == nil {
				d.err = err
			}
			d.written = upto
			d.exposure = max(d.exposure, time.Since(oldest))
			d.cond.Broadcast()
			d.mu.Unlock()
			if err != nil {
				onError(err)
				return
			}
		}
		if compact != nil && d.size > compactAbove {
			if err := d.compactWith(compact); err != nil {
				d.log.Warn("outbox: compaction failed; the file keeps growing until the next try", "err", err)
			}
		}
		if closed {
			return
		}
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

// compactWith rewrites the file as live's records when it is more than
// twice their size: written to a temporary file, synced, renamed over.
// Records enqueued while it runs are appended to the new file afterwards;
// some of them may already be reflected in live's snapshot, which is
// harmless: replay ignores an entry seen before, and acknowledgements and
// supersedes apply twice to the same effect.
func (d *diskLog) compactWith(live func() [][]byte) error {
	recs := live()
	var liveSize int64
	for _, r := range recs {
		liveSize += int64(len(r))
	}
	if d.size <= 2*liveSize {
		return nil
	}
	d.mu.Lock()
	d.compact = nil
	d.mu.Unlock()
	var buf []byte
	for _, r := range recs {
		buf = append(buf, r...)
	}
	if err := fsutil.WriteFileAtomic(d.path, buf, 0o600); err != nil {
		return err
	}
	f, err := os.OpenFile(d.path, os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("outbox %s: reopen after compaction: %w", d.path, err)
	}
	_ = d.f.Close()
	d.f, d.size = f, int64(len(buf))
	return nil
}

// flush waits until every record enqueued before the call is written.
func (d *diskLog) flush(ctx context.Context) error {
	d.mu.Lock()
	target := d.queued
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
	done := make(chan struct{})
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
	close(done)
	if d.err != nil {
		return d.err
	}
	return ctx.Err()
}

func (d *diskLog) close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
	<-d.done
	return d.f.Close()
}
