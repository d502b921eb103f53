package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/npmreg"
)

func npmState(name, value, dir string) string {
	s := `{"name": [{"key": "` + name + `", "value": "` + value + `"}]`
	if dir != "" {
		s += `, "path": "` + dir + `"`
	}
	return s + "}"
}

// installedVersion reads node_modules/NAME/package.json's version.
func npmInstalled(t *testing.T, modules string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(modules, "package.json"))
	if err != nil {
		return ""
	}
	_, after, _ := strings.Cut(string(data), `"version": "`)
	v, _, _ := strings.Cut(after, `"`)
	return v
}

// TestNpmPackage drives the real npm of a Debian 12 root against a
// registry the test serves on loopback, globally and in a project.
func TestNpmPackage(t *testing.T) {
	t.Parallel()
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	reg := npmreg.New(t,
		npmreg.Package{Name: "opsnpm", Version: "1.0.0", Bin: "opsnpm"},
		npmreg.Package{Name: "opsnpm", Version: "2.0.0", Bin: "opsnpm"},
	)
	reg.Use(t, rig.root)
	const mod = "common.npm.package"
	global := filepath.Join(rig.root, "usr/local/lib/node_modules/opsnpm")
	quiet := []string{"npm", "node", "nodejs", "apt-get", "dpkg"}

	// The prerequisite (Debian's npm), then a pinned version, globally.
	first := rig.converges(t, mod, npmState("opsnpm", "1.0.0", ""), quiet...)
	if !strings.Contains(first.Comment, "npm installed (prerequisite)") || !strings.Contains(first.Comment, "opsnpm 1.0.0 installed") {
		t.Errorf("first round: %q", first.Comment)
	}
	if v := npmInstalled(t, global); v != "1.0.0" {
		t.Errorf("global package.json version %q", v)
	}
	if out := shInRoot(t, rig.root, "opsnpm"); out != "1.0.0" {
		t.Errorf("opsnpm: %q", out)
	}
	// Where the module reads from is where npm says it installs.
	if out := shInRoot(t, rig.root, "npm prefix --global"); out != "/usr/local" {
		t.Errorf("npm prefix --global: %q", out)
	}

	if res := rig.converges(t, mod, npmState("opsnpm", "2.0.0", ""), quiet...); !strings.Contains(res.Comment, "opsnpm 2.0.0 installed (was 1.0.0)") {
		t.Errorf("upgrade: %q", res.Comment)
	}
	if res := rig.converges(t, mod, npmState("opsnpm", "1.0.0", ""), quiet...); !strings.Contains(res.Comment, "opsnpm 1.0.0 installed (was 2.0.0)") {
		t.Errorf("downgrade: %q", res.Comment)
	}

	// latest: the registry is asked (one npm view), nothing installed
	// while the latest is in place.
	if res := rig.apply(t, mod, npmState("opsnpm", "latest", ""), false); !res.OK || !strings.Contains(res.Comment, "opsnpm 2.0.0 installed (was 1.0.0)") {
		t.Fatalf("latest: %+v", res)
	}
	mark := rig.runs.Mark()
	if res := rig.apply(t, mod, npmState("opsnpm", "latest", ""), false); !res.OK || res.Changed {
		t.Fatalf("latest again: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 1 || len(rig.runs.ranWith(mark, "npm", "view", "opsnpm", "version")) != 1 {
		t.Errorf("latest with the latest in place ran %v, want one npm view", ran)
	}
	reg.Add(t, npmreg.Package{Name: "opsnpm", Version: "3.0.0", Bin: "opsnpm"})
	if res := rig.apply(t, mod, npmState("opsnpm", "latest", ""), false); !res.OK || !strings.Contains(res.Comment, "opsnpm 3.0.0 installed (was 2.0.0)") {
		t.Fatalf("latest after 3.0.0 was published: %+v", res)
	}

	// removed.
	if res := rig.converges(t, mod, npmState("opsnpm", "removed", ""), quiet...); !strings.Contains(res.Comment, "opsnpm removed (was 3.0.0)") {
		t.Errorf("removed: %q", res.Comment)
	}
	if _, err := os.Stat(global); !os.IsNotExist(err) {
		t.Errorf("global package left: %v", err)
	}

	// In a project directory (created), recorded in its package.json.
	app := filepath.Join(rig.root, "srv/app")
	if res := rig.converges(t, mod, npmState("opsnpm", "1.0.0", "/srv/app"), quiet...); !strings.Contains(res.Comment, "npm package opsnpm in /srv/app updated: opsnpm 1.0.0 installed") {
		t.Errorf("in /srv/app: %q", res.Comment)
	}
	if v := npmInstalled(t, filepath.Join(app, "node_modules/opsnpm")); v != "1.0.0" {
		t.Errorf("/srv/app/node_modules/opsnpm at %q", v)
	}
	if data, _ := os.ReadFile(filepath.Join(app, "package.json")); !strings.Contains(string(data), `"opsnpm"`) {
		t.Errorf("/srv/app/package.json: %s", data)
	}
	if _, err := os.Stat(global); !os.IsNotExist(err) {
		t.Errorf("the project install went global: %v", err)
	}
	if res := rig.converges(t, mod, npmState("opsnpm", "removed", "/srv/app"), quiet...); !strings.Contains(res.Comment, "opsnpm removed (was 1.0.0)") {
		t.Errorf("removed from /srv/app: %q", res.Comment)
	}

	// A version the registry does not have, and one npm would read as a
	// range: clear failures, nothing changed.
	res := rig.apply(t, mod, npmState("opsnpm", "9.9.9", ""), false)
	if res.OK || !strings.Contains(res.Comment, "opsnpm@9.9.9") || !strings.Contains(res.Comment, "npmrc") {
		t.Errorf("missing version: %+v", res)
	}
	res = rig.apply(t, mod, npmState("opsnpm", "1.2", ""), false)
	if res.OK || !strings.Contains(res.Comment, `parameter name: opsnpm: version "1.2" is not an exact version`) {
		t.Errorf("range as a version: %+v", res)
	}

	// npm's configuration moves the global prefix: the module follows
	// (what it knew of the prefix is kept only while npmrc is unchanged).
	rig.converges(t, mod, npmState("opsnpm", "2.0.0", ""), quiet...)
	f, err := os.OpenFile(filepath.Join(rig.root, "etc/npmrc"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("prefix=/opt/node\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if res := rig.converges(t, mod, npmState("opsnpm", "2.0.0", ""), quiet...); !strings.Contains(res.Comment, "opsnpm 2.0.0 installed") {
		t.Errorf("after the prefix moved: %q", res.Comment)
	}
	if v := npmInstalled(t, filepath.Join(rig.root, "opt/node/lib/node_modules/opsnpm")); v != "2.0.0" {
		t.Errorf("/opt/node/lib/node_modules/opsnpm at %q", v)
	}
}
