package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// installArgs are a real install below root that starts nothing.
func installArgs(root string, more ...string) []string {
	return append([]string{"--root", root, "install", "--ws-uri", "ws://127.0.0.1:1/agent/", "--app-id", "safe", "--version", "2.1.0",
		"--base-remote", "http://127.0.0.1:1", "--set", "network.instance_id=i-safe", "--set", "network.metadata=http://127.0.0.1:1",
		"--set", "agent.engine=native"}, more...)
}

// The enrollment secret reaches `opsagent install` from the userdata
// through the environment: it is in the installed config, and neither in
// install's arguments nor in bootstrap.log.
func TestUserdataSecretReachesInstallOutsideArgv(t *testing.T) {
	key := sharedKey(t)
	bucket := newBucket(t)
	sum := publish(t, bucket.dir, "1.0.0", agentBinary(t, "1.0.0", key.pub), &key)
	secret := "es-e2e-5b1f0c7d"
	script := userdataScript(t, "--app-id", "sec", "--ws-uri", "ws://127.0.0.1:1/agent/", "--version", "1.0.0",
		"--base-remote", bucket.URL, "--pubkey", key.pub, "--sha256", sum, "--enroll-secret", secret,
		"--set", "network.instance_id=i-sec", "--set", "network.metadata=http://127.0.0.1:1", "--set", "agent.engine=native")
	data, _ := os.ReadFile(script)
	// What runs `install` in the script: no --enroll-secret on its line.
	if bytes.Contains(data, []byte("--enroll-secret")) {
		t.Errorf("the script passes --enroll-secret on a command line")
	}
	root := t.TempDir()
	stopAgentsBelow(t, root)
	if code, out := runScript(t, "file", script, root); code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	conf, _ := os.ReadFile(filepath.Join(root, "etc/opsagent.conf"))
	if !bytes.Contains(conf, []byte("enroll_secret="+secret)) {
		t.Errorf("the secret did not reach install:\n%s", conf)
	}
	log, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/bootstrap.log"))
	if bytes.Contains(log, []byte(secret)) {
		t.Errorf("bootstrap.log carries the secret:\n%s", log)
	}
}

// A fake systemctl on PATH records its argv: below a root other than the
// host's, install and uninstall (real processes) only enable and disable
// the unit with --root, and never start, stop or reload anything.
func TestRootNeverDrivesTheHostsSystemd(t *testing.T) {
	root, bin, record := t.TempDir(), t.TempDir(), filepath.Join(t.TempDir(), "systemctl-argv")
	stopAgentsBelow(t, root)
	fake := "#!/bin/sh\nprintf '%s ' \"$@\" >>" + record + "\necho >>" + record + "\ncase \"$*\" in *is-enabled*) exit 1;; esac\nexit 0\n"
	if err := os.WriteFile(filepath.Join(bin, "systemctl"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "run/systemd/system"), 0o755); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
	for _, args := range [][]string{installArgs(root, "--start"), {"--root", root, "uninstall"}} {
		cmd := exec.Command(binary, args...)
		cmd.Env = env
		out, _ := cmd.CombinedOutput()
		if !strings.Contains(string(out), "systemctl --root="+root) {
			t.Errorf("opsagent %s does not say it used systemctl --root:\n%s", args[2], out)
		}
	}
	data, _ := os.ReadFile(record)
	got := strings.Split(strings.TrimSpace(string(data)), "\n")
	want := []string{
		"--root=" + root + " is-enabled --quiet opsagent.service",
		"--root=" + root + " enable opsagent.service",
		"--root=" + root + " disable opsagent.service",
	}
	for i := range got {
		got[i] = strings.TrimSpace(got[i])
	}
	if !slices.Equal(got, want) {
		t.Errorf("systemctl ran with\n%q\nwant\n%q", got, want)
	}
}

// Links planted in a root: install refuses a symlinked state directory
// by name, and the agent refuses a symlinked lock file, writing nothing
// through either.
func TestPlantedLinksRefused(t *testing.T) {
	outside := t.TempDir()
	victim := filepath.Join(outside, "victim")
	if err := os.WriteFile(victim, []byte("precious\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	st0, _ := os.Stat(outside)
	unchanged := func() {
		t.Helper()
		st, _ := os.Stat(outside)
		entries, _ := os.ReadDir(outside)
		if data, _ := os.ReadFile(victim); string(data) != "precious\n" || len(entries) != 1 || st.Mode() != st0.Mode() {
			t.Errorf("written outside the root: %q, %d entries, mode %04o", data, len(entries), st.Mode().Perm())
		}
	}

	root := t.TempDir()
	state := filepath.Join(root, "var/lib/visualops/opsagent")
	if err := os.MkdirAll(filepath.Dir(state), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, state); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary, installArgs(root)...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), state+" is a symbolic link") {
		t.Errorf("install with a symlinked state directory: %v\n%s", err, out)
	}
	unchanged()

	root = t.TempDir()
	stopAgentsBelow(t, root)
	if out, err := exec.Command(binary, installArgs(root)...).CombinedOutput(); err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	lock := filepath.Join(root, "var/lib/visualops/opsagent/lock")
	if err := os.Symlink(victim, lock); err != nil {
		t.Fatal(err)
	}
	// An agent that took the lock through the link would run on: bound it.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err = exec.CommandContext(ctx, binary, "--root", root, "run").CombinedOutput()
	if err == nil || !strings.Contains(string(out), lock+" is a symbolic link") {
		t.Errorf("run with a symlinked lock: %v\n%s", err, out)
	}
	unchanged()
}
