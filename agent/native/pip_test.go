package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/pyindex"
)

// pipState is a common.pip.package parameter for one package.
func pipState(name, value string) string {
	return `{"name": [{"key": "` + name + `", "value": "` + value + `"}]}`
}

// TestPipPackage drives the real pip of a Debian 12 root (PEP 668:
// EXTERNALLY-MANAGED) against a wheel index the test serves on loopback.
func TestPipPackage(t *testing.T) {
	t.Parallel()
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	ix := pyindex.New(t,
		pyindex.Dist{Name: "opsdemo", Version: "1.0", Script: "opsdemo"},
		pyindex.Dist{Name: "opsdemo", Version: "2.0", Script: "opsdemo"},
	)
	ix.Use(t, rig.root)
	const site = "usr/local/lib/python3.11/dist-packages"
	const mod = "common.pip.package"
	quiet := []string{"python3", "pip3", "apt-get", "dpkg"}

	// Check mode on a root without pip: what would happen, nothing done.
	mark := rig.runs.Mark()
	check := rig.apply(t, mod, pipState("opsdemo", "1.0"), true)
	if !check.OK || !check.Changed || !strings.Contains(check.Comment, "python3-pip would be installed") && !strings.Contains(check.Comment, "python3-pip installed (prerequisite)") {
		t.Fatalf("check mode without pip: %+v", check)
	}
	if ran := rig.runs.Since(mark); len(ran) > 0 {
		t.Fatalf("check mode ran %v", ran)
	}

	// The prerequisite, then a pinned version, system-wide under PEP 668.
	mark = rig.runs.Mark()
	first := rig.converges(t, mod, pipState("opsdemo", "1.0"), quiet...)
	if !strings.Contains(first.Comment, "python3-pip installed (prerequisite)") || !strings.Contains(first.Comment, "opsdemo 1.0 installed") {
		t.Errorf("first round: %q", first.Comment)
	}
	if ran := rig.runs.ranWith(mark, "python3", "install", "--break-system-packages", "opsdemo==1.0"); len(ran) != 1 {
		t.Errorf("want one pip install with --break-system-packages (EXTERNALLY-MANAGED is there), ran %v", rig.runs.Since(mark))
	}
	if _, err := os.Stat(filepath.Join(rig.root, site, "opsdemo-1.0.dist-info")); err != nil {
		t.Errorf("not installed under /usr/local: %v", err)
	}
	// As a user expects: the command and the import work for everyone.
	if out := shInRoot(t, rig.root, "opsdemo && cd / && python3 -c 'import opsdemo; print(opsdemo.VERSION)'"); out != "1.0\n1.0" {
		t.Errorf("opsdemo and import opsdemo: %q", out)
	}

	// Up, then down.
	if res := rig.converges(t, mod, pipState("opsdemo", "2.0"), quiet...); !strings.Contains(res.Comment, "opsdemo 2.0 installed (was 1.0)") {
		t.Errorf("upgrade: %q", res.Comment)
	}
	if res := rig.converges(t, mod, pipState("opsdemo", "1.0.0"), quiet...); !strings.Contains(res.Comment, "opsdemo 1.0 installed (was 2.0)") {
		t.Errorf("downgrade (1.0.0 is 1.0): %q", res.Comment)
	}
	if out := shInRoot(t, rig.root, "opsdemo"); out != "1.0" {
		t.Errorf("opsdemo after the downgrade: %q", out)
	}

	// latest: the index is asked every round (the documented cost), and
	// nothing is installed while the newest is in place.
	res := rig.apply(t, mod, pipState("opsdemo", "latest"), false)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "opsdemo 2.0 installed (was 1.0)") {
		t.Fatalf("latest: %+v", res)
	}
	mark = rig.runs.Mark()
	if res := rig.apply(t, mod, pipState("opsdemo", "latest"), false); !res.OK || res.Changed {
		t.Fatalf("latest again: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 1 || len(rig.runs.ranWith(mark, "python3", "index", "versions", "opsdemo")) != 1 {
		t.Errorf("latest with the newest in place ran %v, want one pip index versions", ran)
	}
	ix.Add(t, pyindex.Dist{Name: "opsdemo", Version: "3.0", Script: "opsdemo"})
	if res := rig.apply(t, mod, pipState("opsdemo", "latest"), true); !res.OK || !res.Changed || !strings.Contains(res.Comment, "opsdemo 3.0 installed (was 2.0)") {
		t.Fatalf("latest in check mode after 3.0 was published: %+v", res)
	}
	if res := rig.apply(t, mod, pipState("opsdemo", "latest"), false); !res.OK || !strings.Contains(res.Comment, "opsdemo 3.0 installed (was 2.0)") {
		t.Fatalf("latest after 3.0 was published: %+v", res)
	}

	// removed: files and command gone; then nothing to do.
	if res := rig.converges(t, mod, pipState("opsdemo", "removed"), quiet...); !strings.Contains(res.Comment, "opsdemo removed (was 3.0)") {
		t.Errorf("removed: %q", res.Comment)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "usr/local/bin/opsdemo")); !os.IsNotExist(err) {
		t.Errorf("console script left behind: %v", err)
	}
	// A bare name installs the newest.
	if res := rig.converges(t, mod, `{"name": [{"key": "OpsDemo"}]}`, quiet...); !strings.Contains(res.Comment, "OpsDemo 3.0 installed") {
		t.Errorf("bare name: %q", res.Comment)
	}

	// A package the distribution installed (wheel, from python3-wheel,
	// which python3-pip depends on): in place as it is, and not removed
	// with pip.
	mark = rig.runs.Mark()
	if res := rig.apply(t, mod, `{"name": ["wheel", "opsdemo"]}`, false); !res.OK || res.Changed || res.Comment != "pip packages wheel, opsdemo is already in the correct state" {
		t.Errorf("wheel from dpkg: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 0 {
		t.Errorf("a round with nothing to do ran %v", ran)
	}
	res = rig.apply(t, mod, pipState("wheel", "removed"), false)
	if res.OK || !strings.Contains(res.Comment, "wheel 0.38.4 cannot be removed") || !strings.Contains(res.Comment, "linux.apt.package") || !strings.Contains(res.Comment, "/usr/lib/python3/dist-packages/wheel-0.38.4.egg-info") {
		t.Errorf("removing the distribution's wheel: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "usr/lib/python3/dist-packages/wheel/__init__.py")); err != nil {
		t.Errorf("the distribution's wheel: %v", err)
	}

	// A version no index offers: one line naming it.
	res = rig.apply(t, mod, pipState("opsdemo", "9.9"), false)
	if res.OK || !strings.Contains(res.Comment, "opsdemo==9.9") || !strings.Contains(res.Comment, "pip.conf") {
		t.Errorf("missing version: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(rig.root, site, "opsdemo-3.0.dist-info")); err != nil {
		t.Errorf("a failed install lost the installed version: %v", err)
	}

	// Where the distribution does not mark its Python (RHEL, older
	// Ubuntu), pip runs without the PEP 668 override.
	if err := os.Remove(filepath.Join(rig.root, "usr/lib/python3.11/EXTERNALLY-MANAGED")); err != nil {
		t.Fatal(err)
	}
	mark = rig.runs.Mark()
	rig.converges(t, mod, pipState("opsdemo", "2.0"), quiet...)
	if ran := rig.runs.ranWith(mark, "python3", "install", "opsdemo==2.0"); len(ran) != 1 || strings.Contains(ran[0], "--break-system-packages") {
		t.Errorf("without EXTERNALLY-MANAGED: %v", ran)
	}
}
