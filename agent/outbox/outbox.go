// Package outbox is the agent's durable queue of StateLogs: every
// executed state is reported exactly once, in order, across agent kills,
// reboots, self-updates and backend crashes (protocol 2,
// protocol/PROTOCOL-2.md).
//
// Each StateLog gets the next seq of the agent's log stream and is kept,
// in memory and in an append-only file under the state directory, until
// the backend acknowledges it (protocol 2) or it has been written to the
// socket (protocol 1). Writes are batched (group commit): Push never waits
// for the disk; a flusher goroutine writes what was pushed, in order, and
// fsyncs once per batch. A kill -9 loses at most the StateLogs pushed but
// not yet written by the flusher (a window of microseconds to a few
// milliseconds), and never a later one without an earlier one: the file is
// append-only and a torn or corrupt tail is cut off when it is opened.
//
// The queue is bounded by entries, bytes and age; what is dropped goes
// oldest first and is counted. When the directory cannot be used the
// outbox keeps working in memory and says so (Status).
package outbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/protocol"
)

// Options configures Open. Zero limits take the defaults.
type Options struct {
	Dir        string        // the layout's OutboxDir; "" keeps the queue in memory only
	MaxEntries int           // default 10 000
	MaxBytes   int64         // default 64 MiB (the StateLogs as encoded)
	MaxAge     time.Duration // default 24 h
	Clock      clock.Clock
	Logger     *slog.Logger
}

// Entry is one queued StateLog.
type Entry struct {
	Seq  int64
	At   time.Time // when it was pushed
	Log  protocol.StateLog
	size int64 // bytes it accounts for
}

// Status is a snapshot for the status file.
type Status struct {
	Depth   int    // entries waiting
	Bytes   int64  // their size
	Dropped int64  // entries dropped by the bounds, oldest first, this run
	Stream  string // the log stream
	NextSeq int64
	// Storage is "disk", or "memory: <why>" when the directory could not
	// be used (StateLogs then do not survive a restart).
	Storage string
	// Exposure is the longest a StateLog waited in memory before the
	// flusher wrote it: what a kill -9 at the worst moment could lose.
	Exposure time.Duration
}

// Outbox is the queue. Create it with Open and Close it at the end.
type Outbox struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	stream  string
	next    int64 // seq the next Push gets
	entries []Entry
	bytes   int64
	dropped int64
	storage string
	notify  chan struct{} // one-slot "something was pushed"

	disk *diskLog // nil in memory mode
}

// Defaults of Options.
const (
	DefaultMaxEntries = 10000
	DefaultMaxBytes   = 64 << 20
	DefaultMaxAge     = 24 * time.Hour
)

// Open loads the outbox in opts.Dir (creating it), cutting a torn or
// corrupt tail, and starts its flusher. It does not fail: when the
// directory cannot be used it logs why and works in memory.
func Open(opts Options) *Outbox {
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.MaxAge <= 0 {
		opts.MaxAge = DefaultMaxAge
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o := &Outbox{opts: opts, log: log, next: 1, notify: make(chan struct{}, 1), storage: "disk"}
	if opts.Dir == "" {
		o.storage = "memory: no outbox directory configured"
		o.stream = newStream()
		return o
	}
	d, state, err := openDisk(filepath.Join(opts.Dir, fileName), log)
	if err != nil {
		o.toMemory(err)
		o.stream = newStream()
		return o
	}
	o.disk = d
	o.stream, o.next = state.stream, state.next
	for _, e := range state.entries {
		o.entries = append(o.entries, e)
		o.bytes += e.size
	}
	if o.stream == "" {
		o.stream = newStream()
		d.enqueue(headerRecord(o.stream, o.next))
	}
	o.trim()
	if len(o.entries) > 0 {
		log.Info("outbox: StateLogs from before the restart are queued", "count", len(o.entries), "first_seq", o.entries[0].Seq, "stream", o.stream)
	}
	go d.flusher(o.onDiskError)
	return o
}

// fileName is the outbox file in Options.Dir.
const fileName = "outbox.log"

func newStream() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// toMemory switches to memory mode after a disk failure: queued entries are
// kept, new ones are not written, and the status says why.
func (o *Outbox) toMemory(err error) {
	o.storage = "memory: " + err.Error()
	o.log.Error("outbox: cannot keep StateLogs on disk; keeping them in memory (they will not survive a restart)", "dir", o.opts.Dir, "err", err)
}

// onDiskError is the flusher's report of a failed write or fsync.
func (o *Outbox) onDiskError(err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.disk == nil {
		return
	}
	o.disk = nil
	o.toMemory(err)
}

// Push queues a StateLog, giving it the next seq, and returns that seq. It
// never waits for the disk. Over a bound, the oldest entries are dropped.
func (o *Outbox) Push(sl protocol.StateLog) int64 {
	o.mu.Lock()
	sl.Seq = o.next
	o.next++
	e := Entry{Seq: sl.Seq, At: o.opts.Clock.Now(), Log: sl}
	rec := entryRecord(e)
	e.size = int64(len(rec))
	o.entries = append(o.entries, e)
	o.bytes += e.size
	if o.disk != nil {
		o.disk.enqueue(rec)
	}
	o.trim()
	o.mu.Unlock()
	select {
	case o.notify <- struct{}{}:
	default:
	}
	return sl.Seq
}

// trim drops the oldest entries over a bound. Callers hold mu.
func (o *Outbox) trim() {
	cutoff := o.opts.Clock.Now().Add(-o.opts.MaxAge)
	n := 0
	for n < len(o.entries) && (len(o.entries)-n > o.opts.MaxEntries || o.bytes > o.opts.MaxBytes || o.entries[n].At.Before(cutoff)) {
		o.bytes -= o.entries[n].size
		n++
	}
	if n == 0 {
		return
	}
	o.log.Warn("outbox full or too old: oldest StateLogs dropped", "count", n, "first_seq", o.entries[0].Seq, "last_seq", o.entries[n-1].Seq,
		"max_entries", o.opts.MaxEntries, "max_bytes", o.opts.MaxBytes, "max_age", o.opts.MaxAge)
	o.dropped += int64(n)
	last := o.entries[n-1].Seq
	o.entries = append(o.entries[:0:0], o.entries[n:]...)
	if o.disk != nil {
		o.disk.enqueue(ackRecord(last))
	}
}

// AckThrough removes every entry with seq <= seq: the backend stored them
// (protocol 2), or they were written to the socket (protocol 1).
func (o *Outbox) AckThrough(seq int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for n < len(o.entries) && o.entries[n].Seq <= seq {
		o.bytes -= o.entries[n].size
		n++
	}
	if n == 0 {
		return
	}
	o.entries = append(o.entries[:0:0], o.entries[n:]...)
	if o.disk != nil {
		o.disk.enqueue(ackRecord(seq))
		o.disk.maybeCompact(o.liveRecords)
	}
}

// liveRecords renders what a compacted file holds: the header and the
// entries still queued. The flusher calls it (not holding the disk lock).
func (o *Outbox) liveRecords() [][]byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	recs := [][]byte{headerRecord(o.stream, o.next)}
	for _, e := range o.entries {
		recs = append(recs, entryRecord(e))
	}
	return recs
}

// Supersede drops queued StateLogs of any recipe version but current
// (spec/rounds.md: logs of a replaced recipe are dropped) and returns how
// many.
func (o *Outbox) Supersede(current int64) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	kept := o.entries[:0:0]
	for _, e := range o.entries {
		if e.Log.RecipeVersion == current {
			kept = append(kept, e)
		} else {
			o.bytes -= e.size
		}
	}
	n := len(o.entries) - len(kept)
	o.entries = kept
	if n > 0 && o.disk != nil {
		o.disk.enqueue(supersedeRecord(current))
		o.disk.maybeCompact(o.liveRecords)
	}
	return n
}

// After returns the first queued entry with seq > seq.
func (o *Outbox) After(seq int64) (Entry, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, e := range o.entries {
		if e.Seq > seq {
			return e, true
		}
	}
	return Entry{}, false
}

// Notify receives a value after a Push (one-slot: a reader that drained the
// queue waits on it).
func (o *Outbox) Notify() <-chan struct{} { return o.notify }

// Stream is this agent's log stream (Handshake log_stream).
func (o *Outbox) Stream() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.stream
}

// Status returns a snapshot.
func (o *Outbox) Status() Status {
	o.mu.Lock()
	defer o.mu.Unlock()
	st := Status{Depth: len(o.entries), Bytes: o.bytes, Dropped: o.dropped, Stream: o.stream, NextSeq: o.next, Storage: o.storage}
	if o.disk != nil {
		o.disk.mu.Lock()
		st.Exposure = o.disk.exposure
		o.disk.mu.Unlock()
	}
	return st
}

// Flush waits until everything pushed so far is written and fsynced (or
// ctx is done). The agent calls it before it exits or re-executes.
func (o *Outbox) Flush(ctx context.Context) error {
	o.mu.Lock()
	d := o.disk
	o.mu.Unlock()
	if d == nil {
		return nil
	}
	return d.flush(ctx)
}

// Close flushes and stops the flusher.
func (o *Outbox) Close() error {
	o.mu.Lock()
	d := o.disk
	o.disk = nil
	o.mu.Unlock()
	if d == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := d.flush(ctx)
	if cerr := d.close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	return nil
}
