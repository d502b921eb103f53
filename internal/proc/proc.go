// Package proc runs a command in its own process group and can stop all of
// it: on cancellation or timeout the whole group gets SIGTERM, then SIGKILL
// after a grace period, and Run returns only once the group is gone, so a
// stopped state leaves no stray grandchild behind.
package proc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrTimeout is returned (wrapped) when Cmd.Timeout expired.
var ErrTimeout = errors.New("timed out")

// Cmd is one command to run.
type Cmd struct {
	Path  string // program; looked up in PATH when it has no slash
	Args  []string
	Dir   string
	Env   []string // nil: the agent's environment
	Stdin io.Reader
	// Stderr, when set, receives the standard error apart; Output then
	// holds the standard output alone (git and go commands whose output
	// is parsed). Nil: both streams interleaved in Output.
	Stderr     io.Writer
	Credential *syscall.Credential // run as this uid/gid; nil: as the agent
	// Chroot, when set, is a host directory the command runs chrooted
	// into: Path must then be absolute inside it (it is not looked up in
	// the host's PATH) and Dir is taken inside it too.
	Chroot      string
	OutputLimit int           // bytes of combined output kept; default 64 KiB
	KillGrace   time.Duration // SIGTERM → SIGKILL; default 10 s
	Timeout     time.Duration // 0: none
}

// Result is how a command ended.
type Result struct {
	ExitCode int    // -1 when killed by a signal or not started
	Output   string // stdout and stderr interleaved, head and tail kept
	Dropped  int64  // bytes of output left out of Output
	Duration time.Duration
}

// Runner runs commands. Tests of other packages can replace it.
type Runner interface {
	Run(ctx context.Context, c Cmd) (Result, error)
}

// New returns the real runner.
func New() Runner { return execRunner{} }

type execRunner struct{}

// Run starts c and waits for it. A non-zero exit is not an error (see
// Result.ExitCode); an error means it could not start, was cancelled
// (ctx.Err() wrapped) or timed out (ErrTimeout wrapped).
func (execRunner) Run(ctx context.Context, c Cmd) (Result, error) {
	if c.OutputLimit <= 0 {
		c.OutputLimit = 64 << 10
	}
	if c.KillGrace <= 0 {
		c.KillGrace = 10 * time.Second
	}
	out := newBounded(c.OutputLimit)
	var cmd *exec.Cmd
	if c.Chroot != "" {
		if !strings.HasPrefix(c.Path, "/") {
			return Result{ExitCode: -1}, fmt.Errorf("start %s: a chrooted command needs an absolute path", c.Path)
		}
		// Not exec.Command: it would look the name up on the host.
		cmd = &exec.Cmd{Path: c.Path, Args: append([]string{c.Path}, c.Args...)}
	} else {
		cmd = exec.Command(c.Path, c.Args...)
	}
	cmd.Dir, cmd.Env, cmd.Stdin = c.Dir, c.Env, c.Stdin
	cmd.Stdout, cmd.Stderr = out, out
	if c.Stderr != nil {
		cmd.Stderr = c.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: c.Credential, Chroot: c.Chroot}
	// A daemon started with `cmd &` keeps our output pipe open; do not wait
	// for it once the command itself has exited.
	cmd.WaitDelay = time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return Result{ExitCode: -1, Duration: time.Since(start)}, fmt.Errorf("start %s: %w", c.Path, err)
	}
	pgid := cmd.Process.Pid
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	var timeout <-chan time.Time
	if c.Timeout > 0 {
		t := time.NewTimer(c.Timeout)
		defer t.Stop()
		timeout = t.C
	}
	var stopErr error
	var werr error
	select {
	case werr = <-waited:
	case <-ctx.Done():
		stopErr = ctx.Err()
		StopGroup(pgid, c.KillGrace)
		werr = <-waited
	case <-timeout:
		stopErr = fmt.Errorf("%w after %v", ErrTimeout, c.Timeout)
		StopGroup(pgid, c.KillGrace)
		werr = <-waited
	}
	res := Result{ExitCode: exitCode(cmd, werr), Duration: time.Since(start)}
	res.Output, res.Dropped = out.result()
	if stopErr != nil {
		return res, stopErr
	}
	if werr != nil && res.ExitCode == -1 && !errors.Is(werr, exec.ErrWaitDelay) {
		return res, fmt.Errorf("wait %s: %w", c.Path, werr)
	}
	return res, nil
}

// StopGroup stops process group pgid: SIGTERM to every member, SIGKILL to
// whatever is left once grace has passed, and it returns when no live
// member remains. Waiting is bounded (2 s after the SIGKILL) so that an
// unkillable process (D state) cannot hang the agent. This is the one
// place the agent stops a group: commands, Salt states, the bridge worker.
func StopGroup(pgid int, grace time.Duration) {
	if pgid <= 1 {
		return // never signal group 0 (our own) or init's
	}
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	killAt := time.Now().Add(grace)
	giveUp := killAt.Add(2 * time.Second)
	killed := false
	for GroupAlive(pgid) && time.Now().Before(giveUp) {
		if !killed && !time.Now().Before(killAt) {
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			killed = true
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// GroupAlive reports whether a live (non-zombie) process of group pgid
// exists. It reads /proc, since kill(-pgid, 0) also counts zombies that
// wait for a reaper.
func GroupAlive(pgid int) bool {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return syscall.Kill(-pgid, 0) == nil
	}
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp …; comm may hold spaces and parens.
		i := bytes.LastIndexByte(data, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(data[i+1:]))
		if len(f) < 3 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		if g, err := strconv.Atoi(f[2]); err == nil && g == pgid {
			return true
		}
	}
	return false
}

func exitCode(cmd *exec.Cmd, err error) int {
	if cmd.ProcessState == nil {
		return -1
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return -1
	}
	return cmd.ProcessState.ExitCode()
}

// bounded keeps the first and last halves of what is written to it.
type bounded struct {
	mu      sync.Mutex
	limit   int
	head    []byte
	tail    []byte // ring, logically the last limit/2 bytes
	dropped int64
}

func newBounded(limit int) *bounded { return &bounded{limit: limit} }

func (b *bounded) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := len(p)
	headCap := b.limit / 2
	if room := headCap - len(b.head); room > 0 {
		k := min(room, len(p))
		b.head = append(b.head, p[:k]...)
		p = p[k:]
	}
	if len(p) == 0 {
		return n, nil
	}
	tailCap := b.limit - headCap
	b.tail = append(b.tail, p...)
	if over := len(b.tail) - tailCap; over > 0 {
		b.dropped += int64(over)
		b.tail = append(b.tail[:0], b.tail[over:]...)
	}
	return n, nil
}

func (b *bounded) result() (string, int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dropped == 0 {
		return string(b.head) + string(b.tail), 0
	}
	return fmt.Sprintf("%s\n[… %d bytes of output left out …]\n%s", b.head, b.dropped, b.tail), b.dropped
}

// PassSIGHUPToChildren makes the processes started from now on begin
// with SIGHUP at its default, even when this process was started
// ignoring it (nohup, some cron daemons). A daemon the agent starts
// through an init script or a linux.cmd reloads on SIGHUP, and a POSIX
// shell cannot trap a signal it was started ignoring: the daemon's reload
// would silently do nothing. Catching the signal (and dropping it) keeps
// this process as deaf to it as before, while exec gives every child the
// default disposition. It does nothing when SIGHUP is not ignored.
func PassSIGHUPToChildren() {
	if signal.Ignored(syscall.SIGHUP) {
		signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP)
	}
}
