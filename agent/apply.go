package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/protocol"
)

// ApplyOptions configures Apply.
type ApplyOptions struct {
	Root       fsutil.Root
	ConfigFile string // host path; "" = /etc/opsagent.conf below Root. A missing file means the defaults.
	Recipe     *protocol.RecipeMetadata
	// Test is check mode: every state reports what it would change and
	// nothing is changed (Salt's test=True).
	Test   bool
	Logger *slog.Logger
	// OnResult, when set, is called as each state finishes.
	OnResult func(ApplyResult)
}

// ApplyResult is one state's result, as its StateLog would carry it, with
// what the StateLog does not: whether it changed anything and how long
// it took.
type ApplyResult struct {
	StateID    string `json:"id"`
	Module     string `json:"module"`
	Result     bool   `json:"result"`
	Changed    bool   `json:"changed"`
	Comment    string `json:"comment"`
	Stdout     string `json:"stdout,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	// NotRun: an earlier state failed, so this one did not run (a round
	// stops at its first failure).
	NotRun bool `json:"not_run,omitempty"`
}

// Apply applies a recipe once, here, with no backend (as `salt-call
// --local` does): the states run in order through the same executors a
// round uses, and the first failure ends it as it ends a round.
// meta.comment is skipped as in a round; a meta.wait, which only a
// backend can release, is passed over and says so. Outside check mode it
// holds the agent's lock, so it never runs beside a running agent on the
// same root.
func Apply(ctx context.Context, opts ApplyOptions) ([]ApplyResult, error) {
	if opts.Recipe == nil {
		return nil, errors.New("apply: no recipe")
	}
	if opts.ConfigFile == "" {
		opts.ConfigFile = opts.Root.Path(config.DefaultPath)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg, err := applyConfig(opts.ConfigFile)
	if err != nil {
		return nil, err
	}
	layout := config.NewLayout(opts.Root, opts.ConfigFile, cfg)
	if !opts.Test {
		if _, err := os.Stat(layout.StateDir()); err == nil {
			lock, err := fsutil.Lock(layout.LockFile())
			if err != nil {
				if errors.Is(err, fsutil.ErrLocked) {
					return nil, fmt.Errorf("%w: an agent is applying recipes on this root; stop it first (systemctl stop opsagent), or use --test", err)
				}
				return nil, err
			}
			defer lock.Unlock()
		}
	}
	sys := system.New(system.Options{Root: opts.Root, Logger: log, KillGrace: cfg.Agent.KillGrace, OutputLimit: cfg.Agent.OutputLimit})
	router, closeExec := newExecutor(layout, cfg, log, sys, func(string) {}, nil)
	defer closeExec()
	if opts.Recipe.Module != nil || cfg.Module.Repo != "" {
		mod := opts.Recipe.Module
		if mod == nil {
			mod = &protocol.ModuleSource{Repo: cfg.Module.Repo, Tag: cfg.Module.Tag}
		}
		router.BeginRound(mod)
	}

	var out []ApplyResult
	failed := false
	for _, st := range opts.Recipe.States {
		r := ApplyResult{StateID: st.ID, Module: st.Module}
		start := time.Now()
		switch {
		case failed:
			r.NotRun, r.Comment = true, "not run: an earlier state failed"
		case st.Module == rounds.ModuleComment:
			r.Result, r.Comment = true, "skipped: comment"
		case st.Module == rounds.ModuleWait:
			r.Result, r.Comment = true, "skipped: a meta.wait is released by a backend, and apply runs without one"
		default:
			res := router.Execute(ctx, state.Request{
				RecipeVersion: opts.Recipe.RecipeVersion, StateID: st.ID, Module: st.Module, Parameter: st.Parameter, Test: opts.Test,
			})
			r.Result, r.Changed, r.Comment, r.Stdout = res.OK, res.Changed, res.Comment, res.Stdout
			failed = !res.OK
		}
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		r.DurationMS = time.Since(start).Milliseconds()
		out = append(out, r)
		if opts.OnResult != nil {
			opts.OnResult(r)
		}
	}
	return out, nil
}

// applyConfig reads the config for apply: the defaults when there is no
// file (trying a recipe needs no installation), and no required userdata
// keys (apply talks to no backend).
func applyConfig(path string) (*config.Config, error) {
	data, err := fsutil.ReadFixedFile(path, config.MaxFileSize)
	if errors.Is(err, fs.ErrNotExist) {
		return config.Default(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return config.Parse(path, data)
}

// newExecutor builds the state executor that [agent] engine asks for:
// native modules in Go and, unless the engine is native, the Salt bridge
// for the others. The returned function stops the bridge.
func newExecutor(layout config.Layout, cfg *config.Config, log *slog.Logger, sys *system.Host, setSaltError func(string), setPackagePath func(string)) (*rounds.Router, func()) {
	salt := newSaltExecutor(layout, cfg, log.With("part", "salt"), setSaltError, setPackagePath)
	router := &rounds.Router{
		Engine: strings.ToLower(cfg.Agent.Engine),
		Salt:   salt,
		Native: native.New(native.Options{
			Root:        layout.Root(),
			Runner:      proc.New(),
			HTTPClient:  &http.Client{Timeout: 10 * time.Minute},
			Logger:      log,
			OutputLimit: cfg.Agent.OutputLimit,
			KillGrace:   cfg.Agent.KillGrace,
			System:      sys,
			WatchDir:    layout.WatchDir(),
			StateDir:    layout.StateDir(),
			S3:          native.S3Options{MetadataURL: cfg.Network.Metadata},
		}),
	}
	return router, salt.Close
}
