package saltbootstrap

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/saltfork"
)

// isolated runs every command in a network namespace that holds only
// loopback (unshare -n), with stubs of the commands that would change the
// host (apt-get, yum, service) or reach the internet (wget, curl) first on
// the PATH: each records its arguments and fails.
type isolated struct {
	stubs string
	inner proc.Runner
}

func (r isolated) Run(ctx context.Context, c proc.Cmd) (proc.Result, error) {
	c.Args = append([]string{"-n", "--", "env", "PATH=" + r.stubs + ":/usr/bin:/bin", c.Path}, c.Args...)
	c.Path = "unshare"
	return r.inner.Run(ctx, c)
}

func stubCommands(t *testing.T) (dir, calls string) {
	t.Helper()
	dir = t.TempDir()
	calls = filepath.Join(dir, "calls.log")
	for _, name := range []string{"apt-get", "yum", "service", "wget", "curl"} {
		script := "#!/bin/sh\necho \"" + name + " $*\" >> " + calls + "\nexit 1\n"
		if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir, calls
}

// TestForkBootstrapScript runs the real fork's scripts/bootstrap.sh with a
// config the agent wrote, in a network namespace with only loopback: it
// finds every value it greps (package_path, root, name, conf_path,
// base_remote, platform), copies the fork's libraries into the
// virtualenv's site-packages and Mesos files into conf_path, and its
// failing downloads end as a warning, not an error (as in 2014).
func TestForkBootstrapScript(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("unshare -n needs root")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare is not installed")
	}
	if out, err := exec.Command("unshare", "-n", "true").CombinedOutput(); err != nil {
		t.Skipf("cannot make a network namespace here: %v %s", err, out)
	}
	gs := gitserver.New(t)
	url := gs.FromBundle("salt", filepath.Join(saltfork.Root(t), "testdata", "fixtures", "salt-fork.bundle"))
	base := t.TempDir()
	site := filepath.Join(base, "env", "lib", "python2.7", "site-packages")
	stateDir := filepath.Join(base, "state")
	for _, d := range []string{site, stateDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The config as the agent writes it, every path inside the test's
	// directory (the script works on host paths).
	confPath := filepath.Join(base, "opsagent.conf")
	owner := config.NewOwner(config.New(confPath))
	if _, err := owner.Update(func(c *config.Config) error {
		c.Userdata.WSURI, c.Userdata.AppID = "ws://127.0.0.1:1/agent/", "app-boot"
		c.Userdata.BaseRemote = "http://127.0.0.1:9/opsagent"
		c.Global.PackagePath, c.Global.StateDir, c.Global.Platform = site, stateDir, "APT"
		c.Module.ReposDir, c.Module.RepoName = filepath.Join(base, "bootstrap"), "salt"
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	stubs, calls := stubCommands(t)
	dir := filepath.Join(base, "bootstrap", "salt")
	f := New(Options{Dir: dir, StampFile: dir + ".state.json", ConfigPath: confPath, InterfaceVersion: "1.0",
		BootstrapScript: "scripts/bootstrap.sh", Runner: isolated{stubs: stubs, inner: proc.New()}})
	res, err := f.Ensure(context.Background(), url, saltfork.Tag, nil)
	if err != nil {
		t.Fatalf("a failing bootstrap.sh must not fail the checkout: %v", err)
	}
	t.Logf("warning: %s", res.Warning)
	if !strings.HasPrefix(res.Warning, "Can't bootstrap modules: scripts/bootstrap.sh failed") {
		t.Errorf("warning %q", res.Warning)
	}
	for _, lib := range []string{"docker", "requests", "six.py", "websocket.py", "mock.py"} {
		if _, err := os.Stat(filepath.Join(site, lib)); err != nil {
			t.Errorf("bootstrap.sh did not copy %s into package_path: %v", lib, err)
		}
	}
	if _, err := os.Stat(filepath.Join(stateDir, "mesos-apt")); err != nil {
		t.Errorf("bootstrap.sh did not copy mesos-apt into conf_path (platform APT): %v", err)
	}
	log, _ := os.ReadFile(calls)
	for _, want := range []string{"wget -nv http://127.0.0.1:9/opsagent/docker/", "wget -nv https://www.opscode.com/chef/install.sh"} {
		if !strings.Contains(string(log), want) {
			t.Errorf("stubbed calls lack %q (base_remote read from the config?):\n%s", want, log)
		}
	}
}
