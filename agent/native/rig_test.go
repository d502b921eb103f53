package native

import (
	"context"
	"encoding/json"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// recordingRunner runs commands for real and records each one's program
// and arguments, so a test can tell that a second round ran no package
// manager, useradd or crontab.
type recordingRunner struct {
	proc.Runner
	mu   sync.Mutex
	cmds [][]string
}

func (r *recordingRunner) Run(ctx context.Context, c proc.Cmd) (proc.Result, error) {
	r.mu.Lock()
	r.cmds = append(r.cmds, append([]string{path.Base(c.Path)}, c.Args...))
	r.mu.Unlock()
	return r.Runner.Run(ctx, c)
}

// Since returns the commands run from mark on (mark = Mark()).
func (r *recordingRunner) Since(mark int) [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]string(nil), r.cmds[mark:]...)
}

// Mark is the number of commands run so far.
func (r *recordingRunner) Mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.cmds)
}

// Ran reports whether any command since mark ran one of the programs.
func (r *recordingRunner) Ran(mark int, programs ...string) []string {
	var out []string
	for _, c := range r.Since(mark) {
		for _, p := range programs {
			if c[0] == p {
				out = append(out, strings.Join(c, " "))
			}
		}
	}
	return out
}

// debianRig is an Executor on a fresh Debian 12 root (package debroot)
// whose commands are recorded.
type debianRig struct {
	root string
	e    *Executor
	runs *recordingRunner
}

func newDebianRig(t testing.TB) *debianRig {
	t.Helper()
	root := debroot.New(t)
	r, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	runs := &recordingRunner{Runner: proc.New()}
	return &debianRig{root: root, runs: runs, e: New(Options{Root: r, Runner: runs, KillGrace: time.Second})}
}

// apply runs one state (check mode when test).
func (r *debianRig) apply(t testing.TB, module, param string, test bool) state.Result {
	t.Helper()
	if !json.Valid([]byte(param)) {
		t.Fatalf("bad test parameter %s", param)
	}
	return r.e.Execute(context.Background(), state.Request{RecipeVersion: 1, StateID: "s-" + module, Module: module, Parameter: json.RawMessage(param), Test: test})
}

// converges applies a state, which must succeed and change something,
// then applies it again, which must succeed, change nothing and run none
// of the programs named; a check-mode run then reports no change either.
func (r *debianRig) converges(t *testing.T, module, param string, quiet ...string) state.Result {
	t.Helper()
	first := r.apply(t, module, param, false)
	if !first.OK || !first.Changed {
		t.Fatalf("%s %s: first round %+v, want a change", module, param, first)
	}
	mark := r.runs.Mark()
	second := r.apply(t, module, param, false)
	if !second.OK || second.Changed {
		t.Fatalf("%s %s: second round %+v, want nothing to change", module, param, second)
	}
	if ran := r.runs.Ran(mark, quiet...); len(ran) > 0 {
		t.Fatalf("%s: second round ran %v", module, ran)
	}
	if check := r.apply(t, module, param, true); !check.OK || check.Changed {
		t.Fatalf("%s: check mode after convergence %+v", module, check)
	}
	return first
}
