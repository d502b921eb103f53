package backend

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

// StateLogs live in one JetStream stream per app (opsagent-logs-<app>),
// one message per StateLog on opsagent.app.<app>.log.<instance>.<stream>;
// the stream seq is the API's cursor. Retention by age is the stream's
// MaxAge (--log-retention-age). Retention by size (--log-retention-size,
// per app) is a purge of the oldest StateLogs that any replica makes when
// the stream is over it (retain): a stream's MaxBytes would reserve its
// whole size in JetStream's storage at creation, so that a disk would hold
// only so many apps, however small most of them are.
//
// Exactly once, across replicas, for protocol 2. An instance's log stream
// is written by one connection at a time, its owner. At the Handshake the
// replica takes ownership: it publishes a marker on the stream's fence
// subject (opsagent.app.<app>.fence.<instance>.<stream>, a rollup, so one
// marker per stream is kept) and remembers its stream seq F. Every
// StateLog it then publishes carries "the last message on the fence
// subject is F" (Nats-Expected-Last-Subject-Sequence with
// ...-Subject), which JetStream checks when it stores the message. Only
// then, with the fence in place, does it read what is stored: the last
// StateLog on the stream's subject and the stream's high-water mark (the
// opsagent-logstreams bucket), and acknowledges that to the agent. So a
// connection that lingers on another replica (the agent reconnected
// elsewhere) can store nothing more: its fence moved, and what it stored
// before the move is in what the new owner read. The new owner drops any
// StateLog at or below that high, whenever it is sent again: after a
// second or after hours, even once retention removed the StateLogs
// themselves, since the high-water mark in the bucket outlives them. A
// StateLog is acknowledged only once JetStream has stored it with the
// stream's replication; anything else (a timeout, a full store, a lost
// fence) closes the connection without acknowledgement and the agent
// sends again after reconnecting, to an owner that reads afresh what
// is stored. A writer never retries a publish itself: a publish that
// timed out may have been stored, and only a fresh read can tell.

// LogEntry is one StateLog as stored and served by the API. Seq is the
// app's StateLog stream seq (the API cursor); AgentSeq and LogStream are
// what a protocol-2 agent numbered it.
type LogEntry struct {
	Seq           int64     `json:"seq"`
	ReceivedAt    time.Time `json:"received_at"`
	InstanceID    string    `json:"instance_id"`
	LogStream     string    `json:"log_stream,omitempty"`
	AgentSeq      int64     `json:"agent_seq,omitempty"`
	RecipeVersion int64     `json:"recipe_version"`
	StateID       string    `json:"state_id"`
	Result        bool      `json:"result"`
	Comment       *string   `json:"comment"`
	Stdout        *string   `json:"stdout"`
}

const (
	defaultRetention = 1 << 30
	defaultAge       = 30 * 24 * time.Hour
	defaultOutput    = 64 << 10
	minOutputBytes   = 64      // room for the truncation marker
	maxPageBytes     = 4 << 20 // StateLogs per API page; a larger single StateLog is served alone
	maxGroup         = 256     // StateLogs a writer publishes at once
	maxGroupBytes    = 1 << 20
	writerQueue      = 256 // StateLogs a connection hands over before its reader waits
	// batchSlots is how many atomic batches a replica has in flight per
	// app: JetStream allows 50 per stream, and three replicas share them.
	batchSlots = 12
	// summaryOutput bounds what a summary keeps of a StateLog's comment
	// and output: the listing shows the last one at a glance.
	summaryOutput = 1 << 10
)

// acker is the connection a protocol-2 StateLog came on.
type acker interface {
	// ack acknowledges a stream up to seq (it never blocks).
	ack(stream string, seq int64)
	// refuse closes the connection without acknowledging anything more
	// (the agent sends the StateLogs again after reconnecting).
	refuse(reason string)
	refused() bool
}

// logStreamConfig is an app's StateLog stream. first, when not 0, is its
// first seq (an import keeps the cursors of the data directory).
func (st *natsStore) logStreamConfig(app string, first uint64) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name: logStreamName(app), Description: "opsagent StateLogs of app " + app,
		Subjects: []string{appSubjects(app)}, Storage: jetstream.FileStorage, Replicas: st.replicas,
		Retention: jetstream.LimitsPolicy, Discard: jetstream.DiscardOld,
		MaxBytes: -1, MaxAge: st.logCfg.retentionAge,
		// Rollups keep one fence marker per log stream; atomic batches
		// store a connection's queued StateLogs at once on a replicated
		// stream; no direct gets, so that reads come from the leader and
		// see every acknowledged StateLog.
		AllowRollup: true, AllowAtomicPublish: st.replicas > 1, AllowDirect: false,
		FirstSeq: first,
	}
}

// ensureLogStream makes an app's StateLog stream, or brings an existing
// one's retention and replicas to this backend's settings.
func (st *natsStore) ensureLogStream(ctx context.Context, app string, first uint64) error {
	want := st.logStreamConfig(app, first)
	// Each step may be made again: creating a stream that exists with the
	// same settings answers it, and an update is to absolute settings.
	var s jetstream.Stream
	err := retrying(ctx, func(ctx context.Context) (err error) {
		s, err = st.js.Stream(ctx, want.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			s, err = st.js.CreateStream(ctx, want)
			if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
				s, err = st.js.Stream(ctx, want.Name)
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("the StateLog stream %s: %w", want.Name, err)
	}
	have := s.CachedInfo().Config
	if have.MaxAge != want.MaxAge || have.Replicas != want.Replicas || have.AllowAtomicPublish != want.AllowAtomicPublish {
		cfg := have
		cfg.MaxAge, cfg.Replicas, cfg.AllowAtomicPublish = want.MaxAge, want.Replicas, want.AllowAtomicPublish
		if err = retrying(ctx, func(ctx context.Context) (err error) { s, err = st.js.UpdateStream(ctx, cfg); return err }); err != nil {
			return fmt.Errorf("the StateLog stream %s: changing retention to %v and to %d replicas: %w", want.Name, want.MaxAge, want.Replicas, err)
		}
		st.log.Info("StateLog stream settings changed", "app_id", app, "retention_age", want.MaxAge,
			"replicas", want.Replicas, "were", fmt.Sprintf("%v, %d replicas", have.MaxAge, have.Replicas))
	}
	st.mu.Lock()
	st.logStreams[app] = s
	st.mu.Unlock()
	return nil
}

// streamFor is an app's StateLog stream.
func (st *natsStore) streamFor(ctx context.Context, app string) (jetstream.Stream, error) {
	st.mu.Lock()
	s := st.logStreams[app]
	st.mu.Unlock()
	if s != nil {
		return s, nil
	}
	err := retrying(ctx, func(ctx context.Context) (err error) { s, err = st.js.Stream(ctx, logStreamName(app)); return err })
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("app %s has no StateLog stream %s in NATS (was it deleted by hand? it is made again when the app is imported or created)", app, logStreamName(app))
	}
	if err != nil {
		return nil, fmt.Errorf("the StateLog stream of app %s: %w", app, err)
	}
	st.mu.Lock()
	st.logStreams[app] = s
	st.mu.Unlock()
	return s, nil
}

// encodeEntry is a StateLog as stored (its Seq is the message's).
func encodeEntry(e LogEntry) ([]byte, error) {
	e.Seq = 0
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // stdout is often HTML or shell: keep it readable and small
	if err := enc.Encode(&e); err != nil {
		return nil, fmt.Errorf("encode StateLog: %w", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// streamWriter stores one protocol-2 log stream of one connection, in
// order, and acknowledges what JetStream acknowledged.
type streamWriter struct {
	st                *natsStore
	app, inst, stream string
	subj, fenceSubj   string
	fence             uint64
	high              int64 // highest agent seq stored
	atomic            bool  // the stream takes atomic batches
	err               error // why the stream could not be taken: everything is refused
	ack               acker
	in                chan LogEntry
	done              chan struct{}

	// opened is closed once the stream is taken (or could not be); until
	// then high is the writer's alone. lateAck is set when the Handshake
	// could not wait that long: the writer then acknowledges high itself.
	opened  chan struct{}
	mu      sync.Mutex
	isOpen  bool
	lateAck bool
}

// openStream starts the writer of an instance's log stream, which first
// takes ownership of the stream (the fence) and reads the highest agent
// seq stored. When the stream cannot be taken (NATS out of reach, the store
// full), the writer refuses every StateLog (the agent sends them again
// after reconnecting), and the seq is one surely stored, so that the agent
// still gets its recipe.
func (st *natsStore) openStream(app, instance, stream string, ack acker) *streamWriter {
	w := &streamWriter{st: st, app: app, inst: instance, stream: stream, ack: ack,
		subj: logSubject(app, instance, stream), fenceSubj: fenceSubject(app, instance, stream),
		in: make(chan LogEntry, writerQueue), done: make(chan struct{}), opened: make(chan struct{})}
	go w.run()
	return w
}

// firstAck is the seq the Handshake acknowledges: the highest stored, once
// the writer knows it. An agent that gets no StateLogAck within 2 s of
// its Handshake takes the backend for a protocol-1 one (and then never
// waits for acknowledgements): past wait (a cluster electing a leader),
// the Handshake is acknowledged 0, which is always true, and the writer
// acknowledges the high when it has it (the agent drops what the backend
// has already as it comes).
func (w *streamWriter) firstAck(wait time.Duration) int64 {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-w.opened:
	case <-t.C:
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.isOpen {
		return w.high
	}
	w.lateAck = true
	return 0
}

// take opens the stream; it runs first on the writer's goroutine.
func (w *streamWriter) take() {
	ctx, cancel := opCtx(context.Background())
	defer cancel()
	st := w.st
	if err := w.open(ctx); err != nil {
		w.err = err
		w.high = 0
		if sum, serr := st.summary(ctx, w.app, w.inst, w.stream); serr == nil {
			w.high = sum.High
		}
		st.logError("cannot take an instance's log stream; its StateLogs are refused until it can", "app_id", w.app, "instance_id", w.inst, "log_stream", w.stream, "err", err)
	}
	w.mu.Lock()
	w.isOpen = true
	late, high := w.lateAck, w.high
	w.mu.Unlock()
	close(w.opened)
	if late {
		w.ack.ack(w.stream, high)
	}
}

func (w *streamWriter) open(ctx context.Context) error {
	st := w.st
	s, err := st.streamFor(ctx, w.app)
	if err != nil {
		return err
	}
	w.atomic = s.CachedInfo().Config.AllowAtomicPublish
	marker := nats.NewMsg(w.fenceSubj)
	marker.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	pa, err := st.js.PublishMsg(ctx, marker)
	if err != nil {
		return fmt.Errorf("taking the log stream: %w", err)
	}
	w.fence = pa.Sequence
	// Read only now: whatever an earlier owner stored is in the stream
	// by the time the marker is, and it can store nothing after it.
	last, err := s.GetLastMsgForSubject(ctx, w.subj)
	switch {
	case err == nil:
		var e LogEntry
		if json.Unmarshal(last.Data, &e) == nil {
			w.high = e.AgentSeq
			e.Seq = int64(last.Sequence)
			st.sums.note(w.app, w.inst, w.stream, e.AgentSeq, &e)
		}
	case !errors.Is(err, jetstream.ErrMsgNotFound):
		return fmt.Errorf("reading the log stream: %w", err)
	}
	sum, err := st.summary(ctx, w.app, w.inst, w.stream)
	if err != nil {
		return err
	}
	w.high = max(w.high, sum.High)
	return nil
}

// submit hands over a StateLog; it blocks while the writer's queue is full.
func (w *streamWriter) submit(e LogEntry) { w.in <- e }

// close stops taking StateLogs; those handed over are still stored.
func (w *streamWriter) close() { close(w.in) }

func (w *streamWriter) run() {
	defer close(w.done)
	w.take()
	failed := false
	if w.err != nil {
		// Refused at the first StateLog (not before: the agent gets its
		// recipe meanwhile).
		for range w.in {
			if !failed {
				failed = true
				w.ack.refuse(refuseReason(w.err))
			}
		}
		return
	}
	for first := range w.in {
		group := []LogEntry{first}
		size := 0
	drain:
		for len(group) < maxGroup && size < maxGroupBytes {
			select {
			case e, ok := <-w.in:
				if !ok {
					break drain
				}
				group = append(group, e)
				size += len(deref(e.Stdout)) + len(deref(e.Comment))
			default:
				break drain
			}
		}
		if failed || w.ack.refused() {
			failed = true
			continue // the connection is closing unacknowledged: drop, the agent resends
		}
		var fresh []LogEntry
		for _, e := range group {
			if e.AgentSeq > w.high && (len(fresh) == 0 || e.AgentSeq > fresh[len(fresh)-1].AgentSeq) {
				fresh = append(fresh, e)
			}
		}
		if len(fresh) > 0 {
			if err := w.store(fresh); err != nil {
				failed = true
				w.st.logError("cannot store StateLogs; the agent was disconnected and will send them again",
					"app_id", w.app, "instance_id", w.inst, "log_stream", w.stream, "err", err)
				w.ack.refuse(refuseReason(err))
				continue
			}
		}
		w.ack.ack(w.stream, w.high)
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

var errFenceMoved = errors.New("another connection of this instance took over its log stream")

func refuseReason(err error) string {
	if errors.Is(err, errFenceMoved) {
		return "replaced by a newer connection (its StateLogs go there)"
	}
	return "backend could not store StateLogs; reconnect to send them again"
}

// store publishes fresh StateLogs (ascending agent seqs above high) and
// raises high to what JetStream acknowledged. It stops at the first
// failure, so what is stored is always a prefix.
func (w *streamWriter) store(fresh []LogEntry) error {
	data := make([][]byte, len(fresh))
	for i, e := range fresh {
		var err error
		if data[i], err = encodeEntry(e); err != nil {
			return err
		}
	}
	for len(fresh) > 0 {
		n := 1
		var seq uint64
		var err error
		if w.atomic && len(fresh) > 1 && w.st.takeBatchSlot(w.app) {
			seq, err = w.publishBatch(data)
			w.st.releaseBatchSlot(w.app)
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) && !isWrongLast(err) {
				// Refused as a whole (too many batches in flight, say):
				// nothing of it is stored; go one by one.
				seq, err = w.publishOne(data[0])
			} else {
				n = len(fresh)
			}
		} else {
			seq, err = w.publishOne(data[0])
		}
		if err != nil {
			if isWrongLast(err) {
				return errFenceMoved
			}
			return err
		}
		for i := range fresh[:n] {
			e := fresh[i]
			e.Seq = int64(seq) - int64(n-1-i) // an atomic batch takes consecutive seqs
			w.st.logStored(w.app, &e)
		}
		last := fresh[n-1]
		last.Seq = int64(seq)
		w.high = last.AgentSeq
		w.st.sums.note(w.app, w.inst, w.stream, w.high, &last)
		fresh, data = fresh[n:], data[n:]
	}
	return nil
}

func (w *streamWriter) fenced(m *nats.Msg) {
	m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(w.fence, 10))
	m.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, w.fenceSubj)
}

func (w *streamWriter) publishOne(data []byte) (uint64, error) {
	ctx, cancel := opCtx(context.Background())
	defer cancel()
	m := nats.NewMsg(w.subj)
	m.Data = data
	w.fenced(m)
	pa, err := w.st.js.PublishMsg(ctx, m)
	if err != nil {
		return 0, err
	}
	return pa.Sequence, nil
}

// publishBatch stores StateLogs as one atomic batch: all or none, checked
// against the fence once.
func (w *streamWriter) publishBatch(data [][]byte) (uint64, error) {
	id := nuid.Next()
	for i, d := range data[:len(data)-1] {
		m := nats.NewMsg(w.subj)
		m.Data = d
		m.Header.Set("Nats-Batch-Id", id)
		m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(i+1))
		if i == 0 {
			w.fenced(m)
		}
		if err := w.st.nc.PublishMsg(m); err != nil {
			return 0, err
		}
	}
	m := nats.NewMsg(w.subj)
	m.Data = data[len(data)-1]
	m.Header.Set("Nats-Batch-Id", id)
	m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(len(data)))
	m.Header.Set("Nats-Batch-Commit", "1")
	ctx, cancel := opCtx(context.Background())
	defer cancel()
	resp, err := w.st.nc.RequestMsgWithContext(ctx, m)
	if err != nil {
		return 0, err
	}
	var pa struct {
		Error *jetstream.APIError `json:"error"`
		Seq   uint64              `json:"seq"`
		Count int                 `json:"count"`
	}
	if err := json.Unmarshal(resp.Data, &pa); err != nil {
		return 0, fmt.Errorf("atomic batch: bad answer %q: %w", resp.Data, err)
	}
	if pa.Error != nil {
		return 0, pa.Error
	}
	if pa.Count != len(data) {
		return 0, fmt.Errorf("atomic batch: %d of %d StateLogs committed", pa.Count, len(data))
	}
	return pa.Seq, nil
}

func (st *natsStore) takeBatchSlot(app string) bool {
	st.mu.Lock()
	slots := st.batchSlots[app]
	if slots == nil {
		slots = make(chan struct{}, batchSlots)
		st.batchSlots[app] = slots
	}
	st.mu.Unlock()
	select {
	case slots <- struct{}{}:
		return true
	default:
		return false
	}
}

func (st *natsStore) releaseBatchSlot(app string) {
	st.mu.Lock()
	slots := st.batchSlots[app]
	st.mu.Unlock()
	<-slots
}

// logStored logs a stored StateLog: one line each, a failed state as a
// warning, the client's strings clipped.
func (st *natsStore) logStored(app string, e *LogEntry) {
	lvl := slog.LevelInfo
	if !e.Result {
		lvl = slog.LevelWarn
	}
	comment := ""
	if e.Comment != nil {
		comment = clip(firstLine(*e.Comment))
	}
	st.log.Log(context.Background(), lvl, "StateLog", "app_id", app, "instance_id", e.InstanceID, "recipe_version", e.RecipeVersion,
		"state_id", clip(e.StateID), "result", e.Result, "comment", comment, "seq", e.Seq)
}

// publishUnsequenced stores a protocol-1 StateLog: no seq, no
// acknowledgement, so no dedupe and no fence.
func (st *natsStore) publishUnsequenced(app string, e LogEntry) error {
	data, err := encodeEntry(e)
	if err != nil {
		return err
	}
	f, err := st.js.PublishAsync(logSubject(app, e.InstanceID, ""), data)
	if err != nil {
		return err
	}
	go func() {
		select {
		case pa := <-f.Ok():
			e.Seq = int64(pa.Sequence)
			st.sums.note(app, e.InstanceID, "", 0, &e)
			st.logStored(app, &e)
		case <-f.Err(): // logged by the async error handler
		}
	}()
	return nil
}

// readLogs is one page of an app's StateLogs with seq > after: at most
// limit of them and, past the first, at most maxBytes as stored. more
// reports that the page ends before the last one stored.
func (st *natsStore) readLogs(ctx context.Context, app string, after int64, limit, maxBytes int) ([]LogEntry, bool, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	s, err := st.streamFor(ctx, app)
	if err != nil {
		return nil, false, err
	}
	p := &pageReader{out: []LogEntry{}, after: after, limit: limit, maxBytes: maxBytes, want: 16}
	// A read cut short (the stream's leader moved) goes on from where it
	// stopped.
	if err := retrying(ctx, func(ctx context.Context) error { return p.read(ctx, s, logsFilter(app)) }); err != nil {
		return nil, false, fmt.Errorf("reading StateLogs: %w", err)
	}
	return p.out, p.more, nil
}

// pageReader is a page being read.
type pageReader struct {
	out             []LogEntry
	after           int64
	limit, maxBytes int
	size            int
	more            bool
	// want is the next batch's size: small batches sized by what came so
	// far, so that a page of fat StateLogs holds little more than maxBytes
	// in memory.
	want int
}

func (p *pageReader) read(ctx context.Context, s jetstream.Stream, filter string) error {
	start := p.after + 1
	if len(p.out) > 0 {
		start = p.out[len(p.out)-1].Seq + 1
	}
	cons, err := s.CreateConsumer(ctx, jetstream.ConsumerConfig{
		AckPolicy: jetstream.AckNonePolicy, DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: uint64(start),
		FilterSubject: filter, MemoryStorage: true, Replicas: 1, InactiveThreshold: time.Minute,
	})
	if err != nil {
		return err
	}
	defer func() {
		dctx, dcancel := opCtx(context.Background())
		_ = s.DeleteConsumer(dctx, cons.CachedInfo().Name)
		dcancel()
	}()
	for len(p.out) < p.limit && !p.more {
		batch, err := cons.FetchNoWait(min(p.limit-len(p.out), p.want))
		if err != nil {
			return err
		}
		got := 0
		var pending uint64
		for msg := range batch.Messages() {
			got++
			if p.more {
				continue // drained, not taken
			}
			data := msg.Data()
			if len(p.out) > 0 && p.size+len(data) > p.maxBytes {
				p.more = true
				continue
			}
			md, err := msg.Metadata()
			if err != nil {
				continue
			}
			pending = md.NumPending
			var e LogEntry
			if json.Unmarshal(data, &e) != nil {
				continue
			}
			e.Seq = int64(md.Sequence.Stream)
			p.out = append(p.out, e)
			p.size += len(data)
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return err
		}
		if got == 0 || pending == 0 && !p.more {
			return nil
		}
		if len(p.out) >= p.limit {
			p.more = pending > 0
		}
		if len(p.out) > 0 {
			p.want = max(1, min(256, (p.maxBytes-p.size)/max(p.size/len(p.out), 1)))
		}
	}
	return nil
}

// retain deletes an app's oldest StateLogs while its stream is over the
// retention size: the number to delete is estimated from the average
// StateLog, and checked again. Only StateLogs are purged (the fences of
// live connections stay). Idempotent, so every replica may run it.
func (st *natsStore) retain(ctx context.Context, app string) error {
	s, err := st.streamFor(ctx, app)
	if err != nil {
		return err
	}
	for range 8 {
		info, err := s.Info(ctx)
		if err != nil {
			return err
		}
		state := info.State
		if int64(state.Bytes) <= st.logCfg.retentionBytes || state.Msgs == 0 {
			return nil
		}
		avg := max(state.Bytes/state.Msgs, 1)
		n := max((uint64(int64(state.Bytes)-st.logCfg.retentionBytes)+avg-1)/avg, 1)
		if err := s.Purge(ctx, jetstream.WithPurgeSubject(logsFilter(app)), jetstream.WithPurgeKeep(state.Msgs-min(n, state.Msgs))); err != nil {
			return err
		}
	}
	return nil
}

// lastSeq is the app's last stream seq (GET /api/apps).
func (st *natsStore) lastSeq(ctx context.Context, app string) (int64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	s, err := st.streamFor(ctx, app)
	if err != nil {
		return 0, err
	}
	var info *jetstream.StreamInfo
	if err := retrying(ctx, func(ctx context.Context) (err error) { info, err = s.Info(ctx); return err }); err != nil {
		return 0, err
	}
	return int64(info.State.LastSeq), nil
}

// instSummary is what GET /api/apps/{app}/instances shows about one
// instance's StateLogs, without reading them.
type instSummary struct {
	last     *LogEntry // newest retained StateLog (output capped)
	count    int64     // retained StateLogs
	lastRecv time.Time
	// streams maps log stream → highest agent seq stored; it outlives
	// retention, as it decides what is a duplicate.
	streams map[string]int64
}

// summaries are an app's instance summaries: the counts from the stream's
// subjects, the rest from the opsagent-logstreams bucket.
func (st *natsStore) summaries(ctx context.Context, app string) (map[string]instSummary, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	out := map[string]instSummary{}
	inst := func(id string) instSummary {
		in, ok := out[id]
		if !ok {
			in = instSummary{streams: map[string]int64{}}
		}
		return in
	}
	s, err := st.streamFor(ctx, app)
	if err != nil {
		return nil, err
	}
	var info *jetstream.StreamInfo
	err = retrying(ctx, func(ctx context.Context) (err error) {
		info, err = s.Info(ctx, jetstream.WithSubjectFilter(logsFilter(app)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("the StateLog stream of app %s: %w", app, err)
	}
	prefix := strings.TrimSuffix(logsFilter(app), ">")
	for subj, n := range info.State.Subjects {
		parts, err := splitKey(strings.TrimPrefix(subj, prefix), 2)
		if err != nil {
			continue
		}
		in := inst(parts[0])
		in.count += int64(n)
		out[parts[0]] = in
	}
	w, err := st.logstreams.WatchFiltered(ctx, []string{esc(app) + ".>"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", bucketLogStreams, err)
	}
	defer w.Stop()
	for e := range w.Updates() {
		if e == nil {
			break
		}
		parts, err := splitKey(e.Key(), 3)
		if err != nil {
			continue
		}
		var sum streamSummary
		if json.Unmarshal(e.Value(), &sum) != nil {
			continue
		}
		in := inst(parts[1])
		if parts[2] != anyToken && sum.High > 0 {
			in.streams[parts[2]] = sum.High
		}
		if sum.Last != nil && in.count > 0 && (in.last == nil || sum.Last.Seq > in.last.Seq) {
			in.last, in.lastRecv = sum.Last, sum.Last.ReceivedAt
		}
		out[parts[1]] = in
	}
	return out, nil
}

// streamSummary is one log stream's entry in the opsagent-logstreams
// bucket: the highest agent seq stored (the dedupe's high-water mark,
// kept beyond retention) and its last StateLog.
type streamSummary struct {
	High int64     `json:"high"`
	Last *LogEntry `json:"last,omitempty"`
}

func (st *natsStore) summary(ctx context.Context, app, instance, stream string) (streamSummary, error) {
	var sum streamSummary
	e, err := kvGet(ctx, st.logstreams, summaryKey(app, instance, stream))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return sum, nil
	}
	if err != nil {
		return sum, fmt.Errorf("bucket %s: %w", bucketLogStreams, err)
	}
	if err := json.Unmarshal(e.Value(), &sum); err != nil {
		return sum, fmt.Errorf("bucket %s, key %s: %w", bucketLogStreams, e.Key(), err)
	}
	return sum, nil
}

// merge keeps the higher mark and the later StateLog.
func (s streamSummary) merge(o streamSummary) streamSummary {
	s.High = max(s.High, o.High)
	if o.Last != nil && (s.Last == nil || o.Last.Seq > s.Last.Seq) {
		s.Last = o.Last
	}
	return s
}

// summaryWriter writes stream summaries behind the acknowledgements,
// coalescing: the last value per stream wins, merged with what is stored
// (compare-and-set), so that it never goes back. A crash loses at most the
// last writes, which the next owner of the stream redoes from the stream's
// last StateLog (openStream).
type summaryWriter struct {
	st   *natsStore
	mu   sync.Mutex
	cond *sync.Cond
	// dirty holds what is to be written; busy is set while a round runs.
	dirty        map[string]streamSummary
	busy, closed bool
	written      sync.Map // key → writtenSummary: the last one written or read

	done chan struct{}
}

func newSummaryWriter(st *natsStore) *summaryWriter {
	w := &summaryWriter{st: st, dirty: map[string]streamSummary{}, done: make(chan struct{})}
	w.cond = sync.NewCond(&w.mu)
	go w.run()
	return w
}

func (w *summaryWriter) note(app, instance, stream string, high int64, last *LogEntry) {
	var cp *LogEntry
	if last != nil {
		c := *last
		c.Comment, c.Stdout = capOutput(c.Comment, summaryOutput), capOutput(c.Stdout, summaryOutput)
		cp = &c
	}
	key := summaryKey(app, instance, stream)
	w.mu.Lock()
	w.dirty[key] = w.dirty[key].merge(streamSummary{High: high, Last: cp})
	w.cond.Signal()
	w.mu.Unlock()
}

func (w *summaryWriter) run() {
	defer close(w.done)
	w.mu.Lock()
	for {
		for len(w.dirty) == 0 && !w.closed {
			w.cond.Wait()
		}
		if len(w.dirty) == 0 {
			w.mu.Unlock()
			return
		}
		round := w.dirty
		w.dirty = map[string]streamSummary{}
		w.busy = true
		w.mu.Unlock()
		w.writeRound(round)
		w.mu.Lock()
		w.busy = false
		w.cond.Broadcast()
	}
}

// writeRound writes one round's summaries, a few at a time.
func (w *summaryWriter) writeRound(round map[string]streamSummary) {
	keys := make(chan string)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range keys {
				if err := w.write(k, round[k]); err != nil {
					w.st.logError("cannot store a log stream's summary (its high-water mark); retried with its next StateLog", "key", k, "err", err)
				}
			}
		}()
	}
	for k := range round {
		keys <- k
	}
	close(keys)
	wg.Wait()
}

// writtenSummary is what the writer last wrote (or read) of a key.
type writtenSummary struct {
	rev uint64
	sum streamSummary
}

func (w *summaryWriter) write(key string, s streamSummary) error {
	kv := w.st.logstreams
	for attempt := 0; ; attempt++ {
		ctx, cancel := opCtx(context.Background())
		var rev uint64
		if prev, ok := w.written.Load(key); ok {
			rev, s = prev.(writtenSummary).rev, s.merge(prev.(writtenSummary).sum)
		} else {
			e, err := kvGet(ctx, kv, key)
			switch {
			case err == nil:
				var stored streamSummary
				_ = json.Unmarshal(e.Value(), &stored)
				s, rev = s.merge(stored), e.Revision()
			case !errors.Is(err, jetstream.ErrKeyNotFound):
				cancel()
				return err
			}
		}
		data, _ := json.Marshal(s)
		var err error
		if rev == 0 {
			rev, err = kv.Create(ctx, key, data)
		} else {
			rev, err = kv.Update(ctx, key, data, rev)
		}
		cancel()
		if err == nil {
			w.written.Store(key, writtenSummary{rev, s})
			return nil
		}
		w.written.Delete(key) // read it again and merge
		if !isWrongLast(err) || attempt >= 10 {
			return err
		}
	}
}

func (w *summaryWriter) close() error {
	w.mu.Lock()
	w.closed = true
	w.cond.Broadcast()
	w.mu.Unlock()
	select {
	case <-w.done:
		return nil
	case <-time.After(30 * time.Second):
		return errors.New("log stream summaries not all written within 30 s (their StateLogs are stored; the summaries are rebuilt as agents reconnect)")
	}
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
