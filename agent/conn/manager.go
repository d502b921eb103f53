// Package conn is the agent's side of the WebSocket to the backend
// (spec/protocol.md): it connects, sends Handshake, keeps the link alive
// with pings, reconnects forever with exponential backoff and full jitter,
// and delivers StateLogs from the durable outbox (agent/outbox).
// Messages for the round engine go to a Handler.
//
// Each connection has exactly one reader and one writer goroutine, as
// gorilla/websocket requires; everything else hands frames to the writer.
//
// Delivery of StateLogs follows protocol 2 (protocol/PROTOCOL-2.md): the
// Handshake carries protocol_version 2 and the outbox's log stream; a
// backend whose first answer is a StateLogAck speaks 2, and then every
// StateLog stays queued (on disk) until an acknowledgement covers it and
// is sent again after a reconnect, so each is stored exactly once, in
// order. A backend that answers anything else first, or nothing within
// AckWait, speaks 1: a StateLog then leaves the outbox once written to the
// socket, as the 2014 protocol did.
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

	"github.com/visualops/opsagent/agent/outbox"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

// Identity is what the agent says about itself in Handshake and Test.
type Identity struct {
	InstanceID   string
	AppID        string
	AgentVersion string
	Token        string
	EnrollSecret string // the app's enrollment secret, for the first Handshake
	InitErrors   []string
}

// Bounds of init_errors in a Handshake: the backend keeps 4 KiB of it and
// refuses frames over 64 KiB before a Handshake is accepted, so one long
// error (a whole compat.txt quoted) must not cost the agent its
// connection, nor crowd the others out.
const (
	maxInitError  = 1 << 10
	maxInitErrors = 4 << 10
)

// wire is the identity as Handshake and Test carry it: init errors joined
// by "; ", or null when there are none.
func (id Identity) wire(stream string) protocol.Identity {
	var initErrs *string
	if len(id.InitErrors) > 0 {
		parts := make([]string, len(id.InitErrors))
		for i, e := range id.InitErrors {
			parts[i] = cut(e, maxInitError)
		}
		s := cut(strings.Join(parts, "; "), maxInitErrors)
		initErrs = &s
	}
	return protocol.Identity{
		InstanceID: id.InstanceID, AppID: id.AppID, AgentVersion: id.AgentVersion,
		ProtocolVersion: protocol.Version, InstanceToken: id.Token, InitErrors: initErrs,
		EnrollmentSecret: id.EnrollSecret, LogStream: stream,
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

	// Outbox holds the StateLogs; nil: an outbox in memory (tests).
	Outbox  *outbox.Outbox
	AckWait time.Duration // how long to wait for a StateLogAck after Handshake; default 2 s
	// OnEstablished is called when the backend has accepted a Handshake
	// (its first answer, or AckWait without a refusal): a new version
	// confirms its update there.
	OnEstablished    func()
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
	Protocol      int       // what the current (or last) connection speaks: 1 or 2; 0 before any
	DroppedFrames int64
	Outbox        outbox.Status
	LastError     string
}

// Manager owns the connection. Create it with New and run it with Run.
type Manager struct {
	opts   Options
	log    *slog.Logger
	out    *outbox.Outbox
	dialer *websocket.Dialer
	caErr  error         // bad CA file: every attempt fails with it
	kick   chan struct{} // the backend URL changed: drop the link now

	mu            sync.Mutex
	url           string   // the backend, changed by SetURL
	urlErr        error    // what is wrong with url, if anything
	id            Identity // last identity sent
	connected     bool
	since         time.Time
	lastErr       string
	droppedFrames int64
	waitQuery     int64 // recipe version to ask about after the next Handshake; 0: none
	protocol      int   // of the current connection, once known
	wqNotify      chan struct{}
}

// New returns a Manager.
func New(opts Options) *Manager {
	if opts.Outbox == nil {
		opts.Outbox = outbox.Open(outbox.Options{Logger: opts.Logger})
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
	def(&opts.AckWait, 2*time.Second)
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
	m := &Manager{opts: opts, log: log, out: opts.Outbox, since: time.Now(),
		wqNotify: make(chan struct{}, 1), kick: make(chan struct{}, 1)}
	m.dialer, m.caErr = newDialer(opts)
	m.url, m.urlErr = opts.URL, checkURL(opts.URL)
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
	m.out.Push(*sl)
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
	if n := m.out.Supersede(current); n > 0 {
		m.log.Info("dropped queued StateLogs of a replaced recipe", "count", n, "recipe_version", current)
	}
}

// Status returns a snapshot.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return Status{
		Connected: m.connected, Since: m.since, Backend: Redact(m.url),
		Protocol: m.protocol, DroppedFrames: m.droppedFrames, Outbox: m.out.Status(), LastError: m.lastErr,
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

// SetURL points the connection at another backend (a changed [userdata]
// ws_uri, written back from userdata): the live link, if any, is closed
// with a normal close frame and the next attempt, made at once, uses url.
// No SIGHUP or restart is needed.
func (m *Manager) SetURL(url string) {
	m.mu.Lock()
	if url == m.url {
		m.mu.Unlock()
		return
	}
	m.url, m.urlErr = url, checkURL(url)
	m.mu.Unlock()
	m.log.Info("backend changed; reconnecting", "backend", Redact(url))
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// target is the backend to dial and what is wrong with it, if anything.
func (m *Manager) target() (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.urlErr != nil {
		return m.url, m.urlErr
	}
	return m.url, m.caErr
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

// errMoved ends a session because the backend URL changed.
var errMoved = errors.New("backend URL changed")

// Run connects and reconnects until ctx is done. It returns nil then.
func (m *Manager) Run(ctx context.Context) error {
	if _, err := m.target(); err != nil {
		// A config error: say so loudly once. Run keeps retrying (slowly,
		// by backoff) so that the status shows the error; a corrected
		// ws_uri (SetURL) or a config reload fixes it.
		m.log.Error("cannot connect with this configuration", "err", err)
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
		case errors.Is(err, errMoved):
			attempt, pause = 0, 0
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
		case <-m.kick: // a new URL: try it now
			t.Stop()
		}
	}
	m.setConnected(false, nil)
	return nil
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

// checkURL says what is wrong with a backend URL before any dial does, with
// the config's one rule, in words that name the config key.
func checkURL(raw string) error {
	if err := config.CheckBackendURL(raw); err != nil {
		return fmt.Errorf("[userdata] ws_uri %s: %w", Redact(raw), err)
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

// cut keeps at most limit bytes of s, on a rune boundary, saying how much
// was left out.
func cut(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	keep := textcut.Prefix(s, limit-32) // room for the note
	return fmt.Sprintf("%s… (%d more bytes)", keep, len(s)-len(keep))
}
