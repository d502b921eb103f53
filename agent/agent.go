// Package agent is `opsagent run`: it loads the config, takes the
// single-instance lock, works out the instance's identity, and runs the
// connection to the backend (agent/conn) and the round engine
// (agent/rounds) side by side until it is told to stop or to re-execute a
// new version. It also keeps the status file that `opsagent status` reads.
//
// The config is read at the boundary: the session builds read-only
// options for each component from it once, and the config's one Owner
// saves changes (userdata values, the states repository) and hands new
// values to whoever needs them (a new ws_uri reaches the connection).
package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/visualops/opsagent/agent/bridge"
	"github.com/visualops/opsagent/agent/conn"
	"github.com/visualops/opsagent/agent/outbox"
	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/protocol"
)

// Options configures Run.
type Options struct {
	Root       fsutil.Root
	ConfigFile string    // host path of the config; "" = /etc/opsagent.conf below Root
	LogLevel   string    // overrides [global] loglvl when set
	Stderr     io.Writer // also log here (a terminal); nil: the log file only
	// Reload receives a value when the config should be re-read (SIGHUP).
	Reload <-chan struct{}
	// UpdateNow receives a value when `opsagent update` left a request
	// (SIGUSR1).
	UpdateNow <-chan struct{}
	// Binary is the running executable, resolved once at start: what a
	// self-update replaces and re-executes. "": os.Executable.
	Binary  string
	Version string // agent version reported in Handshake
	// StatusInterval is how often status.json is checked for changes;
	// default 250 ms. It is rewritten only when something changed (or
	// every 30 s, to refresh updated_at).
	StatusInterval time.Duration
	// Updater applies self-updates; nil: the one built from the config.
	Updater rounds.Updater
}

// Restart is what Run returns when an update installed a new binary: the
// caller re-executes Binary with the same arguments and environment plus
// Env, which hands over the lock.
type Restart struct {
	Binary  string
	Version string
	Env     []string
}

// outcome is how one session ended.
type outcome int

const (
	stopped outcome = iota
	reloading
	restarting
)

// Run runs the agent until ctx is done (nil, nil), or until an update asks
// to re-execute the new binary (a Restart, with the lock kept open for the
// new image). Everything is unwound before it returns: the close frame is
// sent, the status written, the outbox flushed.
//
// The lock and the outbox belong to the process and outlive sessions: a
// reload (SIGHUP) ends the session and starts another with the new config,
// handing it the same outbox, so that no StateLog kept in memory is lost
// and no seq is handed out twice.
func Run(ctx context.Context, opts Options) (*Restart, error) {
	if opts.ConfigFile == "" {
		opts.ConfigFile = opts.Root.Path(config.DefaultPath)
	}
	if opts.StatusInterval <= 0 {
		opts.StatusInterval = 250 * time.Millisecond
	}
	if opts.Binary == "" {
		if exe, err := os.Executable(); err == nil {
			opts.Binary, _ = filepath.EvalSymlinks(exe)
		}
	}
	cfg, err := loadConfig(ctx, opts.ConfigFile)
	if err != nil {
		return nil, err
	}
	layout := config.NewLayout(opts.Root, opts.ConfigFile, cfg)
	if err := os.MkdirAll(layout.StateDir(), 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w (run 'opsagent install' to create the layout)", layout.StateDir(), err)
	}
	lock, err := fsutil.Lock(layout.LockFile())
	if err != nil {
		if errors.Is(err, fsutil.ErrLocked) {
			return nil, fmt.Errorf("%w (stop that agent first, e.g. systemctl stop opsagent)", err)
		}
		return nil, err
	}
	handedOver := false
	defer func() {
		if !handedOver {
			_ = lock.Unlock()
		}
	}()
	logs, err := openLog(layout.LogFile(), logLevel(opts, cfg), opts.Stderr)
	if err != nil {
		return nil, err
	}
	procLog := newSwitchHandler(logs.logger.Handler())
	outboxDir := layout.OutboxDir()
	queue := outbox.Open(outbox.Options{
		Dir: outboxDir, MaxEntries: cfg.Agent.OutboxLimit, MaxBytes: int64(cfg.Agent.OutboxMaxBytes),
		MaxAge: cfg.Agent.OutboxMaxAge, Logger: slog.New(procLog).With("part", "outbox"),
	})
	defer queue.Close() // after an early return; the session closes it otherwise
	for {
		for _, w := range cfg.Warnings() {
			logs.logger.Warn(w)
		}
		out, restart, next := runSession(ctx, opts, cfg, layout, logs.logger, queue)
		if out == stopped {
			logs.Close()
			return nil, nil
		}
		if out == restarting {
			env, herr := lock.HandOver()
			if herr != nil {
				logs.logger.Error("cannot keep the lock across the restart; the watchdog will start the new version", "err", herr)
			} else {
				handedOver = true
			}
			logs.logger.Info("re-executing the new version", "binary", restart.Binary, "version", restart.Version)
			logs.Close()
			r := &Restart{Binary: restart.Binary, Version: restart.Version}
			if env != "" {
				r.Env = []string{env}
			}
			return r, nil
		}
		logs.Close()
		cfg, layout, logs = next.cfg, next.layout, next.logs
		procLog.set(logs.logger.Handler())
		if d := layout.OutboxDir(); d != outboxDir {
			logs.logger.Warn("the state directory changed; the lock and the outbox stay where they are until the agent restarts", "outbox", outboxDir, "new", d)
		}
		queue.SetLimits(cfg.Agent.OutboxLimit, int64(cfg.Agent.OutboxMaxBytes), cfg.Agent.OutboxMaxAge)
		if err := queue.RetryDisk(); err != nil {
			logs.logger.Warn("outbox: still in memory", "err", err)
		}
	}
}

// logLevel is --log-level when given, else the config's loglvl.
func logLevel(opts Options, cfg *config.Config) slog.Level {
	if opts.LogLevel != "" {
		level, _ := config.ParseLogLevel(opts.LogLevel)
		return level
	}
	level, _ := config.ParseLogLevel(cfg.Global.LogLevel)
	return level
}

// loadConfig is config.Load, given up when ctx is done: whatever sits at
// the config's path, SIGTERM still stops the agent.
func loadConfig(ctx context.Context, path string) (*config.Config, error) {
	type loaded struct {
		cfg *config.Config
		err error
	}
	ch := make(chan loaded, 1)
	go func() {
		c, err := config.Load(path)
		ch <- loaded{c, err}
	}()
	select {
	case l := <-ch:
		return l.cfg, l.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// reload is what a SIGHUP hands to the next session: the new config, its
// layout and its log, each checked while the running session went on.
type reload struct {
	cfg    *config.Config
	layout config.Layout
	logs   logSink
}

// prepareReload loads and checks the config for a reload. An error leaves
// everything as it is: the running session is not touched.
func prepareReload(ctx context.Context, opts Options) (*reload, error) {
	cfg, err := loadConfig(ctx, opts.ConfigFile)
	if err != nil {
		return nil, err
	}
	layout := config.NewLayout(opts.Root, opts.ConfigFile, cfg)
	logs, err := openLog(layout.LogFile(), logLevel(opts, cfg), opts.Stderr)
	if err != nil {
		return nil, err
	}
	return &reload{cfg: cfg, layout: layout, logs: logs}, nil
}

// session is one life of the agent's components with one config. A reload
// ends it and starts another; the lock is held across.
type session struct {
	opts    Options
	layout  config.Layout
	owner   *config.Owner
	log     *slog.Logger
	id      *identity
	engine  *rounds.Engine
	mgr     *conn.Manager
	started time.Time

	update  *selfUpdate   // nil when Options.Updater replaces it (tests)
	confirm *confirmation // this run's side of an update
	sys     *system.Host  // the system below the root, shown in status

	mu         sync.Mutex
	initErrors []string
	saltError  string // the Salt path's current problem, "" when it is ready
}

// runSession runs until ctx is done, a reload is asked (and its config
// loaded: a config that cannot be loaded leaves the session running), or an
// update asks to re-execute. The outbox is the process's: the session closes
// it unless it ends for a reload.
func runSession(ctx context.Context, opts Options, cfg *config.Config, layout config.Layout, log *slog.Logger, queue *outbox.Outbox) (outcome, *rounds.Restart, *reload) {
	owner := config.NewOwner(cfg)
	s := &session{opts: opts, layout: layout, owner: owner, log: log, started: time.Now()}
	s.id = newIdentity(layout, owner, log)
	s.prepareLayout()
	if err := s.id.RefreshUserdata(ctx); err != nil {
		log.Warn("could not refresh identity from userdata", "err", err)
	}
	cur := owner.Current() // after userdata may have changed it
	s.confirm = newConfirmation(layout, owner, opts.Version, log.With("part", "update"))
	if msg := s.confirm.initError(); msg != "" {
		s.addInitError(msg)
	}
	updater := opts.Updater
	if updater == nil {
		s.update = newSelfUpdate(layout, owner, opts.Version, opts.Binary, log.With("part", "update"))
		updater = s.update
		if msg := s.update.keyProblem(); msg != "" {
			s.addInitError(msg)
		}
	}
	store := rounds.NewStore(rounds.Files{Recipe: layout.RecipeFile(), PendingUpdate: layout.PendingUpdateFile()}, clock.Real{}, log)

	// bridge.py ships inside the binary: write it out at start (only when
	// it changed), so a self-update updates it too.
	if err := bridge.WriteScript(layout.BridgeScript()); err != nil {
		s.addInitError(fmt.Sprintf("cannot write bridge.py: %v", err))
	}
	// The system below the root (distribution, package manager, init) is
	// detected once, by the first module or status write that asks.
	s.sys = system.New(system.Options{Root: layout.Root(), Logger: log.With("part", "system"), KillGrace: cur.Agent.KillGrace, OutputLimit: cur.Agent.OutputLimit})
	executor, closeExecutor := newExecutor(layout, cur, log, s.sys, s.setSaltError, func(p string) {
		if _, err := owner.Update(func(c *config.Config) error { c.Global.PackagePath = p; return nil }); err != nil {
			log.Error("cannot write [global] package_path back to the config", "err", err)
		}
	})
	defer closeExecutor()
	link := &linkProxy{}
	var defMod *protocol.ModuleSource
	if cur.Module.Repo != "" {
		defMod = &protocol.ModuleSource{Repo: cur.Module.Repo, Tag: cur.Module.Tag}
	}
	s.engine = rounds.New(rounds.Options{
		Executor:       executor,
		Link:           link,
		Store:          store,
		Logger:         log.With("part", "rounds"),
		Updater:        updater,
		CurrentVersion: opts.Version,
		InstanceID: func() string {
			id, _ := s.id.CachedInstanceID()
			return id
		},
		RoundDelay:    s.pause("[salt] delay", cur.Salt.RoundDelay),
		RetryDelay:    s.pause("[agent] retry_delay", cur.Agent.RetryDelay),
		StateTimeout:  cur.Agent.StateTimeout,
		OutputLimit:   cur.Agent.OutputLimit,
		DefaultModule: defMod,
		OnModuleChange: func(m protocol.ModuleSource) {
			if _, err := owner.Update(func(c *config.Config) error {
				c.Module.Repo, c.Module.Tag = m.Repo, m.Tag
				return nil
			}); err != nil {
				log.Error("cannot write the states repository back to the config", "err", err)
			}
		},
	})
	s.mgr = conn.New(conn.Options{
		URL:              cur.Userdata.WSURI,
		CAFile:           rootedOrEmpty(layout.Root(), cur.Network.CAFile),
		Identity:         s.identity,
		Handler:          s.engine,
		Logger:           log.With("part", "conn"),
		Outbox:           queue,
		OnEstablished:    s.confirm.established,
		AppNotReadyDelay: cur.Agent.AppNotReadyDelay,
	})
	link.m = s.mgr
	owner.OnChange(func(before, after *config.Config) {
		if after.Userdata.WSURI != before.Userdata.WSURI {
			s.mgr.SetURL(after.Userdata.WSURI)
		}
	})

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var restart *rounds.Restart
	engineDone := make(chan struct{})
	wg.Add(3)
	go func() {
		defer wg.Done()
		defer close(engineDone)
		r, err := s.engine.Run(sctx)
		if err != nil {
			log.Error("round engine stopped", "err", err)
		}
		restart = r
	}()
	go func() { defer wg.Done(); _ = s.mgr.Run(sctx) }()
	go func() { defer wg.Done(); s.keepStatus(sctx) }()
	log.Info("agent started", "version", opts.Version, "backend", conn.Redact(cur.Userdata.WSURI), "app_id", cur.Userdata.AppID, "engine", cur.Agent.Engine)

	out := stopped
	var next *reload
wait:
	for {
		select {
		case <-ctx.Done():
			log.Info("agent stopping")
		case <-opts.Reload:
			r, err := prepareReload(ctx, opts)
			if err != nil {
				if ctx.Err() != nil {
					log.Info("agent stopping")
					break wait
				}
				log.Error("config reload failed; keeping the running config (the session and its connection go on untouched)", "err", err)
				continue
			}
			out, next = reloading, r
			log.Info("reloading the config")
		case <-opts.UpdateNow:
			s.updateRequested(sctx)
			continue
		case <-engineDone:
			if restart != nil {
				out = restarting
			} else if ctx.Err() == nil {
				log.Error("round engine ended unexpectedly; stopping")
			}
		}
		break wait
	}
	cancel()
	wg.Wait()
	if out != reloading {
		if err := queue.Close(); err != nil {
			log.Error("outbox: the last StateLogs may not be on disk", "err", err)
		}
	}
	s.writeStatus(s.snapshot())
	return out, restart, next
}

// updateRequested hands a request left by `opsagent update` to the round
// engine, which applies it when the round ends.
func (s *session) updateRequested(ctx context.Context) {
	r, err := takeUpdateRequest(s.layout)
	if err != nil {
		s.log.Error("update request refused", "err", err)
		return
	}
	if r == nil {
		return
	}
	if s.update == nil {
		s.log.Warn("update request ignored: this agent has no updater", "version", r.Version)
		return
	}
	s.log.Info("update requested by hand", "version", r.Version, "force", r.Force)
	s.engine.DeliverUpdateByHand(ctx, *s.update.request(*r))
}

// pause applies the floor of the pauses between rounds, saying so when a
// configuration asked for less (0 would loop thousands of rounds a second).
func (s *session) pause(key string, d time.Duration) time.Duration {
	p, raised := config.Pause(d)
	if raised {
		s.log.Warn("pause raised to the minimum", "key", key, "configured", d, "used", p)
	}
	return p
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
	cur := s.owner.Current()
	return conn.Identity{
		InstanceID:   iid,
		AppID:        cur.Userdata.AppID,
		AgentVersion: s.opts.Version,
		Token:        tok,
		EnrollSecret: cur.Userdata.EnrollSecret,
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
		{s.layout.StateDir(), 0o700},
		{s.layout.WatchDir(), 0o700},
		{s.layout.LogDir(), 0o750},
	} {
		if err := os.MkdirAll(d.path, d.mode); err != nil {
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

// systemInfo is the system below the root, for status (nil before the
// session built it).
func (s *session) systemInfo() *system.Info {
	if s.sys == nil {
		return nil
	}
	in := s.sys.Info()
	return &in
}

func (s *session) snapshot() statusfile.Snapshot {
	cs := s.mgr.Status()
	iid, _ := s.id.CachedInstanceID()
	return statusfile.Snapshot{
		PID:          os.Getpid(),
		AgentVersion: s.opts.Version,
		InstanceID:   iid,
		AppID:        s.owner.Current().Userdata.AppID,
		System:       s.systemInfo(),
		StartedAt:    s.started,
		UpdatedAt:    time.Now(),
		Connection: statusfile.Connection{
			Connected:     cs.Connected,
			Since:         cs.Since,
			Backend:       cs.Backend,
			Protocol:      cs.Protocol,
			OutboxDepth:   cs.Outbox.Depth,
			OutboxBytes:   cs.Outbox.Bytes,
			OutboxStorage: cs.Outbox.Storage,
			NextSeq:       cs.Outbox.NextSeq,
			DroppedFrames: cs.DroppedFrames,
			DroppedLogs:   cs.Outbox.Dropped,
			DroppedBy:     cs.Outbox.DroppedBy,
			LastError:     cs.LastError,
		},
		Engine:     s.engine.Status(),
		Update:     s.updateStatus(),
		Goroutines: runtime.NumGoroutine(),
		InitErrors: s.InitErrors(),
	}
}

// updateStatus merges what this process's updater did (a download in
// progress, a refusal) with the update state shared with the watchdog (a
// confirmation, a rollback).
func (s *session) updateStatus() *statusfile.Update {
	if s.update != nil {
		if st := s.update.status(); st.Phase != "" {
			return &statusfile.Update{Phase: st.Phase, Version: st.Version, From: s.opts.Version, Bytes: st.Bytes, Total: st.Total, Reason: st.Reason}
		}
	}
	if st := s.confirm.status(); st.Phase != "" {
		return &statusfile.Update{Phase: st.Phase, Version: st.To, From: st.From, Reason: st.Reason, At: st.Updated}
	}
	return nil
}

func (s *session) writeStatus(snap statusfile.Snapshot) {
	if err := statusfile.Write(s.layout.StatusFile(), snap); err != nil {
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
