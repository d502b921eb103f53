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
)

func statusRoot(t *testing.T) (root, stateDir string) {
	t.Helper()
	root = t.TempDir()
	conf := "[userdata]\nws_uri = ws://127.0.0.1:1/agent/\napp_id = app-1\n[global]\nconf_path = /state\n"
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/opsagent.conf"), []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	stateDir = filepath.Join(root, "state")
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
		"2.2 pending", "init error: cannot create /var/log/visualops"} {
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

func TestStatusWithoutConfigWarns(t *testing.T) {
	code, _, errs := runCLI(t, "--root", t.TempDir(), "status")
	if code != exitNotRunning || !strings.Contains(errs, "warning") {
		t.Fatalf("exit %d stderr %q", code, errs)
	}
}
