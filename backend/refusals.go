package backend

import (
	"log/slog"
	"sync"
	"time"
)

// Anyone who can reach the backend can open sockets and send Handshakes
// (and API calls) that it turns away. A line per refusal would let them
// fill the log (2 000 bad Handshakes a second, 2 000 lines), so refusals
// are counted, by kind, and logged as one summary line per interval, with
// the last refusal as a sample (its client-supplied strings clipped).

// Refusal kinds: the keys of the summary line.
const (
	refBadIdentity    = "bad_identity"          // a Handshake without valid ids or token
	refBadSecret      = "bad_enrollment_secret" // a new instance without the app's secret
	refTokenMismatch  = "token_mismatch"        // a known instance with another token
	refRevoked        = "revoked"               // a revoked instance
	refEnrollLimit    = "over_enrollment_limit" // a new instance over the app's limit
	refAppFailed      = "app_not_loaded"        // the app is stored but failed to load
	refAppUnknown     = "app_unknown"           // AppNotReady (the app does not exist)
	refNoHandshake    = "no_handshake"          // no Handshake in time, or AppNotReady too often
	refEarlyFrame     = "bad_frame_before_handshake"
	refFrameTooLarge  = "frame_too_large"
	refStorage        = "storage_error"
	refAPIToken       = "api_token" // an API call without the right token
	refShuttingDown   = "shutting_down"
	defaultRefusalLog = 10 * time.Second
)

// refusalLog counts refusals and logs one summary per interval: the first
// refusal of a quiet period starts the interval, its end logs the counts.
type refusalLog struct {
	log   *slog.Logger
	every time.Duration

	mu     sync.Mutex
	counts map[string]int
	sample []any // the last refusal: reason and where it came from
	timer  *time.Timer
}

// add counts one refusal; sample describes it (clipped strings only).
func (r *refusalLog) add(kind string, sample ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.counts == nil {
		r.counts = map[string]int{}
	}
	r.counts[kind]++
	r.sample = append([]any{"kind", kind}, sample...)
	if r.timer == nil {
		r.timer = time.AfterFunc(r.every, r.flush)
	}
}

// flush logs the summary of what was counted since the last one, if any.
// Close calls it, so the last interval is not lost at shutdown.
func (r *refusalLog) flush() {
	r.mu.Lock()
	counts, sample := r.counts, r.sample
	r.counts, r.sample = nil, nil
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
	r.mu.Unlock()
	if len(counts) == 0 {
		return
	}
	total := 0
	byKind := make([]any, 0, len(counts))
	for _, k := range sortedKeys(counts) {
		total += counts[k]
		byKind = append(byKind, slog.Int(k, counts[k]))
	}
	r.log.Warn("connections and calls refused (one summary per interval)", "total", total, "interval", r.every,
		slog.Group("by_kind", byKind...), slog.Group("last", sample...))
}
