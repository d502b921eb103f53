package conn

import (
	"sync"

	"github.com/visualops/opsagent/protocol"
)

// outbox is the ordered, bounded queue of StateLogs waiting to be written.
// It survives reconnects: an entry leaves only once it has been written to
// a socket, or when it is dropped (queue full, or its recipe version was
// superseded).
type outbox struct {
	mu      sync.Mutex
	limit   int
	entries []outEntry
	nextSeq uint64
	dropped int64
	notify  chan struct{} // one-slot "something was added" signal
}

type outEntry struct {
	seq uint64
	msg *protocol.StateLog
}

func newOutbox(limit int) *outbox {
	return &outbox{limit: limit, notify: make(chan struct{}, 1)}
}

// push appends m, dropping the oldest entry when full. It reports whether
// an entry was dropped.
func (o *outbox) push(m *protocol.StateLog) (dropped bool) {
	o.mu.Lock()
	if len(o.entries) >= o.limit {
		o.entries[0] = outEntry{}
		o.entries = o.entries[1:]
		o.dropped++
		dropped = true
	}
	o.nextSeq++
	o.entries = append(o.entries, outEntry{seq: o.nextSeq, msg: m})
	o.mu.Unlock()
	select {
	case o.notify <- struct{}{}:
	default:
	}
	return dropped
}

// peek returns the oldest entry without removing it.
func (o *outbox) peek() (outEntry, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.entries) == 0 {
		return outEntry{}, false
	}
	return o.entries[0], true
}

// ack removes the entry seq once written (unless it was dropped meanwhile).
func (o *outbox) ack(seq uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.entries) > 0 && o.entries[0].seq == seq {
		o.entries[0] = outEntry{}
		o.entries = o.entries[1:]
	}
}

// supersede drops entries whose recipe version is not current and reports
// how many.
func (o *outbox) supersede(current int64) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	kept := o.entries[:0]
	for _, e := range o.entries {
		if e.msg.RecipeVersion == current {
			kept = append(kept, e)
		}
	}
	n := len(o.entries) - len(kept)
	for i := len(kept); i < len(o.entries); i++ {
		o.entries[i] = outEntry{}
	}
	o.entries = kept
	return n
}

func (o *outbox) depth() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.entries)
}

func (o *outbox) droppedCount() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.dropped
}
