// Package backend is the embedded reference backend (`opsagent backend`): a
// small but real control plane speaking spec/protocol.md to agents over
// WebSocket, with a JSON API to put recipes, read StateLogs, release waits
// and roll out updates. It keeps its state through an appStore (store.go:
// today atomic JSON files and StateLogs in bounded, fsynced JSONL segments
// per app, see logstore.go) so a restart loses nothing, acknowledges
// protocol-2 StateLogs only once they are durable (protocol/PROTOCOL-2.md),
// and keeps an app it cannot load as failed, never creating it afresh
// (apps.go). Every API call needs the API token (apitoken.go). A new
// instance id enrolls only with its app's enrollment secret, within the
// app's enrollment limit, and can be revoked (enroll.go); refusals are
// logged as summaries (refusals.go); browsers are kept out by Host and
// Origin checks (httpguard.go).
package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// Options configures a Server.
type Options struct {
	DataDir string
	// APIToken is the bearer token every /api/ call but /api/healthz
	// needs, on any address. "" means the one in <DataDir>/api-token,
	// created (256 random bits, 0600) on first start; see APITokenFile.
	APIToken string
	Logger   *slog.Logger
	MaxFrame int // default protocol.DefaultMaxFrame

	// AllowedHosts are extra names (or name:port) that clients may use in
	// the Host header, e.g. the name agents reach a proxy in front of the
	// backend by. A name without a port is allowed on any port.
	// ListenAndServe always allows its listen address (and, on loopback,
	// localhost, 127.0.0.1 and [::1] with the bound port); a Handler used
	// on its own serves only these names.
	AllowedHosts []string
	// OpenEnrollment lets any client that knows an app id enroll a new
	// instance id without the app's enrollment secret (the 2014 behaviour).
	OpenEnrollment bool
	// EnrollLimit is how many new instances an app may enroll per
	// EnrollWindow (a token bucket holding one window's worth; enroll.go):
	// 0 means the default, 100 per minute; below 0, no limit. A Handshake
	// over it is closed 1013 and the agent comes back later.
	EnrollLimit  int
	EnrollWindow time.Duration

	PingInterval     time.Duration // default 25 s
	DeadAfter        time.Duration // default 60 s
	HandshakeTimeout time.Duration // first frame must arrive within; default 10 s
	SendQueue        int           // frames buffered per agent; default 64

	// StateLog storage (apps/<app>/logs/<first seq>.jsonl segments).
	// LogSegmentBytes is where a segment is closed and a new one started
	// (default 16 MiB). Whole old segments are deleted once an app's
	// StateLogs exceed LogRetentionBytes (default 1 GiB) or are older than
	// LogRetentionAge (default 30 days); checked at each new segment and at
	// start. MaxOutputBytes caps each StateLog's comment and stdout
	// (default 64 KiB, the agent's own output limit; at least 64), with a
	// "[… truncated N bytes]" marker.
	LogSegmentBytes   int64
	LogRetentionBytes int64
	LogRetentionAge   time.Duration
	MaxOutputBytes    int

	// logCommitDelay is how long the log writer gathers StateLogs before
	// one write and fsync; default 2 ms. Unexported: only tests change it.
	logCommitDelay time.Duration

	// badFrameEvery spaces the log lines about one connection's bad frames;
	// default 10 s. Unexported: only tests change it.
	badFrameEvery time.Duration
	// refusalEvery is the interval of the refusal summary (refusals.go);
	// default 10 s. Unexported: only tests change it.
	refusalEvery time.Duration

	// loadRetryMin and loadRetryMax bound the wait before an app that
	// failed to load is tried again (doubling from min to max); defaults
	// 1 s and 1 min. Unexported: only tests change them.
	loadRetryMin, loadRetryMax time.Duration

	// newStore opens the store; default the file store in DataDir.
	// Unexported: the store suite runs the Server on other stores.
	newStore func(Options) (appStore, error)
}

// Server is the backend. Use Handler with any http.Server, or
// ListenAndServe.
type Server struct {
	opts  Options
	lock  *fsutil.LockFile // the data directory's
	log   *slog.Logger
	st    appStore
	up    websocket.Upgrader
	hosts atomic.Pointer[hostSet] // replaced once ListenAndServe knows its address

	apiAuth      apiAuth
	apiTokenFile string // <data>/api-token when the token comes from there
	refusals     *refusalLog
	enroll       *enrollLimiter

	// loadMu makes loads and creations of apps one at a time, so that two
	// requests never load (or create) the same app twice.
	loadMu sync.Mutex

	mu     sync.Mutex
	apps   map[string]*appState             // loaded apps
	failed map[string]*appFailure           // stored apps that did not load
	agents map[string]map[string]*agentConn // app → instance → live connection
	closed bool
}

// New opens (or creates) the data directory and loads its state.
func New(opts Options) (*Server, error) {
	if opts.DataDir == "" {
		return nil, errors.New("backend: --data is required (a directory for apps, recipes, tokens and logs)")
	}
	if opts.MaxFrame <= 0 {
		opts.MaxFrame = protocol.DefaultMaxFrame
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.PingInterval, 25*time.Second)
	def(&opts.DeadAfter, 60*time.Second)
	def(&opts.HandshakeTimeout, 10*time.Second)
	def(&opts.badFrameEvery, 10*time.Second)
	def(&opts.loadRetryMin, time.Second)
	def(&opts.loadRetryMax, time.Minute)
	def(&opts.refusalEvery, defaultRefusalLog)
	def(&opts.EnrollWindow, defaultEnrollWindow)
	if opts.EnrollLimit == 0 {
		opts.EnrollLimit = defaultEnrollLimit
	}
	if opts.newStore == nil {
		opts.newStore = func(o Options) (appStore, error) { return openFileStore(o.DataDir, o.logOptions(), o.Logger), nil }
	}
	if opts.SendQueue <= 0 {
		opts.SendQueue = 64
	}
	if err := logDefaults(&opts); err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	log := opts.Logger
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("backend: data dir %s: %w", opts.DataDir, err)
	}
	// Two backends on one data directory would interleave their writes.
	lock, err := fsutil.Lock(filepath.Join(opts.DataDir, "lock"))
	if err != nil {
		return nil, fmt.Errorf("backend: data dir %s is in use: %w", opts.DataDir, err)
	}
	auth, tokenFile, err := newAPIAuth(opts.DataDir, opts.APIToken)
	if err != nil {
		_ = lock.Unlock()
		return nil, err
	}
	st, err := opts.newStore(opts)
	if err != nil {
		_ = lock.Unlock()
		return nil, fmt.Errorf("backend: %w", err)
	}
	s := &Server{
		apiAuth: auth, apiTokenFile: tokenFile,
		lock: lock,
		opts: opts,
		log:  log,
		st:   st,

		refusals: &refusalLog{log: log, every: opts.refusalEvery},
		enroll:   newEnrollLimiter(opts.EnrollLimit, opts.EnrollWindow),
		// Small read buffers and pooled write buffers keep an idle agent
		// connection cheap (a fleet is mostly idle connections).
		up:     websocket.Upgrader{ReadBufferSize: 1 << 10, WriteBufferSize: 4 << 10, WriteBufferPool: &sync.Pool{}},
		apps:   map[string]*appState{},
		failed: map[string]*appFailure{},
		agents: map[string]map[string]*agentConn{},
	}
	// Browsers always send Origin on a WebSocket upgrade; agents send none.
	s.up.CheckOrigin = s.originAllowed
	s.hosts.Store(newHostSet(opts.AllowedHosts))
	ids, err := st.AppIDs()
	if err != nil {
		// Without the list no app is known, and a PUT could not tell a
		// new app from a stored one it cannot see: refuse to start.
		_ = st.Close()
		_ = lock.Unlock()
		return nil, fmt.Errorf("backend: data dir %s: %w", opts.DataDir, err)
	}
	s.loadMu.Lock()
	for _, id := range ids {
		_, _ = s.load(id) // a failure is logged and kept in s.failed
	}
	s.loadMu.Unlock()
	return s, nil
}

// logDefaults fills in and checks the StateLog storage options.
func logDefaults(o *Options) error {
	if o.MaxOutputBytes < 0 || o.MaxOutputBytes > 0 && o.MaxOutputBytes < minOutputBytes {
		return fmt.Errorf("backend: MaxOutputBytes %d: use 0 for the default (64 KiB) or at least %d, room for the truncation marker", o.MaxOutputBytes, minOutputBytes)
	}
	if o.MaxOutputBytes == 0 {
		o.MaxOutputBytes = defaultOutput
	}
	if o.LogSegmentBytes <= 0 {
		o.LogSegmentBytes = defaultSegment
	}
	if o.LogRetentionBytes <= 0 {
		o.LogRetentionBytes = defaultRetention
	}
	if o.LogRetentionAge <= 0 {
		o.LogRetentionAge = defaultAge
	}
	if o.logCommitDelay <= 0 {
		o.logCommitDelay = defaultCommit
	}
	return nil
}

func (o Options) logOptions() logOptions {
	return logOptions{segmentBytes: o.LogSegmentBytes, retentionBytes: o.LogRetentionBytes,
		retentionAge: o.LogRetentionAge, maxOutput: o.MaxOutputBytes, commitDelay: o.logCommitDelay}
}

// APITokenFile is the file the API token was read from or created in
// (<data>/api-token), or "" when Options.APIToken gave it.
func (s *Server) APITokenFile() string { return s.apiTokenFile }

// Close stores the StateLogs already received (write, fsync) and stops
// the log writer; StateLogs arriving later are refused. ListenAndServe
// calls it on shutdown; a caller serving Handler itself calls it once
// agents are closed.
func (s *Server) Close() error {
	defer s.lock.Unlock()
	s.refusals.flush()
	if err := s.st.Close(); err != nil {
		return fmt.Errorf("backend: closing the StateLog store: %w", err)
	}
	return nil
}

// Handler serves the agent WebSocket at /agent/ and the API under /api/.
// Every request must name an allowed host (see Options.AllowedHosts) and,
// when it carries an Origin, come from one.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/agent", s.serveAgent)
	mux.HandleFunc("/agent/", s.serveAgent)
	s.routes(mux)
	return s.guard(mux)
}

// ListenAndServe serves on addr until ctx is done, then closes every agent
// connection with a normal close frame. ready, when not nil, receives the
// bound address once listening.
func (s *Server) ListenAndServe(ctx context.Context, addr string, ready func(net.Addr)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("backend: listen %s: %w", addr, err)
	}
	s.hosts.Store(s.hosts.Load().withListener(addr, ln.Addr()))
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	if ready != nil {
		ready(ln.Addr())
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return errors.Join(err, s.Close())
	case <-ctx.Done():
	}
	s.CloseAgents()
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	// Last: a connection may still hand over a StateLog read before its
	// close; Close waits for it and fsyncs.
	return s.Close()
}

// CloseAgents sends a normal close to every agent (shutdown).
func (s *Server) CloseAgents() {
	s.mu.Lock()
	s.closed = true
	var all []*agentConn
	for _, m := range s.agents {
		for _, c := range m {
			all = append(all, c)
		}
	}
	s.mu.Unlock()
	for _, c := range all {
		c.close(websocket.CloseGoingAway, "backend shutting down")
	}
}

// broadcast queues frame to every connected agent of app for which pick
// returns true (nil: all).
func (s *Server) broadcast(app string, frame []byte, pick func(*agentConn) bool) int {
	s.mu.Lock()
	var targets []*agentConn
	for _, c := range s.agents[app] {
		if pick == nil || pick(c) {
			targets = append(targets, c)
		}
	}
	s.mu.Unlock()
	if len(targets) == 0 {
		return 0
	}
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, frame)
	if err != nil {
		return 0
	}
	for _, c := range targets {
		c.sendPrepared(pm)
	}
	return len(targets)
}
