package service

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/internal/updatephase"
)

// watchdog runs the rendered cron.sh for real with sh below a temporary
// root, against fake agent binaries: shell scripts that record each start
// (pid, version, arguments) in starts, write their pid into the lock file
// as the agent does, and wait. They stay shells (no exec) so that
// /proc/<pid>/cmdline keeps ".../bin/opsagent ... run", as the agent's
// does.
type watchdog struct {
	t      *testing.T
	l      config.Layout
	starts string
	env    []string
	newBin []byte // the binary in place: version 2.0.0, being confirmed
	oldBin []byte // opsagent.old: version 1.0.0
}

func newWatchdog(t *testing.T, o WatchdogOptions) *watchdog {
	t.Helper()
	return newWatchdogIn(t, "root", o)
}

// newWatchdogIn is newWatchdog with the root named dir (below t.TempDir()).
func newWatchdogIn(t *testing.T, dir string, o WatchdogOptions) *watchdog {
	t.Helper()
	l := tempLayout(t, dir)
	mustMkdir(t, l.StateDir(), l.LogDir(), l.BinDir())
	w := &watchdog{t: t, l: l, starts: filepath.Join(l.Root().Dir(), "agent-starts"), env: os.Environ()}
	t.Cleanup(func() { killMentioning(t, l.Root().Dir()) })
	w.newBin = w.fakeAgent("2.0.0", "")
	w.oldBin = w.fakeAgent("1.0.0", "")
	w.write(l.Binary(), w.newBin, 0o755)
	w.write(l.OldBinary(), w.oldBin, 0o755)
	w.write(l.CronScript(), RenderWatchdogWith(l, o), 0o755)
	return w
}

// fakeAgent is a fake opsagent of version; extra is shell run before it
// writes the lock file (e.g. "exit 1" for a crash at start, or a trap that
// ignores SIGTERM). It answers `version --json` as opsagent does (the
// watchdog asks it before a rollback).
func (w *watchdog) fakeAgent(version, extra string) []byte {
	return fmt.Appendf(nil, `#!/bin/sh
# fake opsagent %[1]s
if [ "$1" = version ]; then
	printf '{\n  "version": "%[1]s",\n  "go_version": "go1"\n}\n'
	exit 0
fi
echo "$$ %[1]s $*" >>%[2]s
%[3]s
echo "$$" >%[4]s
while :; do sleep 1; done
`, version, shellQuote(w.starts), extra, shellQuote(w.l.LockFile()))
}

func (w *watchdog) write(path string, data []byte, mode os.FileMode) {
	w.t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		w.t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		w.t.Fatal(err)
	}
}

// cronSh runs cron.sh with args to its end.
func (w *watchdog) cronSh(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", append([]string{w.l.CronScript()}, args...)...)
	cmd.Env = w.env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	return cmd.CombinedOutput()
}

// run runs cron.sh and checks that it succeeded quietly: it talks to the
// bootstrap log only.
func (w *watchdog) run(args ...string) {
	w.t.Helper()
	out, err := w.cronSh(args...)
	if err != nil {
		w.t.Fatalf("cron.sh %v: %v\n%s\nbootstrap log:\n%s", args, err, out, w.log())
	}
	if len(out) != 0 {
		w.t.Errorf("cron.sh %v printed %q; it must write to the bootstrap log only", args, out)
	}
}

// startAgent starts the binary in place as the agent would run, and waits
// until it wrote its lock file.
func (w *watchdog) startAgent() int {
	w.t.Helper()
	cmd := exec.Command(w.l.Binary(), RunArgs(w.l)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	pid := cmd.Process.Pid
	w.t.Cleanup(func() {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	wait.Eventually(w.t, "the agent writing its lock file", func() bool { return w.lockPID() == pid })
	return pid
}

func (w *watchdog) lockPID() int {
	data, _ := os.ReadFile(w.l.LockFile())
	first, _, _ := strings.Cut(string(data), "\n")
	pid, _ := strconv.Atoi(strings.TrimSpace(first))
	return pid
}

// startLines are the starts of fake agents: "pid version args...".
func (w *watchdog) startLines() []string {
	data, _ := os.ReadFile(w.starts)
	if len(data) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
}

func (w *watchdog) log() string {
	data, _ := os.ReadFile(w.l.BootstrapLog())
	return string(data)
}

func (w *watchdog) setState(s UpdateState) {
	w.t.Helper()
	if err := WriteUpdateState(w.l.UpdateStateFile(), s); err != nil {
		w.t.Fatal(err)
	}
}

func (w *watchdog) state() UpdateState {
	w.t.Helper()
	s, err := ReadUpdateState(w.l.UpdateStateFile())
	if err != nil {
		w.t.Fatal(err)
	}
	return s
}

func (w *watchdog) binary() []byte {
	data, _ := os.ReadFile(w.l.Binary())
	return data
}

// runningAgent is the pid of a live fake agent (not a zombie) named in the
// lock file, and its version; 0 when none runs.
func (w *watchdog) runningAgent() (int, string) {
	pid := w.lockPID()
	if pid <= 0 {
		return 0, ""
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte(w.l.Binary())) {
		return 0, ""
	}
	for _, line := range w.startLines() {
		if f := strings.Fields(line); len(f) > 1 && f[0] == strconv.Itoa(pid) {
			return pid, f[1]
		}
	}
	return pid, "?"
}

func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command in parentheses; Z is a zombie.
	i := bytes.LastIndexByte(stat, ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] != 'Z'
}

// killMentioning kills every process whose command line mentions dir (a
// test's unique temporary root: the fake agents, cron.sh runs) with its
// process group, unless that group is the test's own.
func killMentioning(t *testing.T, dir string) {
	self := syscall.Getpgrp()
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids := mentioning(dir)
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			if pgid, err := syscall.Getpgid(pid); err == nil && pgid > 1 && pgid != self {
				_ = syscall.Kill(-pgid, syscall.SIGKILL)
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if time.Now().After(deadline) {
			t.Errorf("processes mentioning %s survive SIGKILL: %v", dir, pids)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mentioning(dir string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(dir)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestWatchdogShellcheck(t *testing.T) {
	shellcheck, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Skip("shellcheck is not installed")
	}
	for _, dir := range []string{"root", "it's a root"} {
		l := tempLayout(t, dir)
		script := filepath.Join(t.TempDir(), "cron.sh")
		if err := os.WriteFile(script, RenderWatchdog(l), 0o755); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(shellcheck, "--shell=sh", "--severity=style", script).CombinedOutput(); err != nil {
			t.Errorf("shellcheck (root %q): %v\n%s", dir, err, out)
		}
		if out, err := exec.Command("/bin/sh", "-n", script).CombinedOutput(); err != nil {
			t.Errorf("sh -n (root %q): %v\n%s", dir, err, out)
		}
	}
}

// Every path is baked in from the layout, as host paths.
func TestWatchdogBakesLayoutPaths(t *testing.T) {
	l := tempLayout(t, "root")
	script := string(RenderWatchdog(l))
	for _, want := range []string{
		"BIN=" + l.Binary() + "\n", "OLD_BIN=" + l.OldBinary() + "\n", "AGENT_LOCK=" + l.LockFile() + "\n",
		"STATE_FILE=" + l.UpdateStateFile() + "\n", "BOOT_LOG=" + l.BootstrapLog() + "\n",
		"UNIT_FILE=" + l.UnitFile() + "\n", "SYSTEMD_RUN_DIR=" + l.SystemdRunDir() + "\n",
		"WATCHDOG_LOCK=" + l.CronScript() + ".lock\n",
		`setsid "$BIN" --root ` + l.Root().Dir() + " run </dev/null",
		"opsagent_rollback_check() {",
		"MAX_STARTS=3\n", "KILL_GRACE=10\n", "WATCH_INTERVAL=2\n",
	} {
		if !strings.Contains(script, want) {
			t.Errorf("watchdog lacks %q", want)
		}
	}
}

func TestWatchdogUsage(t *testing.T) {
	w := newWatchdog(t, WatchdogOptions{})
	out, err := w.cronSh("bogus")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "usage:") {
		t.Errorf("cron.sh bogus: %v %s", err, out)
	}
}

// Not running: started exactly once, even by concurrent passes; running:
// left alone.
func TestWatchdogStartsTheAgentOnce(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := w.cronSh()
			if err == nil && len(out) != 0 {
				err = fmt.Errorf("printed %q", out)
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("cron.sh: %v", err)
		}
	}
	if starts := w.startLines(); len(starts) != 1 {
		t.Fatalf("%d starts by 3 concurrent passes, want 1: %v\nlog:\n%s", len(starts), starts, w.log())
	}
	pid, version := w.runningAgent()
	if pid == 0 || version != "2.0.0" {
		t.Fatalf("no agent runs after the pass (lock pid %d)\nlog:\n%s", w.lockPID(), w.log())
	}
	if !strings.Contains(w.log(), fmt.Sprintf("started it (pid %d)", pid)) {
		t.Errorf("the start is not logged:\n%s", w.log())
	}
	wantArgs := " 2.0.0 --root " + w.l.Root().Dir() + " run"
	if got := w.startLines()[0]; !strings.HasSuffix(got, wantArgs) {
		t.Errorf("started as %q, want the arguments %q", got, wantArgs)
	}

	before := w.log()
	w.run()
	if starts := w.startLines(); len(starts) != 1 {
		t.Errorf("a running agent was started again: %v", starts)
	}
	if p, _ := w.runningAgent(); p != pid {
		t.Errorf("the running agent %d was replaced by %d", pid, p)
	}
	if after := w.log(); after != before {
		t.Errorf("a pass with nothing to do logged %q", strings.TrimPrefix(after, before))
	}
}

// While HoldWatchdog holds the lock (a binary swapped with no agent
// running), a cron pass starts nothing; once released, it does.
func TestHoldWatchdogKeepsPassesOff(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	release, err := HoldWatchdog(w.l, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := HoldWatchdog(w.l, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "still running") {
		t.Errorf("a second holder: %v", err)
	}
	w.run()
	if starts := w.startLines(); len(starts) != 0 {
		t.Fatalf("a pass started the agent while the lock was held: %v", starts)
	}
	release()
	w.run()
	if starts := w.startLines(); len(starts) != 1 {
		t.Fatalf("%d starts after the release, want 1\nlog:\n%s", len(starts), w.log())
	}
}

// The lock file names a live process that is not an agent (a recycled
// pid): the agent is started.
func TestWatchdogRecycledPID(t *testing.T) {
	t.Parallel()
	for name, args := range map[string][]string{
		"sleep":              {"sleep", "1000"},
		"opsagent, not run":  {"/bin/sh", "-c", "sleep 1000; :", "opsagent", "status"},
		"run, not opsagent":  {"/bin/sh", "-c", "sleep 1000; :", "agent", "run"},
		"run in an argument": {"/bin/sh", "-c", "sleep 1000; :", "opsagent", "--mode=run"},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			w := newWatchdog(t, WatchdogOptions{})
			other := exec.Command(args[0], args[1:]...)
			other.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := other.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = syscall.Kill(-other.Process.Pid, syscall.SIGKILL)
				_ = other.Wait()
			})
			w.write(w.l.LockFile(), []byte(strconv.Itoa(other.Process.Pid)+"\n"), 0o600)
			w.run()
			pid, _ := w.runningAgent()
			if pid == 0 || pid == other.Process.Pid || len(w.startLines()) != 1 {
				t.Errorf("agent not started (lock pid %d, starts %v)\nlog:\n%s", w.lockPID(), w.startLines(), w.log())
			}
			if !alive(other.Process.Pid) {
				t.Error("the process that recycled the pid was stopped")
			}
		})
	}
}

func TestWatchdogTrimsBootstrapLog(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	w.startAgent()
	var big bytes.Buffer
	for i := 0; big.Len() < 2<<20; i++ {
		fmt.Fprintf(&big, "line %d of an old bootstrap log\n", i)
	}
	w.write(w.l.BootstrapLog(), big.Bytes(), 0o640)
	w.run()
	got := []byte(w.log())
	want := big.Bytes()[big.Len()-BootstrapLogKeep:]
	if !bytes.HasPrefix(got, want) {
		t.Fatalf("the log does not start with the last 256 KiB of the old one (%d bytes now)", len(got))
	}
	rest := string(got[len(want):])
	if !strings.Contains(rest, "kept the last 262144") || strings.Count(rest, "\n") != 1 {
		t.Errorf("after the kept tail, want one log line about the cut; got %q", rest)
	}

	// At the limit exactly, it is left alone.
	limit := bytes.Repeat([]byte("x"), BootstrapLogMax)
	w.write(w.l.BootstrapLog(), limit, 0o640)
	w.run()
	if got := w.log(); len(got) != BootstrapLogMax {
		t.Errorf("a log of exactly %d bytes was changed to %d bytes", BootstrapLogMax, len(got))
	}
}

// While an update is confirmed in time and the agent runs, a pass does
// nothing at all.
func TestWatchdogLeavesAConfirmingUpdateAlone(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	pid := w.startAgent()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour), Updated: time.Now()})
	stateBefore, _ := os.ReadFile(w.l.UpdateStateFile())
	w.run()
	w.run(ModePreStart)
	stateAfter, _ := os.ReadFile(w.l.UpdateStateFile())
	if !bytes.Equal(stateBefore, stateAfter) {
		t.Errorf("update state changed:\n%s\nto\n%s", stateBefore, stateAfter)
	}
	if !bytes.Equal(w.binary(), w.newBin) {
		t.Error("the binary changed")
	}
	if p, v := w.runningAgent(); p != pid || v != "2.0.0" || len(w.startLines()) != 1 {
		t.Errorf("agent %d (%s) runs, starts %v; want %d left alone", p, v, w.startLines(), pid)
	}
	if w.log() != "" {
		t.Errorf("logged:\n%s", w.log())
	}
}

// The deadline passed: the old binary is restored byte for byte, the new
// agent stopped, the old one started, and the state says why.
func TestWatchdogRollsBackAfterTheDeadline(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	newPID := w.startAgent()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second), Updated: time.Now()})
	w.run()
	w.checkRolledBack(newPID, "the new version 2.0.0 did not confirm by its deadline")
	if s := w.state(); s.Starts != 0 {
		t.Errorf("the start of the old version was counted: starts=%d", s.Starts)
	}
}

// A stale update state (confirming 2.0.0, its deadline passed, or its
// starts used up) while the installed binary is another version, e.g. a
// swap that never happened or a reinstall since: the healthy agent is left
// running, nothing is rolled back, and the state says the update did not
// take effect.
func TestWatchdogStaleStateRollsNothingBack(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		state UpdateState
		run   bool // an agent runs
	}{
		{"deadline passed, agent running", UpdateState{Phase: updatephase.Confirming, From: "1.5.0", To: "2.0.0", Deadline: time.Now().Add(-time.Hour)}, true},
		{"starts used up, agent down", UpdateState{Phase: updatephase.Confirming, From: "1.5.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour), Starts: 3}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newWatchdog(t, WatchdogOptions{})
			// The installed binary is a healthy 1.0.0; opsagent.old an
			// older 0.9.0 that a rollback would wrongly bring back.
			healthy := w.fakeAgent("1.0.0", "")
			w.write(w.l.Binary(), healthy, 0o755)
			w.oldBin = w.fakeAgent("0.9.0", "")
			w.write(w.l.OldBinary(), w.oldBin, 0o755)
			pid := 0
			if tc.run {
				pid = w.startAgent()
			}
			w.setState(tc.state)
			w.run()
			if !bytes.Equal(w.binary(), healthy) {
				t.Errorf("the healthy binary was replaced:\n%s\nlog:\n%s", w.binary(), w.log())
			}
			if p, v := w.runningAgent(); v != "1.0.0" || (tc.run && p != pid) {
				t.Errorf("agent %d (%s) runs, want 1.0.0 (pid %d) left running\nlog:\n%s", p, v, pid, w.log())
			}
			s := w.state()
			if s.Phase != updatephase.Failed || !strings.Contains(s.Reason, "did not take effect") || !strings.Contains(s.Reason, "is version 1.0.0") {
				t.Errorf("state %+v, want failed saying the installed binary is 1.0.0", s)
			}
			if !strings.Contains(w.log(), "not rolling back") {
				t.Errorf("not logged:\n%s", w.log())
			}
			// A later pass leaves it all alone.
			before := w.state()
			w.run()
			if after := w.state(); after.Phase != before.Phase || !bytes.Equal(w.binary(), healthy) {
				t.Errorf("a later pass changed %+v to %+v", before, after)
			}
		})
	}
}

// The installed binary that cannot say its version (it hangs on `version
// --json`) is the broken new one: the rollback goes ahead, after the
// timeout.
func TestWatchdogRollsBackABinaryThatCannotSayItsVersion(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{VersionTimeout: time.Second})
	w.newBin = []byte("#!/bin/sh\n# fake opsagent 2.0.0 that hangs on everything\nwhile :; do sleep 1; done\n")
	w.write(w.l.Binary(), w.newBin, 0o755)
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second)})
	w.run()
	w.checkRolledBack(0, "the new version 2.0.0 did not confirm by its deadline")
}

func (w *watchdog) checkRolledBack(newPID int, reason string) {
	w.t.Helper()
	if !bytes.Equal(w.binary(), w.oldBin) {
		w.t.Errorf("the binary is not the old one:\n%s", w.binary())
	}
	if st, err := os.Stat(w.l.Binary()); err != nil || st.Mode().Perm() != 0o755 {
		w.t.Errorf("binary mode: %v %v", st, err)
	}
	if old, err := os.ReadFile(w.l.OldBinary()); err != nil || !bytes.Equal(old, w.oldBin) {
		w.t.Errorf("opsagent.old changed or vanished: %v", err)
	}
	if newPID != 0 && alive(newPID) {
		w.t.Errorf("the new agent (pid %d) still runs", newPID)
	}
	if pid, version := w.runningAgent(); pid == 0 || version != "1.0.0" {
		w.t.Errorf("agent %d version %q runs, want the old version\nlog:\n%s", pid, version, w.log())
	}
	s := w.state()
	if s.Phase != updatephase.RolledBack || s.Reason != reason || s.From != "1.0.0" || s.To != "2.0.0" || s.Updated.IsZero() {
		w.t.Errorf("state after rollback: %+v, want rolled-back with the reason %q", s, reason)
	}
	if st, err := os.Stat(w.l.UpdateStateFile()); err != nil || st.Mode().Perm() != 0o600 {
		w.t.Errorf("state file mode: %v %v", st, err)
	}
	if !strings.Contains(w.log(), "rolled back to the previous binary: "+reason) {
		w.t.Errorf("the rollback is not logged:\n%s", w.log())
	}
}

// A new agent that ignores SIGTERM is killed after the grace period.
func TestWatchdogKillsANewAgentThatIgnoresSIGTERM(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{KillGrace: time.Second})
	w.newBin = w.fakeAgent("2.0.0", "trap '' TERM")
	w.write(w.l.Binary(), w.newBin, 0o755)
	newPID := w.startAgent()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second)})
	w.run()
	w.checkRolledBack(newPID, "the new version 2.0.0 did not confirm by its deadline")
	if !strings.Contains(w.log(), "did not stop within 1s of SIGTERM; sent SIGKILL") {
		t.Errorf("the SIGKILL is not logged:\n%s", w.log())
	}
}

// systemd's pre-start counts starts of a new version and, at 3 with the
// agent down, rolls back; it never starts the agent itself.
func TestWatchdogPreStartCountsAndRollsBack(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour), Starts: 1})
	w.run(ModePreStart)
	if s := w.state(); s.Phase != updatephase.Confirming || s.Starts != 2 {
		t.Errorf("after pre-start: %+v, want starts=2 still confirming", s)
	}
	w.run(ModePreStart)
	if s := w.state(); s.Phase != updatephase.Confirming || s.Starts != 3 || !bytes.Equal(w.binary(), w.newBin) {
		t.Errorf("after the 3rd start: %+v, want starts=3 still confirming, new binary", s)
	}
	w.run(ModePreStart)
	if len(w.startLines()) != 0 {
		t.Errorf("pre-start started an agent: %v", w.startLines())
	}
	if !bytes.Equal(w.binary(), w.oldBin) {
		t.Error("the old binary was not restored")
	}
	s := w.state()
	if s.Phase != updatephase.RolledBack || s.Reason != "the new version 2.0.0 exited 3 times at start" || s.Starts != 3 {
		t.Errorf("state: %+v", s)
	}
	// Once rolled back, pre-start counts nothing more.
	w.run(ModePreStart)
	if s := w.state(); s.Starts != 3 || s.Phase != updatephase.RolledBack {
		t.Errorf("state after another pre-start: %+v", s)
	}
}

// Cron alone: a new version that crashes at start is started 3 times,
// then rolled back and the old one started.
func TestWatchdogRollsBackACrashLoopFromCron(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	w.newBin = w.fakeAgent("2.0.0", "exit 1")
	w.write(w.l.Binary(), w.newBin, 0o755)
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour)})
	for i := 1; i <= 3; i++ {
		w.run()
		if s := w.state(); s.Phase != updatephase.Confirming || s.Starts != i {
			t.Fatalf("after pass %d: %+v\nlog:\n%s", i, s, w.log())
		}
	}
	if !strings.Contains(w.log(), "exited at once") {
		t.Errorf("the crash is not logged:\n%s", w.log())
	}
	w.run()
	w.checkRolledBack(0, "the new version 2.0.0 exited 3 times at start")
	if lines := w.startLines(); len(lines) != 4 {
		t.Errorf("starts %v, want 3 of the new version and 1 of the old", lines)
	}
}

// Without opsagent.old there is nothing to roll back to: the update is
// marked failed, with the fix in the reason.
func TestWatchdogWithoutOldBinary(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	if err := os.Remove(w.l.OldBinary()); err != nil {
		t.Fatal(err)
	}
	w.startAgent()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second)})
	w.run()
	s := w.state()
	if s.Phase != updatephase.Failed || !strings.Contains(s.Reason, "no previous binary "+w.l.OldBinary()) || !strings.Contains(s.Reason, "opsagent install") {
		t.Errorf("state: %+v", s)
	}
	if !bytes.Equal(w.binary(), w.newBin) {
		t.Error("the binary changed")
	}
}

// Where systemd runs the unit, the watchdog asks systemd to start it
// (never the host's systemd: a fake systemctl first in PATH, and the
// systemd run directory below the temporary root); when that fails it
// starts the agent itself.
// fakeSystemctl gives w a systemd root (the run directory and the unit)
// and puts a systemctl on its PATH that records its arguments in the
// returned file and exits with exit.
func (w *watchdog) fakeSystemctl(exit string) (calls string) {
	w.t.Helper()
	mustMkdir(w.t, w.l.SystemdRunDir(), filepath.Dir(w.l.UnitFile()))
	w.write(w.l.UnitFile(), RenderUnit(w.l), 0o644)
	bin := filepath.Join(w.t.TempDir(), "bin")
	mustMkdir(w.t, bin)
	calls = filepath.Join(w.t.TempDir(), "calls")
	w.write(filepath.Join(bin, "systemctl"), fmt.Appendf(nil, "#!/bin/sh\necho \"$*\" >>%s\nexit %s\n", shellQuote(calls), exit), 0o755)
	for i, e := range w.env {
		if strings.HasPrefix(e, "PATH=") {
			w.env[i] = "PATH=" + bin + ":" + strings.TrimPrefix(e, "PATH=")
		}
	}
	return calls
}

// On the host's root, where systemd runs the unit, the watchdog asks
// systemd to start the agent (rendered as the host's: the systemctl
// called is a fake that records).
func TestWatchdogStartsThroughSystemd(t *testing.T) {
	t.Parallel()
	for _, ok := range []bool{true, false} {
		t.Run(fmt.Sprintf("systemctl succeeds %v", ok), func(t *testing.T) {
			t.Parallel()
			w := newWatchdog(t, WatchdogOptions{treatAsHost: true})
			calls := w.fakeSystemctl(map[bool]string{true: "0", false: "1"}[ok])
			w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour)})
			w.run(ModePreStart)
			w.run()
			got, _ := os.ReadFile(calls)
			if string(got) != "start --no-block opsagent.service\n" {
				t.Errorf("systemctl calls: %q", got)
			}
			if ok {
				if n := len(w.startLines()); n != 0 {
					t.Errorf("the watchdog started the agent beside systemd")
				}
				if s := w.state(); s.Starts != 1 {
					t.Errorf("starts=%d, want 1 (pre-start's count only)", s.Starts)
				}
				return
			}
			if pid, _ := w.runningAgent(); pid == 0 {
				t.Errorf("not started after systemctl failed\nlog:\n%s", w.log())
			}
			if s := w.state(); s.Starts != 2 {
				t.Errorf("starts=%d, want 2 (pre-start's, then the direct start)", s.Starts)
			}
		})
	}
}

// Below a root other than the host's, the watchdog never runs systemctl,
// even where that root has systemd's run directory and the unit: the
// systemd that would answer is the host's (service.Systemctl's rule). It
// starts the agent directly.
func TestWatchdogNeverDrivesTheHostSystemdBelowARoot(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	calls := w.fakeSystemctl("0")
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour)})
	w.run()
	if got, _ := os.ReadFile(calls); len(got) != 0 {
		t.Errorf("cron.sh below %s ran the host's systemctl: %q", w.l.Root().Dir(), got)
	}
	if pid, _ := w.runningAgent(); pid == 0 {
		t.Errorf("the agent was not started directly\nlog:\n%s", w.log())
	}
	if s := w.state(); s.Starts != 1 {
		t.Errorf("starts=%d, want 1 (the direct start)", s.Starts)
	}
}

// The phases cron.sh reads and writes come from their one definition
// (internal/updatephase), rendered into the script: the template spells
// none of them, and the script holds the Go values.
func TestWatchdogSpellsNoPhase(t *testing.T) {
	tmpl, err := templateFS.ReadFile("templates/cron.sh.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	phases := map[string]bool{}
	for _, p := range updatephase.All() {
		phases[string(p)] = true
	}
	// A phase in the script is a comparison's right side or what
	// state_write records: quoted or not, it must be a $PHASE_ variable.
	uses := regexp.MustCompile(`(?:\s!?=|state_write phase)\s+"?([a-z$][A-Za-z_-]*)"?`)
	for i, line := range strings.Split(string(tmpl), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		for _, m := range uses.FindAllStringSubmatch(line, -1) {
			if phases[m[1]] {
				t.Errorf("cron.sh.tmpl line %d spells the phase %q: use the $PHASE_ variable rendered from updatephase\n%s", i+1, m[1], line)
			}
		}
	}
	script := string(RenderWatchdog(tempLayout(t, "root")))
	for v, p := range map[string]updatephase.Phase{"PHASE_CONFIRMING": updatephase.Confirming, "PHASE_ROLLED_BACK": updatephase.RolledBack, "PHASE_FAILED": updatephase.Failed} {
		if want := "\n" + v + "=" + shellQuote(string(p)) + "\n"; !strings.Contains(script, want) {
			t.Errorf("the rendered cron.sh lacks %q", strings.TrimSpace(want))
		}
		if !strings.Contains(string(tmpl), `"$`+v+`"`) {
			t.Errorf("cron.sh.tmpl never uses $%s", v)
		}
	}
}

// Watch mode, started detached the way the updater does, passes every
// interval and exits once the update is confirmed.
func TestWatchExitsOnceDone(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{Interval: time.Second})
	pid := w.startAgent()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour)})
	if err := StartWatch(w.l); err != nil {
		t.Fatal(err)
	}
	watching := func() bool {
		for _, p := range mentioning(w.l.CronScript()) {
			if cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p)); bytes.HasSuffix(cmd, []byte("\x00watch\x00")) {
				return true
			}
		}
		return false
	}
	wait.Eventually(t, "watch mode running", func() bool { return strings.Contains(w.log(), "watching the update") && watching() })
	if _, err := ConfirmUpdate(w.l.UpdateStateFile(), "2.0.0", time.Now()); err != nil {
		t.Fatal(err)
	}
	wait.Eventually(t, "watch mode exiting", func() bool { return !watching() })
	if !strings.Contains(w.log(), "no update is being confirmed (phase done); stopped watching") {
		t.Errorf("log:\n%s", w.log())
	}
	if p, _ := w.runningAgent(); p != pid || len(w.startLines()) != 1 {
		t.Errorf("the agent was disturbed: runs %d, starts %v", p, w.startLines())
	}
}

// Watch mode rolls back when the deadline passes, on its own.
func TestWatchRollsBack(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{Interval: time.Second})
	newPID := w.startAgent()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(2 * time.Second)})
	if err := StartWatch(w.l); err != nil {
		t.Fatal(err)
	}
	wait.Eventually(t, "watch mode to roll back and stop", func() bool {
		return strings.Contains(w.log(), "stopped watching")
	})
	w.checkRolledBack(newPID, "the new version 2.0.0 did not confirm by its deadline")
}

// StopWatchdogs (uninstall) ends a watch pass at once, and leaves the
// watchdog of another root alone.
func TestStopWatchdogs(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{Interval: time.Second})
	other := newWatchdog(t, WatchdogOptions{Interval: time.Second})
	for _, x := range []*watchdog{w, other} {
		x.startAgent()
		x.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(time.Hour)})
		if err := StartWatch(x.l); err != nil {
			t.Fatal(err)
		}
	}
	watching := func(x *watchdog) bool { return len(mentioning(x.l.CronScript())) > 0 }
	wait.Eventually(t, "both watching", func() bool { return watching(w) && watching(other) })
	// (A pass's subshells share its command line: more than one may go.)
	if n := StopWatchdogs(w.l); n < 1 {
		t.Errorf("stopped %d processes, want the watch pass", n)
	}
	wait.Eventually(t, "the watch stopped", func() bool { return !watching(w) })
	if !watching(other) {
		t.Error("the other root's watchdog was stopped too")
	}
}

func TestStartWatchWithoutScript(t *testing.T) {
	l := tempLayout(t, "root")
	err := StartWatch(l)
	if err == nil || !strings.Contains(err.Error(), l.CronScript()) || !strings.Contains(err.Error(), "opsagent install") {
		t.Errorf("StartWatch without cron.sh: %v", err)
	}
}

func TestEnsureWatchdog(t *testing.T) {
	l := tempLayout(t, "root")
	if _, err := EnsureWatchdog(l); err == nil || !strings.Contains(err.Error(), "opsagent install") {
		t.Errorf("without the state directory: %v", err)
	}
	mustMkdir(t, l.StateDir())
	for i, want := range []bool{true, false} {
		changed, err := EnsureWatchdog(l)
		if err != nil || changed != want {
			t.Errorf("call %d: changed %v, %v; want %v", i+1, changed, err, want)
		}
	}
	if err := os.WriteFile(l.CronScript(), []byte("#!/bin/sh\n# an older watchdog\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if changed, err := EnsureWatchdog(l); err != nil || !changed {
		t.Errorf("an older watchdog was not rewritten: %v %v", changed, err)
	}
	if err := os.Chmod(l.CronScript(), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := EnsureWatchdog(l); err != nil || !changed {
		t.Errorf("a watchdog with mode 0644 was not fixed: %v %v", changed, err)
	}
	data, _ := os.ReadFile(l.CronScript())
	st, _ := os.Stat(l.CronScript())
	if !bytes.Equal(data, RenderWatchdog(l)) || st.Mode().Perm() != 0o755 {
		t.Errorf("watchdog on disk differs or has mode %v", st.Mode().Perm())
	}
}

// A root whose path needs quoting works end to end: start, then rollback.
func TestWatchdogOddRoot(t *testing.T) {
	t.Parallel()
	w := newWatchdogIn(t, "it's a root", WatchdogOptions{})
	w.run()
	newPID, version := w.runningAgent()
	if newPID == 0 || version != "2.0.0" {
		t.Fatalf("not started\nlog:\n%s", w.log())
	}
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second)})
	w.run()
	w.checkRolledBack(newPID, "the new version 2.0.0 did not confirm by its deadline")
}

// Without flock(1) the watchdog proceeds unlocked: it still starts the
// agent and rolls back.
func TestWatchdogWithoutFlock(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	bin := filepath.Join(t.TempDir(), "bin")
	mustMkdir(t, bin)
	for _, tool := range []string{"date", "sleep", "tr", "grep", "head", "cut", "cp", "chmod", "mv", "rm", "tail", "wc", "cat", "setsid"} {
		path, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("%s is not installed", tool)
		}
		if err := os.Symlink(path, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	w.env = append(w.env, "PATH="+bin)
	w.run()
	newPID, _ := w.runningAgent()
	if newPID == 0 {
		t.Fatalf("not started\nlog:\n%s", w.log())
	}
	if _, err := os.Stat(w.l.WatchdogLockFile()); err == nil {
		t.Error("the watchdog lock was created without flock")
	}
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second)})
	w.run()
	w.checkRolledBack(newPID, "the new version 2.0.0 did not confirm by its deadline")
}

// The watchdog waits for the state lock the Go side holds (here: the
// test, as WriteUpdateState would), so neither side's change is lost.
func TestWatchdogWaitsForTheStateLock(t *testing.T) {
	t.Parallel()
	w := newWatchdog(t, WatchdogOptions{})
	newPID := w.startAgent()
	path := w.l.UpdateStateFile()
	w.setState(UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: time.Now().Add(-time.Second)})
	f, err := os.OpenFile(stateLockPath(path), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		out, err := w.cronSh()
		if err == nil && len(out) != 0 {
			err = fmt.Errorf("printed %q", out)
		}
		done <- err
	}()
	wait.Consistently(t, 500*time.Millisecond, "no rollback while the state is locked", func() bool {
		return bytes.Equal(w.binary(), w.newBin) && w.state().Phase == updatephase.Confirming
	})
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	w.checkRolledBack(newPID, "the new version 2.0.0 did not confirm by its deadline")
}
