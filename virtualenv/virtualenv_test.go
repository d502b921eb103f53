package virtualenv

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// wheelScript builds a pure-Python wheel with the standard library.
const wheelScript = `
import sys, zipfile, hashlib, base64
out = sys.argv[1]
files = {
  "hello_fixture/__init__.py": "GREETING = 'hello from the wheelhouse'\n",
  "hello_fixture-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-fixture\nVersion: 1.0\n",
  "hello_fixture-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: opsagent-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(out, "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data.encode()).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (name, digest, len(data)))
    record.append("hello_fixture-1.0.dist-info/RECORD,,")
    z.writestr("hello_fixture-1.0.dist-info/RECORD", "\n".join(record) + "\n")
`

func ino(t *testing.T, p string) uint64 {
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func TestCreateKeepRepairAndWheelhouse(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed")
	}
	dir := filepath.Join(t.TempDir(), "opt", "visualops", "env")
	ctx := context.Background()
	env, err := Ensure(ctx, Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if !env.Created || env.Version == "" || env.Minimal {
		t.Fatalf("create: %+v", env)
	}
	if !strings.HasPrefix(env.SitePackages, dir+string(filepath.Separator)) || !strings.HasSuffix(env.SitePackages, "site-packages") {
		t.Fatalf("site-packages %q is not the venv's", env.SitePackages)
	}
	if _, err := os.Stat(env.SitePackages); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "pyvenv.cfg")
	before := ino(t, cfg)
	again, err := Ensure(ctx, Options{Dir: dir})
	if err != nil || again.Created || ino(t, cfg) != before {
		t.Fatalf("a healthy virtualenv was rebuilt: %+v %v", again, err)
	}
	// Offline install from a wheelhouse the test builds.
	house := t.TempDir()
	if out, err := exec.Command("python3", "-c", wheelScript, filepath.Join(house, "hello_fixture-1.0-py3-none-any.whl")).CombinedOutput(); err != nil {
		t.Fatalf("building the wheel: %v %s", err, out)
	}
	req := filepath.Join(t.TempDir(), "requirements.txt")
	os.WriteFile(req, []byte("hello-fixture==1.0\n"), 0o644)
	if err := env.InstallRequirements(ctx, req, house); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(env.Python, "-c", "import hello_fixture; print(hello_fixture.GREETING)").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "hello from the wheelhouse" {
		t.Fatalf("installed package: %s %v", out, err)
	}
	// A requirement the wheelhouse lacks: pip's words in the error.
	os.WriteFile(req, []byte("not-in-the-house==9.9\n"), 0o644)
	err = env.InstallRequirements(ctx, req, house)
	if err == nil || !strings.Contains(err.Error(), "pip install -r") || !strings.Contains(err.Error(), "not-in-the-house") {
		t.Fatalf("missing requirement: %v", err)
	}
	if err := env.InstallRequirements(ctx, filepath.Join(t.TempDir(), "none.txt"), house); err != nil {
		t.Errorf("no requirements file: %v", err)
	}
	// The whole wheelhouse, offline, with the venv's pip: the wheel, plus a
	// plain package directory copied as it is.
	house2 := t.TempDir()
	if out, err := exec.Command("python3", "-c", wheelScript, filepath.Join(house2, "hello_fixture-1.0-py3-none-any.whl")).CombinedOutput(); err != nil {
		t.Fatalf("building the wheel: %v %s", err, out)
	}
	// A wheel for Python 2 in the same wheelhouse is left alone.
	if out, err := exec.Command("python3", "-c", strings.ReplaceAll(wheelScript, "hello_fixture", "py2_only"), filepath.Join(house2, "py2_only-1.0-py2-none-any.whl")).CombinedOutput(); err != nil {
		t.Fatalf("building the wheel: %v %s", err, out)
	}
	os.MkdirAll(filepath.Join(house2, "plainpkg"), 0o755)
	os.WriteFile(filepath.Join(house2, "plainpkg", "__init__.py"), []byte("NAME = 'plain'\n"), 0o644)
	if err := env.InstallFromWheelhouse(ctx, house2); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(env.Python, "-c", "import hello_fixture, plainpkg; print(plainpkg.NAME, plainpkg.__file__)").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "plain "+env.SitePackages) {
		t.Fatalf("wheelhouse install: %s %v", out, err)
	}
	if _, err := os.Stat(filepath.Join(env.SitePackages, "py2_only")); err == nil {
		t.Error("a Python 2 wheel was installed into a Python 3 venv")
	}
	// Repair: the interpreter is gone.
	os.Remove(filepath.Join(dir, "bin", "python"))
	repaired, err := Ensure(ctx, Options{Dir: dir})
	if err != nil || !repaired.Created {
		t.Fatalf("repair: %+v %v", repaired, err)
	}
	if _, err := os.Stat(repaired.Python); err != nil {
		t.Fatal(err)
	}
}

func TestNoPython(t *testing.T) {
	_, err := Ensure(context.Background(), Options{Dir: t.TempDir(), Python: "/no/such/python3"})
	if err == nil || !strings.Contains(err.Error(), "/no/such/python3") {
		t.Fatalf("err = %v", err)
	}
}

// TestEnsureTwiceRewritesNothing: an interpreter reached through a script
// (a pyenv shim) is probed on every Ensure; finding it unchanged, Ensure
// leaves the interpreter cache as it was, so that re-running the
// installer writes no file.
func TestEnsureTwiceRewritesNothing(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed")
	}
	shim := filepath.Join(t.TempDir(), "python3-shim")
	if err := os.WriteFile(shim, []byte("#!/bin/sh\nexec python3 \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "env")
	ctx := context.Background()
	if _, err := Ensure(ctx, Options{Dir: dir, Python: shim}); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(dir, interpreterCacheFile)
	before, err := os.Stat(cache)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Ensure(ctx, Options{Dir: dir, Python: shim})
	if err != nil || again.Created {
		t.Fatalf("second Ensure: %+v %v", again, err)
	}
	after, err := os.Stat(cache)
	if err != nil {
		t.Fatal(err)
	}
	if !after.ModTime().Equal(before.ModTime()) {
		t.Errorf("%s rewritten by an Ensure that changed nothing (mtime %s → %s)", interpreterCacheFile, before.ModTime(), after.ModTime())
	}
}
