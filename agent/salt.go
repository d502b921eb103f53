package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
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
	venvOpts   virtualenv.Options
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

// saltModules are what Salt 2014.1 imports beyond the standard library;
// they are installed into the virtualenv when a repository bundles Salt.
var saltModules = []string{"yaml", "jinja2", "markupsafe", "msgpack"}

func newSaltExecutor(layout config.Layout, cfg *config.Config, log *slog.Logger, setError func(string), setPackagePath func(string)) *saltExecutor {
	wheelhouse := ""
	if cfg.Salt.Wheelhouse != "" {
		wheelhouse = layout.Host(cfg.Salt.Wheelhouse)
	}
	python := ""
	if cfg.Salt.Python != "" {
		python = layout.Host(cfg.Salt.Python)
	}
	return &saltExecutor{
		log: log,
		fetch: saltbootstrap.New(saltbootstrap.Options{
			Dir: layout.StatesDir(), StampFile: layout.StatesStampFile(), ConfigPath: layout.ConfigFile(),
			InterfaceVersion: version.StatesInterface, BootstrapScript: cfg.Module.BootstrapScript, Logger: log,
		}),
		layout:     layout,
		venvOpts:   virtualenv.Options{Dir: layout.VenvDir(), Logger: log},
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
	python, why, err := virtualenv.PythonFor(ctx, nil, s.repoDir, s.python)
	if err != nil {
		return &saltbootstrap.Error{Comment: err.Error(), Err: err}
	}
	opts := s.venvOpts
	opts.Python = python
	env, err := virtualenv.Ensure(ctx, opts)
	if err != nil {
		return err
	}
	if env.Created {
		s.log.Info("virtualenv ready", "python", env.Version, "why", why)
	}
	if _, err := virtualenv.SaltVersion(s.repoDir); err == nil {
		if missing := env.Missing(ctx, saltModules...); len(missing) > 0 {
			if err := s.installSaltLibraries(ctx, env, missing); err != nil {
				return err
			}
		}
	}
	if err := env.InstallRequirements(ctx, filepath.Join(s.repoDir, "requirements.txt"), s.wheelhouse); err != nil {
		return err
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

// installSaltLibraries installs the libraries Salt needs: offline from
// [salt] wheelhouse (wheels or plain package directories), else with pip
// at the versions of the Salt's time.
func (s *saltExecutor) installSaltLibraries(ctx context.Context, env virtualenv.Env, missing []string) error {
	s.log.Info("installing Salt's libraries into the virtualenv", "missing", strings.Join(missing, ","), "wheelhouse", s.wheelhouse)
	var err error
	if s.wheelhouse != "" {
		err = env.InstallFromWheelhouse(ctx, s.wheelhouse)
	} else {
		err = env.InstallPackages(ctx, virtualenv.SaltRequirements(env.Major())...)
	}
	if err != nil {
		return err
	}
	if still := env.Missing(ctx, missing...); len(still) > 0 {
		return fmt.Errorf("virtualenv %s: %s still cannot be imported after installing Salt's libraries (check [salt] wheelhouse)", env.Dir, strings.Join(still, ", "))
	}
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
