// Package backend is the embedded reference backend (`opsagent backend`): a
// small but real control plane speaking spec/protocol.md to agents over
// WebSocket, with a JSON API to put recipes, read StateLogs, release waits
// and roll out updates. Its state is in NATS JetStream (natsstore.go):
// an embedded single-node server on the data directory by default, or an
// existing cluster shared by several replicas behind a load balancer, any
// of which serves any agent and any API call (view.go, presence.go). It
// acknowledges protocol-2 StateLogs only once JetStream stored them, each
// exactly once across replicas (statelogs.go), imports a data directory of
// the earlier file store on first start (import.go), and keeps an app
// whose record does not decode as failed, never creating it afresh
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
	// DataDir holds the lock, the API token file and, without NATS.URLs,
	// the embedded NATS server's storage (<data>/nats). A data directory of
	// the earlier file store (<data>/apps) is imported on first start.
	DataDir string
	// NATS says where the state is: an existing cluster, or (no URLs) the
	// embedded single-node server.
	NATS NATSOptions
	// ReplicaName is how GET …/instances names this replica; default the
	// host name. ListenAndServe adds the address it listens on.
	ReplicaName string
	// APIToken is the bearer token every /api/ call but /api/healthz
	// needs, on any address. "" means the one shared in NATS, created on
	// first start (256 random bits) and kept in <DataDir>/api-token too;
	// see APITokenFile.
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
	// EnrollWindow through this replica (a token bucket holding one
	// window's worth; enroll.go): 0 means the default, 100 per minute;
	// below 0, no limit. A Handshake over it is closed 1013 and the agent
	// comes back later.
	EnrollLimit  int
	EnrollWindow time.Duration

	PingInterval     time.Duration // default 25 s
	DeadAfter        time.Duration // default 60 s
	HandshakeTimeout time.Duration // first frame must arrive within; default 10 s
	SendQueue        int           // frames buffered per agent; default 64

	// StateLog retention: an app's StateLogs are deleted, oldest first,
	// once they exceed LogRetentionBytes (default 1 GiB) or are older than
	// LogRetentionAge (default 30 days). MaxOutputBytes caps each
	// StateLog's comment and stdout (default 64 KiB, the agent's own output
	// limit; at least 64), with a "[… truncated N bytes]" marker.
	LogRetentionBytes int64
	LogRetentionAge   time.Duration
	MaxOutputBytes    int

	// badFrameEvery spaces the log lines about one connection's bad frames;
	// default 10 s. Unexported: only tests change it.
	badFrameEvery time.Duration
	// refusalEvery is the interval of the refusal summary (refusals.go);
	// default 10 s. Unexported: only tests change it.
	refusalEvery time.Duration
	// retainEvery is how often the StateLog streams are brought under
	// LogRetentionBytes; default 10 s. Unexported: only tests change it.
	retainEvery time.Duration
}

// Server is the backend. Use Handler with any http.Server, or
// ListenAndServe.
type Server struct {
	opts  Options
	lock  *fsutil.LockFile // the data directory's
	log   *slog.Logger
	st    *natsStore
	up    websocket.Upgrader
	hosts atomic.Pointer[hostSet] // replaced once ListenAndServe knows its address

	apiAuth      apiAuth
	apiTokenFile string // <data>/api-token when the token is the shared one
	refusals     *refusalLog
	enroll       *enrollLimiter

	// session identifies this process among the replicas; replica names it
	// for people (set again by ListenAndServe, so read with replicaName).
	session string
	replica atomic.Pointer[string]

	stopWatch context.CancelFunc
	watchDone sync.WaitGroup
	stopBG    chan struct{}  // stops the heartbeat and the retention
	bg        sync.WaitGroup // they are running
	writers   sync.WaitGroup // StateLog writers still storing
	closeOnce sync.Once
	closeErr  error

	mu     sync.Mutex
	apps   map[string]*appState             // the view (view.go)
	revs   map[string]uint64                // bucket/key → last revision applied
	alive  map[string]time.Time             // replica session → when it last beat
	agents map[string]map[string]*agentConn // app → instance → live connection here
	closed bool
}

// New opens the data directory, starts the embedded NATS server or joins
// the cluster, imports an earlier data directory on first start, and
// reads the shared state.
func New(opts Options) (*Server, error) {
	if opts.DataDir == "" {
		return nil, errors.New("backend: --data is required (a directory for the lock, the API token and, without --nats, the embedded NATS server's data)")
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
	def(&opts.refusalEvery, defaultRefusalLog)
	def(&opts.EnrollWindow, defaultEnrollWindow)
	def(&opts.LogRetentionAge, defaultAge)
	def(&opts.retainEvery, 10*time.Second)
	if opts.EnrollLimit == 0 {
		opts.EnrollLimit = defaultEnrollLimit
	}
	if opts.SendQueue <= 0 {
		opts.SendQueue = 64
	}
	if opts.LogRetentionBytes <= 0 {
		opts.LogRetentionBytes = defaultRetention
	}
	if opts.MaxOutputBytes < 0 || opts.MaxOutputBytes > 0 && opts.MaxOutputBytes < minOutputBytes {
		return nil, fmt.Errorf("backend: MaxOutputBytes %d: use 0 for the default (64 KiB) or at least %d, room for the truncation marker", opts.MaxOutputBytes, minOutputBytes)
	}
	if opts.MaxOutputBytes == 0 {
		opts.MaxOutputBytes = defaultOutput
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ReplicaName == "" {
		opts.ReplicaName, _ = os.Hostname()
	}
	log := opts.Logger
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("backend: data dir %s: %w", opts.DataDir, err)
	}
	// Two backends on one data directory would share its embedded server's
	// files (or its import).
	lock, err := fsutil.Lock(filepath.Join(opts.DataDir, "lock"))
	if err != nil {
		return nil, fmt.Errorf("backend: data dir %s is in use: %w", opts.DataDir, err)
	}
	ctx := context.Background()
	st, err := openNATS(ctx, opts.DataDir, opts.NATS, logConfig{retentionBytes: opts.LogRetentionBytes, retentionAge: opts.LogRetentionAge, maxOutput: opts.MaxOutputBytes}, log)
	if err != nil {
		_ = lock.Unlock()
		return nil, fmt.Errorf("backend: %w", err)
	}
	fail := func(err error) (*Server, error) {
		_ = st.close()
		_ = lock.Unlock()
		return nil, fmt.Errorf("backend: %w", err)
	}
	if need := int64(2*opts.MaxOutputBytes + 64<<10); st.nc.MaxPayload() < need {
		return fail(fmt.Errorf("the NATS servers take messages of up to %d bytes (max_payload), and a StateLog may take %d: raise max_payload", st.nc.MaxPayload(), need))
	}
	if err := importDataDir(ctx, opts.DataDir, st, log); err != nil {
		return fail(err)
	}
	auth, tokenFile, err := newAPIAuth(ctx, opts.DataDir, opts.APIToken, st)
	if err != nil {
		return fail(err)
	}
	s := &Server{
		apiAuth: auth, apiTokenFile: tokenFile,
		lock: lock,
		opts: opts,
		log:  log,
		st:   st,

		session:  newSession(),
		refusals: &refusalLog{log: log, every: opts.refusalEvery},
		enroll:   newEnrollLimiter(opts.EnrollLimit, opts.EnrollWindow),
		// Small read buffers and pooled write buffers keep an idle agent
		// connection cheap (a fleet is mostly idle connections).
		up:     websocket.Upgrader{ReadBufferSize: 1 << 10, WriteBufferSize: 4 << 10, WriteBufferPool: &sync.Pool{}},
		apps:   map[string]*appState{},
		revs:   map[string]uint64{},
		alive:  map[string]time.Time{},
		agents: map[string]map[string]*agentConn{},
		stopBG: make(chan struct{}),
	}
	s.replica.Store(&opts.ReplicaName)
	// Browsers always send Origin on a WebSocket upgrade; agents send none.
	s.up.CheckOrigin = s.originAllowed
	s.hosts.Store(newHostSet(opts.AllowedHosts))
	if err := s.watchAll(); err != nil {
		s.stopWatch()
		s.watchDone.Wait()
		return fail(err)
	}
	// Each replica brings the StateLog streams to its retention flags (give
	// every replica the same ones).
	for _, id := range s.appIDs() {
		cctx, cancel := opCtx(ctx)
		if err := st.ensureLogStream(cctx, id, 0); err != nil {
			log.Warn("cannot check an app's StateLog stream settings", "app_id", id, "err", err)
		}
		cancel()
	}
	s.bg.Add(2)
	go s.heartbeat(s.stopBG)
	go s.retainLoop(s.stopBG)
	return s, nil
}

// APITokenFile is the file the API token was read from or created in
// (<data>/api-token), or "" when Options.APIToken gave it.
func (s *Server) APITokenFile() string { return s.apiTokenFile }

// Close stores the StateLogs already handed over, writes the log stream
// summaries, leaves the replicas (this one's instances show as
// disconnected at once) and closes the NATS connection (stopping the
// embedded server). ListenAndServe calls it on shutdown; a caller serving
// Handler itself calls it once agents are closed.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.refusals.flush()
		s.writers.Wait()
		close(s.stopBG)
		s.bg.Wait()
		s.stopWatch()
		s.watchDone.Wait()
		if err := s.st.close(); err != nil {
			s.closeErr = fmt.Errorf("backend: closing the NATS store: %w", err)
		}
		_ = s.lock.Unlock()
	})
	return s.closeErr
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
	name := s.opts.ReplicaName + " " + ln.Addr().String()
	s.replica.Store(&name)
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

// retainLoop brings every app's StateLogs under the retention size until
// stop is closed.
func (s *Server) retainLoop(stop <-chan struct{}) {
	defer s.bg.Done()
	t := time.NewTicker(s.opts.retainEvery)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		s.retainAll()
	}
}

func (s *Server) retainAll() {
	for _, id := range s.appIDs() {
		ctx, cancel := opCtx(context.Background())
		if err := s.st.retain(ctx, id); err != nil {
			s.st.logError("cannot apply the StateLog retention size (tried again shortly)", "app_id", id, "err", err)
		}
		cancel()
	}
}

// replicaName is how this replica is named to people.
func (s *Server) replicaName() string { return *s.replica.Load() }

// appIDs are the ids of the apps that exist, as this replica sees them.
func (s *Server) appIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for id, a := range s.apps {
		if a.exists {
			ids = append(ids, id)
		}
	}
	return ids
}
