// Package saltbootstrap fetches the states repository (the Salt fork) that
// recipes name, with go-git so that no git binary is needed on the
// instance: clone into a sibling temporary directory and rename, update an
// existing clone by fetch and checkout, re-fetch a moving branch at each
// round, check compat.txt against the agent version, and run
// scripts/bootstrap.sh after every change (spec/salt-bridge.md).
package saltbootstrap

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-git/go-git/v5"
	"github.com/go-git/go-git/v5/config"
	"github.com/go-git/go-git/v5/plumbing"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
)

// Options configures a Fetcher.
type Options struct {
	Dir       string // the clone, e.g. <root>/opt/visualops/bootstrap/salt
	StampFile string // what the clone holds (repo, tag, commit), from the layout
	// ConfigPath is passed to bootstrap.sh.
	ConfigPath string
	// InterfaceVersion is the states interface the agent offers, checked
	// against compat.txt (version.StatesInterface; not the release).
	InterfaceVersion string
	// BootstrapScript is relative to the clone; "" means none.
	BootstrapScript string
	ScriptTimeout   time.Duration
	Runner          proc.Runner
	Logger          *slog.Logger
}

// Fetcher keeps one clone current.
type Fetcher struct {
	opts Options
	log  *slog.Logger
}

// New returns a Fetcher.
func New(opts Options) *Fetcher {
	if opts.ScriptTimeout <= 0 {
		opts.ScriptTimeout = 10 * time.Minute
	}
	if opts.Runner == nil {
		opts.Runner = proc.New()
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Fetcher{opts: opts, log: log}
}

// Error is a failure whose message is the StateLog comment the spec asks
// for.
type Error struct {
	Comment string
	Err     error
}

func (e *Error) Error() string { return e.Comment }
func (e *Error) Unwrap() error { return e.Err }

// state is what was last checked out, kept beside the clone.
type state struct {
	Repo   string `json:"repo"`
	Tag    string `json:"tag"`
	Commit string `json:"commit"`
	Moving bool   `json:"moving"` // tag is a branch: fetch at every round
	// Warning is bootstrap.sh's failure for this checkout, kept so that it
	// stays visible until the next checkout runs the script again.
	Warning string `json:"warning,omitempty"`
}

func (f *Fetcher) statePath() string { return f.opts.StampFile }

func (f *Fetcher) readState() state {
	var s state
	data, err := os.ReadFile(f.statePath())
	if err == nil {
		_ = json.Unmarshal(data, &s)
	}
	return s
}

// Ensure makes the clone hold repo at tag, running bootstrap.sh when
// anything changed.
//
// Its Result says whether the checkout changed and carries a Warning when
// bootstrap.sh failed: as in 2014 (utils.bootstrap_mod logged "Can't
// bootstrap modules" and went on), a failing script does not fail the
// states, because the real fork's script ends with downloads that often
// fail; the agent shows the warning in status and init_errors.
//
// prepare, when not nil, runs after a changed checkout passed compat.txt
// and before bootstrap.sh: the agent builds the virtualenv there, because
// the interpreter depends on the repository and bootstrap.sh copies
// libraries into the virtualenv's site-packages.
func (f *Fetcher) Ensure(ctx context.Context, repo, tag string, prepare func(context.Context) error) (Result, error) {
	if repo == "" {
		return Result{}, &Error{Comment: "no states repository configured (set [module] mod_repo, or name one in the recipe)"}
	}
	if tag == "" {
		tag = "master"
	}
	cur := f.readState()
	_, statErr := os.Stat(filepath.Join(f.opts.Dir, ".git"))
	have := statErr == nil && cur.Repo == repo
	if have && cur.Tag == tag && !cur.Moving {
		return Result{Warning: cur.Warning}, nil // a fixed tag that did not change: nothing to fetch
	}
	var next state
	var err error
	if have {
		next, err = f.update(ctx, repo, tag)
		if err != nil {
			f.log.Warn("updating the states repository failed; trying a fresh clone", "repo", repo, "tag", tag, "err", err)
			next, err = f.fresh(ctx, repo, tag)
		}
	} else {
		next, err = f.fresh(ctx, repo, tag)
	}
	if err != nil {
		return Result{}, err
	}
	res := Result{Changed: next.Commit != cur.Commit || next.Repo != cur.Repo}
	next.Warning = cur.Warning
	if res.Changed {
		f.log.Info("states repository checked out", "repo", repo, "tag", tag, "commit", next.Commit)
		err := f.checkCompat()
		if err == nil && prepare != nil {
			err = prepare(ctx)
		}
		if err != nil {
			// Forget the checkout so that the next round tries again
			// rather than trusting a tree that failed its checks.
			_ = os.Remove(f.statePath())
			return res, err
		}
		next.Warning = f.runBootstrap(ctx)
	}
	res.Warning = next.Warning
	data, _ := json.Marshal(next)
	if err := fsutil.WriteFileAtomic(f.statePath(), data, 0o644); err != nil {
		return res, err
	}
	return res, nil
}

// Result is what Ensure did.
type Result struct {
	Changed bool   // the checkout changed (requirements and the bridge reload follow)
	Warning string // bootstrap.sh failed: shown, not fatal
}

// fresh clones into a sibling temporary directory and renames it over the
// old clone, so a failed clone never leaves half a tree.
func (f *Fetcher) fresh(ctx context.Context, repo, tag string) (state, error) {
	parent := filepath.Dir(f.opts.Dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return state{}, &Error{Comment: fmt.Sprintf("Can't clone states repo %s: %v", repo, err), Err: err}
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(f.opts.Dir)+".clone-")
	if err != nil {
		return state{}, &Error{Comment: fmt.Sprintf("Can't clone states repo %s: %v", repo, err), Err: err}
	}
	defer os.RemoveAll(tmp)
	r, err := git.PlainCloneContext(ctx, tmp, false, &git.CloneOptions{URL: repo, Tags: git.AllTags, NoCheckout: true})
	if err != nil {
		return state{}, &Error{Comment: fmt.Sprintf("Can't clone states repo %s: %v", repo, err), Err: err}
	}
	st, err := checkout(r, repo, tag)
	if err != nil {
		return state{}, err
	}
	old := f.opts.Dir + ".old"
	_ = os.RemoveAll(old)
	if _, err := os.Stat(f.opts.Dir); err == nil {
		if err := os.Rename(f.opts.Dir, old); err != nil {
			return state{}, &Error{Comment: fmt.Sprintf("Can't clone states repo %s: %v", repo, err), Err: err}
		}
	}
	if err := os.Rename(tmp, f.opts.Dir); err != nil {
		_ = os.Rename(old, f.opts.Dir)
		return state{}, &Error{Comment: fmt.Sprintf("Can't clone states repo %s: %v", repo, err), Err: err}
	}
	_ = os.RemoveAll(old)
	return st, nil
}

// update fetches into the existing clone and checks tag out.
func (f *Fetcher) update(ctx context.Context, repo, tag string) (state, error) {
	r, err := git.PlainOpen(f.opts.Dir)
	if err != nil {
		return state{}, err
	}
	err = r.FetchContext(ctx, &git.FetchOptions{
		RemoteName: "origin",
		RefSpecs:   []config.RefSpec{"+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"},
		Tags:       git.AllTags,
		Force:      true,
	})
	if err != nil && !errors.Is(err, git.NoErrAlreadyUpToDate) {
		return state{}, &Error{Comment: fmt.Sprintf("Can't clone states repo %s: fetch: %v", repo, err), Err: err}
	}
	return checkout(r, repo, tag)
}

// checkout resolves tag as a tag, a branch or a commit and checks it out
// (detached, forced: local edits in the clone are not kept).
func checkout(r *git.Repository, repo, tag string) (state, error) {
	st := state{Repo: repo, Tag: tag}
	var hash plumbing.Hash
	if ref, err := r.Reference(plumbing.NewTagReferenceName(tag), true); err == nil {
		hash = ref.Hash()
		if obj, err := r.TagObject(hash); err == nil { // annotated tag
			if c, err := obj.Commit(); err == nil {
				hash = c.Hash
			}
		}
	} else if ref, err := r.Reference(plumbing.NewRemoteReferenceName("origin", tag), true); err == nil {
		hash, st.Moving = ref.Hash(), true
	} else if h, err := r.ResolveRevision(plumbing.Revision(tag)); err == nil {
		hash = *h
	} else {
		return st, &Error{Comment: fmt.Sprintf("Can't checkout required states tag %s: no such tag, branch or commit in %s", tag, repo), Err: err}
	}
	wt, err := r.Worktree()
	if err == nil {
		err = wt.Checkout(&git.CheckoutOptions{Hash: hash, Force: true})
	}
	if err != nil {
		return st, &Error{Comment: fmt.Sprintf("Can't checkout required states tag %s: %v", tag, err), Err: err}
	}
	st.Commit = hash.String()
	return st, nil
}

// runBootstrap runs the bootstrap script (bash <script> <config>) when one
// is configured and the clone has it as a file, and returns "" or a
// warning that says why it failed. An empty [module] bootstrap means none.
func (f *Fetcher) runBootstrap(ctx context.Context) string {
	if strings.TrimSpace(f.opts.BootstrapScript) == "" {
		return ""
	}
	script := filepath.Join(f.opts.Dir, f.opts.BootstrapScript)
	if st, err := os.Stat(script); err != nil || !st.Mode().IsRegular() {
		return ""
	}
	res, err := f.opts.Runner.Run(ctx, proc.Cmd{
		Path: "bash", Args: []string{script, f.opts.ConfigPath}, Dir: f.opts.Dir,
		Timeout: f.opts.ScriptTimeout, KillGrace: 10 * time.Second,
	})
	for _, line := range strings.Split(strings.TrimRight(res.Output, "\n"), "\n") {
		if line != "" {
			f.log.Info("bootstrap.sh", "line", line)
		}
	}
	if err == nil && res.ExitCode == 0 {
		return ""
	}
	why := fmt.Sprintf("exit code %d", res.ExitCode)
	if err != nil {
		why = err.Error()
	}
	w := fmt.Sprintf("Can't bootstrap modules: %s failed (%s): %s", f.opts.BootstrapScript, why, lastLines(res.Output, 5))
	f.log.Warn("bootstrap script failed; the states run anyway (as in 2014)", "script", script, "why", why)
	return w
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
