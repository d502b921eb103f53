package virtualenv_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/visualops/opsagent/virtualenv"

	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/saltfork"
	"github.com/visualops/opsagent/virtualenv/venvtest"
)

// importProbe imports Salt's libraries the way the bridge finds them
// (site.addsitedir), and says where each came from.
const importProbe = `
import site, sys
site.addsitedir(sys.argv[1])
import yaml, jinja2, msgpack, markupsafe
for m in (yaml, jinja2, msgpack, markupsafe):
    print("lib " + m.__name__ + " " + m.__file__)
print("dump " + yaml.safe_dump({"a": 1}).strip())
print("render " + jinja2.Template("{{ x }}!").render(x="hi"))
print("msgpack %r" % (msgpack.unpackb(msgpack.packb([1, 2])),))
`

func lino(t *testing.T, p string) uint64 {
	t.Helper()
	st, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func TestPython2EnvWithTheFixtureLibs(t *testing.T) {
	py := venvtest.Python2(t)
	dir := filepath.Join(t.TempDir(), "opt", "visualops", "env")
	ctx := context.Background()
	env, err := virtualenv.Ensure(ctx, virtualenv.Options{Dir: dir, Python: py})
	if err != nil {
		t.Fatal(err)
	}
	if !env.Created || !strings.HasPrefix(env.Version, "2.7.") || env.Major() != 2 {
		t.Fatalf("create: %+v", env)
	}
	if rel, err := filepath.Rel(dir, env.SitePackages); err != nil || strings.HasPrefix(rel, "..") || filepath.Base(env.SitePackages) != "site-packages" {
		t.Fatalf("site-packages %q is not inside the environment %s", env.SitePackages, dir)
	}
	if env.Minimal {
		if target, err := os.Readlink(env.Python); err != nil || !filepath.IsAbs(target) {
			t.Fatalf("minimal env: bin/python should be a symlink to the interpreter: %q %v", target, err)
		}
	}
	if err := env.InstallFromWheelhouse(ctx, saltfork.Libs(t)); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(env.Python, "-c", importProbe, env.SitePackages).CombinedOutput()
	if err != nil {
		t.Fatalf("importing Salt's libraries: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "lib" && !strings.HasPrefix(f[2], env.SitePackages+string(filepath.Separator)) {
			t.Errorf("%s imported from %s, not from the environment", f[1], f[2])
		}
	}
	for _, want := range []string{"dump {a: 1}", "render hi!", "msgpack [1, 2]"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("libraries do not work: want %q in\n%s", want, out)
		}
	}
	// A second install replaces the copies, and a second Ensure keeps the
	// environment as it is.
	if err := env.InstallFromWheelhouse(ctx, saltfork.Libs(t)); err != nil {
		t.Fatalf("second install: %v", err)
	}
	before := lino(t, env.Python)
	again, err := virtualenv.Ensure(ctx, virtualenv.Options{Dir: dir, Python: py})
	if err != nil || again.Created || lino(t, again.Python) != before || again.SitePackages != env.SitePackages || again.Minimal != env.Minimal {
		t.Fatalf("a healthy environment was rebuilt: %+v %v", again, err)
	}
	if _, err := os.Stat(filepath.Join(again.SitePackages, "yaml", "__init__.py")); err != nil {
		t.Fatalf("re-Ensure lost the installed packages: %v", err)
	}
	// The states repository now needs Python 3: rebuilt with it.
	if _, err := exec.LookPath("python3"); err == nil {
		py3, err := virtualenv.Ensure(ctx, virtualenv.Options{Dir: dir, Python: "python3"})
		if err != nil || !py3.Created || !strings.HasPrefix(py3.Version, "3.") || py3.Minimal {
			t.Fatalf("rebuild with python3: %+v %v", py3, err)
		}
		if _, err := os.Stat(filepath.Join(dir, virtualenv.MinimalMarker)); err == nil {
			t.Error("the minimal environment's marker survived the rebuild")
		}
	}
}

func TestPythonForTheFork(t *testing.T) {
	repo := saltfork.Clone(t)
	v, err := virtualenv.SaltVersion(repo)
	if err != nil || v != [3]int{2014, 1, 0} {
		t.Fatalf("SaltVersion = %v, %v", v, err)
	}
	py, why, err := virtualenv.PythonFor(context.Background(), nil, repo, "")
	if err != nil {
		if strings.Contains(err.Error(), "not installed") {
			venvtest.Python2(t) // skips when the machine has none; else a bug
		}
		t.Fatal(err)
	}
	out, err := exec.Command(py, "-c", `import sys; print("%d.%d" % sys.version_info[:2])`).Output()
	if err != nil || strings.TrimSpace(string(out)) != "2.7" {
		t.Fatalf("PythonFor picked %s (%s): %s %v", py, why, out, err)
	}
	if !strings.Contains(why, "2014.1.0") {
		t.Errorf("why = %q", why)
	}
	if py, why, err := virtualenv.PythonFor(context.Background(), nil, repo, "/opt/python/bin/python2.7"); err != nil || py != "/opt/python/bin/python2.7" || !strings.Contains(why, "[salt] python") {
		t.Errorf("override: %s %q %v", py, why, err)
	}
}

func TestPythonForOtherRepos(t *testing.T) {
	newer := t.TempDir()
	os.MkdirAll(filepath.Join(newer, "sources", "salt"), 0o755)
	os.WriteFile(filepath.Join(newer, "sources", "salt", "version.py"), []byte("__saltstack_version__ = SaltStackVersion(2018, 3, 0, 0, 0)\n"), 0o644)
	if py, why, err := virtualenv.PythonFor(context.Background(), nil, newer, ""); err != nil || py != "python3" || !strings.Contains(why, "2018.3.0") {
		t.Errorf("Salt 2018.3: %s %q %v", py, why, err)
	}
	os.WriteFile(filepath.Join(newer, "sources", "salt", "version.py"), []byte("__version_info__ = (2017, 7, 8)\n"), 0o644)
	if v, err := virtualenv.SaltVersion(newer); err != nil || v != [3]int{2017, 7, 8} {
		t.Errorf("__version_info__ tuple: %v %v", v, err)
	}
	if py, why, err := virtualenv.PythonFor(context.Background(), nil, t.TempDir(), ""); err != nil || py != "python3" || !strings.Contains(why, "version.py") {
		t.Errorf("no Salt version: %s %q %v", py, why, err)
	}
	// No Python 2 anywhere: the error says what to do.
	none := filepath.Join(t.TempDir(), "python2.7")
	if py, tried := virtualenv.FindPython2For(context.Background(), proc.New(), []string{none, none}); py != "" || len(tried) != 1 {
		t.Fatalf("findPython2 = %q %v", py, tried)
	}
	err := virtualenv.Python2Missing("2014.1.0", fmt.Errorf("no Python 2.7 in %s", none))
	for _, want := range []string{"needs Python 2.7 (Salt 2014.1.0)", "not installed on this instance", "install python2.7", "[agent] engine = native", none} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

func TestSaltRequirementsMatchTheFixture(t *testing.T) {
	libs := saltfork.Libs(t)
	read := func(p string) string {
		data, err := os.ReadFile(filepath.Join(libs, p))
		if err != nil {
			t.Fatal(err)
		}
		return string(data)
	}
	want := map[string]string{
		"PyYAML":         regexp.MustCompile(`__version__ = '([^']+)'`).FindStringSubmatch(read("yaml/__init__.py"))[1],
		"Jinja2":         regexp.MustCompile(`__version__ = '([^']+)'`).FindStringSubmatch(read("jinja2/__init__.py"))[1],
		"msgpack-python": strings.Join(regexp.MustCompile(`\((\d+), (\d+), (\d+)\)`).FindStringSubmatch(read("msgpack/_version.py"))[1:], "."),
	}
	got := map[string]string{}
	for _, r := range virtualenv.SaltRequirements(2) {
		name, version, ok := strings.Cut(r, "==")
		if !ok {
			t.Errorf("%q is not pinned", r)
		}
		got[name] = version
	}
	for name, v := range want {
		if got[name] != v {
			t.Errorf("virtualenv.SaltRequirements(2) pins %s %q; the fixture holds %q", name, got[name], v)
		}
	}
	if _, ok := got["MarkupSafe"]; !ok {
		t.Error("MarkupSafe missing")
	}
	if len(virtualenv.SaltRequirements(3)) != 4 {
		t.Errorf("virtualenv.SaltRequirements(3) = %v", virtualenv.SaltRequirements(3))
	}
}
