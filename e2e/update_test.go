package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// updateRig is an instance installed at 1.0.0 from a release bucket,
// connected to a backend.
type updateRig struct {
	t      testing.TB
	key    releaseKey
	bucket *bucket
	b      *backendProc
	root   string
	app    string
	id     string
}

func newUpdateRig(t testing.TB, app, recipe string) *updateRig {
	t.Helper()
	r := &updateRig{t: t, key: sharedKey(t), bucket: newBucket(t), root: t.TempDir(), app: app, id: "i-" + app}
	stopAgentsBelow(t, r.root)
	for _, v := range []string{"1.0.0", "2.0.0"} {
		publish(t, r.bucket.dir, v, agentBinary(t, v, r.key.pub), &r.key)
	}
	r.b = startBackend(t, t.TempDir(), "127.0.0.1:0")
	r.b.api(t, "PUT", "/api/apps/"+app+"/recipe", recipe)
	v1 := filepath.Join(t.TempDir(), "opsagent-linux")
	if err := os.WriteFile(v1, agentBinary(t, "1.0.0", r.key.pub), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(v1, "--root", r.root, "install", "--ws-uri", "ws://"+r.b.addr+"/agent/", "--app-id", app,
		"--version", "1.0.0", "--base-remote", r.bucket.URL, "--pubkey", r.key.pub, "--skip-packages", "--start",
		"--set", "network.instance_id="+r.id, "--set", "network.metadata=http://127.0.0.1:1",
		"--set", "agent.engine=native", "--set", "salt.delay=1s", "--set", "agent.update_health_timeout=60s").CombinedOutput()
	if err != nil {
		t.Fatalf("install 1.0.0: %v\n%s", err, out)
	}
	eventually(t, "1.0.0 connected", func() bool { return r.b.connectedAs(app, r.id) == "1.0.0" })
	checkSecretsAndModes(t, r.root, r.b, app)
	return r
}

func (r *updateRig) installed() []byte {
	data, _ := os.ReadFile(filepath.Join(r.root, "opt/visualops/bin/opsagent"))
	return data
}

func (r *updateRig) update(version string) {
	r.b.api(r.t, "POST", "/api/apps/"+r.app+"/update", fmt.Sprintf(`{"version":%q}`, version))
}

// statusOf reads status.json below root.
func statusOf(root string) map[string]any {
	data, _ := os.ReadFile(filepath.Join(root, "var/lib/visualops/opsagent/status.json"))
	var m map[string]any
	_ = json.Unmarshal(data, &m)
	return m
}

func engineField(root, key string) any {
	eng, _ := statusOf(root)["engine"].(map[string]any)
	return eng[key]
}

// checkExactlyOnce fails unless the agent's StateLogs at the backend carry
// agent seqs 1..n of one stream with no gap and no repeat.
func checkExactlyOnce(t *testing.T, b *backendProc, app, id string) int {
	t.Helper()
	resp := b.api(t, "GET", "/api/apps/"+app+"/logs?limit=10000", "")
	logs, _ := resp["logs"].([]any)
	seen := map[float64]bool{}
	var last float64
	for _, x := range logs {
		l := x.(map[string]any)
		if l["instance_id"] != id {
			continue
		}
		seq, _ := l["agent_seq"].(float64)
		if seq == 0 {
			t.Errorf("a StateLog without agent_seq: %v", l)
			continue
		}
		if seen[seq] {
			t.Errorf("seq %v stored twice", seq)
		}
		seen[seq] = true
		if seq != last+1 {
			t.Errorf("seq %v after %v: a gap or disorder", seq, last)
		}
		last = seq
	}
	return len(seen)
}

// TestSelfUpdateBetweenRounds: an agent at 1.0.0 gets AgentUpdate 2.0.0 in
// the middle of a round. The round finishes, the binary is swapped (1.0.0
// kept as opsagent.old), the same process re-executes the new binary,
// handshakes as 2.0.0 and resumes the recipe; every StateLog arrives
// exactly once. Then a 3.0.0 that exits at start is offered: the watchdog
// rolls it back to 2.0.0, and the backend hears why.
func TestSelfUpdateBetweenRounds(t *testing.T) {
	r := newUpdateRig(t, "upd", `{"state":[
	  {"id":"before","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}},
	  {"id":"slow","module":"linux.cmd","parameter":{"cmd":"sleep 2","cwd":"/tmp"}},
	  {"id":"after","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	v1 := r.installed()
	pid := agentPID(r.root)
	eventually(t, "the slow state running", func() bool { return engineField(r.root, "state_id") == "slow" })
	n := len(r.b.logs(t, "upd"))
	r.update("2.0.0")
	eventually(t, "2.0.0 connected", func() bool { return r.b.connectedAs("upd", r.id) == "2.0.0" })
	// The round in progress finished before the swap.
	var ids []string
	for _, l := range r.b.logs(t, "upd")[n:] {
		ids = append(ids, l.StateID)
	}
	if len(ids) < 2 || ids[0] != "slow" || ids[1] != "after" {
		t.Errorf("StateLogs after the AgentUpdate: %v, want the round to end first (slow, after)", ids)
	}
	if got := agentPID(r.root); got != pid {
		t.Errorf("the agent's pid changed %d → %d: not re-executed in place", pid, got)
	}
	if old, _ := os.ReadFile(filepath.Join(r.root, "opt/visualops/bin/opsagent.old")); !bytes.Equal(old, v1) {
		t.Error("opsagent.old is not the 1.0.0 binary")
	}
	// Rewritten once the Handshake is accepted, just after the backend
	// shows the instance connected.
	eventually(t, "[userdata] version rewritten to 2.0.0", func() bool {
		conf, _ := os.ReadFile(filepath.Join(r.root, "etc/opsagent.conf"))
		return bytes.Contains(conf, []byte("version=2.0.0"))
	})
	// The recipe resumes under 2.0.0.
	m := len(r.b.logs(t, "upd"))
	eventually(t, "rounds under 2.0.0", func() bool { return len(r.b.logs(t, "upd")) >= m+3 })
	agentLog, _ := os.ReadFile(filepath.Join(r.root, "var/log/visualops/agent.log"))
	if !bytes.Contains(agentLog, []byte("updated from 1.0.0 to 2.0.0")) {
		t.Error("agent.log does not say 'updated from 1.0.0 to 2.0.0'")
	}

	// A broken 3.0.0 (passes the smoke test, exits at start) is rolled back.
	publish(t, r.bucket.dir, "3.0.0", brokenBinary("3.0.0"), &r.key)
	v2 := r.installed()
	r.update("3.0.0")
	eventually(t, "the rollback to 2.0.0 reported to the backend", func() bool {
		in := r.b.instance("upd", r.id)
		ie, _ := in["init_errors"].(string)
		return in["connected"] == true && in["agent_version"] == "2.0.0" && strings.Contains(ie, "rolled back")
	})
	// The backend offers 3.0.0 again at every Handshake: it is refused,
	// not retried in a loop, and the rounds go on under 2.0.0.
	k := len(r.b.logs(t, "upd"))
	eventually(t, "rounds under 2.0.0 after the rollback", func() bool { return len(r.b.logs(t, "upd")) >= k+3 })
	agentLog, _ = os.ReadFile(filepath.Join(r.root, "var/log/visualops/agent.log"))
	if !bytes.Contains(agentLog, []byte("update to 3.0.0 refused: it was rolled back here")) {
		t.Error("agent.log does not show the re-offered 3.0.0 refused")
	}
	if !bytes.Equal(r.installed(), v2) {
		t.Error("the installed binary is not 2.0.0 after the rollback")
	}
	in := r.b.instance("upd", r.id)
	t.Logf("backend sees: %v", in["init_errors"])
	checkSecretsAndModes(t, r.root, r.b, "upd")
	if count := checkExactlyOnce(t, r.b, "upd", r.id); count == 0 {
		t.Error("no StateLogs")
	}
}

// TestUpdateByHand: `opsagent update` asks a running agent (which waits
// for its round), and updates directly when no agent runs.
func TestUpdateByHand(t *testing.T) {
	r := newUpdateRig(t, "hand", `{"state":[{"id":"c","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	bin := filepath.Join(r.root, "opt/visualops/bin/opsagent")
	out, err := exec.Command(bin, "--root", r.root, "update", "--version", "2.0.0", "--wait", "60s").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "updated to 2.0.0") {
		t.Fatalf("update with a running agent: %v\n%s", err, out)
	}
	if v := r.b.connectedAs("hand", r.id); v != "2.0.0" {
		t.Errorf("connected as %q", v)
	}
	// A downgrade is refused without --force; with it, and no agent
	// running, the binary is replaced directly and the agent started.
	out, err = exec.Command(bin, "--root", r.root, "update", "--version", "1.0.0", "--wait", "30s").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not newer") {
		t.Fatalf("downgrade without --force: %v\n%s", err, out)
	}
	if err := syscall.Kill(agentPID(r.root), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no agent running", func() bool { return agentPID(r.root) == 0 })
	out, err = exec.Command(filepath.Join(r.root, "opt/visualops/bin/opsagent"), "--root", r.root, "update", "--version", "1.0.0", "--force").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "no agent runs: updating") {
		t.Fatalf("direct update: %v\n%s", err, out)
	}
	t.Logf("direct update:\n%s", out)
	t.Cleanup(func() {
		if t.Failed() {
			agentLog, _ := os.ReadFile(filepath.Join(r.root, "var/log/visualops/agent.log"))
			boot, _ := os.ReadFile(filepath.Join(r.root, "var/log/visualops/bootstrap.log"))
			t.Logf("agent.log:\n%s\nbootstrap.log:\n%s", agentLog, boot)
		}
	})
	eventually(t, "1.0.0 started and connected", func() bool { return r.b.connectedAs("hand", r.id) == "1.0.0" })
}

// TestKilledDuringDownloadResumesAtNextStart: kill -9 while the update
// downloads; the watchdog (cron.sh, run here as cron would) starts the
// agent again, which applies the persisted pending update.
func TestKilledDuringDownloadResumesAtNextStart(t *testing.T) {
	r := newUpdateRig(t, "kill", `{"state":[{"id":"c","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	hold := make(chan struct{})
	r.bucket.hold.Store(&hold)
	r.update("2.0.0")
	eventually(t, "the download started", func() bool {
		u, _ := statusOf(r.root)["update"].(map[string]any)
		return u["phase"] == "downloading"
	})
	pid := agentPID(r.root)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the agent gone", func() bool { return agentPID(r.root) == 0 })
	r.bucket.hold.Store(nil)
	close(hold)
	if out, err := exec.Command("/bin/sh", filepath.Join(r.root, "var/lib/visualops/opsagent/cron.sh")).CombinedOutput(); err != nil {
		t.Fatalf("cron.sh: %v\n%s", err, out)
	}
	eventually(t, "2.0.0 connected after the restart", func() bool { return r.b.connectedAs("kill", r.id) == "2.0.0" })
}

// checkSecretsAndModes: the instance token appears nowhere but its own
// file (not in logs, status, StateLogs, config, the backend's files or
// output), and the layout has the modes spec/install-update.md gives.
func checkSecretsAndModes(t testing.TB, root string, b *backendProc, app string) {
	t.Helper()
	tokenFile := filepath.Join(root, "etc/opsagent.token")
	tok, err := os.ReadFile(tokenFile)
	if err != nil || len(bytes.TrimSpace(tok)) < 32 {
		t.Fatalf("token: %q %v", tok, err)
	}
	secret := bytes.TrimSpace(tok)
	grep := func(dir string) {
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || p == tokenFile || !d.Type().IsRegular() {
				return nil
			}
			if data, _ := os.ReadFile(p); bytes.Contains(data, secret) {
				t.Errorf("the instance token is in %s", p)
			}
			return nil
		})
	}
	grep(root)
	grep(b.data)
	if strings.Contains(b.out.String(), string(secret)) {
		t.Error("the instance token is in the backend's output")
	}
	logs := b.api(t, "GET", "/api/apps/"+app+"/logs?limit=10000", "")
	if data, _ := json.Marshal(logs); bytes.Contains(data, secret) {
		t.Error("the instance token is in StateLogs")
	}
	for rel, want := range map[string]fs.FileMode{
		"opt/visualops/bin/opsagent": 0o755, "var/lib/visualops/opsagent": 0o700, "var/log/visualops": 0o750,
		"etc/opsagent.conf": 0o640, "etc/opsagent.token": 0o400,
	} {
		st, err := os.Stat(filepath.Join(root, rel))
		if err != nil {
			t.Errorf("%s: %v", rel, err)
		} else if st.Mode().Perm() != want {
			t.Errorf("%s has mode %04o, want %04o", rel, st.Mode().Perm(), want)
		}
	}
	if st, err := os.Stat(filepath.Join(root, "opt/visualops/bin/opsagent.old")); err == nil && st.Mode().Perm() != 0o755 {
		t.Errorf("opsagent.old has mode %04o, want 0755", st.Mode().Perm())
	}
}
