package agent

import (
	"context"
	"errors"
	"log/slog"
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
	venvOpts   virtualenv.Options
	wheelhouse string
	repoDir    string
	bridgeOpts bridge.Options
	setError   func(string) // the current problem, "" when ready

	mu       sync.Mutex
	module   *protocol.ModuleSource // of the current round
	prepared bool                   // for the current round
	prepErr  error
	warning  string // bootstrap.sh's failure for the current checkout
	venv     *virtualenv.Env
	bridge   *bridge.Bridge
}

func newSaltExecutor(layout config.Layout, cfg *config.Config, log *slog.Logger, setError func(string)) *saltExecutor {
	wheelhouse := ""
	if cfg.Salt.Wheelhouse != "" {
		wheelhouse = layout.Host(cfg.Salt.Wheelhouse)
	}
	return &saltExecutor{
		log: log,
		fetch: saltbootstrap.New(saltbootstrap.Options{
			Dir: layout.StatesDir(), StampFile: layout.StatesStampFile(), ConfigPath: layout.ConfigFile(),
			InterfaceVersion: version.StatesInterface, BootstrapScript: cfg.Module.BootstrapScript, Logger: log,
		}),
		venvOpts:   virtualenv.Options{Dir: layout.VenvDir(), Logger: log},
		wheelhouse: wheelhouse,
		repoDir:    layout.StatesDir(),
		bridgeOpts: bridge.Options{
			Script:    layout.BridgeScript(),
			WatchDir:  layout.WatchDir(),
			OSRoot:    layout.Root().Dir(),
			KillGrace: cfg.Agent.KillGrace,
			Logger:    log.With("part", "bridge"),
			Config: map[string]any{
				"global": map[string]any{"conf_path": layout.StateDir(), "watch": layout.WatchDir()},
				"module": map[string]any{"root": layout.ReposDir(), "name": cfg.Module.RepoName},
			},
		},
		setError: setError,
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
	if s.venv == nil {
		env, err := virtualenv.Ensure(ctx, s.venvOpts)
		if err != nil {
			return err
		}
		s.venv = &env
		opts := s.bridgeOpts
		opts.Python = env.Python
		s.bridge = bridge.New(opts)
	}
	res, err := s.fetch.Ensure(ctx, repo, tag)
	if err != nil {
		return err
	}
	s.warning = res.Warning
	changed := res.Changed
	if changed {
		if err := s.venv.InstallRequirements(ctx, filepath.Join(s.repoDir, "requirements.txt"), s.wheelhouse); err != nil {
			return err
		}
	}
	s.bridge.SetRepo(s.repoDir, changed)
	s.log.Debug("salt path ready", "repo", repo, "tag", tag, "changed", changed, "took", time.Since(begin))
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
