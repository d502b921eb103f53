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
// append-only and a torn or corrupt tail is cut off when it is opened. The
// file is rewritten when what is gone outweighs what is queued, so it stays
// near the byte bound (disk.go).
//
// A process opens its outbox once and keeps it: a seq is never handed out
// twice in a stream. The queue is bounded by entries, bytes and age; what
// is dropped goes oldest first and is counted with its reason. When the
// directory cannot be used the outbox keeps working in memory and says so
// (Status); RetryDisk takes it back to disk.
package outbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
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

	// manualFlush (tests) starts no flusher: the test drives the disk
	// log's steps itself and starts the flusher before Close.
	manualFlush bool
}

// Entry is one queued StateLog.
type Entry struct {
	Seq  int64
	At   time.Time // when it was pushed
	Log  protocol.StateLog
	size int64 // bytes it accounts for (its record in the file)
}

// Why StateLogs were dropped, the keys of Status.DroppedBy. The bounds are
// named after the config keys that set them.
const (
	DroppedLimit    = "outbox_limit"     // more entries than [agent] outbox_limit
	DroppedMaxBytes = "outbox_max_bytes" // more bytes than [agent] outbox_max_bytes
	DroppedMaxAge   = "outbox_max_age"   // older than [agent] outbox_max_age
	DroppedReplaced = "recipe_replaced"  // of a recipe version that was replaced (spec/rounds.md)
	DroppedInMemory = "lost_from_memory" // kept in memory (the disk failed) when the agent stopped
)

// Status is a snapshot for the status file.
type Status struct {
	Depth   int   // entries waiting
	Bytes   int64 // their size
	Dropped int64 // entries dropped, this run: the sum of DroppedBy
	// DroppedBy counts the dropped entries by reason (the Dropped*
	// constants); nil when nothing was dropped.
	DroppedBy map[string]int64
	Stream    string // the log stream
	NextSeq   int64
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
	path string // the file; "" without a directory

	mu      sync.Mutex
	stream  string
	next    int64 // seq the next Push gets
	entries []Entry
	bytes   int64
	dropped map[string]int64
	storage string
	notify  chan struct{} // one-slot "something was pushed"
	// firstOwn is the first seq this process handed out, and checked says
	// whether the backend's first acknowledgement was compared with it
	// (AckHandshake).
	firstOwn int64
	checked  bool
	// fileRead: the file's contents were read at Open, so it may be
	// rewritten from memory (RetryDisk); a file never read is never
	// overwritten.
	fileRead bool
	closed   bool

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
	opts.MaxEntries, opts.MaxBytes, opts.MaxAge = limits(opts.MaxEntries, opts.MaxBytes, opts.MaxAge)
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o := &Outbox{opts: opts, log: log, next: 1, notify: make(chan struct{}, 1), storage: "disk", dropped: map[string]int64{}}
	defer func() { o.firstOwn = o.next }()
	if opts.Dir == "" {
		o.storage = "memory: no outbox directory configured"
		o.stream = newStream()
		return o
	}
	o.path = filepath.Join(opts.Dir, fileName)
	d, state, err := openDisk(o.path, log, o)
	if err != nil {
		o.toMemory(err)
		o.stream = newStream()
		return o
	}
	o.disk, o.fileRead = d, true
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
	if !opts.manualFlush {
		go d.flusher(o.onDiskError(d))
		d.poke() // a file that is mostly dead is compacted at once
	}
	return o
}

func limits(entries int, bytes int64, age time.Duration) (int, int64, time.Duration) {
	if entries <= 0 {
		entries = DefaultMaxEntries
	}
	if bytes <= 0 {
		bytes = DefaultMaxBytes
	}
	if age <= 0 {
		age = DefaultMaxAge
	}
	return entries, bytes, age
}

// fileName is the outbox file in Options.Dir.
const fileName = "outbox.log"

func newStream() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// toMemory switches to memory mode after a disk failure: queued entries are
// kept, new ones are not written, and the status says why. Callers hold mu
// (or own o alone).
func (o *Outbox) toMemory(err error) {
	o.storage = "memory: " + err.Error()
	o.log.Error("outbox: cannot keep StateLogs on disk; keeping them in memory (they will not survive a restart; free the disk and send SIGHUP to go back to it)", "dir", o.opts.Dir, "err", err)
}

// onDiskError is d's flusher's report of a failed write or fsync.
func (o *Outbox) onDiskError(d *diskLog) func(error) {
	return func(err error) {
		o.mu.Lock()
		defer o.mu.Unlock()
		if o.disk != d {
			return
		}
		o.disk = nil
		o.toMemory(err)
	}
}

// cut and liveBytes are what the flusher asks (source).
func (o *Outbox) cut(during func()) snapshot {
	o.mu.Lock()
	defer o.mu.Unlock()
	during()
	return o.snapshotLocked()
}

func (o *Outbox) snapshotLocked() snapshot {
	return snapshot{stream: o.stream, next: o.next, entries: append([]Entry(nil), o.entries...)}
}

func (o *Outbox) liveBytes() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.bytes
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

// trim drops the oldest entries over a bound, counting each under the
// bound it broke. Callers hold mu.
func (o *Outbox) trim() {
	cutoff := o.opts.Clock.Now().Add(-o.opts.MaxAge)
	n := 0
	var old, many, big int64 // dropped for age, entries, bytes
over:
	for n < len(o.entries) {
		switch e := o.entries[n]; {
		case e.At.Before(cutoff):
			old++
		case len(o.entries)-n > o.opts.MaxEntries:
			many++
		case o.bytes > o.opts.MaxBytes:
			big++
		default:
			break over
		}
		o.bytes -= o.entries[n].size
		n++
	}
	if n == 0 {
		return
	}
	o.log.Warn("outbox full or too old: oldest StateLogs dropped", "count", n, "first_seq", o.entries[0].Seq, "last_seq", o.entries[n-1].Seq,
		DroppedMaxAge, old, DroppedLimit, many, DroppedMaxBytes, big, "max_entries", o.opts.MaxEntries, "max_bytes", o.opts.MaxBytes, "max_age", o.opts.MaxAge)
	for k, v := range map[string]int64{DroppedMaxAge: old, DroppedLimit: many, DroppedMaxBytes: big} {
		if v > 0 {
			o.dropped[k] += v
		}
	}
	last := o.entries[n-1].Seq
	o.dropFront(n)
	if o.disk != nil {
		o.disk.enqueue(ackRecord(last))
	}
}

// SetLimits applies new bounds (a reloaded config); zero takes the
// default. What is over them now is dropped at once, and counted.
func (o *Outbox) SetLimits(maxEntries int, maxBytes int64, maxAge time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.opts.MaxEntries, o.opts.MaxBytes, o.opts.MaxAge = limits(maxEntries, maxBytes, maxAge)
	o.trim()
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
	o.dropFront(n)
	if o.disk != nil {
		o.disk.enqueue(ackRecord(seq))
	}
}

// dropFront removes the first n entries in O(n), not O(queue): the slots
// are cleared so that their StateLogs can be collected, and the backing
// array is let go of when a later append outgrows it.
func (o *Outbox) dropFront(n int) {
	clear(o.entries[:n])
	o.entries = o.entries[n:]
}

// AckHandshake is the backend's first acknowledgement on a connection
// (protocol 2): the highest seq of this stream it holds. The first one
// this process gets is checked: the backend cannot hold a seq this process
// handed out before it ever connected. When it does, the counter this
// process started from went back: an earlier run kept StateLogs in memory
// when its disk failed, and they reached the backend but never the file
// (or the state directory was restored from a backup). Those seqs were
// then handed out twice, and the backend would drop this run's StateLogs
// as duplicates; instead they are renumbered after the backend's, and the
// file is rewritten before any of them is sent.
func (o *Outbox) AckHandshake(seq int64) {
	o.mu.Lock()
	var rewrite func() error
	if !o.checked {
		o.checked = true
		if seq >= o.firstOwn {
			rewrite = o.renumberLocked(seq)
		}
	}
	o.mu.Unlock()
	if rewrite != nil {
		if err := rewrite(); err != nil {
			o.log.Error("outbox: cannot rewrite the file after renumbering; StateLogs are kept in memory", "err", err)
		}
	}
	o.AckThrough(seq)
}

// renumberLocked gives this process's queued entries seqs after acked and
// returns what waits for the file to say so (nil in memory mode).
func (o *Outbox) renumberLocked(acked int64) func() error {
	shift := acked + 1 - o.firstOwn
	moved := 0
	for i := range o.entries {
		e := &o.entries[i]
		if e.Seq < o.firstOwn {
			continue
		}
		e.Seq += shift
		e.Log.Seq = e.Seq
		o.bytes -= e.size
		e.size = int64(len(entryRecord(*e)))
		o.bytes += e.size
		moved++
	}
	o.log.Warn("outbox: the backend holds seqs this agent had not sent yet (an earlier run kept StateLogs only in memory, or the state directory was restored); this run's StateLogs are renumbered after the backend's, none is lost",
		"stream", o.stream, "backend_seq", acked, "first_seq_of_this_run", o.firstOwn, "renumbered", moved, "next_seq", o.next+shift)
	o.next += shift
	o.firstOwn += shift
	if o.disk == nil {
		return nil
	}
	return o.disk.rewriteNow
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
	if n > 0 {
		o.dropped[DroppedReplaced] += int64(n)
		if o.disk != nil {
			o.disk.enqueue(supersedeRecord(current))
		}
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
	st := Status{Depth: len(o.entries), Bytes: o.bytes, Stream: o.stream, NextSeq: o.next, Storage: o.storage}
	for _, n := range o.dropped {
		st.Dropped += n
	}
	if st.Dropped > 0 {
		st.DroppedBy = maps.Clone(o.dropped)
	}
	if o.disk != nil {
		o.disk.mu.Lock()
		st.Exposure = o.disk.exposure
		o.disk.mu.Unlock()
	}
	return st
}

// RetryDisk takes an outbox that fell back to memory back to disk: the
// file is rewritten with everything queued (the stream, the counter, the
// entries), so it is the queue again, and the flusher restarts. The agent
// calls it on SIGHUP, which is what an operator sends after freeing the
// disk. A file whose contents this process never read (it could not be
// opened at start) is not overwritten: that takes a restart.
func (o *Outbox) RetryDisk() error {
	o.mu.Lock()
	if o.disk != nil || o.path == "" || o.closed {
		o.mu.Unlock()
		return nil
	}
	if !o.fileRead {
		if _, err := os.Lstat(o.path); !errors.Is(err, fs.ErrNotExist) {
			o.mu.Unlock()
			return fmt.Errorf("outbox %s: it could not be read when the agent started; restart the agent to take it up", o.path)
		}
	}
	snap := o.snapshotLocked()
	d := newDiskLog(o.path, o.log, o)
	o.disk = d // records pushed from now on wait in d until the flusher runs
	o.mu.Unlock()

	err := os.MkdirAll(o.opts.Dir, 0o700)
	if err == nil {
		err = d.rewrite(snap)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if err != nil {
		d.fail(err, nil)
		if o.disk == d {
			o.disk = nil
			o.storage = "memory: " + err.Error()
		}
		return err
	}
	o.storage, o.fileRead = "disk", true
	go d.flusher(o.onDiskError(d))
	d.poke()
	o.log.Info("outbox: back on disk", "file", o.path, "queued", len(o.entries), "next_seq", o.next)
	return nil
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

// Close flushes and stops the flusher. StateLogs that were only in memory
// are lost with the process: they are counted (DroppedInMemory) and
// logged. Close may be called more than once.
func (o *Outbox) Close() error {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return nil
	}
	o.closed = true
	d := o.disk
	o.disk = nil
	if d == nil && len(o.entries) > 0 {
		n := len(o.entries)
		o.log.Error("outbox: StateLogs kept in memory are lost as the agent stops", "count", n, "first_seq", o.entries[0].Seq, "last_seq", o.entries[n-1].Seq, "storage", o.storage)
		o.dropped[DroppedInMemory] += int64(n)
		o.entries, o.bytes = nil, 0
	}
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
