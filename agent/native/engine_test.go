package native

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/protocol"
)

// report is one StateLog the engine sent.
type report struct {
	version int64
	id      string
	res     state.Result
	at      time.Time
}

type chanLink struct{ c chan report }

func (l chanLink) Report(v int64, id string, r state.Result) {
	l.c <- report{v, id, r, time.Now()}
}
func (chanLink) QueryWaits(int64) {}
func (chanLink) Supersede(int64)  {}

// engineRig runs the real round engine with the native executor.
type engineRig struct {
	engine *rounds.Engine
	link   chanLink
	root   string
	cancel context.CancelFunc
	done   chan struct{}
}

func newEngineRig(tb testing.TB, grace time.Duration) *engineRig {
	tb.Helper()
	dir := tb.TempDir()
	root, _ := fsutil.NewRoot(dir)
	link := chanLink{c: make(chan report, 4096)}
	e := rounds.New(rounds.Options{
		Executor:   &rounds.Router{Engine: config.EngineNative, Native: New(Options{Root: root, KillGrace: grace})},
		Link:       link,
		Store:      rounds.NewStore(rounds.Files{Recipe: filepath.Join(dir, "state", "recipe.json"), PendingUpdate: filepath.Join(dir, "state", "pending-update.json")}, clock.Real{}, nil),
		RoundDelay: time.Hour,
		RetryDelay: time.Hour,
	})
	os.MkdirAll(filepath.Join(dir, "state"), 0o700)
	ctx, cancel := context.WithCancel(context.Background())
	r := &engineRig{engine: e, link: link, root: dir, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(r.done); _, _ = e.Run(ctx) }()
	tb.Cleanup(func() { cancel(); <-r.done })
	return r
}

func cmdRecipe(version int64, cmds ...string) *protocol.RecipeMetadata {
	m := &protocol.RecipeMetadata{RecipeVersion: version, States: []protocol.RecipeState{}}
	for i, c := range cmds {
		p, _ := json.Marshal(map[string]string{"cmd": c})
		m.States = append(m.States, protocol.RecipeState{ID: fmt.Sprintf("s%d", i+1), Module: "linux.cmd", Parameter: p})
	}
	return m
}

func (r *engineRig) next(tb testing.TB) report {
	tb.Helper()
	select {
	case rep := <-r.link.c:
		return rep
	case <-time.After(30 * time.Second):
		tb.Fatal("no StateLog")
		return report{}
	}
}

func waitPID(tb testing.TB, path string) int {
	tb.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		data, _ := os.ReadFile(path)
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && pid > 0 {
			return pid
		}
	}
	tb.Fatal("no pid")
	return 0
}

// A new recipe stops the running state at once: its whole process group
// (here a sleep grandchild) is gone, its result is not reported, and the
// new round starts.
func TestNewRecipeKillsRunningStateProcessGroup(t *testing.T) {
	r := newEngineRig(t, 5*time.Second)
	pidFile := filepath.Join(r.root, "pid")
	r.engine.Deliver(context.Background(), cmdRecipe(1, "sleep 300 & echo $! > "+pidFile+"; wait"))
	pid := waitPID(t, pidFile)
	r.engine.Deliver(context.Background(), cmdRecipe(2, "echo second"))
	rep := r.next(t)
	if rep.version != 2 || rep.id != "s1" || !rep.res.OK || rep.res.Stdout != "second\n" {
		t.Fatalf("first report after preemption: %+v (the stopped state must not be reported)", rep)
	}
	data, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if len(data) > 0 && !strings.Contains(string(data), ") Z") {
		t.Fatalf("sleep %d of the preempted state is still alive", pid)
	}
}

// BenchmarkEngineOverhead runs a round of 1000 linux.cmd states running
// `true` and compares it with spawning `true` 1000 times directly.
func BenchmarkEngineOverhead(b *testing.B) {
	const n = 1000
	cmds := make([]string, n)
	for i := range cmds {
		cmds[i] = "true"
	}
	runner := proc.New()
	for i := 0; i < b.N; i++ {
		// Baseline: the same process (/bin/sh -c true) spawned directly.
		begin := time.Now()
		for j := 0; j < n; j++ {
			if _, err := runner.Run(context.Background(), proc.Cmd{Path: "/bin/sh", Args: []string{"-c", "true"}}); err != nil {
				b.Fatal(err)
			}
		}
		spawn := time.Since(begin)
		bare := time.Now()
		for j := 0; j < n; j++ {
			if err := exec.Command("/bin/sh", "-c", "true").Run(); err != nil {
				b.Fatal(err)
			}
		}
		bareSpawn := time.Since(bare)

		r := newEngineRig(b, time.Second)
		begin = time.Now()
		r.engine.Deliver(context.Background(), cmdRecipe(1, cmds...))
		for j := 0; j < n; j++ {
			if rep := r.next(b); !rep.res.OK {
				b.Fatalf("state failed: %+v", rep)
			}
		}
		round := time.Since(begin)
		b.ReportMetric(float64(round.Milliseconds()), "round-ms")
		b.ReportMetric(float64(round.Microseconds())/n/1000, "ms/state")
		b.ReportMetric(float64(bareSpawn.Microseconds())/n/1000, "spawn-ms/state")
		b.ReportMetric(float64((round-bareSpawn).Microseconds())/n/1000, "overhead-ms/state")
		b.ReportMetric(float64((spawn-bareSpawn).Microseconds())/n/1000, "runner-overhead-ms/state")
	}
}

// BenchmarkPreemption measures the time from a new recipe's arrival to the
// old state's process group being gone and the new round's first state
// started, for a child that obeys SIGTERM and one that ignores it.
func BenchmarkPreemption(b *testing.B) {
	for _, tc := range []struct {
		name, cmd string
		grace     time.Duration
	}{
		{"obeys-SIGTERM", "sleep 300 & echo $! > %s; wait", 10 * time.Second},
		{"ignores-SIGTERM", "trap '' TERM; echo $$ > %s; while :; do sleep 0.01; done", 200 * time.Millisecond},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var total time.Duration
			var mu sync.Mutex
			for i := 0; i < b.N; i++ {
				r := newEngineRig(b, tc.grace)
				pidFile := filepath.Join(r.root, "pid")
				r.engine.Deliver(context.Background(), cmdRecipe(1, fmt.Sprintf(tc.cmd, pidFile)))
				waitPID(b, pidFile)
				begin := time.Now()
				r.engine.Deliver(context.Background(), cmdRecipe(2, "true"))
				rep := r.next(b)
				// The state's report comes after it ran; its start is what
				// counts, and `true` takes about one spawn.
				mu.Lock()
				total += rep.at.Sub(begin)
				mu.Unlock()
				r.cancel()
				<-r.done
			}
			b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms/preemption")
		})
	}
}
