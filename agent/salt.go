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
	"github.com/visualops/opsagent/protocol"
	saltbootstrap "github.com/visualops/opsagent/salt-bootstrap"
)

// saltExecutor runs states through the Salt bridge. Before the first Salt
// state of each round it prepares the Salt path (saltbootstrap.Path: the
// states repository at the recipe's repo and tag, and the virtualenv it
// needs, the sequence `opsagent install` runs too); any failure there
// fails that state with the comment the spec asks for ("Can't clone
// states repo …"). The work happens in Execute, on the round's goroutine
// and under its context, so a slow clone never blocks the engine from
// taking a new recipe.
type saltExecutor struct {
	log        *slog.Logger
	path       *saltbootstrap.Path
	layout     config.Layout
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
	python   string // the virtualenv's Python version the bridge runs with ("" before the first)
	bridge   *bridge.Bridge
}

func newSaltExecutor(layout config.Layout, o saltOptions, log *slog.Logger, setError func(string), setPackagePath func(string)) *saltExecutor {
	o.Path.Logger = log
	o.Bridge.Logger = log.With("part", "bridge")
	return &saltExecutor{
		log:            log,
		path:           saltbootstrap.NewPath(o.Path),
		layout:         layout,
		bridgeOpts:     o.Bridge,
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

// prepare brings the Salt path to the round's repo and tag. Callers hold
// mu.
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
	res, err := s.path.Ensure(ctx, repo, tag)
	if err != nil {
		return err // a virtualenv failure's message is the failed state's comment
	}
	if res.EnvChecked {
		if res.PackagePath != "" && s.setPackagePath != nil {
			s.setPackagePath(res.PackagePath)
		}
		s.useEnv(res)
	}
	s.warning = res.Warning
	s.bridge.SetRepo(s.layout.StatesDir(), res.Changed)
	s.log.Debug("salt path ready", "repo", repo, "tag", tag, "changed", res.Changed, "took", time.Since(begin))
	return nil
}

// useEnv (re)starts the bridge when the virtualenv's interpreter changed.
// Callers hold mu.
func (s *saltExecutor) useEnv(res saltbootstrap.PathResult) {
	env := res.Env
	if s.python != "" && !env.Created && s.python == env.Version {
		return
	}
	if s.bridge != nil {
		s.bridge.Close()
	}
	l := s.layout
	opts := s.bridgeOpts
	opts.Python = env.Python
	opts.Config = map[string]any{
		"site_packages": env.SitePackages,
		"global": map[string]any{
			"conf_path": l.StateDir(), "watch": l.WatchDir(),
			"envroot": l.VenvDir(), "package_path": env.SitePackages,
		},
		"module": map[string]any{"root": l.ReposDir(), "name": filepath.Base(l.StatesDir())},
	}
	s.bridge = bridge.New(opts)
	s.python = env.Version
}

// Close stops the bridge worker.
func (s *saltExecutor) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bridge != nil {
		s.bridge.Close()
	}
}
