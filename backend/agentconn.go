package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

// agentConn is one agent's connection: one reader (serveAgent) and one
// writer goroutine fed by a bounded queue, so that a slow agent is
// disconnected instead of stalling a broadcast.
type agentConn struct {
	ws    *websocket.Conn
	queue chan *websocket.PreparedMessage
	done  chan struct{}
	once  sync.Once
	log   *slog.Logger

	app, instance string
	agentVersion  string
	initErrors    string // what the agent's Handshake reported, "" for none
	since         time.Time
	recipeVersion atomic.Int64 // last recipe version sent to it
	// logStream is the protocol-2 log stream named by the Handshake, or ""
	// (protocol 1: StateLogs are stored, never acknowledged); writer
	// stores it (statelogs.go).
	logStream string
	logs      *streamWriter
	// presenceRev is the revision of its presence entry once written.
	presenceRev atomic.Uint64
	// storeFailed is set when some of its StateLogs could not be stored:
	// the connection is being closed and no more of its StateLogs are
	// stored or acknowledged, so that no acknowledgement covers the lost
	// ones; the agent sends them again after reconnecting.
	storeFailed atomic.Bool
}

func (c *agentConn) send(frame []byte) {
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, frame)
	if err != nil {
		return
	}
	c.sendPrepared(pm)
}

// sendPrepared queues a frame framed once for every receiver (broadcasts).
func (c *agentConn) sendPrepared(pm *websocket.PreparedMessage) {
	select {
	case c.queue <- pm:
	case <-c.done:
	default:
		c.log.Warn("agent send queue full; disconnecting it", "instance_id", c.instance)
		c.close(websocket.CloseTryAgainLater, "send queue full")
	}
}

// maxCloseReason is what fits in a close frame (125 bytes less the code);
// gorilla refuses to send a longer one, and the agent would see no reason.
const maxCloseReason = 123

// close sends a close frame (best effort) and ends the connection.
func (c *agentConn) close(code int, reason string) {
	c.once.Do(func() {
		reason = textcut.Prefix(reason, maxCloseReason)
		_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, reason), time.Now().Add(time.Second))
		close(c.done)
		_ = c.ws.Close()
	})
}

func (c *agentConn) writer(ping, dead time.Duration) {
	t := time.NewTicker(ping)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case frame := <-c.queue:
			_ = c.ws.SetWriteDeadline(time.Now().Add(dead))
			if err := c.ws.WritePreparedMessage(frame); err != nil {
				c.close(websocket.CloseAbnormalClosure, "")
				return
			}
		case <-t.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(dead)); err != nil {
				c.close(websocket.CloseAbnormalClosure, "")
				return
			}
		}
	}
}

func (s *Server) serveAgent(w http.ResponseWriter, r *http.Request) {
	ws, err := s.up.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade already answered with an HTTP error
	}
	c := &agentConn{ws: ws, queue: make(chan *websocket.PreparedMessage, s.opts.SendQueue), done: make(chan struct{}), log: s.log, since: time.Now()}
	go c.writer(s.opts.PingInterval, s.opts.DeadAfter)
	rd := &reader{s: s, c: c, remote: r.RemoteAddr, bad: logLimiter{every: s.opts.badFrameEvery}}
	defer func() {
		c.close(websocket.CloseNormalClosure, "")
		s.unregister(c)
		rd.flushSuppressed()
	}()
	rd.run()
}

// maxHandshakeFrame is the frame size limit until a Handshake is accepted.
// A Handshake is well under 1 KiB; this keeps a socket that has not
// identified itself from making the backend buffer a MaxFrame frame.
const maxHandshakeFrame = 64 << 10

// maxNotReady is how many AppNotReady answers one connection gets: the
// agent closes the socket after the first and reconnects later, so a
// client that keeps handshaking for unknown apps on one socket is closed.
const maxNotReady = 3

// errFrameTooLarge is a frame over the connection's current limit.
var errFrameTooLarge = errors.New("frame over the size limit")

// reader is the state of one connection's read loop.
type reader struct {
	s        *Server
	c        *agentConn
	remote   string
	bad      logLimiter
	notReady int // AppNotReady answers sent on this connection
}

// run reads frames until the connection ends. Until a Handshake is
// accepted, frames are limited to maxHandshakeFrame and do not extend the
// read deadline, nor does an AppNotReady answer: a socket that never
// identifies itself is closed HandshakeTimeout after it opened, however
// much it sends.
func (rd *reader) run() {
	s, c, ws := rd.s, rd.c, rd.c.ws
	ws.SetPongHandler(func(string) error {
		if c.instance == "" {
			return nil
		}
		return ws.SetReadDeadline(time.Now().Add(s.opts.DeadAfter))
	})
	_ = ws.SetReadDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	for {
		data, err := rd.next()
		if err != nil {
			rd.readFailed(err)
			return
		}
		if c.instance != "" {
			_ = ws.SetReadDeadline(time.Now().Add(s.opts.DeadAfter))
		}
		msg, err := protocol.DecodeLimit(data, s.opts.MaxFrame)
		if err != nil {
			rd.badFrame("ignored a bad frame from an agent", "err", err)
			continue
		}
		if !rd.dispatch(msg) {
			return
		}
	}
}

// limit is the connection's frame size limit: maxHandshakeFrame until a
// Handshake is accepted, then MaxFrame.
func (rd *reader) limit() int {
	if rd.c.instance == "" {
		return min(rd.s.opts.MaxFrame, maxHandshakeFrame)
	}
	return rd.s.opts.MaxFrame
}

// next reads one message of at most limit bytes, holding no more than
// that in memory. The limit is checked here rather than by gorilla's
// SetReadLimit, whose own 1009 close frame would carry no reason.
func (rd *reader) next() ([]byte, error) {
	limit := rd.limit()
	_, r, err := rd.c.ws.NextReader()
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		return nil, err
	}
	if len(data) > limit {
		return nil, errFrameTooLarge
	}
	return data, nil
}

func (rd *reader) readFailed(err error) {
	var ne net.Error
	switch {
	case errors.Is(err, errFrameTooLarge):
		limit := rd.limit()
		reason := fmt.Sprintf("frames are limited to %d bytes", limit)
		if rd.c.instance == "" {
			reason = fmt.Sprintf("frames before the Handshake are limited to %d bytes", limit)
		}
		rd.s.refusals.add(refFrameTooLarge, "remote", rd.remote, "instance_id", rd.c.instance, "reason", reason)
		rd.c.close(websocket.CloseMessageTooBig, reason)
	case errors.As(err, &ne) && ne.Timeout() && rd.c.instance == "":
		reason := "no Handshake within " + rd.s.opts.HandshakeTimeout.String()
		rd.s.refusals.add(refNoHandshake, "remote", rd.remote, "reason", reason)
		rd.c.close(websocket.ClosePolicyViolation, reason)
	}
}

// dispatch handles one decoded frame; false ends the connection.
func (rd *reader) dispatch(msg protocol.Message) bool {
	s, c := rd.s, rd.c
	if m, ok := msg.(*protocol.Handshake); ok {
		return rd.handshake(m)
	}
	if c.instance == "" {
		rd.badFrame("agent sent a message before its Handshake; ignored", "code", msg.MessageCode())
		return true
	}
	switch m := msg.(type) {
	case *protocol.StateLog:
		if forged(c, m) {
			rd.badFrame("StateLog names another instance or app; ignored", "claimed", clip(m.InstanceID)+"/"+clip(m.AppID))
			return true
		}
		s.stateLog(c, m)
	case *protocol.WaitQuery:
		s.waitQuery(c, m)
	case *protocol.Test:
		if m.InstanceID != "" {
			frame, _ := protocol.Encode(&protocol.TestAns{Result: m.InstanceID == c.instance && m.AppID == c.app})
			c.send(frame)
		}
	default:
		rd.badFrame("ignored a backend-to-agent message sent by an agent", "code", msg.MessageCode())
	}
	return true
}

// handshake accepts the first Handshake that registers the connection. A
// later one naming the same identity is a harmless repeat; one naming
// another would leave the first identity registered to this socket, so it
// ends the connection.
func (rd *reader) handshake(m *protocol.Handshake) bool {
	c := rd.c
	if c.instance != "" {
		if m.InstanceID == c.instance && m.AppID == c.app {
			return true
		}
		rd.s.log.Warn("second Handshake names another identity; closing", "instance_id", c.instance, "app_id", c.app, "claimed", clip(m.InstanceID)+"/"+clip(m.AppID))
		c.close(websocket.ClosePolicyViolation, "one connection serves one instance: reconnect to handshake as another")
		return false
	}
	switch rd.s.handshake(c, m, rd.remote) {
	case hsRefused:
		return false
	case hsNotReady:
		return rd.appNotReady(m.AppID)
	case hsRegistered:
		_ = c.ws.SetReadDeadline(time.Now().Add(rd.s.opts.DeadAfter))
	}
	return true
}

// appNotReady answers a Handshake for an unknown app. The handshake
// deadline stays where it is (HandshakeTimeout after the connection
// opened): the agent closes the socket on AppNotReady and reconnects after
// its delay, so the answer buys no time, and after maxNotReady answers one
// more such Handshake closes the connection.
func (rd *reader) appNotReady(app string) bool {
	if rd.notReady >= maxNotReady {
		reason := fmt.Sprintf("the app does not exist (%d Handshakes got AppNotReady): reconnect later", rd.notReady)
		rd.s.refusals.add(refNoHandshake, "remote", rd.remote, "app_id", clip(app), "reason", reason)
		rd.c.close(websocket.ClosePolicyViolation, reason)
		return false
	}
	rd.notReady++
	rd.s.refusals.add(refAppUnknown, "remote", rd.remote, "app_id", clip(app), "reason", "AppNotReady: no such app")
	frame, _ := protocol.Encode(&protocol.AppNotReady{})
	rd.c.send(frame)
	return true
}

// badFrame logs at most one line per interval per connection, so that one
// misbehaving agent cannot flood the backend's log: bad frames and forged
// StateLogs share the interval. Before a Handshake the connection is
// anyone's, and many of them could each log a line: those are counted
// with the refusals instead. Client-supplied args must be clipped.
func (rd *reader) badFrame(msg string, args ...any) {
	if rd.c.instance == "" {
		rd.s.refusals.add(refEarlyFrame, append([]any{"remote", rd.remote, "reason", msg}, args...)...)
		return
	}
	ok, suppressed := rd.bad.allow(time.Now())
	if !ok {
		return
	}
	args = append(args, "remote", rd.remote, "instance_id", rd.c.instance)
	if suppressed > 0 {
		args = append(args, "suppressed_since_last", suppressed)
	}
	rd.s.log.Warn(msg, args...)
}

func (rd *reader) flushSuppressed() {
	if n := rd.bad.suppressed; n > 0 {
		rd.s.log.Warn("more bad frames were ignored before the connection ended", "remote", rd.remote, "instance_id", rd.c.instance, "suppressed", n)
	}
}

// logLimiter lets one event through per interval and counts the others.
type logLimiter struct {
	every      time.Duration
	next       time.Time
	suppressed int
}

// allow reports whether to log now, and how many events were held back
// since the last one logged.
func (l *logLimiter) allow(now time.Time) (ok bool, suppressed int) {
	if now.Before(l.next) {
		l.suppressed++
		return false, 0
	}
	l.next = now.Add(l.every)
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}

type hsResult int

const (
	hsRefused    hsResult = iota // the connection was closed
	hsNotReady                   // the app is unknown: the reader answers AppNotReady
	hsRegistered                 // the connection serves this instance
)

// handshake checks the identity, the app and the token (or, for a new
// instance, the enrollment secret and the enrollment limit), takes the
// instance's log stream (protocol 2) and registers the connection.
// Refusals are counted (refusals.go), with the ids clipped until
// checkIdentity has bounded them.
func (s *Server) handshake(c *agentConn, m *protocol.Handshake, remote string) hsResult {
	if reason := checkIdentity(&m.Identity); reason != "" {
		s.refusals.add(refBadIdentity, "remote", remote, "instance_id", clip(m.InstanceID), "app_id", clip(m.AppID), "reason", reason)
		c.close(websocket.ClosePolicyViolation, reason)
		return hsRefused
	}
	refuse := func(r *refusal) hsResult {
		s.refusals.add(r.kind, "remote", remote, "instance_id", m.InstanceID, "app_id", m.AppID, "reason", r.log)
		c.close(r.code, r.reason)
		return hsRefused
	}
	app, err := s.appFor(m.AppID)
	switch {
	case errors.Is(err, errNoApp):
		return hsNotReady
	case err != nil:
		return refuse(&refusal{refAppFailed, websocket.CloseTryAgainLater,
			"the backend cannot load this app now (a storage problem on its side); reconnect later", err.Error()})
	}
	log := s.log.With("instance_id", m.InstanceID, "app_id", m.AppID)
	firstSeen, r := s.admit(app, m, time.Now())
	if r != nil {
		return refuse(r)
	}
	c.app, c.instance, c.agentVersion = m.AppID, m.InstanceID, m.AgentVersion
	if m.InitErrors != nil {
		c.initErrors = textcut.Prefix(*m.InitErrors, 4<<10)
	}
	if m.ProtocolVersion >= 2 && m.LogStream != "" {
		w := s.st.openStream(c.app, c.instance, m.LogStream, c)
		high := w.firstAck(handshakeStorageWait)
		// Queued before the connection is registered, so that no push can
		// come first: the agent tells the protocol by the first frame.
		c.logStream, c.logs = m.LogStream, w
		s.writers.Add(1)
		go func() { <-w.done; s.writers.Done() }()
		c.ack(c.logStream, high)
	}
	s.freshen(m.AppID)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return refuse(&refusal{refShuttingDown, websocket.CloseGoingAway, "backend shutting down", "backend shutting down"})
	}
	old := s.register(c)
	frames := s.welcome(app, c, m.AgentVersion)
	s.mu.Unlock()
	if old != nil && old != c {
		old.close(websocket.CloseNormalClosure, "replaced by a newer connection")
	}
	go s.announce(c)
	init := ""
	if m.InitErrors != nil {
		init = *m.InitErrors
	}
	log.Info("agent connected", "agent_version", clip(m.AgentVersion), "init_errors", clip(init), "first_seen", firstSeen)
	for _, f := range frames {
		c.send(f)
	}
	return hsRegistered
}

// freshen reads the app's record from the store into the view before a
// Handshake is welcomed. The view may lag the store (its watch catching
// up after the NATS node it used went away, or after a restart): an agent
// that got a newer recipe through another replica would be sent an older
// one, run it again and drop the StateLogs it had queued for the newer
// (the agent drops those of a replaced recipe). When the store does not
// answer within handshakeStorageWait the view serves as it is.
func (s *Server) freshen(app string) {
	ctx, cancel := context.WithTimeout(context.Background(), handshakeStorageWait)
	defer cancel()
	e, err := kvGet(ctx, s.st.apps, esc(app))
	if err != nil {
		s.log.Debug("cannot read the app's record at a Handshake; the view serves", "app_id", app, "err", err)
		return
	}
	s.apply(eventOf(bucketApps, e))
}

// handshakeStorageWait bounds the storage work a Handshake waits for
// before its first answer: an agent that hears nothing within 2 s takes
// the backend for a protocol-1 one.
const handshakeStorageWait = time.Second

// refusal is why admit turned a Handshake away: its kind (refusals.go), a
// close code, a close reason for the agent and a longer one for the log.
type refusal struct {
	kind        string
	code        int
	reason, log string
}

// admit checks a known instance's token, or enrolls a new instance when it
// presents the app's enrollment secret (or enrollment is open) within the
// app's enrollment limit. A revoked instance id is refused either way. The
// enrollment is a create in the shared bucket: when another replica
// enrolled the id meanwhile, its record decides.
func (s *Server) admit(app *appState, m *protocol.Handshake, now time.Time) (firstSeen bool, r *refusal) {
	revokedRefusal := &refusal{refRevoked, websocket.ClosePolicyViolation, revokedReason,
		"instance revoked (POST /api/apps/" + app.AppID + "/instances/" + m.InstanceID + "/admit lets it enroll again)"}
	mismatch := &refusal{refTokenMismatch, websocket.ClosePolicyViolation, "instance token mismatch", "instance token differs from the one first seen for this instance"}
	s.mu.Lock()
	_, revoked := app.Revoked[m.InstanceID]
	known, seen := app.TokenHashes[m.InstanceID]
	secret := app.Secret
	s.mu.Unlock()
	if seen || revoked {
		// The view follows the bucket through a watch, so it can lag a
		// revocation (or an admission) made through another replica by a
		// moment: for an id it knows, the stored record decides, so that
		// a revocation holds on every replica once its DELETE has
		// answered. Unknown ids are decided by the enrollment's create
		// below. When the record cannot be read (NATS out of reach), the
		// view decides: agents it knows reconnect, as they do to a
		// single backend.
		ctx, cancel := context.WithTimeout(context.Background(), handshakeStorageWait)
		rec, rev, found, err := s.st.instance(ctx, app.AppID, m.InstanceID)
		cancel()
		switch {
		case err != nil:
		case !found:
			seen, revoked = false, false
		default:
			data, _ := json.Marshal(rec)
			s.apply(kvEvent{bucket: bucketInstances, key: instanceKey(app.AppID, m.InstanceID), value: data, rev: rev})
			revoked = rec.RevokedAt != nil
			known, seen = rec.SHA256, !revoked
		}
	}
	h := hashToken(m.InstanceToken)
	switch {
	case revoked:
		return false, revokedRefusal
	case seen && !sameHash(known, h):
		return false, mismatch
	case seen:
		return false, nil
	}
	if secret == "" && !s.opts.OpenEnrollment {
		// A crash between the parts of an app, or an import of one without
		// a secret: it gets one.
		ctx, cancel := context.WithTimeout(context.Background(), handshakeStorageWait)
		err := s.refresh(ctx, app.AppID)
		cancel()
		if err == nil {
			s.mu.Lock()
			secret = app.Secret
			s.mu.Unlock()
		}
	}
	if !s.opts.OpenEnrollment && !enrollmentOK(m.EnrollmentSecret, secret) {
		return false, &refusal{refBadSecret, websocket.ClosePolicyViolation, enrollReason,
			"new instance without the right enrollment secret; the agent needs [userdata] enroll_secret from GET /api/apps/" + app.AppID + "/enrollment"}
	}
	// After the secret: those without it cannot use up the app's quota.
	if !s.enroll.allow(app.AppID, now) {
		return false, &refusal{refEnrollLimit, websocket.CloseTryAgainLater, s.enroll.reason(),
			"over the app's enrollment limit: " + s.enroll.reason()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), handshakeStorageWait)
	rec, rev, created, err := s.st.enroll(ctx, app.AppID, m.InstanceID, h)
	cancel()
	if err != nil {
		return false, &refusal{refStorage, websocket.CloseTryAgainLater, "backend storage error; reconnect later", "cannot store the instance token: " + err.Error()}
	}
	data, _ := json.Marshal(rec)
	s.apply(kvEvent{bucket: bucketInstances, key: instanceKey(app.AppID, m.InstanceID), value: data, rev: rev})
	switch {
	case rec.RevokedAt != nil:
		return false, revokedRefusal
	case !sameHash(rec.SHA256, h):
		return false, mismatch
	}
	return created, nil
}

// register makes c the live connection of its instance and returns the one
// it replaces. Called with s.mu held.
func (s *Server) register(c *agentConn) *agentConn {
	byInst := s.agents[c.app]
	if byInst == nil {
		byInst = map[string]*agentConn{}
		s.agents[c.app] = byInst
	}
	old := byInst[c.instance]
	byInst[c.instance] = c
	return old
}

// welcome is what a newly registered agent is sent: the recipe, its
// released waits and any pending update. Called with s.mu held.
func (s *Server) welcome(app *appState, c *agentConn, agentVersion string) [][]byte {
	var frames [][]byte
	if app.RecipeVersion > 0 {
		f, _ := protocol.Encode(app.recipe())
		frames = append(frames, f)
		c.recipeVersion.Store(app.RecipeVersion)
		for _, id := range app.releasedFor(c.instance) {
			f, _ := protocol.Encode(&protocol.StatePush{RecipeVersion: app.RecipeVersion, StateID: id})
			frames = append(frames, f)
		}
	}
	if u := app.Update; u != nil && u.Version != agentVersion {
		f, _ := protocol.Encode(u)
		frames = append(frames, f)
	}
	return frames
}

func (s *Server) unregister(c *agentConn) {
	if c.logs != nil {
		c.logs.close() // what it was handed is still stored
	}
	if c.instance == "" {
		return
	}
	s.mu.Lock()
	if s.agents[c.app][c.instance] == c {
		delete(s.agents[c.app], c.instance)
	}
	s.mu.Unlock()
	s.log.Info("agent disconnected", "instance_id", c.instance, "app_id", c.app)
}

// forged reports whether a StateLog names an instance or app other than
// its connection's (empty ids mean the connection's own).
func forged(c *agentConn, m *protocol.StateLog) bool {
	return m.AppID != "" && m.AppID != c.app || m.InstanceID != "" && m.InstanceID != c.instance
}

// stateLog hands a StateLog of the connection's own instance (the reader
// drops forged ones) to its log stream's writer and goes on reading: the
// writer stores it and, for a protocol-2 connection, acknowledges it
// (statelogs.go). A seq without a log stream cannot be deduplicated: it is
// kept for the record but not acknowledged.
func (s *Server) stateLog(c *agentConn, m *protocol.StateLog) {
	if forged(c, m) {
		return
	}
	e := LogEntry{ReceivedAt: time.Now().UTC(), InstanceID: c.instance, AgentSeq: m.Seq, RecipeVersion: m.RecipeVersion,
		StateID: m.StateID, Result: m.Result, Comment: m.Comment, Stdout: m.Stdout}
	capEntry(&e, s.opts.MaxOutputBytes)
	if m.Seq > 0 && c.logs != nil {
		e.LogStream = c.logStream
		c.logs.submit(e)
	} else {
		if err := s.st.publishUnsequenced(c.app, e); err != nil {
			s.st.logError("cannot store a protocol-1 StateLog (never acknowledged, so it is lost)", "app_id", c.app, "instance_id", c.instance, "err", err)
		}
	}
	if m.Result {
		s.relay(c.app, c.instance, m.RecipeVersion, m.StateID)
	}
}

// ack queues a StateLogAck. It never blocks: the stream writer calls it,
// and a full queue (an agent that reads nothing) is closed from another
// goroutine, as closing writes a frame.
func (c *agentConn) ack(stream string, seq int64) {
	frame, err := protocol.Encode(&protocol.StateLogAck{LogStream: stream, Seq: seq})
	if err != nil {
		return
	}
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, frame)
	if err != nil {
		return
	}
	select {
	case c.queue <- pm:
	case <-c.done:
	default:
		c.log.Warn("agent send queue full; disconnecting it", "instance_id", c.instance)
		go c.close(websocket.CloseTryAgainLater, "send queue full")
	}
}

// refuse closes the connection without acknowledging more: its StateLogs
// could not all be stored, and the agent sends them again after
// reconnecting. It never blocks (the stream writer calls it).
func (c *agentConn) refuse(reason string) {
	if c.storeFailed.CompareAndSwap(false, true) {
		go c.close(websocket.CloseInternalServerErr, reason)
	}
}

func (c *agentConn) refused() bool { return c.storeFailed.Load() }

func (s *Server) waitQuery(c *agentConn, m *protocol.WaitQuery) {
	s.mu.Lock()
	app := s.view(c.app)
	wl := &protocol.WaitList{RecipeVersion: m.RecipeVersion, Waited: []protocol.WaitEntry{}}
	if app.RecipeVersion == m.RecipeVersion {
		for _, id := range app.releasedFor(c.instance) {
			wl.Waited = append(wl.Waited, protocol.WaitEntry{InstanceID: c.instance, StateID: id})
		}
	}
	s.mu.Unlock()
	frame, _ := protocol.Encode(wl)
	c.send(frame)
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " …"
	}
	return s
}
