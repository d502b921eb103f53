package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/testutil/wait"
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
	// Registered after stopAgentsBelow's cleanup, so run before it: the
	// logs as the failure left them.
	t.Cleanup(func() {
		if t.Failed() {
			agentLog, _ := os.ReadFile(filepath.Join(r.root, "var/log/visualops/agent.log"))
			boot, _ := os.ReadFile(filepath.Join(r.root, "var/log/visualops/bootstrap.log"))
			t.Logf("agent.log:\n%s\nbootstrap.log:\n%s", agentLog, boot)
		}
	})
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
	// Three watchdog passes, a rollback and a fresh start: a shell script
	// that forks a few dozen processes a pass, which on a loaded 2-core
	// machine took 35 s (each fork waits its turn), so a longer bound.
	wait.EventuallyWithin(t, watchdogTimeout, "the rollback to 2.0.0 reported to the backend", func() bool {
		in := r.b.instance("upd", r.id)
		ie, _ := in["init_errors"].(string)
		return in["connected"] == true && in["agent_version"] == "2.0.0" && strings.Contains(ie, "rolled back")
	})
	// The backend offers 3.0.0 again at every Handshake: it is refused,
	// not retried in a loop, and the rounds go on under 2.0.0.
	k := len(r.b.logs(t, "upd"))
	eventually(t, "rounds under 2.0.0 after the rollback", func() bool { return len(r.b.logs(t, "upd")) >= k+3 })
	// Refused once the resumed recipe's first round has ended.
	eventually(t, "agent.log showing the re-offered 3.0.0 refused", func() bool {
		agentLog, _ = os.ReadFile(filepath.Join(r.root, "var/log/visualops/agent.log"))
		return bytes.Contains(agentLog, []byte("update to 3.0.0 refused: it was rolled back here"))
	})
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
	eventually(t, "1.0.0 started and connected", func() bool { return r.b.connectedAs("hand", r.id) == "1.0.0" })
}

// releaseSize is the size of version's opsagent.tgz in the bucket.
func (r *updateRig) releaseSize(version string) int64 {
	st, err := os.Stat(filepath.Join(r.bucket.dir, version, dist.TarballName))
	if err != nil {
		r.t.Fatal(err)
	}
	return st.Size()
}

// partialDownload is the size of the tarball download in progress.
func (r *updateRig) partialDownload() int64 {
	st, err := os.Stat(filepath.Join(r.root, "var/lib/visualops/opsagent/update", dist.TarballName+".unverified"))
	if err != nil {
		return 0
	}
	return st.Size()
}

func hasLog(logs []logEntry, stateID string) bool {
	for _, l := range logs {
		if l.StateID == stateID {
			return true
		}
	}
	return false
}

// TestSlowReleaseServerDoesNotFreezeRecipes: the release server stops
// sending in the middle of the tarball. Meanwhile the agent applies a new
// recipe, is released from a meta.wait, and `opsagent status` says how far
// the download is ("downloading N of M"); once the server goes on, the
// update is installed.
func TestSlowReleaseServerDoesNotFreezeRecipes(t *testing.T) {
	r := newUpdateRig(t, "slow", `{"state":[{"id":"c","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	size := r.releaseSize("2.0.0")
	var once sync.Once
	release := r.bucket.stallAt(size / 2)
	t.Cleanup(func() { once.Do(release) })
	r.update("2.0.0")
	eventually(t, "half of the tarball on disk, then the server stalls", func() bool { return r.partialDownload() == size/2 })

	r.b.api(t, "PUT", "/api/apps/slow/recipe", `{"state":[
	  {"id":"n1","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}},
	  {"id":"w","module":"meta.wait","parameter":{"state":["@{other.state.1}"]}},
	  {"id":"n2","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	eventually(t, "the new recipe's first state reported while the download stalls", func() bool { return hasLog(r.b.logs(t, "slow"), "n1") })
	eventually(t, "the round waiting on w", func() bool { return engineField(r.root, "waiting_on") == "w" })
	r.b.api(t, "POST", "/api/apps/slow/waits", `{"instance_id":"i-slow","state_id":"w"}`)
	eventually(t, "the wait released and the round going on", func() bool { return hasLog(r.b.logs(t, "slow"), "n2") })

	progress := regexp.MustCompile(`update: +1\.0\.0 → 2\.0\.0: downloading [0-9.]+ (KiB|MiB) of [0-9.]+ MiB`)
	var line string
	eventually(t, "status saying 'downloading N of M'", func() bool {
		out, _ := exec.Command(binary, "--root", r.root, "status").CombinedOutput()
		line = progress.FindString(string(out))
		return line != ""
	})
	if v := r.b.connectedAs("slow", r.id); v != "1.0.0" || r.partialDownload() != size/2 {
		t.Fatalf("the download did not stall: agent %s, %d bytes on disk", v, r.partialDownload())
	}
	once.Do(release)
	eventually(t, "2.0.0 connected once the server went on", func() bool { return r.b.connectedAs("slow", r.id) == "2.0.0" })
	var sent int64
	for _, tr := range r.bucket.tarballRequests() {
		sent += tr.sent.Load()
	}
	t.Logf("FIGURES slow release server: tarball %d bytes, stalled at %d; status said %q; %d tarball requests, %d bytes sent", size, size/2, line, len(r.bucket.tarballRequests()), sent)
}

// TestKilledDuringDownloadResumesAtNextStart: kill -9 while the update
// downloads (the server stalled half-way); the watchdog (cron.sh, run here
// as cron would) starts the agent again, which runs the persisted
// recipe's first round, then resumes the download where it stopped (Range)
// and installs the update.
func TestKilledDuringDownloadResumesAtNextStart(t *testing.T) {
	r := newUpdateRig(t, "kill", `{"state":[{"id":"mark","module":"linux.file","parameter":{"path":"/srv/marker","content":"converged\n"}}]}`)
	marker := filepath.Join(r.root, "srv/marker")
	eventually(t, "the recipe applied", func() bool { _, err := os.Stat(marker); return err == nil })
	size := r.releaseSize("2.0.0")
	release := r.bucket.stallAt(size / 2)
	r.update("2.0.0")
	eventually(t, "half of the tarball on disk", func() bool { return r.partialDownload() == size/2 })
	pid := agentPID(r.root)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the agent gone", func() bool { return agentPID(r.root) == 0 })
	have := r.partialDownload()
	if err := os.Remove(marker); err != nil {
		t.Fatal(err)
	}
	r.bucket.marker.Store(&marker)
	release()
	before := len(r.bucket.tarballRequests())
	if out, err := exec.Command("/bin/sh", filepath.Join(r.root, "var/lib/visualops/opsagent/cron.sh")).CombinedOutput(); err != nil {
		t.Fatalf("cron.sh: %v\n%s", err, out)
	}
	eventually(t, "2.0.0 connected after the restart", func() bool { return r.b.connectedAs("kill", r.id) == "2.0.0" })
	after := r.bucket.tarballRequests()[before:]
	if len(after) != 1 {
		t.Fatalf("%d tarball requests after the restart, want 1", len(after))
	}
	if want := fmt.Sprintf("bytes=%d-", have); after[0].rangeHdr != want {
		t.Errorf("the restarted agent asked for Range %q, want %q (%d bytes kept across the kill)", after[0].rangeHdr, want, have)
	}
	if got := after[0].sent.Load(); got != size-have {
		t.Errorf("the restarted agent fetched %d bytes, want the %d missing", got, size-have)
	}
	if !after[0].marker {
		t.Error("the pending update was retried before the persisted recipe's first round (the marker it writes was not there)")
	}
	t.Logf("FIGURES kill during download: tarball %d bytes, %d kept across kill -9, %d fetched after the restart with Range %s", size, have, after[0].sent.Load(), after[0].rangeHdr)
}

// TestMalformedPubkeyStillUpdatesWithCompiledInKey: [userdata] pubkey is
// garbage. The agent says so once (init error, at the backend and in
// status) and the update signed with the release key compiled into it is
// still verified and installed.
func TestMalformedPubkeyStillUpdatesWithCompiledInKey(t *testing.T) {
	r := newUpdateRig(t, "badkey", `{"state":[{"id":"c","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	if err := syscall.Kill(agentPID(r.root), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the agent stopped", func() bool { return agentPID(r.root) == 0 })
	confPath := filepath.Join(r.root, "etc/opsagent.conf")
	conf, err := os.ReadFile(confPath)
	if err != nil {
		t.Fatal(err)
	}
	bad := regexp.MustCompile(`(?m)^pubkey=.*$`).ReplaceAll(conf, []byte("pubkey=RWQ-not-a-minisign-key"))
	if bytes.Equal(bad, conf) {
		t.Fatalf("no pubkey line in\n%s", conf)
	}
	if err := os.WriteFile(confPath, bad, 0o640); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("/bin/sh", filepath.Join(r.root, "var/lib/visualops/opsagent/cron.sh")).CombinedOutput(); err != nil {
		t.Fatalf("cron.sh: %v\n%s", err, out)
	}
	eventually(t, "1.0.0 connected again", func() bool { return r.b.connectedAs("badkey", r.id) == "1.0.0" })
	r.update("2.0.0")
	eventually(t, "2.0.0 connected", func() bool { return r.b.connectedAs("badkey", r.id) == "2.0.0" })
	eventually(t, "the bad key reported to the backend", func() bool {
		ie, _ := r.b.instance("badkey", r.id)["init_errors"].(string)
		return strings.Contains(ie, "[userdata] pubkey is ignored") && strings.Contains(ie, "compiled into this binary")
	})
	_, st := status(t, r.root)
	snap, _ := st["status"].(map[string]any)
	if ie := fmt.Sprint(snap["init_errors"]); !strings.Contains(ie, "[userdata] pubkey is ignored") {
		t.Errorf("status init errors %s do not name the bad key", ie)
	}
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
