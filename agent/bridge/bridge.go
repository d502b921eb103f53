// Package bridge runs configuration states through the Salt fork with a
// long-lived Python worker (bridge.py, embedded here and written out at
// start): JSON lines on stdin/stdout, one forked child per state in its own
// process group. The Go side starts and restarts the worker, kills a
// state's process group on preemption or timeout, never waits on the
// worker without a deadline, and turns every bridge failure into a failed
// state with a clear comment.
package bridge

import (
	"bufio"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/textcut"
)

//go:embed bridge.py
var script []byte

// Options configures a Bridge.
type Options struct {
	Python   string // the virtualenv's interpreter
	Script   string // where bridge.py is written (the layout's BridgeScript)
	WatchDir string // checksums of watched files
	OSRoot   string // root for /etc/os-release (tests); default "/"
	Config   map[string]any
	Logger   *slog.Logger

	KillGrace    time.Duration // SIGTERM → SIGKILL for a stopped state; default 10 s
	StartTimeout time.Duration // worker start + load; default 2 min
}

// Bridge is a state.Executor backed by the Python worker.
type Bridge struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex // one state at a time, and guards the fields below
	w      *worker
	repo   string // states repository the worker should have loaded
	loaded string // what it has loaded
	seq    int64
}

// New returns a Bridge; the worker starts with the first state.
func New(opts Options) *Bridge {
	if opts.KillGrace <= 0 {
		opts.KillGrace = 10 * time.Second
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 2 * time.Minute
	}
	if opts.OSRoot == "" {
		opts.OSRoot = "/"
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Bridge{opts: opts, log: log}
}

// Options returns the options the bridge was made with.
func (b *Bridge) Options() Options { return b.opts }

// SetRepo names the states repository checkout to load; a change (or
// force, after the checkout was updated) reloads it before the next state.
func (b *Bridge) SetRepo(dir string, force bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if dir != b.repo || force {
		b.repo = dir
		b.loaded = ""
	}
}

// Close stops the worker.
func (b *Bridge) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w != nil {
		b.w.kill()
		b.w = nil
	}
}

// WriteScript writes bridge.py to path unless it already holds the same
// content.
func WriteScript(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	_, err := fsutil.WriteFileIfChanged(path, script, 0o644)
	return err
}

// response is one line from the worker.
type response struct {
	Seq     *int64 `json:"seq"`
	Event   string `json:"event"`
	PGID    int    `json:"pgid"`
	Result  bool   `json:"result"`
	Comment string `json:"comment"`
	Stdout  string `json:"stdout"`

	malformed string // a line that was not a response (set by the reader)
}

// worker is one Python process.
type worker struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan response // in order, malformed lines included; closed when stdout ends
	done  chan struct{} // closed when the process has exited
}

func (w *worker) kill() {
	_ = w.stdin.Close()
	proc.StopGroup(w.cmd.Process.Pid, 0)
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
	}
}

func (b *Bridge) start() (*worker, error) {
	path := b.opts.Script
	if err := WriteScript(path); err != nil {
		return nil, fmt.Errorf("bridge: cannot write %s: %w", path, err)
	}
	cmd := exec.Command(b.opts.Python, "-u", path)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	// Its own group: killing the worker takes its children with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("bridge: cannot start %s (is the virtualenv built?): %w", b.opts.Python, err)
	}
	w := &worker{cmd: cmd, stdin: stdin, lines: make(chan response, 4), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
		for sc.Scan() {
			b.log.Info("bridge", "stderr", sc.Text())
		}
	}()
	go func() {
		defer close(w.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
		for sc.Scan() {
			var r response
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.Seq == nil {
				b.log.Warn("bridge: malformed output from the worker", "line", truncate(sc.Text(), 200))
				zero := int64(0)
				w.lines <- response{Seq: &zero, malformed: sc.Text()}
				continue
			}
			w.lines <- r
		}
	}()
	go func() { _ = cmd.Wait(); close(w.done) }()
	return w, nil
}

// errWorker means the worker must be replaced.
var errWorker = errors.New("bridge worker failed")

// call sends req and waits for its final response. started is called with
// the state's process group when the worker forks it. On ctx done the
// group is killed and the call returns ctx.Err().
func (b *Bridge) call(ctx context.Context, w *worker, req map[string]any, timeout time.Duration) (response, error) {
	b.seq++
	seq := b.seq
	req["seq"] = seq
	line, err := json.Marshal(req)
	if err != nil {
		return response{}, err
	}
	if _, err := w.stdin.Write(append(line, '\n')); err != nil {
		return response{}, fmt.Errorf("%w: cannot write to it: %v", errWorker, err)
	}
	var deadline <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		deadline = t.C
	}
	// A run must at least report that it forked the state soon; a worker
	// that does not is stuck, and the agent must not wait on it forever.
	var notStarted <-chan time.Time
	if req["op"] == "run" {
		t := time.NewTimer(b.opts.StartTimeout)
		defer t.Stop()
		notStarted = t.C
	}
	pgid := 0
	for {
		select {
		case <-notStarted:
			if pgid == 0 {
				return response{}, fmt.Errorf("%w: it did not start the state within %v", errWorker, b.opts.StartTimeout)
			}
		case r, ok := <-w.lines:
			if !ok {
				return response{}, fmt.Errorf("%w: it exited", errWorker)
			}
			if r.malformed != "" {
				if pgid > 0 {
					proc.StopGroup(pgid, b.opts.KillGrace)
				}
				return response{}, fmt.Errorf("%w: malformed output %q", errWorker, truncate(r.malformed, 80))
			}
			if *r.Seq != seq {
				continue // a late answer to a request we gave up on
			}
			if r.Event == "started" {
				pgid = r.PGID
				continue
			}
			return r, nil
		case <-deadline:
			return response{}, fmt.Errorf("%w: no answer within %v", errWorker, timeout)
		case <-ctx.Done():
			if pgid > 0 {
				proc.StopGroup(pgid, b.opts.KillGrace)
				// The worker answers once the child is gone; wait for it
				// briefly so the next request starts clean.
				t := time.NewTimer(b.opts.KillGrace + 2*time.Second)
				defer t.Stop()
				for {
					select {
					case r, ok := <-w.lines:
						if ok && (*r.Seq != seq || r.Event == "started") {
							continue
						}
						if !ok {
							return response{}, fmt.Errorf("%w: it exited", errWorker)
						}
						return response{}, ctx.Err()
					case <-t.C:
						return response{}, fmt.Errorf("%w: stuck after the state was stopped", errWorker)
					}
				}
			}
			return response{}, fmt.Errorf("%w: %v", errWorker, ctx.Err())
		}
	}
}

// ensure returns a live worker with the current repository loaded.
func (b *Bridge) ensure(ctx context.Context) (*worker, error) {
	if b.repo == "" {
		return nil, errors.New("no states repository configured")
	}
	if b.w != nil {
		select {
		case <-b.w.done:
			b.w = nil
		default:
		}
	}
	if b.w == nil {
		w, err := b.start()
		if err != nil {
			return nil, err
		}
		b.w, b.loaded = w, ""
	}
	if b.loaded != b.repo {
		cfg := map[string]any{"watch_dir": b.opts.WatchDir, "os_root": b.opts.OSRoot}
		for k, v := range b.opts.Config {
			cfg[k] = v
		}
		r, err := b.call(ctx, b.w, map[string]any{"op": "load", "repo_dir": b.repo, "config": cfg}, b.opts.StartTimeout)
		if err != nil {
			b.w.kill()
			b.w = nil
			return nil, fmt.Errorf("bridge: loading the states repository: %v", err)
		}
		if !r.Result {
			return nil, fmt.Errorf("bridge: cannot load the states repository %s: %s", b.repo, firstLine(r.Comment))
		}
		b.loaded = b.repo
	}
	return b.w, nil
}

// Execute runs one state through the worker.
func (b *Bridge) Execute(ctx context.Context, req state.Request) state.Result {
	b.mu.Lock()
	defer b.mu.Unlock()
	w, err := b.ensure(ctx)
	if err != nil {
		return state.Failed(err.Error())
	}
	var param any = map[string]any{}
	if len(req.Parameter) > 0 {
		if err := json.Unmarshal(req.Parameter, &param); err != nil {
			return state.Failed("bridge: parameter is not JSON: " + err.Error())
		}
	}
	r, err := b.call(ctx, w, map[string]any{
		"op": "run", "state_id": req.StateID, "module": req.Module,
		"parameter": param, "recipe_version": req.RecipeVersion,
	}, 0)
	if err != nil {
		if errors.Is(err, errWorker) {
			b.log.Warn("bridge worker failed; it will be restarted", "state_id", req.StateID, "err", err)
			w.kill()
			b.w = nil
			return state.Failed(fmt.Sprintf("bridge: worker failed while running state %s (%v); it will be restarted", req.StateID, err))
		}
		return state.Failed(fmt.Sprintf("bridge: state %s stopped: %v", req.StateID, err))
	}
	return state.Result{OK: r.Result, Comment: r.Comment, Stdout: r.Stdout}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func truncate(s string, n int) string {
	if len(s) > n {
		return textcut.Prefix(s, n) + "…"
	}
	return s
}
