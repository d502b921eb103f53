package proc

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func run(t *testing.T, ctx context.Context, c Cmd) (Result, error) {
	t.Helper()
	return New().Run(ctx, c)
}

func TestExitCodesAndOutput(t *testing.T) {
	res, err := run(t, context.Background(), Cmd{Path: "/bin/sh", Args: []string{"-c", "echo out; echo err >&2; exit 3"}})
	if err != nil || res.ExitCode != 3 {
		t.Fatalf("res %+v err %v", res, err)
	}
	if !strings.Contains(res.Output, "out\n") || !strings.Contains(res.Output, "err\n") {
		t.Errorf("output %q", res.Output)
	}
	res, err = run(t, context.Background(), Cmd{Path: "true"})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("true: %+v %v", res, err)
	}
	_, err = run(t, context.Background(), Cmd{Path: "/no/such/program"})
	if err == nil || !strings.Contains(err.Error(), "/no/such/program") {
		t.Errorf("missing program: %v", err)
	}
}

func TestDirAndEnv(t *testing.T) {
	dir := t.TempDir()
	res, err := run(t, context.Background(), Cmd{Path: "/bin/sh", Args: []string{"-c", "pwd; echo $GREETING"}, Dir: dir, Env: []string{"GREETING=hello"}})
	if err != nil || res.Output != dir+"\nhello\n" {
		t.Fatalf("%q %v", res.Output, err)
	}
}

func TestOutputLimitKeepsHeadAndTail(t *testing.T) {
	res, err := run(t, context.Background(), Cmd{Path: "/bin/sh", Args: []string{"-c", "echo START; seq 1 20000; echo END"}, OutputLimit: 1024})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(res.Output, "START") || !strings.HasSuffix(res.Output, "END\n") || res.Dropped == 0 ||
		!strings.Contains(res.Output, "bytes of output left out") {
		t.Errorf("output (%d bytes, dropped %d): %q…", len(res.Output), res.Dropped, res.Output[:80])
	}
	if len(res.Output) > 1024+100 {
		t.Errorf("output %d bytes, limit 1024", len(res.Output))
	}
}

// pidOf reads the pid a shell script wrote to a file.
func pidOf(t *testing.T, path string) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		data, err := os.ReadFile(path)
		if pid, perr := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && perr == nil && pid > 0 {
			return pid
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("child never wrote its pid")
	return 0
}

func alive(pid int) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(data), ')')
	return i >= 0 && !strings.HasPrefix(strings.TrimSpace(string(data[i+1:])), "Z")
}

func TestCancelKillsTheWholeGroup(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var err error
	go func() {
		defer close(done)
		// The grandchild sleep is what a killed state must not leave behind.
		_, err = run(t, ctx, Cmd{Path: "/bin/sh", Args: []string{"-c", "sleep 300 & echo $! > " + pidFile + "; wait"}, KillGrace: 5 * time.Second})
	}()
	grandchild := pidOf(t, pidFile)
	cancel()
	<-done
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
	if alive(grandchild) {
		t.Fatalf("grandchild %d survived the cancel", grandchild)
	}
}

func TestSIGTERMIgnoredGetsSIGKILL(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var res Result
	go func() {
		defer close(done)
		res, _ = run(t, ctx, Cmd{Path: "/bin/sh", Args: []string{"-c", "trap '' TERM; echo $$ > " + pidFile + "; while :; do sleep 0.01; done"}, KillGrace: 200 * time.Millisecond})
	}()
	pid := pidOf(t, pidFile)
	cancel()
	<-done
	if alive(pid) || res.ExitCode != -1 {
		t.Fatalf("pid %d alive=%v exit=%d", pid, alive(pid), res.ExitCode)
	}
}

func TestTimeout(t *testing.T) {
	_, err := run(t, context.Background(), Cmd{Path: "sleep", Args: []string{"30"}, Timeout: 50 * time.Millisecond, KillGrace: time.Second})
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "timed out after 50ms") {
		t.Fatalf("err = %v", err)
	}
}

func TestDaemonHoldingOutputDoesNotBlock(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	res, err := run(t, context.Background(), Cmd{Path: "/bin/sh", Args: []string{"-c", "sleep 30 & echo $! > " + pidFile + "; echo started"}})
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Output, "started") {
		t.Fatalf("%+v %v", res, err)
	}
	_ = syscall.Kill(pidOf(t, pidFile), syscall.SIGKILL)
}

func TestCredential(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch user")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody")
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	res, err := run(t, context.Background(), Cmd{Path: "id", Args: []string{"-u"}, Dir: "/", Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}})
	if err != nil || strings.TrimSpace(res.Output) != nobody.Uid {
		t.Fatalf("%+v %v", res, err)
	}
}

func TestBoundedWriter(t *testing.T) {
	b := newBounded(10)
	for _, s := range []string{"abc", "defgh", "ijklmnop", "qrst"} {
		b.Write([]byte(s))
	}
	out, dropped := b.result()
	if dropped != 10 || !strings.HasPrefix(out, "abcde") || !strings.HasSuffix(out, "pqrst") {
		t.Errorf("%q %d", out, dropped)
	}
}

// StopProcess stops one process, SIGKILL after the grace when it ignores
// SIGTERM, and leaves the rest of its group alone.
func TestStopProcess(t *testing.T) {
	for _, script := range []string{"sleep 60", "trap '' TERM; while :; do sleep 1; done"} {
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		if err := StopProcess(cmd.Process.Pid, 100*time.Millisecond); err != nil {
			t.Errorf("%q: %v", script, err)
		}
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%q still runs after StopProcess", script)
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // the sleep the trap loop started
	}
	if err := StopProcess(1, time.Second); err == nil {
		t.Error("StopProcess(1) was not refused")
	}
}
