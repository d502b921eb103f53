package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/pyindex"
)

// TestVirtualenv makes environments with the real python3 -m venv of a
// Debian 12 root and installs requirements with their real pip from a
// wheel index the test serves on loopback.
func TestVirtualenv(t *testing.T) {
	t.Parallel()
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	ix := pyindex.New(t, pyindex.Dist{Name: "opsdemo", Version: "1.0"}, pyindex.Dist{Name: "opsdemo", Version: "2.0"})
	ix.Use(t, rig.root)
	const mod = "common.virtualenv"
	quiet := []string{"python3", "python", "pip", "apt-get", "dpkg"}
	cfg := func(dir string) string {
		data, _ := os.ReadFile(filepath.Join(rig.root, dir, "pyvenv.cfg"))
		return string(data)
	}

	// Check mode: reported, nothing made.
	res := rig.apply(t, mod, `{"path": "/srv/venv"}`, true)
	if !res.OK || !res.Changed || res.Comment != "Virtualenv /srv/venv would be updated: created with python3 (system site packages)" {
		t.Errorf("check mode: %+v", res)
	}
	if _, err := os.Lstat(filepath.Join(rig.root, "srv/venv")); !os.IsNotExist(err) {
		t.Fatalf("check mode made the environment: %v", err)
	}

	// Made with the system's python3 (python3-venv installed first),
	// with the system site packages by default (module.json).
	first := rig.converges(t, mod, `{"path": "/srv/venv"}`, quiet...)
	if !strings.Contains(first.Comment, "python3-venv installed (prerequisite)") || !strings.Contains(first.Comment, "created with python3 (system site packages)") {
		t.Errorf("first round: %q", first.Comment)
	}
	if !strings.Contains(cfg("srv/venv"), "include-system-site-packages = true") {
		t.Errorf("pyvenv.cfg: %s", cfg("srv/venv"))
	}
	if out := shInRoot(t, rig.root, "/srv/venv/bin/python -c 'import sys; print(sys.prefix)'"); out != "/srv/venv" {
		t.Errorf("the environment's python: %q", out)
	}

	// system-site-packages false: the setting changes, nothing runs.
	mark := rig.runs.Mark()
	res = rig.converges(t, mod, `{"path": "/srv/venv", "system-site-packages": false}`, quiet...)
	if !strings.Contains(res.Comment, "system site packages disabled") {
		t.Errorf("system-site-packages false: %q", res.Comment)
	}
	if ran := rig.runs.Since(mark); len(ran) != 0 {
		t.Errorf("changing system-site-packages ran %v", ran)
	}
	if !strings.Contains(cfg("srv/venv"), "include-system-site-packages = false") {
		t.Errorf("pyvenv.cfg: %s", cfg("srv/venv"))
	}

	// requirements-file: installed once, then again only when it changes.
	req := filepath.Join(rig.root, "srv/req.txt")
	if err := os.WriteFile(req, []byte("opsdemo==1.0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	withReq := `{"path": "/srv/venv", "system-site-packages": false, "requirements-file": "/srv/req.txt"}`
	pipRuns := func(mark int) int {
		return len(rig.runs.ranWith(mark, "python", "install", "--requirement", "/srv/req.txt"))
	}
	mark = rig.runs.Mark()
	res = rig.converges(t, mod, withReq, quiet...)
	if !strings.Contains(res.Comment, "requirements of /srv/req.txt installed") || pipRuns(mark) != 1 {
		t.Errorf("requirements: %q, %d pip runs (want 1)", res.Comment, pipRuns(mark))
	}
	venvSite := filepath.Join(rig.root, "srv/venv/lib/python3.11/site-packages")
	if _, err := os.Stat(filepath.Join(venvSite, "opsdemo-1.0.dist-info")); err != nil {
		t.Errorf("opsdemo 1.0 in the environment: %v", err)
	}
	if err := os.WriteFile(req, []byte("opsdemo==2.0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := rig.apply(t, mod, withReq, true); !res.OK || !res.Changed || !strings.Contains(res.Comment, "would be updated: requirements of /srv/req.txt installed") {
		t.Errorf("check mode with changed requirements: %+v", res)
	}
	mark = rig.runs.Mark()
	rig.converges(t, mod, withReq, quiet...)
	if n := pipRuns(mark); n != 1 {
		t.Errorf("changed requirements: %d pip runs, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(venvSite, "opsdemo-2.0.dist-info")); err != nil {
		t.Errorf("opsdemo 2.0 in the environment: %v", err)
	}

	// extra-search-dir: pip finds wheels there (the index has none of
	// opslocal).
	pyindex.WriteWheel(t, filepath.Join(rig.root, "srv/wheels"), pyindex.Dist{Name: "opslocal", Version: "1.0"})
	if err := os.WriteFile(filepath.Join(rig.root, "srv/req2.txt"), []byte("opslocal==1.0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rig.converges(t, mod, `{"path": "/srv/venv2", "system-site-packages": "false", "requirements-file": "/srv/req2.txt", "extra-search-dir": ["/srv/wheels"]}`, quiet...)
	if _, err := os.Stat(filepath.Join(rig.root, "srv/venv2/lib/python3.11/site-packages/opslocal-1.0.dist-info")); err != nil {
		t.Errorf("opslocal from extra-search-dir: %v", err)
	}

	// The distribution's python3 moved to another minor version (as an
	// upgrade to the next release does; here the environment says it was
	// made with 3.10): rebuilt, requirements again.
	cfgPath := filepath.Join(rig.root, "srv/venv2/pyvenv.cfg")
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(cfg("srv/venv2"), "version = 3.11.", "version = 3.10.", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	res = rig.converges(t, mod, `{"path": "/srv/venv2", "system-site-packages": "false", "requirements-file": "/srv/req2.txt", "extra-search-dir": ["/srv/wheels"]}`, quiet...)
	if !strings.Contains(res.Comment, "rebuilt (it was made with Python 3.10, its interpreter is now 3.11) with python3") || !strings.Contains(res.Comment, "requirements of /srv/req2.txt installed") {
		t.Errorf("after a Python upgrade: %q", res.Comment)
	}
	if !strings.Contains(cfg("srv/venv2"), "version = 3.11.") {
		t.Errorf("pyvenv.cfg after the rebuild: %s", cfg("srv/venv2"))
	}

	// The interpreter is removed (the distribution's Python goes away):
	// the environment is rebuilt with the Python now there, and the
	// requirements go into it again.
	shInRoot(t, rig.root, "DEBIAN_FRONTEND=noninteractive apt-get -q -y remove python3.11-minimal >/dev/null")
	if _, err := os.Stat(filepath.Join(rig.root, "usr/bin/python3.11")); !os.IsNotExist(err) {
		t.Fatalf("the interpreter is still there: %v", err)
	}
	mark = rig.runs.Mark()
	res = rig.converges(t, mod, withReq, quiet...)
	if !strings.Contains(res.Comment, "python3-venv installed (prerequisite)") || !strings.Contains(res.Comment, "rebuilt (its interpreter is gone) with python3") || !strings.Contains(res.Comment, "requirements of /srv/req.txt installed") {
		t.Errorf("after the interpreter was removed: %q", res.Comment)
	}
	if n := pipRuns(mark); n != 1 {
		t.Errorf("requirements after the rebuild: %d pip runs, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(venvSite, "opsdemo-2.0.dist-info")); err != nil {
		t.Errorf("opsdemo 2.0 in the rebuilt environment: %v", err)
	}

	// Bad input: one line naming the thing.
	res = rig.apply(t, mod, `{"path": "/srv/venv3", "python-bin": "/usr/bin/python2.6"}`, false)
	if res.OK || res.Comment != "Virtualenv /srv/venv3: python-bin /usr/bin/python2.6 is not installed (install it first)" {
		t.Errorf("missing python-bin: %+v", res)
	}
	res = rig.apply(t, mod, `{"path": "/srv/venv", "system-site-packages": false, "requirements-file": "/srv/nope.txt"}`, false)
	if res.OK || !strings.Contains(res.Comment, "requirements-file /srv/nope.txt does not exist") {
		t.Errorf("missing requirements-file: %+v", res)
	}
}

// TestVirtualenvPython2 covers a Python 2 python-bin, which Debian 12
// cannot install: a stand-in interpreter and virtualenv record what the
// module runs (venv has no Python 2; the virtualenv tool makes those).
func TestVirtualenvPython2(t *testing.T) {
	t.Parallel()
	rig := newDebianRig(t)
	write := func(p, body string) {
		if err := os.WriteFile(filepath.Join(rig.root, p), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write("usr/local/bin/python2.7", "#!/bin/sh\n# stands in for Python 2.7: answers the version probe\necho 2.7\n")
	write("usr/local/bin/virtualenv", `#!/bin/sh
echo "$@" >> /tmp/virtualenv.calls
for last; do :; done
mkdir -p "$last/bin"
ln -sf "$(command -v "$2")" "$last/bin/python"
`)
	param := `{"path": "/srv/py2", "python-bin": "python2.7", "system-site-packages": false, "extra-search-dir": ["/srv/wheels", "/srv/more"]}`
	res := rig.converges(t, "common.virtualenv", param, "virtualenv", "python2.7")
	if res.Comment != "Virtualenv /srv/py2 updated: created with python2.7" {
		t.Errorf("comment: %q", res.Comment)
	}
	calls, _ := os.ReadFile(filepath.Join(rig.root, "tmp/virtualenv.calls"))
	if string(calls) != "--python python2.7 --extra-search-dir /srv/wheels --extra-search-dir /srv/more -- /srv/py2\n" {
		t.Errorf("virtualenv ran with %q", calls)
	}

	// Another python-bin: the environment is rebuilt with it (--clear,
	// which deletes the directory's content), but not over files that
	// are not the environment's.
	write("usr/local/bin/python2.6", "#!/bin/sh\necho 2.6\n")
	write("srv/py2/app.py", "print('mine')\n")
	other := `{"path": "/srv/py2", "python-bin": "python2.6", "system-site-packages": false}`
	res = rig.apply(t, "common.virtualenv", other, false)
	if res.OK || res.Comment != "Virtualenv /srv/py2: must be rebuilt (its interpreter /usr/local/bin/python2.7 is not python-bin python2.6), but /srv/py2 holds other files (app.py), which rebuilding would delete: move them away, or remove the directory" {
		t.Errorf("rebuild over a file of the user's: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "srv/py2/app.py")); err != nil {
		t.Errorf("app.py: %v", err)
	}
	if err := os.Remove(filepath.Join(rig.root, "srv/py2/app.py")); err != nil {
		t.Fatal(err)
	}
	res = rig.converges(t, "common.virtualenv", other, "virtualenv", "python2.6")
	if res.Comment != "Virtualenv /srv/py2 updated: rebuilt (its interpreter /usr/local/bin/python2.7 is not python-bin python2.6) with python2.6" {
		t.Errorf("rebuilt: %q", res.Comment)
	}
	calls, _ = os.ReadFile(filepath.Join(rig.root, "tmp/virtualenv.calls"))
	if !strings.HasSuffix(string(calls), "\n--python python2.6 --clear -- /srv/py2\n") {
		t.Errorf("virtualenv ran with %q", calls)
	}

	res = rig.apply(t, "common.virtualenv", `{"path": "/usr/local/"}`, false)
	if res.OK || !strings.Contains(res.Comment, "parameter path: /usr/local is a system directory") {
		t.Errorf("path /usr/local: %+v", res)
	}
}
