package system_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

func newHost(t *testing.T, root string) *system.Host {
	t.Helper()
	r, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	return system.New(system.Options{Root: r})
}

// TestDebianRoot runs the system layer against a real Debian 12 root:
// detection, a tool run chrooted into it (never the host's), and a
// prerequisite installed from a local repository with apt-get.
func TestDebianRoot(t *testing.T) {
	root := debroot.New(t)
	h := newHost(t, root)
	d, err := h.Distro()
	if err != nil {
		t.Fatal(err)
	}
	if d.ID != "debian" || d.VersionID != "12" || d.Family() != system.FamilyDebian {
		t.Fatalf("distro %+v", d)
	}
	info := h.Info()
	if info.PackageManager != "apt" || info.Init != system.InitSysV || !info.Chroot {
		t.Fatalf("info %+v", info)
	}

	// A tool runs chrooted: it sees the root's files, not the host's.
	marker := filepath.Join(root, "etc", "opsagent-marker")
	if err := os.WriteFile(marker, []byte("inside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := h.Check(context.Background(), system.Cmd{Tool: "cat", Args: []string{"/etc/opsagent-marker"}})
	if err != nil || res.Output != "inside\n" {
		t.Fatalf("cat in the root: %q %v", res.Output, err)
	}
	var missing *system.ToolMissingError
	if _, err := h.Run(context.Background(), system.Cmd{Tool: "crontab"}); !errors.As(err, &missing) {
		t.Fatalf("crontab in a minbase root: %v, want ToolMissingError", err)
	}

	apt, err := h.Packages()
	if err != nil {
		t.Fatal(err)
	}
	have, err := apt.Installed(context.Background(), "bash", "cron")
	if err != nil || have["bash"] == "" || have["cron"] != "" {
		t.Fatalf("installed: %v %v", have, err)
	}

	// cron comes from a local repository holding the cached extras; the
	// index is fetched because it was never fetched (stale), once.
	requests := debroot.UseExtras(t, root)
	pkg, err := h.EnsureTool(context.Background(), system.Prerequisite{Tool: "crontab", Packages: map[system.Family]string{system.FamilyDebian: "cron"}})
	if err != nil || pkg != "cron" {
		t.Fatalf("EnsureTool crontab: %q %v", pkg, err)
	}
	if !h.HasTool("crontab") {
		t.Fatal("crontab still missing")
	}
	before := requests.Load()
	pkg, err = h.EnsureTool(context.Background(), system.Prerequisite{Tool: "crontab", Packages: map[system.Family]string{system.FamilyDebian: "cron"}})
	if err != nil || pkg != "" || requests.Load() != before {
		t.Fatalf("second EnsureTool: %q %v, %d requests", pkg, err, requests.Load()-before)
	}
	// Nothing of this reached the host.
	if _, err := os.Stat("/etc/opsagent-marker"); err == nil {
		t.Fatal("marker on the host")
	}

	_, err = apt.EnsureInstalled(context.Background(), "no-such-package-xyz")
	if err == nil || !strings.Contains(err.Error(), "no repository offers no-such-package-xyz") {
		t.Fatalf("unknown package: %v", err)
	}
}

// TestToolsBelowARootDoNotSeeTheMachinesSettings: a tool chrooted into a
// root gets the root's HOME and no setting of the machine running the
// agent (a PIP_INDEX_URL there is not the instance's), proxies aside.
func TestToolsBelowARootDoNotSeeTheMachinesSettings(t *testing.T) {
	t.Setenv("PIP_INDEX_URL", "http://machine.invalid/simple")
	t.Setenv("HOME", "/home/machine-user")
	t.Setenv("https_proxy", "http://proxy.invalid:3128")
	h := newHost(t, debroot.New(t))
	res, err := h.Check(context.Background(), system.Cmd{Tool: "env"})
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"PIP_INDEX_URL=", "HOME=/home/machine-user"} {
		if strings.Contains(res.Output, bad) {
			t.Errorf("the tool saw %s…:\n%s", bad, res.Output)
		}
	}
	for _, want := range []string{"HOME=/root", "https_proxy=http://proxy.invalid:3128", "LC_ALL=C"} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("the tool did not see %s:\n%s", want, res.Output)
		}
	}
}
