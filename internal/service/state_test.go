package service

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/internal/updatephase"
)

func TestUpdateStateRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "update.state")
	in := UpdateState{Phase: updatephase.RolledBack, From: "1.0.0", To: "2.0.0", Reason: "a=b; it exited 3 times at start",
		Deadline: time.Unix(1_700_000_120, 0), Starts: 3, Updated: time.Unix(1_700_000_000, 0)}
	if err := WriteUpdateState(path, in); err != nil {
		t.Fatal(err)
	}
	out, err := ReadUpdateState(path)
	if err != nil {
		t.Fatal(err)
	}
	if out.Phase != in.Phase || out.From != in.From || out.To != in.To || out.Reason != in.Reason || out.Starts != in.Starts ||
		!out.Deadline.Equal(in.Deadline) || !out.Updated.Equal(in.Updated) {
		t.Errorf("round trip:\n got %+v\nwant %+v", out, in)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("mode: %v %v", st, err)
	}
	// The shell reads it the way the watchdog does: a value with "=" in it
	// comes out whole, times are Unix seconds.
	for key, want := range map[string]string{"reason": in.Reason, "deadline": "1700000120", "starts": "3", "phase": "rolled-back"} {
		got, err := exec.Command("/bin/sh", "-c", `grep "^$1=" "$2" | cut -d= -f2-`, "sh", key, path).Output()
		if err != nil || strings.TrimSuffix(string(got), "\n") != want {
			t.Errorf("sh reads %s=%q (%v), want %q", key, got, err, want)
		}
	}

	// Zero times stay zero; sub-second precision is dropped.
	if err := WriteUpdateState(path, UpdateState{Phase: updatephase.Done, Updated: time.Unix(5, 999)}); err != nil {
		t.Fatal(err)
	}
	out, _ = ReadUpdateState(path)
	if !out.Deadline.IsZero() || !out.Updated.Equal(time.Unix(5, 0)) || out.Reason != "" {
		t.Errorf("zero deadline / whole seconds: %+v", out)
	}
}

func TestReadUpdateState(t *testing.T) {
	dir := t.TempDir()
	s, err := ReadUpdateState(filepath.Join(dir, "missing"))
	if err != nil || s != (UpdateState{}) {
		t.Errorf("missing file: %+v %v", s, err)
	}
	// What the shell writes: keys in another order, unknown keys kept,
	// repeated keys (first wins, as with grep | head -n 1).
	path := filepath.Join(dir, "update.state")
	if err := os.WriteFile(path, []byte("to=2.0.0\nfuture=x\nstarts=2\nphase=confirming\nphase=done\n\nupdated=7\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err = ReadUpdateState(path)
	if err != nil || s.Phase != updatephase.Confirming || s.To != "2.0.0" || s.Starts != 2 || !s.Updated.Equal(time.Unix(7, 0)) {
		t.Errorf("shell-written file: %+v %v", s, err)
	}
	for name, content := range map[string]string{
		"no equals":  "phase=confirming\ngarbage\n",
		"bad starts": "starts=many\n",
		"neg starts": "starts=-1\n",
		"bad time":   "deadline=tomorrow\n",
	} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := ReadUpdateState(path)
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "delete the file") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestWriteUpdateStateRefusesLineBreaks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "update.state")
	if err := WriteUpdateState(path, UpdateState{Phase: updatephase.Confirming, To: "2.0.0"}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	for _, s := range []UpdateState{
		{Phase: "done\nphase=confirming"},
		{From: "1\n"},
		{To: "2.0.0\ndeadline=0"},
		{Reason: "line one\r\nline two"},
		{Reason: "nul\x00"},
		{Starts: -1},
	} {
		err := WriteUpdateState(path, s)
		if err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("%+v: %v", s, err)
		}
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Errorf("a refused write changed the file:\n%s", after)
	}
	err := WriteUpdateState(path, UpdateState{Reason: "a\nb"})
	if err == nil || !strings.Contains(err.Error(), "reason") || !strings.Contains(err.Error(), "one-line") {
		t.Errorf("the error does not name the field and the fix: %v", err)
	}
}

func TestConfirmUpdate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "update.state")
	now := time.Unix(1_700_000_000, 0)
	if err := WriteUpdateState(path, UpdateState{Phase: updatephase.Confirming, From: "1.0.0", To: "2.0.0", Deadline: now.Add(time.Minute), Starts: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := ConfirmUpdate(path, "3.0.0", now); !errors.Is(err, ErrNotConfirming) {
		t.Errorf("confirming another version: %v", err)
	}
	s, err := ConfirmUpdate(path, "2.0.0", now)
	if err != nil || s.Phase != updatephase.Done || !s.Updated.Equal(now) {
		t.Fatalf("confirm: %+v %v", s, err)
	}
	if got, _ := ReadUpdateState(path); got.Phase != updatephase.Done || got.To != "2.0.0" || got.Starts != 1 {
		t.Errorf("on disk: %+v", got)
	}

	// A rollback won the race: the confirmation must not overwrite it.
	rolled := UpdateState{Phase: updatephase.RolledBack, From: "1.0.0", To: "2.0.0", Reason: "the new version 2.0.0 did not confirm by its deadline"}
	if err := WriteUpdateState(path, rolled); err != nil {
		t.Fatal(err)
	}
	_, err = ConfirmUpdate(path, "2.0.0", now)
	if !errors.Is(err, ErrNotConfirming) || !strings.Contains(err.Error(), "did not confirm by its deadline") {
		t.Errorf("confirm after rollback: %v", err)
	}
	if got, _ := ReadUpdateState(path); got.Phase != updatephase.RolledBack {
		t.Errorf("the rollback was overwritten: %+v", got)
	}
}

// Writers wait for the state lock that the watchdog takes with flock(1).
func TestUpdateStateWaitsForTheLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "update.state")
	f, err := os.OpenFile(stateLockPath(path), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- WriteUpdateState(path, UpdateState{Phase: updatephase.Done}) }()
	wait.Consistently(t, 200*time.Millisecond, "the write waiting for the lock", func() bool {
		_, err := os.Stat(path)
		return os.IsNotExist(err)
	})
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s, _ := ReadUpdateState(path); s.Phase != updatephase.Done {
		t.Errorf("state %+v", s)
	}
}

func TestEditUpdateStateError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "update.state")
	boom := errors.New("boom")
	if _, err := EditUpdateState(path, func(*UpdateState) error { return boom }); !errors.Is(err, boom) {
		t.Errorf("edit error: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("a failed edit wrote the file: %v", err)
	}
	_, err := EditUpdateState(filepath.Join(t.TempDir(), "missing-dir", "update.state"), func(*UpdateState) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "opsagent install") {
		t.Errorf("missing state directory: %v", err)
	}
}

// The locks beside the update state and cron.sh are never opened through
// a link planted at their names: a dangling one would have the lock
// created wherever it points. Each refusal names the link.
func TestStateLocksRefuseLinks(t *testing.T) {
	l := tempLayout(t, "root")
	mustMkdir(t, l.StateDir())
	elsewhere := t.TempDir()
	for _, lock := range []string{stateLockPath(l.UpdateStateFile()), l.WatchdogLockFile()} {
		if err := os.Symlink(filepath.Join(elsewhere, filepath.Base(lock)), lock); err != nil {
			t.Fatal(err)
		}
	}
	if err := WriteUpdateState(l.UpdateStateFile(), UpdateState{Phase: updatephase.Done}); err == nil || !strings.Contains(err.Error(), stateLockPath(l.UpdateStateFile())) {
		t.Errorf("WriteUpdateState through a link at its lock: %v", err)
	}
	if release, err := HoldWatchdog(l, time.Second); err == nil || !strings.Contains(err.Error(), l.WatchdogLockFile()) {
		if err == nil {
			release()
		}
		t.Errorf("HoldWatchdog through a link at its lock: %v", err)
	}
	if entries, _ := os.ReadDir(elsewhere); len(entries) != 0 {
		t.Errorf("a lock was created through a link: %s", entries[0].Name())
	}
}
