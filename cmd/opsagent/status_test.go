package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/system"
)

func statusRoot(t *testing.T) (root, stateDir string) {
	t.Helper()
	root = t.TempDir()
	conf := "[userdata]\nws_uri = ws://127.0.0.1:1/agent/\napp_id = app-1\n[global]\nconf_path = /srv/opsagent\n"
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/opsagent.conf"), []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	stateDir = filepath.Join(root, "srv/opsagent")
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return root, stateDir
}

func TestStatusNotRunning(t *testing.T) {
	root, _ := statusRoot(t)
	code, out, errs := runCLI(t, "--root", root, "status")
	if code != exitNotRunning || !strings.Contains(out, "not running") {
		t.Fatalf("exit %d out %q err %q", code, out, errs)
	}
	if errs != "" {
		t.Errorf("stderr %q, want nothing", errs)
	}
}

func TestStatusRunning(t *testing.T) {
	root, stateDir := statusRoot(t)
	lock, err := fsutil.Lock(filepath.Join(stateDir, "lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Unlock()
	now := time.Now()
	snap := statusfile.Snapshot{
		PID: os.Getpid(), AgentVersion: "2.1", InstanceID: "i-1", AppID: "app-1",
		StartedAt: now, UpdatedAt: now,
		System: &system.Info{Distro: "Debian GNU/Linux 12 (bookworm)", PackageManager: "apt", Init: system.InitSysV, Chroot: true},
		Connection: statusfile.Connection{Connected: true, Since: now, Backend: "ws://127.0.0.1:1/agent/", OutboxDepth: 2, DroppedLogs: 3,
			DroppedBy: map[string]int64{"recipe_replaced": 1, "outbox_max_bytes": 2}},
		Engine: rounds.Status{RecipeVersion: 7, States: 3, Phase: "running", Round: 4, StateIndex: 1, StateID: "state-2",
			LastResults:   map[string]rounds.StateResult{"state-1": {OK: true, Comment: "File /x updated"}},
			PendingUpdate: "2.2"},
		InitErrors: []string{"cannot create /var/log/visualops"},
	}
	if err := statusfile.Write(filepath.Join(stateDir, "status.json"), snap); err != nil {
		t.Fatal(err)
	}
	code, out, errs := runCLI(t, "--root", root, "status")
	if code != exitOK {
		t.Fatalf("exit %d err %q", code, errs)
	}
	for _, want := range []string{"running as pid", "connected since", "version 7, 3 states; round 4",
		"running state 2/3 state-2", "ok   state-1  File /x updated", "2 StateLogs queued (0 B), 3 dropped (outbox_max_bytes 2, recipe_replaced 1)",
		"2.2 pending", "init error: cannot create /var/log/visualops",
		"system:     Debian GNU/Linux 12 (bookworm), packages with apt, services with sysv (tools run chrooted into the root)"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runCLI(t, "--root", root, "status", "--json")
	if code != exitOK {
		t.Fatalf("--json exit %d", code)
	}
	var rep statusReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if !rep.Running || rep.Snapshot.Engine.RecipeVersion != 7 || rep.Snapshot.Connection.OutboxDepth != 2 {
		t.Errorf("json report %+v", rep)
	}
}

// While the pending update downloads, status says how far: "downloading N
// of M", and why the last attempt was interrupted.
func TestStatusShowsDownloadProgress(t *testing.T) {
	for _, tc := range []struct {
		engine rounds.Status
		update *statusfile.Update
		want   string
	}{
		{rounds.Status{PendingUpdate: "2.2", UpdateStage: "preparing"},
			&statusfile.Update{Phase: "downloading", Version: "2.2", From: "2.1", Bytes: 3 << 19, Total: 10 << 20, Reason: "attempt 1: stalled"},
			"update:     2.1 → 2.2: downloading 1.5 MiB of 10.0 MiB (attempt 1: stalled)"},
		{rounds.Status{PendingUpdate: "2.2", UpdateStage: "held"}, nil,
			"update:     2.2 pending (prepared once the resumed recipe's first round ends)"},
		{rounds.Status{PendingUpdate: "2.2", UpdateStage: "ready"}, &statusfile.Update{Phase: "ready", Version: "2.2"},
			"update:     2.2 downloaded and verified; installed when the round ends"},
		{rounds.Status{PendingUpdate: "2.3", UpdateStage: "preparing"}, &statusfile.Update{Phase: "refused", Version: "2.2", Reason: "no signature"},
			"update:     2.3 pending (installed between rounds)"},
	} {
		line := "update:     " + updateLine(statusfile.Snapshot{Engine: tc.engine, Update: tc.update})
		if line != tc.want {
			t.Errorf("got  %q\nwant %q", line, tc.want)
		}
	}
}

func TestStatusWithoutConfigWarns(t *testing.T) {
	code, _, errs := runCLI(t, "--root", t.TempDir(), "status")
	if code != exitNotRunning || !strings.Contains(errs, "warning") {
		t.Fatalf("exit %d stderr %q", code, errs)
	}
}

// A backend's close reason, a state's output and a release server's
// answer reach `status` with their terminal escapes made visible.
func TestStatusPrintsNoTerminalEscapes(t *testing.T) {
	root, stateDir := statusRoot(t)
	lock, err := fsutil.Lock(filepath.Join(stateDir, "lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Unlock()
	evil := "\x1b]0;owned\x07\x1b[2J\u009b31m\u202e"
	now := time.Now()
	snap := statusfile.Snapshot{
		PID: os.Getpid(), AgentVersion: "2.1" + evil, InstanceID: "i-1" + evil, AppID: "app-1" + evil, StartedAt: now, UpdatedAt: now,
		Connection: statusfile.Connection{Backend: "ws://127.0.0.1:1/agent/" + evil, LastError: "closed by the backend: " + evil},
		Engine: rounds.Status{RecipeVersion: 7, States: 3, Phase: "idle" + evil, StateIndex: -1,
			LastResults: map[string]rounds.StateResult{"s" + evil: {OK: false, Comment: "out: " + evil}},
			UpdateNote:  "update refused: HTTP 500 " + evil},
		InitErrors: []string{"init " + evil},
	}
	if err := statusfile.Write(filepath.Join(stateDir, "status.json"), snap); err != nil {
		t.Fatal(err)
	}
	code, out, errs := runCLI(t, "--root", root, "status")
	if code != exitOK {
		t.Fatalf("exit %d err %q", code, errs)
	}
	if strings.ContainsAny(out+errs, "\x1b\x07\u009b\u202e") {
		t.Errorf("a terminal escape reached the output:\n%q", out+errs)
	}
	for _, want := range []string{`closed by the backend: \x1b]0;owned\x07\x1b[2J\u009b31m\u202e`, `out: \x1b]0;owned`, `update refused: HTTP 500 \x1b`, `init \x1b`} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// A pid in the lock file that is not the holder's is not shown as the
// agent's (install, uninstall and update would signal it).
func TestStatusDoesNotBelieveAForgedPID(t *testing.T) {
	root, stateDir := statusRoot(t)
	lockPath := filepath.Join(stateDir, "lock")
	lock, err := fsutil.Lock(lockPath)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Unlock()
	if err := os.WriteFile(lockPath, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errs := runCLI(t, "--root", root, "status")
	if code != exitOK || !strings.Contains(out, "running, pid unknown") || strings.Contains(out, "pid 1 ") {
		t.Errorf("exit %d\n%s%s", code, out, errs)
	}
}
