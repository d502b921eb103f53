package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/visualops/opsagent/agent/bridge"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/version"
	"github.com/visualops/opsagent/protocol"
	saltbootstrap "github.com/visualops/opsagent/salt-bootstrap"
	"github.com/visualops/opsagent/virtualenv"
)

// saltExecutor runs states through the Salt bridge. Before the first Salt
// state of each round it makes sure the virtualenv exists and the states
// repository is at the recipe's repo and tag; any failure there fails that
// state with the comment the spec asks for ("Can't clone states repo …").
// The work happens in Execute, on the round's goroutine and under its
// context, so a slow clone never blocks the engine from taking a new recipe.
type saltExecutor struct {
	log        *slog.Logger
	fetch      *saltbootstrap.Fetcher
	layout     config.Layout
	python     string // [salt] python: overrides what the repository needs
	wheelhouse string
	repoDir    string
	bridgeOpts bridge.Options
	setError   func(string) // the current problem, "" when ready
	// setPackagePath writes the virtualenv's site-packages back to the
	// config ([global] package_path), which bootstrap.sh reads.
	setPackagePath func(instancePath string)

	mu       sync.Mutex
	module   *protocol.ModuleSource // of the current round
	prepared bool                   // for the current round
	prepErr  error
	warning  string // bootstrap.sh's failure for the current checkout
	venv     *virtualenv.Env
	bridge   *bridge.Bridge
}

func newSaltExecutor(layout config.Layout, cfg *config.Config, log *slog.Logger, setError func(string), setPackagePath func(string)) *saltExecutor {
	wheelhouse := ""
	if cfg.Salt.Wheelhouse != "" {
		wheelhouse = layout.Host(cfg.Salt.Wheelhouse)
	}
	// [salt] python names a program, like linux.cmd's shell: a path on
	// the host, not mapped below the root.
	python := cfg.Salt.Python
	return &saltExecutor{
		log: log,
		fetch: saltbootstrap.New(saltbootstrap.Options{
			Dir: layout.StatesDir(), StampFile: layout.StatesStampFile(), ConfigPath: layout.ConfigFile(),
			InterfaceVersion: version.StatesInterface, BootstrapScript: cfg.Module.BootstrapScript, Logger: log,
		}),
		layout:     layout,
		python:     python,
		wheelhouse: wheelhouse,
		repoDir:    layout.StatesDir(),
		bridgeOpts: bridge.Options{
			Script:    layout.BridgeScript(),
			WatchDir:  layout.WatchDir(),
			OSRoot:    osRoot(layout),
			KillGrace: cfg.Agent.KillGrace,
			Logger:    log.With("part", "bridge"),
		},
		setError:       setError,
		setPackagePath: setPackagePath,
	}
}

// BeginRound records the round's states repository (rounds.RoundAware).
func (s *saltExecutor) BeginRound(module *protocol.ModuleSource) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.module, s.prepared, s.prepErr = module, false, nil
}

// Execute prepares (once per round) and runs the state through the bridge.
func (s *saltExecutor) Execute(ctx context.Context, req state.Request) state.Result {
	s.mu.Lock()
	if !s.prepared {
		s.prepErr = s.prepare(ctx)
		s.prepared = ctx.Err() == nil
	}
	err, b := s.prepErr, s.bridge
	s.mu.Unlock()
	if err != nil {
		var fe *saltbootstrap.Error
		if errors.As(err, &fe) {
			return state.Failed(fe.Comment)
		}
		return state.Failed(err.Error())
	}
	return b.Execute(ctx, req)
}

// prepare brings the states repository to the round's repo and tag and
// builds the virtualenv (first time, or after a failure). Callers hold mu.
func (s *saltExecutor) prepare(ctx context.Context) error {
	err := s.prepareSteps(ctx)
	msg := ""
	if err != nil {
		var fe *saltbootstrap.Error
		if msg = err.Error(); errors.As(err, &fe) {
			msg = fe.Comment
		}
	}
	if msg == "" {
		msg = s.warning // a failed bootstrap.sh: shown, not fatal
	}
	s.setError(msg)
	return err
}

func (s *saltExecutor) prepareSteps(ctx context.Context) error {
	begin := time.Now()
	repo, tag := "", ""
	if s.module != nil {
		repo, tag = s.module.Repo, s.module.Tag
	}
	if repo == "" {
		// Said before building a virtualenv that would have nothing to run.
		return &saltbootstrap.Error{Comment: "no states repository configured (set [module] mod_repo, or name one in the recipe's module)"}
	}
	// The virtualenv is built between the checkout and bootstrap.sh: its
	// Python depends on the repository, and the script copies libraries
	// into its site-packages.
	res, err := s.fetch.Ensure(ctx, repo, tag, s.prepareEnv)
	if err != nil {
		return err
	}
	if s.venv == nil { // an unchanged checkout from an earlier run
		if err := s.prepareEnv(ctx); err != nil {
			return err
		}
	}
	s.warning = res.Warning
	s.bridge.SetRepo(s.repoDir, res.Changed)
	s.log.Debug("salt path ready", "repo", repo, "tag", tag, "changed", res.Changed, "took", time.Since(begin))
	return nil
}

// prepareEnv builds (or keeps) the virtualenv with the Python the checkout
// needs, installs Salt's libraries when the repository bundles Salt and
// its requirements.txt, and (re)starts the bridge when the interpreter
// changed. Callers hold mu.
func (s *saltExecutor) prepareEnv(ctx context.Context) error {
	env, err := virtualenv.ForRepo(ctx, virtualenv.RepoOptions{
		Dir: s.layout.VenvDir(), RepoDir: s.repoDir, Python: s.python, Wheelhouse: s.wheelhouse, Logger: s.log,
	})
	if err != nil {
		return err // its message is the failed state's comment
	}
	if p, ok := s.layout.Root().Instance(env.SitePackages); ok && s.setPackagePath != nil {
		s.setPackagePath(p)
	}
	if s.venv == nil || env.Created || s.venv.Version != env.Version {
		if s.bridge != nil {
			s.bridge.Close()
		}
		opts := s.bridgeOpts
		opts.Python = env.Python
		opts.Config = map[string]any{
			"site_packages": env.SitePackages,
			"global": map[string]any{
				"conf_path": s.layout.StateDir(), "watch": s.layout.WatchDir(),
				"envroot": s.layout.VenvDir(), "package_path": env.SitePackages,
			},
			"module": map[string]any{"root": s.layout.ReposDir(), "name": filepath.Base(s.repoDir)},
		}
		s.bridge = bridge.New(opts)
	}
	s.venv = &env
	return nil
}

// Close stops the bridge worker.
func (s *saltExecutor) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bridge != nil {
		s.bridge.Close()
	}
}

// osRoot is where the bridge reads etc/os-release (the adaptor needs the
// OS type): the root when it has one (a real instance, or a test that
// gives one), else the host's, so that a test root without an
// /etc/os-release still names a real OS.
func osRoot(layout config.Layout) string {
	if _, err := os.Stat(layout.OSReleaseFile()); err == nil {
		return layout.Root().Dir()
	}
	return "/"
}
