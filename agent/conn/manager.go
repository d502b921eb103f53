// Package conn is the agent's side of the WebSocket to the backend
// (spec/protocol.md): it connects, sends Handshake, keeps the link alive
// with pings, reconnects forever with exponential backoff and full jitter,
// and queues StateLogs in an ordered, bounded outbox that survives
// reconnects. Messages for the round engine go to a Handler.
//
// Each connection has exactly one reader and one writer goroutine, as
// gorilla/websocket requires; everything else hands frames to the writer.
//
// Delivery of StateLogs is at-least-once: an entry leaves the outbox only
// after it was written to the socket, so a connection that dies between the
// write and the backend reading it loses nothing, but a frame written just
// before the loss may in rare cases be sent again after the reconnect. The
// backend must tolerate that duplicate (same version, state id, result).
//
// AppNotReady is handled by closing the connection (1000) and connecting
// anew after the jittered delay, with a refreshed identity: the same
// Handshake path as any reconnect, and nothing half-open is kept meanwhile.
package conn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/protocol"
)

// Identity is what the agent says about itself in Handshake and Test.
type Identity struct {
	InstanceID   string
	AppID        string
	AgentVersion string
	Token        string
	InitErrors   []string
}

// wire is the identity as Handshake and Test carry it: init errors joined
// by "; ", or null when there are none.
func (id Identity) wire() protocol.Identity {
	var initErrs *string
	if len(id.InitErrors) > 0 {
		s := strings.Join(id.InitErrors, "; ")
		initErrs = &s
	}
	return protocol.Identity{
		InstanceID: id.InstanceID, AppID: id.AppID, AgentVersion: id.AgentVersion,
		ProtocolVersion: protocol.Version, InstanceToken: id.Token, InitErrors: initErrs,
	}
}

// Handler receives the messages the connection does not handle itself
// (RecipeMetadata, State, WaitList, AgentUpdate). rounds.Engine is one.
// Deliver runs on the reader goroutine: it should hand the message over
// and return, because pongs are not processed while it blocks.
type Handler interface {
	Deliver(ctx context.Context, m protocol.Message)
	// Connected is called after each Handshake has been sent.
	Connected()
}

// Options configures a Manager. Zero durations and limits take defaults.
type Options struct {
	URL    string // ws:// or wss://
	CAFile string // extra CA certificates (PEM) trusted besides the system's
	// Identity is called before every Handshake; refresh is true after the
	// backend said AppNotReady, so the caller re-reads userdata and token.
	Identity func(ctx context.Context, refresh bool) (Identity, error)
	Handler  Handler
	Logger   *slog.Logger

	OutboxLimit      int           // StateLogs kept while disconnected; default 10 000
	PingInterval     time.Duration // default 25 s
	DeadAfter        time.Duration // no frame nor pong for this long: dead; default 60 s
	BackoffMin       time.Duration // default 1 s
	BackoffMax       time.Duration // default 60 s
	StableAfter      time.Duration // a connection that lived this long resets the backoff; default 60 s
	AppNotReadyDelay time.Duration // default 30 s, jittered ±20 %
	HandshakeTimeout time.Duration // WebSocket opening handshake; default 10 s
	MaxFrame         int           // read limit; default protocol.DefaultMaxFrame
	// Rand returns a number in [0,1) for jitter; default math/rand/v2.
	Rand func() float64
}

// Status is a snapshot of the link, for the status file.
type Status struct {
	Connected     bool
	Since         time.Time // of the current state (connected or not)
	Backend       string    // URL without credentials or query
	OutboxDepth   int
	DroppedFrames int64
	DroppedLogs   int64
	LastError     string
}

// Manager owns the connection. Create it with New and run it with Run.
type Manager struct {
	opts     Options
	log      *slog.Logger
	out      *outbox
	dialer   *websocket.Dialer
	setupErr error // bad URL or CA file: every attempt fails with it

	mu            sync.Mutex
	id            Identity // last identity sent
	connected     bool
	since         time.Time
	lastErr       string
	droppedFrames int64
	waitQuery     int64 // recipe version to ask about after the next Handshake; 0: none
	wqNotify      chan struct{}
}

// New returns a Manager.
func New(opts Options) *Manager {
	if opts.OutboxLimit <= 0 {
		opts.OutboxLimit = 10000
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.PingInterval, 25*time.Second)
	def(&opts.DeadAfter, 60*time.Second)
	def(&opts.BackoffMin, time.Second)
	def(&opts.BackoffMax, 60*time.Second)
	def(&opts.StableAfter, 60*time.Second)
	def(&opts.AppNotReadyDelay, 30*time.Second)
	def(&opts.HandshakeTimeout, 10*time.Second)
	if opts.MaxFrame <= 0 {
		opts.MaxFrame = protocol.DefaultMaxFrame
	}
	if opts.Rand == nil {
		opts.Rand = rand.Float64
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{opts: opts, log: log, out: newOutbox(opts.OutboxLimit), since: time.Now(), wqNotify: make(chan struct{}, 1)}
	m.dialer, m.setupErr = newDialer(opts)
	if err := checkURL(opts.URL); err != nil {
		m.setupErr = err
	}
	return m
}

func newDialer(opts Options) (*websocket.Dialer, error) {
	d := &websocket.Dialer{
		Proxy:            http.ProxyFromEnvironment,
		HandshakeTimeout: opts.HandshakeTimeout,
		// Small I/O buffers keep an idle agent (and a simulated fleet in
		// benchmarks) cheap; larger messages simply take more reads.
		ReadBufferSize:  4 << 10,
		WriteBufferSize: 16 << 10,
	}
	if opts.CAFile != "" {
		pem, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return d, fmt.Errorf("[network] ca_file %s: %w", opts.CAFile, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return d, fmt.Errorf("[network] ca_file %s: no PEM certificate found in it", opts.CAFile)
		}
		d.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return d, nil
}

// Report queues one StateLog (rounds.Link).
func (m *Manager) Report(version int64, stateID string, res state.Result) {
	m.mu.Lock()
	id := m.id
	m.mu.Unlock()
	sl := &protocol.StateLog{
		InstanceID: id.InstanceID, AppID: id.AppID, RecipeVersion: version,
		StateID: stateID, Result: res.OK,
		Comment: nilIfEmpty(res.Comment), Stdout: nilIfEmpty(res.Stdout),
	}
	if m.out.push(sl) {
		m.log.Warn("outbox full: oldest StateLog dropped", "limit", m.opts.OutboxLimit)
	}
}

// QueryWaits asks, now or after the next Handshake, which waits of version
// the backend has released (rounds.Link).
func (m *Manager) QueryWaits(version int64) {
	m.mu.Lock()
	m.waitQuery = version
	m.mu.Unlock()
	select {
	case m.wqNotify <- struct{}{}:
	default:
	}
}

// Supersede drops queued StateLogs of any version but current (rounds.Link).
func (m *Manager) Supersede(current int64) {
	if n := m.out.supersede(current); n > 0 {
		m.log.Info("dropped queued StateLogs of a replaced recipe", "count", n, "recipe_version", current)
	}
}

// Status returns a snapshot.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return Status{
		Connected: m.connected, Since: m.since, Backend: Redact(m.opts.URL),
		OutboxDepth: m.out.depth(), DroppedFrames: m.droppedFrames,
		DroppedLogs: m.out.droppedCount(), LastError: m.lastErr,
	}
}

func (m *Manager) setConnected(up bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if up != m.connected {
		m.connected, m.since = up, time.Now()
	}
	if err != nil {
		m.lastErr = err.Error()
	}
}

// Backoff is the pause before reconnect attempt n (0-based): full jitter
// over an exponential ceiling, min·2ⁿ capped at max. r is in [0,1).
func Backoff(n int, min, max time.Duration, r float64) time.Duration {
	ceil := float64(max)
	if n < 62 {
		ceil = math.Min(float64(min)*math.Pow(2, float64(n)), float64(max))
	}
	d := time.Duration(r * ceil)
	if d < min/10 {
		d = min / 10 // never hammer the backend in a tight loop
	}
	return d
}

// errAppNotReady ends a session so that the identity is refreshed.
var errAppNotReady = errors.New("backend says the app is not ready")

// Run connects and reconnects until ctx is done. It returns nil then.
func (m *Manager) Run(ctx context.Context) error {
	if m.setupErr != nil {
		// A config error: say so loudly once. Run keeps retrying (slowly,
		// by backoff) so that the status shows the error, and a config
		// reload replaces the manager anyway.
		m.log.Error("cannot connect with this configuration", "err", m.setupErr)
	}
	attempt := 0
	refresh := false
	for ctx.Err() == nil {
		start := time.Now()
		err := m.session(ctx, refresh)
		refresh = false
		if ctx.Err() != nil {
			break
		}
		m.setConnected(false, err)
		var pause time.Duration
		switch {
		case errors.Is(err, errAppNotReady):
			refresh, attempt = true, 0
			pause = time.Duration(float64(m.opts.AppNotReadyDelay) * (0.8 + 0.4*m.opts.Rand()))
			m.log.Warn("backend: app not ready; handshaking again later", "in", pause.Round(time.Millisecond))
		default:
			if time.Since(start) >= m.opts.StableAfter {
				attempt = 0
			}
			pause = Backoff(attempt, m.opts.BackoffMin, m.opts.BackoffMax, m.opts.Rand())
			attempt++
			m.log.Warn("connection lost; reconnecting", "err", err, "in", pause.Round(time.Millisecond), "attempt", attempt)
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
	m.setConnected(false, nil)
	return nil
}

// session runs one connection until it fails or ctx is done.
func (m *Manager) session(ctx context.Context, refresh bool) error {
	if m.setupErr != nil {
		return m.setupErr
	}
	id, err := m.opts.Identity(ctx, refresh)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	m.mu.Lock()
	m.id = id
	m.mu.Unlock()

	dctx, cancel := context.WithTimeout(ctx, m.opts.HandshakeTimeout)
	ws, resp, err := m.dialer.DialContext(dctx, m.opts.URL, nil)
	cancel()
	if err != nil {
		if resp != nil {
			return fmt.Errorf("connect %s: %w (HTTP %s)", Redact(m.opts.URL), err, resp.Status)
		}
		return fmt.Errorf("connect %s: %w", Redact(m.opts.URL), err)
	}
	defer ws.Close()
	// A frame over the limit makes gorilla fail the read and close the
	// socket (1009): that is a connection error, so the agent reconnects.
	// It cannot skip just that frame, as the rest of it is still in flight.
	ws.SetReadLimit(int64(m.opts.MaxFrame))

	hs, err := protocol.Encode(&protocol.Handshake{Identity: id.wire()})
	if err != nil {
		return err
	}
	_ = ws.SetWriteDeadline(time.Now().Add(m.opts.DeadAfter))
	if err := ws.WriteMessage(websocket.TextMessage, hs); err != nil {
		return fmt.Errorf("send Handshake: %w", err)
	}
	m.log.Info("connected; Handshake sent", "backend", Redact(m.opts.URL), "instance_id", id.InstanceID, "app_id", id.AppID)
	m.setConnected(true, nil)
	if m.opts.Handler != nil {
		m.opts.Handler.Connected()
	}

	c := &link{m: m, ws: ws, control: make(chan []byte, 16), done: make(chan struct{})}
	readErr := make(chan error, 1)
	go func() { readErr <- c.read(ctx) }()
	writeErr := make(chan error, 1)
	go func() { writeErr <- c.write(ctx) }()

	select {
	case err = <-readErr:
		close(c.done)
		if errors.Is(err, errAppNotReady) {
			// Say goodbye properly: the backend asked us to come back later.
			c.sendClose("app not ready; handshaking again later")
		}
		// Closing the socket unblocks a writer stuck on a peer that stopped
		// reading; an unfinished StateLog stays queued for the next session.
		_ = ws.Close()
		<-writeErr
	case err = <-writeErr:
		close(c.done)
		_ = ws.Close() // unblocks the reader
		<-readErr
	case <-ctx.Done():
		close(c.done)
		// The writer sends the close frame (1000). A peer that stopped
		// reading must not hold the shutdown: half a second for the writer,
		// half a second for the backend's answering close frame.
		wait := func(ch chan error) {
			t := time.NewTimer(500 * time.Millisecond)
			defer t.Stop()
			select {
			case <-ch:
			case <-t.C:
				_ = ws.Close()
				<-ch
			}
		}
		wait(writeErr)
		wait(readErr)
		m.log.Info("connection closed", "backend", Redact(m.opts.URL))
		return nil
	}
	return err
}

// link is one live connection.
type link struct {
	m       *Manager
	ws      *websocket.Conn
	control chan []byte   // frames the reader wants sent (Test answers)
	done    chan struct{} // closed when the session ends
}

func (c *link) read(ctx context.Context) error {
	m := c.m
	extend := func() { _ = c.ws.SetReadDeadline(time.Now().Add(m.opts.DeadAfter)) }
	extend()
	c.ws.SetPongHandler(func(string) error { extend(); return nil })
	c.ws.SetPingHandler(func(data string) error {
		extend()
		// Answer pings from the backend; WriteControl is safe next to the writer.
		err := c.ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(5*time.Second))
		if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
			return err
		}
		return nil
	})
	for {
		typ, data, err := c.ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				if ce.Code == websocket.ClosePolicyViolation {
					return fmt.Errorf("backend refused this agent (%d %s): check the instance token and app id", ce.Code, ce.Text)
				}
				return fmt.Errorf("backend closed the connection (%d %s)", ce.Code, ce.Text)
			}
			if errors.Is(err, websocket.ErrReadLimit) {
				return fmt.Errorf("frame larger than %d bytes; connection dropped", m.opts.MaxFrame)
			}
			return fmt.Errorf("read: %w", err)
		}
		extend()
		if typ != websocket.TextMessage {
			m.badFrame(errors.New("binary frame; only text frames carry messages"))
			continue
		}
		msg, err := protocol.DecodeLimit(data, m.opts.MaxFrame)
		if err != nil {
			m.badFrame(err)
			continue
		}
		switch msg := msg.(type) {
		case *protocol.AppNotReady:
			return errAppNotReady
		case *protocol.Test:
			c.answerTest()
		case *protocol.TestAns:
			e := ""
			if msg.Error != nil {
				e = *msg.Error
			}
			m.log.Info("backend test answer", "result", msg.Result, "error", e)
		case *protocol.Handshake, *protocol.StateLog, *protocol.WaitQuery:
			m.badFrame(fmt.Errorf("%s is an agent-to-backend message", msg.MessageCode()))
		default:
			if m.opts.Handler != nil {
				m.opts.Handler.Deliver(ctx, msg)
			}
		}
	}
}

func (m *Manager) badFrame(err error) {
	m.mu.Lock()
	m.droppedFrames++
	m.mu.Unlock()
	m.log.Warn("ignored a bad frame from the backend", "err", err)
}

func (c *link) answerTest() {
	c.m.mu.Lock()
	id := c.m.id
	c.m.mu.Unlock()
	frame, err := protocol.Encode(&protocol.Test{Identity: id.wire()})
	if err != nil {
		return
	}
	select {
	case c.control <- frame:
	case <-c.done:
	}
}

// write is the only goroutine writing data frames: Test answers first,
// then a pending WaitQuery, then the outbox in order, plus pings.
func (c *link) write(ctx context.Context) error {
	m := c.m
	ping := time.NewTicker(m.opts.PingInterval)
	defer ping.Stop()
	send := func(frame []byte) error {
		_ = c.ws.SetWriteDeadline(time.Now().Add(m.opts.DeadAfter))
		return c.ws.WriteMessage(websocket.TextMessage, frame)
	}
	for {
		// Drain what is ready before sleeping; pings go out even while a
		// long backlog is flushed, so the backend's pongs keep us alive.
		// The session's end is checked first so that a long backlog does
		// not delay shutdown.
		select {
		case <-c.done:
			if ctx.Err() != nil {
				c.sendClose("agent stopping")
			}
			return nil
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(m.opts.DeadAfter)); err != nil {
				return fmt.Errorf("ping: %w", err)
			}
			continue
		case frame := <-c.control:
			if err := send(frame); err != nil {
				return fmt.Errorf("write: %w", err)
			}
			continue
		default:
		}
		if v := m.takeWaitQuery(); v > 0 {
			iid, app := m.currentIDs(&protocol.StateLog{})
			frame, _ := protocol.Encode(&protocol.WaitQuery{InstanceID: iid, AppID: app, RecipeVersion: v})
			if err := send(frame); err != nil {
				m.QueryWaits(v) // ask again on the next connection
				return fmt.Errorf("write: %w", err)
			}
			continue
		}
		if e, ok := m.out.peek(); ok {
			sl := *e.msg
			sl.InstanceID, sl.AppID = m.currentIDs(&sl)
			frame, err := protocol.Encode(&sl)
			if err == nil {
				if err := send(frame); err != nil {
					return fmt.Errorf("write: %w", err)
				}
			}
			m.out.ack(e.seq)
			continue
		}
		select {
		case <-ctx.Done():
			c.sendClose("agent stopping")
			return nil
		case <-c.done:
			if ctx.Err() != nil {
				c.sendClose("agent stopping")
			}
			return nil
		case frame := <-c.control:
			if err := send(frame); err != nil {
				return fmt.Errorf("write: %w", err)
			}
		case <-m.wqNotify:
		case <-m.out.notify:
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(m.opts.DeadAfter)); err != nil {
				return fmt.Errorf("ping: %w", err)
			}
		}
	}
}

// sendClose starts the close handshake (1000). WriteControl may be called
// next to the writer goroutine; it waits at most half a second for it.
func (c *link) sendClose(reason string) {
	_ = c.ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, reason), time.Now().Add(500*time.Millisecond))
}

func (m *Manager) takeWaitQuery() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.waitQuery
	m.waitQuery = 0
	return v
}

// currentIDs fills in the identity of StateLogs queued before the first
// Handshake (the engine resumes before the backend answers).
func (m *Manager) currentIDs(sl *protocol.StateLog) (string, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	iid, app := sl.InstanceID, sl.AppID
	if iid == "" {
		iid = m.id.InstanceID
	}
	if app == "" {
		app = m.id.AppID
	}
	return iid, app
}

func nilIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// checkURL says what is wrong with a backend URL before any dial does, in
// words that name the config key.
func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("ws_uri %q is not a URL: %w", Redact(raw), err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return fmt.Errorf("ws_uri %s: scheme must be ws:// or wss://", Redact(raw))
	}
	if u.Host == "" {
		return fmt.Errorf("ws_uri %s: no host", Redact(raw))
	}
	if u.User != nil {
		return fmt.Errorf("ws_uri %s: user name or password in the URL is not allowed; the agent authenticates with its instance token", Redact(raw))
	}
	return nil
}

// Redact drops credentials and the query string from a URL, for logs and
// status.
func Redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User = nil
	u.RawQuery, u.Fragment = "", ""
	return u.String()
}
