package e2e

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/visualops/opsagent/internal/fsutil"
)

// agentPID is the pid of the agent running below root (from its lock), 0
// when none runs.
func agentPID(root string) int {
	pid, held, _ := fsutil.HolderPID(filepath.Join(root, "var/lib/visualops/opsagent/lock"))
	if !held {
		return 0
	}
	return pid
}

// stopAgentsBelow kills, at the end of a test, every agent and watchdog
// started below root (they run detached, in sessions of their own).
func stopAgentsBelow(t testing.TB, root string) {
	t.Cleanup(func() {
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			if err != nil || !bytes.Contains(cmdline, []byte(root)) {
				continue
			}
			var pid int
			if _, err := fmt.Sscan(e.Name(), &pid); err == nil && pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
}

// instance returns the backend's row for an instance, nil when unknown.
func (b *backendProc) instance(app, id string) map[string]any {
	rows, _ := b.api(nil, "GET", "/api/apps/"+app+"/instances", "")["instances"].([]any)
	for _, r := range rows {
		if m := r.(map[string]any); m["instance_id"] == id {
			return m
		}
	}
	return nil
}

func (b *backendProc) connectedAs(app, id string) string {
	in := b.instance(app, id)
	if in == nil || in["connected"] != true {
		return ""
	}
	v, _ := in["agent_version"].(string)
	return v
}

// userdataScript renders the bootstrap script with the real `opsagent
// userdata`.
func userdataScript(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(binary, append([]string{"userdata"}, args...)...).Output()
	if err != nil {
		t.Fatalf("opsagent userdata: %v", err)
	}
	p := filepath.Join(t.TempDir(), "user-data")
	if err := os.WriteFile(p, out, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// runScript runs the userdata script one of the three ways instances run
// it, with the root redirected, in the foreground.
func runScript(t *testing.T, how, script, root string) (int, string) {
	t.Helper()
	env := []string{"OPSAGENT_ROOT=" + root, "OPSAGENT_FOREGROUND=1", "OPSAGENT_RETRY_MAX_DELAY=1"}
	var cmd *exec.Cmd
	switch how {
	case "file": // saved and run by hand
		cmd = exec.Command("bash", script)
		cmd.Env = append(os.Environ(), env...)
	case "pipe": // curl -sSL …/user-data | bash: no script file, $0 is bash
		data, _ := os.ReadFile(script)
		cmd = exec.Command("bash")
		cmd.Stdin = bytes.NewReader(data)
		cmd.Env = append(os.Environ(), env...)
	case "cloud-init": // executed as a file with a bare environment
		cmd = exec.Command(script)
		cmd.Env = append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	}
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		code = -1
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
	}
	return code, string(out)
}

// TestUserdataBootstrapsAnInstance runs the rendered userdata the three
// ways it is run (a file, piped into bash, as cloud-init does) against a
// loopback server that serves a release built by the test: the agent is
// installed from it, started, and connects to the backend and applies the
// app's recipe. A bad checksum is refused with nothing installed; a server
// that is down for a while is retried.
func TestUserdataBootstrapsAnInstance(t *testing.T) {
	key := sharedKey(t)
	bucket := newBucket(t)
	sum := publish(t, bucket.dir, "1.0.0", agentBinary(t, "1.0.0", key.pub), &key)
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/boot/recipe", `{"state":[{"id":"hello","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	render := func(instance, sha string) string {
		return userdataScript(t, "--app-id", "boot", "--ws-uri", "ws://"+b.addr+"/agent/", "--version", "1.0.0",
			"--base-remote", bucket.URL, "--pubkey", key.pub, "--sha256", sha,
			"--set", "network.instance_id="+instance, "--set", "network.metadata=http://127.0.0.1:1",
			"--set", "agent.engine=native", "--set", "salt.delay=1s")
	}
	for _, how := range []string{"file", "pipe", "cloud-init"} {
		t.Run(how, func(t *testing.T) {
			root := t.TempDir()
			stopAgentsBelow(t, root)
			id := "i-" + how
			if how == "pipe" {
				bucket.failures.Store(2) // the server is down for a while
			}
			code, out := runScript(t, how, render(id, sum), root)
			if code != 0 {
				t.Fatalf("exit %d:\n%s", code, out)
			}
			eventually(t, "the installed agent connected", func() bool { return b.connectedAs("boot", id) == "1.0.0" })
			eventually(t, "its first StateLog", func() bool {
				for _, l := range b.logs(t, "boot") {
					if l.InstanceID == id && l.StateID == "hello" && l.Result {
						return true
					}
				}
				return false
			})
			log, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/bootstrap.log"))
			for _, want := range []string{"SHA-256 " + sum + " verified", "opsagent install"} {
				if !bytes.Contains(log, []byte(want)) {
					t.Errorf("bootstrap.log lacks %q:\n%s", want, log)
				}
			}
			if how == "pipe" && !bytes.Contains(log, []byte("retrying")) {
				t.Errorf("no retry while the server was down:\n%s", log)
			}
			if m, _ := filepath.Glob(filepath.Join(root, "opt/visualops/.bootstrap*")); len(m) > 0 {
				t.Errorf("temporary files left: %v", m)
			}
			if how == "file" {
				// Re-run by hand on the installed instance: nothing to do,
				// the same agent keeps running.
				pid := agentPID(root)
				code, out := runScript(t, "pipe", render(id, sum), root)
				if code != 0 || !strings.Contains(out, "already installed, nothing to do") {
					t.Errorf("re-run: exit %d:\n%s", code, out)
				}
				if agentPID(root) != pid {
					t.Errorf("the re-run restarted the agent (%d → %d)", pid, agentPID(root))
				}
			}
		})
	}
	t.Run("bad checksum", func(t *testing.T) {
		root := t.TempDir()
		code, out := runScript(t, "file", render("i-bad", strings.Repeat("0", 64)), root)
		if code == 0 || !strings.Contains(out, "checksum mismatch") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
		if _, err := os.Stat(filepath.Join(root, "opt/visualops/bin/opsagent")); err == nil {
			t.Error("installed although the checksum was wrong")
		}
		log, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/bootstrap.log"))
		if !bytes.Contains(log, []byte("checksum mismatch")) {
			t.Errorf("the refusal is not logged:\n%s", log)
		}
	})
}

// TestInstallRunUninstall: userdata → install → agent started → recipe
// applied → uninstall leaves only the config, the token and the logs.
func TestInstallRunUninstall(t *testing.T) {
	key := sharedKey(t)
	bucket := newBucket(t)
	sum := publish(t, bucket.dir, "1.0.0", agentBinary(t, "1.0.0", key.pub), &key)
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/life/recipe", `{"state":[{"id":"d","module":"linux.dir","parameter":{"path":["/srv/life"]}}]}`)
	root := t.TempDir()
	stopAgentsBelow(t, root)
	script := userdataScript(t, "--app-id", "life", "--ws-uri", "ws://"+b.addr+"/agent/", "--version", "1.0.0",
		"--base-remote", bucket.URL, "--pubkey", key.pub, "--sha256", sum,
		"--set", "network.instance_id=i-life", "--set", "network.metadata=http://127.0.0.1:1", "--set", "agent.engine=native")
	if code, out := runScript(t, "file", script, root); code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	eventually(t, "the recipe applied", func() bool {
		st, err := os.Stat(filepath.Join(root, "srv/life"))
		return err == nil && st.IsDir()
	})
	pid := agentPID(root)
	if pid == 0 {
		t.Fatal("no agent runs")
	}
	out, err := exec.Command(filepath.Join(root, "opt/visualops/bin/opsagent"), "--root", root, "uninstall").CombinedOutput()
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if syscall.Kill(pid, 0) == nil {
		// It may be a zombie of nobody's (setsid): check it no longer runs.
		if stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); !bytes.Contains(stat, []byte(") Z")) {
			t.Errorf("the agent (pid %d) still runs after uninstall", pid)
		}
	}
	var left []string
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(root, p)
			left = append(left, rel)
		}
		return nil
	})
	for _, f := range left {
		if f != "etc/opsagent.conf" && f != "etc/opsagent.token" && !strings.HasPrefix(f, "var/log/visualops/") && !strings.HasPrefix(f, "srv/") {
			t.Errorf("uninstall left %s", f)
		}
	}
	for _, f := range []string{"etc/opsagent.conf", "etc/opsagent.token"} {
		if !slices.Contains(left, f) {
			t.Errorf("uninstall removed %s", f)
		}
	}
}
