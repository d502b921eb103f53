// Package agent is `opsagent run`: it loads the config, takes the
// single-instance lock, works out the instance's identity, and runs the
// connection to the backend (agent/conn) and the round engine
// (agent/rounds) side by side until it is told to stop. It also keeps the
// status file that `opsagent status` reads.
package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/visualops/opsagent/agent/bridge"
	"github.com/visualops/opsagent/agent/conn"
	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/protocol"
)

// Options configures Run.
type Options struct {
	Root       fsutil.Root
	ConfigPath string    // instance path of the config, e.g. /etc/opsagent.conf
	LogLevel   string    // overrides [global] loglvl when set
	Stderr     io.Writer // also log here (a terminal); nil: the log file only
	// Reload receives a value when the config should be re-read (SIGHUP).
	Reload  <-chan struct{}
	Version string // agent version reported in Handshake
	// StatusInterval is how often status.json is checked for changes;
	// default 250 ms. It is rewritten only when something changed (or
	// every 30 s, to refresh updated_at).
	StatusInterval time.Duration
}

// Run runs the agent until ctx is done. It returns nil on a clean stop.
func Run(ctx context.Context, opts Options) error {
	if opts.ConfigPath == "" {
		opts.ConfigPath = config.DefaultPath
	}
	if opts.StatusInterval <= 0 {
		opts.StatusInterval = 250 * time.Millisecond
	}
	cfgFile := opts.Root.Path(opts.ConfigPath)
	cfg, err := config.Load(cfgFile)
	if err != nil {
		return err
	}
	stateDir := opts.Root.Path(cfg.Global.ConfPath)
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("state directory %s: %w (run 'opsagent install' to create the layout)", stateDir, err)
	}
	lock, err := fsutil.Lock(filepath.Join(stateDir, "lock"))
	if err != nil {
		return err
	}
	defer lock.Unlock()

	for {
		logs, err := openLog(opts.Root.Path(cfg.Global.LogFile), levelOf(opts.LogLevel, cfg.Global.LogLevel), opts.Stderr)
		if err != nil {
			return err
		}
		reload, err := runSession(ctx, opts, cfg, logs.logger)
		logs.Close()
		if err != nil || !reload {
			return err
		}
		next, lerr := config.Load(cfgFile)
		if lerr != nil {
			logs, _ := openLog(opts.Root.Path(cfg.Global.LogFile), levelOf(opts.LogLevel, cfg.Global.LogLevel), opts.Stderr)
			logs.logger.Error("config reload failed; keeping the running config", "err", lerr)
			logs.Close()
			continue
		}
		cfg = next
	}
}

// session is one life of the agent's components with one config. A reload
// ends it and starts another; the lock is held across.
type session struct {
	opts    Options
	cfg     *config.Config
	log     *slog.Logger
	id      *identity
	engine  *rounds.Engine
	mgr     *conn.Manager
	started time.Time

	mu         sync.Mutex
	initErrors []string
	saltError  string // the Salt path's current problem, "" when it is ready
}

// runSession runs until ctx is done (reload=false) or a reload is asked
// (reload=true).
func runSession(ctx context.Context, opts Options, cfg *config.Config, log *slog.Logger) (reload bool, err error) {
	s := &session{opts: opts, cfg: cfg, log: log, started: time.Now()}
	s.id = newIdentity(opts.Root, cfg, log)
	s.prepareLayout()
	if err := s.id.RefreshUserdata(ctx); err != nil {
		log.Warn("could not refresh identity from userdata", "err", err)
	}
	stateDir := opts.Root.Path(cfg.Global.ConfPath)
	store := rounds.NewStore(stateDir, clock.Real{}, log)

	// bridge.py ships inside the binary: write it out at start (only when
	// it changed), so a self-update updates it too.
	if _, err := bridge.WriteScript(stateDir); err != nil {
		s.addInitError(fmt.Sprintf("cannot write bridge.py: %v", err))
	}
	salt := newSaltExecutor(opts.Root, cfg, opts.Version, log.With("part", "salt"), s.setSaltError)
	defer salt.Close()
	executor := &rounds.Router{
		Engine: strings.ToLower(cfg.Agent.Engine),
		Salt:   salt,
		Native: native.New(native.Options{
			Root:        opts.Root,
			Runner:      proc.New(),
			HTTPClient:  &http.Client{Timeout: 10 * time.Minute},
			Logger:      log,
			OutputLimit: cfg.Agent.OutputLimit,
			KillGrace:   cfg.Agent.KillGrace,
		}),
	}
	link := &linkProxy{}
	var defMod *protocol.ModuleSource
	if cfg.Module.Repo != "" {
		defMod = &protocol.ModuleSource{Repo: cfg.Module.Repo, Tag: cfg.Module.Tag}
	}
	s.engine = rounds.New(rounds.Options{
		Executor: executor,
		Link:     link,
		Store:    store,
		Logger:   log.With("part", "rounds"),
		InstanceID: func() string {
			id, _ := s.id.CachedInstanceID()
			return id
		},
		RoundDelay:    cfg.Salt.Delay,
		RetryDelay:    cfg.Agent.RetryDelay,
		StateTimeout:  cfg.Agent.StateTimeout,
		OutputLimit:   cfg.Agent.OutputLimit,
		DefaultModule: defMod,
		OnModuleChange: func(m protocol.ModuleSource) {
			if err := s.id.SetModule(m.Repo, m.Tag); err != nil {
				log.Error("cannot write the states repository back to the config", "err", err)
			}
		},
	})
	s.mgr = conn.New(conn.Options{
		URL:              cfg.Userdata.WSURI,
		CAFile:           rootedOrEmpty(opts.Root, cfg.Network.CAFile),
		Identity:         s.identity,
		Handler:          s.engine,
		Logger:           log.With("part", "conn"),
		OutboxLimit:      cfg.Agent.OutboxLimit,
		AppNotReadyDelay: cfg.Agent.AppNotReadyDelay,
	})
	link.m = s.mgr

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); _ = s.engine.Run(sctx) }()
	go func() { defer wg.Done(); _ = s.mgr.Run(sctx) }()
	go func() { defer wg.Done(); s.keepStatus(sctx) }()
	log.Info("agent started", "version", opts.Version, "backend", redactURL(cfg.Userdata.WSURI), "app_id", cfg.Userdata.AppID, "engine", cfg.Agent.Engine)

	select {
	case <-ctx.Done():
		log.Info("agent stopping")
	case <-opts.Reload:
		reload = true
		log.Info("reloading the config")
	}
	cancel()
	wg.Wait()
	s.writeStatus(s.snapshot())
	return reload, nil
}

// identity is the conn.Options.Identity callback: called before every
// Handshake, and after AppNotReady (which also re-reads userdata).
func (s *session) identity(ctx context.Context, refresh bool) (conn.Identity, error) {
	if refresh {
		if err := s.id.RefreshUserdata(ctx); err != nil {
			s.log.Warn("could not refresh identity from userdata", "err", err)
		}
	}
	iid, err := s.id.InstanceID(ctx)
	if err != nil {
		return conn.Identity{}, err
	}
	tok, err := s.id.Token()
	if err != nil {
		s.addInitError(err.Error())
	}
	return conn.Identity{
		InstanceID:   iid,
		AppID:        s.id.AppID(),
		AgentVersion: s.opts.Version,
		Token:        tok,
		InitErrors:   s.InitErrors(),
	}, nil
}

// prepareLayout creates the directories the agent writes to, recording
// failures as init errors (reported in Handshake) rather than refusing to
// start: a half-broken instance that reports is better than a silent one.
func (s *session) prepareLayout() {
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{
		{s.cfg.Global.ConfPath, 0o700},
		{s.cfg.Global.Watch, 0o700},
		{s.cfg.Global.LogPath, 0o750},
	} {
		if err := os.MkdirAll(s.opts.Root.Path(d.path), d.mode); err != nil {
			s.addInitError(fmt.Sprintf("cannot create %s: %v", d.path, err))
		}
	}
}

func (s *session) addInitError(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.initErrors {
		if e == msg {
			return
		}
	}
	s.initErrors = append(s.initErrors, msg)
	s.log.Warn("init error", "err", msg)
}

// setSaltError records the Salt path's current problem ("" clears it), so
// that init_errors reports what is wrong now, not what was once wrong.
func (s *session) setSaltError(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if msg != "" && msg != s.saltError {
		s.log.Warn("salt path not ready", "err", msg)
	}
	s.saltError = msg
}

// InitErrors returns the problems met while preparing.
func (s *session) InitErrors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := append([]string(nil), s.initErrors...)
	if s.saltError != "" {
		out = append(out, s.saltError)
	}
	return out
}

func (s *session) keepStatus(ctx context.Context) {
	t := time.NewTicker(s.opts.StatusInterval)
	defer t.Stop()
	var last []byte
	var lastWrite time.Time
	for {
		snap := s.snapshot()
		key, _ := json.Marshal(struct {
			statusfile.Snapshot
			UpdatedAt bool `json:"updated_at,omitempty"`
		}{Snapshot: snap})
		if !bytes.Equal(key, last) || time.Since(lastWrite) > 30*time.Second {
			s.writeStatus(snap)
			last, lastWrite = key, time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *session) snapshot() statusfile.Snapshot {
	cs := s.mgr.Status()
	iid, _ := s.id.CachedInstanceID()
	return statusfile.Snapshot{
		PID:          os.Getpid(),
		AgentVersion: s.opts.Version,
		InstanceID:   iid,
		AppID:        s.id.AppID(),
		StartedAt:    s.started,
		UpdatedAt:    time.Now(),
		Connection: statusfile.Connection{
			Connected:     cs.Connected,
			Since:         cs.Since,
			Backend:       cs.Backend,
			OutboxDepth:   cs.OutboxDepth,
			DroppedFrames: cs.DroppedFrames,
			DroppedLogs:   cs.DroppedLogs,
			LastError:     cs.LastError,
		},
		Engine:     s.engine.Status(),
		InitErrors: s.InitErrors(),
	}
}

func (s *session) writeStatus(snap statusfile.Snapshot) {
	path := filepath.Join(s.opts.Root.Path(s.cfg.Global.ConfPath), statusfile.Name)
	if err := statusfile.Write(path, snap); err != nil {
		s.log.Debug("cannot write the status file", "err", err)
	}
}

// linkProxy breaks the construction cycle between the engine (which
// reports through the connection) and the connection (which delivers to the
// engine).
type linkProxy struct{ m *conn.Manager }

func (l *linkProxy) Report(v int64, id string, r state.Result) { l.m.Report(v, id, r) }
func (l *linkProxy) QueryWaits(v int64)                        { l.m.QueryWaits(v) }
func (l *linkProxy) Supersede(v int64)                         { l.m.Supersede(v) }

func rootedOrEmpty(root fsutil.Root, p string) string {
	if p == "" {
		return ""
	}
	return root.Path(p)
}

// redactURL drops credentials and query strings from a URL for logs.
func redactURL(u string) string {
	if i := strings.IndexAny(u, "?#"); i >= 0 {
		u = u[:i]
	}
	if at := strings.Index(u, "@"); at >= 0 {
		if scheme := strings.Index(u, "://"); scheme >= 0 && scheme < at {
			u = u[:scheme+3] + u[at+1:]
		}
	}
	return u
}
