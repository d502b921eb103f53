package native

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/testutil/aptrepo"
	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/rpmrepo"
)

// benchExecutor is an Executor on root (a host path).
func benchExecutor(b *testing.B, root string, ppa PPAEndpoints) *Executor {
	b.Helper()
	r, err := fsutil.NewRoot(root)
	if err != nil {
		b.Fatal(err)
	}
	return New(Options{Root: r, KillGrace: time.Second, PPA: ppa})
}

func benchApply(b *testing.B, e *Executor, module, param string) state.Result {
	b.Helper()
	return e.Execute(context.Background(), state.Request{RecipeVersion: 1, StateID: "bench", Module: module, Parameter: json.RawMessage(param)})
}

// benchNoChange times a state that finds everything in place: one
// sub-benchmark per state, so ns/op is the time per state.
func benchNoChange(b *testing.B, e *Executor, name, module, param string) {
	b.Helper()
	if res := benchApply(b, e, module, param); !res.OK {
		b.Fatalf("%s: setup round %+v", name, res)
	}
	b.Run(name, func(b *testing.B) {
		for b.Loop() {
			if res := benchApply(b, e, module, param); !res.OK || res.Changed {
				b.Fatalf("%s: %+v", name, res)
			}
		}
	})
}

// BenchmarkNoChangeRoundPackages times a round of the package and
// repository modules over a system where everything is in place (goal:
// under 50 ms per state; Salt 2014 loaded the package lists on every
// pkg state). Debian: dpkg's status file is read (cached while it does
// not change), latest asks apt-cache; RPM: rpm's database listed once
// and again only when its files change, latest asks dnf.
func BenchmarkNoChangeRoundPackages(b *testing.B) {
	b.Run("debian", func(b *testing.B) {
		root := debroot.New(b)
		repo := aptrepo.New(b)
		repo.Add(b, hellod1, hellod2, plugin)
		repo.Use(b, root)
		e := benchExecutor(b, root, PPAEndpoints{})
		benchNoChange(b, e, "linux.apt.repo", "linux.apt.repo", `{"name": "bench", "content": "deb [trusted=yes] `+repo.Serve(b)+` ./\n"}`)
		benchNoChange(b, e, "linux.apt.package-installed", "linux.apt.package", `{"name": [{"key": "hellod"}, {"key": "hellod-plugin"}]}`)
		benchNoChange(b, e, "linux.apt.package-version", "linux.apt.package", `{"name": [{"key": "hellod", "value": "2.0"}]}`)
		benchNoChange(b, e, "linux.apt.package-latest", "linux.apt.package", `{"name": [{"key": "hellod", "value": "latest"}]}`)
		benchNoChange(b, e, "linux.apt.package-removed", "linux.apt.package", `{"name": [{"key": "nothere", "value": "removed"}]}`)
	})
	b.Run("ubuntu", func(b *testing.B) {
		root := debroot.New(b)
		osr := "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\nUBUNTU_CODENAME=noble\n"
		_ = os.Remove(filepath.Join(root, "etc/os-release"))
		if err := os.WriteFile(filepath.Join(root, "etc/os-release"), []byte(osr), 0o644); err != nil {
			b.Fatal(err)
		}
		key := rpmrepo.NewKey(b, "Launchpad PPA for team <ppa@example.invalid>")
		lp := newLaunchpad(b, key.Fingerprint, key.Public)
		e := benchExecutor(b, root, PPAEndpoints{LaunchpadAPI: lp.srv.URL + "/api", Keyserver: lp.srv.URL})
		benchNoChange(b, e, "linux.apt.ppa", "linux.apt.ppa", `{"name": "team/tools"}`)
	})
	b.Run("rhel", func(b *testing.B) {
		root := rpmrepo.NewRoot(b)
		repo := rpmrepo.New(b)
		repo.Add(b, rhello1, rhello2)
		repo.Use(b, root, "test", false)
		key := rpmrepo.NewKey(b, "opsagent bench <bench@example.invalid>")
		if err := os.MkdirAll(filepath.Join(root, "tmp"), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "tmp/rpm.key"), key.Public, 0o644); err != nil {
			b.Fatal(err)
		}
		e := benchExecutor(b, root, PPAEndpoints{})
		benchNoChange(b, e, "linux.yum.repo", "linux.yum.repo", `{"name": "bench", "content": "[bench]\nname=bench\nbaseurl=file:///nonexistent\nenabled=0\n"}`)
		benchNoChange(b, e, "linux.rpm.key", "linux.rpm.key", `{"path": "/tmp/rpm.key"}`)
		benchNoChange(b, e, "linux.yum.package-installed", "linux.yum.package", `{"name": [{"key": "hellod"}]}`)
		benchNoChange(b, e, "linux.yum.package-latest", "linux.yum.package", `{"name": [{"key": "hellod", "value": "latest"}]}`)
	})
}

// BenchmarkAptInstallOverhead installs a package from a loopback
// repository through linux.apt.package and with `apt-get install`
// directly (both chrooted into the same Debian root, index already
// fetched), removing it between installs untimed, and reports both
// times and their ratio.
func BenchmarkAptInstallOverhead(b *testing.B) {
	root := debroot.New(b)
	repo := aptrepo.New(b)
	repo.Add(b, hellod1, hellod2)
	repo.Use(b, root)
	e := benchExecutor(b, root, PPAEndpoints{})
	chroot := func(args ...string) {
		b.Helper()
		cmd := exec.Command("chroot", append([]string{root}, args...)...)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C"}
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	chroot("apt-get", "-q", "update")
	param := `{"name": [{"key": "hellod"}]}`
	var module, direct time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		chroot("dpkg", "--purge", "hellod")
		b.StartTimer()
		start := time.Now()
		if res := benchApply(b, e, "linux.apt.package", param); !res.OK || !res.Changed {
			b.Fatalf("module: %+v", res)
		}
		module += time.Since(start)
		b.StopTimer()
		chroot("dpkg", "--purge", "hellod")
		b.StartTimer()
		start = time.Now()
		chroot("apt-get", "-y", "-q", "install", "hellod")
		direct += time.Since(start)
	}
	b.ReportMetric(float64(module.Nanoseconds())/float64(b.N), "module-ns/op")
	b.ReportMetric(float64(direct.Nanoseconds())/float64(b.N), "apt-get-ns/op")
	b.ReportMetric(float64(module)/float64(direct), "module/apt-get")
}
