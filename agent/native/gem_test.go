package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/gemsource"
)

func gemState(name, value string) string {
	return `{"name": [{"key": "` + name + `", "value": "` + value + `"}]}`
}

// TestGemPackage drives the real gem of a Debian 12 root against a gem
// source the test builds with that gem and serves on loopback.
func TestGemPackage(t *testing.T) {
	t.Parallel()
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	const mod = "common.gem.package"
	quiet := []string{"gem", "ruby", "apt-get", "dpkg"}
	specs := filepath.Join(rig.root, "var/lib/gems/3.1.0/specifications")

	// Check mode without ruby: reported, nothing run.
	mark := rig.runs.Mark()
	if res := rig.apply(t, mod, `{"name": ["json"]}`, true); !res.OK || !res.Changed || res.Comment != "gem json would be updated: ruby installed (prerequisite), json installed" {
		t.Errorf("check mode without ruby: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 0 {
		t.Errorf("check mode ran %v", ran)
	}
	// The prerequisite: ruby, whose default gems include json, so that
	// nothing else is installed.
	if res := rig.converges(t, mod, `{"name": ["json"]}`, quiet...); res.Comment != "gem json updated: ruby installed (prerequisite)" {
		t.Errorf("first round: %q", res.Comment)
	}

	src := gemsource.New(t, rig.root,
		gemsource.Gem{Name: "opsgem", Version: "1.0.0", Executable: "opsgem"},
		gemsource.Gem{Name: "opsgem", Version: "2.0.0", Executable: "opsgem"},
	)
	src.Use(t, rig.root)

	if res := rig.converges(t, mod, gemState("opsgem", "1.0.0"), quiet...); res.Comment != "gem opsgem updated: opsgem 1.0.0 installed" {
		t.Errorf("pinned: %q", res.Comment)
	}
	if out := shInRoot(t, rig.root, `opsgem && ruby -e 'require "opsgem"; puts Opsagent::OPSGEM_VERSION'`); out != "1.0.0\n1.0.0" {
		t.Errorf("opsgem and require: %q", out)
	}
	// Another version goes beside it, as gem keeps versions.
	if res := rig.converges(t, mod, gemState("opsgem", "2.0"), quiet...); res.Comment != "gem opsgem updated: opsgem 2.0.0 installed (was 1.0.0)" {
		t.Errorf("second version: %q", res.Comment)
	}
	for _, v := range []string{"1.0.0", "2.0.0"} {
		if _, err := os.Stat(filepath.Join(specs, "opsgem-"+v+".gemspec")); err != nil {
			t.Errorf("opsgem %s: %v", v, err)
		}
	}

	// latest: the sources are asked (one gem list), nothing installed
	// while the newest is there.
	mark = rig.runs.Mark()
	if res := rig.apply(t, mod, gemState("opsgem", "latest"), false); !res.OK || res.Changed {
		t.Fatalf("latest with 2.0.0 installed: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 1 || len(rig.runs.ranWith(mark, "gem", "list", "--remote", "opsgem")) != 1 {
		t.Errorf("latest ran %v, want one gem list --remote", ran)
	}
	src.Add(t, gemsource.Gem{Name: "opsgem", Version: "3.0.0", Executable: "opsgem"})
	if res := rig.apply(t, mod, gemState("opsgem", "latest"), false); !res.OK || res.Comment != "gem opsgem updated: opsgem 3.0.0 installed (was 1.0.0, 2.0.0)" {
		t.Fatalf("latest after 3.0.0 was published: %+v", res)
	}

	// removed: every version and the command.
	if res := rig.converges(t, mod, gemState("opsgem", "removed"), quiet...); res.Comment != "gem opsgem updated: opsgem removed (was 1.0.0, 2.0.0, 3.0.0)" {
		t.Errorf("removed: %q", res.Comment)
	}
	if left, _ := filepath.Glob(filepath.Join(specs, "opsgem-*")); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "usr/local/bin/opsgem")); !os.IsNotExist(err) {
		t.Errorf("the command is left: %v", err)
	}

	// Gems gem cannot remove: one of ruby's default gems, one of a
	// Debian package. Clear failures, nothing touched.
	res := rig.apply(t, mod, gemState("json", "removed"), false)
	if res.OK || !strings.Contains(res.Comment, "json 2.6.1 cannot be removed: it is a default gem of ruby") {
		t.Errorf("removing json: %+v", res)
	}
	res = rig.apply(t, mod, gemState("webrick", "removed"), false)
	if res.OK || !strings.Contains(res.Comment, "/usr/share/rubygems-integration/all/specifications/webrick-1.8.1.gemspec") || !strings.Contains(res.Comment, "linux.apt.package") {
		t.Errorf("removing webrick: %+v", res)
	}

	// A version no source has: one line naming it.
	res = rig.apply(t, mod, gemState("opsgem", "9.9"), false)
	if res.OK || !strings.Contains(res.Comment, "Could not find a valid gem 'opsgem' (= 9.9)") || !strings.Contains(res.Comment, "gemrc") {
		t.Errorf("missing version: %+v", res)
	}
}
