package virtualenv

import (
	"archive/zip"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/proc"
)

// writeWheel writes a wheel with the given files (RECORD added).
func writeWheel(t *testing.T, path string, files map[string]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	z := zip.NewWriter(f)
	var record []string
	for name, data := range files {
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		h.SetMode(0o644)
		if strings.Contains(name, ".data/scripts/") {
			h.SetMode(0o755)
		}
		w, err := z.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(data))
		record = append(record, name+",,")
	}
	parts := strings.Split(filepath.Base(path), "-")
	info := parts[0] + "-" + parts[1] + ".dist-info/RECORD"
	w, _ := z.Create(info)
	w.Write([]byte(strings.Join(append(record, info+",,"), "\n") + "\n"))
	if err := z.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// TestUnpackWheelsWithoutPip installs wheels the way a minimal Python 2
// environment does (no pip of its own): only those that fit its Python,
// .data directories laid out like pip, an upgrade removing the old files.
func TestUnpackWheelsWithoutPip(t *testing.T) {
	dir := t.TempDir()
	env := Env{Dir: dir, Python: filepath.Join(dir, "bin", "python"), Version: "2.7.18", Minimal: true,
		SitePackages: filepath.Join(dir, "lib", "python2.7", "site-packages"), runner: proc.New(), log: slog.New(slog.DiscardHandler)}
	os.MkdirAll(env.SitePackages, 0o755)
	house := t.TempDir()
	writeWheel(t, filepath.Join(house, "hello_two-1.0-py2-none-any.whl"), map[string]string{
		"hello_two/__init__.py":                     "V = 1\n",
		"hello_two/old.py":                          "gone = True\n",
		"hello_two-1.0.data/scripts/hello-two":      "#!python\nprint('hi')\n",
		"hello_two-1.0.data/purelib/hello_extra.py": "X = 1\n",
		"hello_two-1.0.dist-info/METADATA":          "Name: hello-two\nVersion: 1.0\n",
	})
	writeWheel(t, filepath.Join(house, "only_three-1.0-py3-none-any.whl"), map[string]string{"only_three.py": ""})
	writeWheel(t, filepath.Join(house, "native-1.0-cp27-cp27mu-win_amd64.whl"), map[string]string{"native.py": ""})
	os.WriteFile(filepath.Join(house, "single.py"), []byte("S = 1\n"), 0o644)
	os.WriteFile(filepath.Join(house, "README"), []byte("not a package\n"), 0o644)
	ctx := context.Background()
	if err := env.InstallFromWheelhouse(ctx, house); err != nil {
		t.Fatal(err)
	}
	sp := env.SitePackages
	for _, p := range []string{"hello_two/__init__.py", "hello_two/old.py", "hello_extra.py", "single.py", "hello_two-1.0.dist-info/INSTALLER"} {
		if _, err := os.Stat(filepath.Join(sp, p)); err != nil {
			t.Errorf("missing %s: %v", p, err)
		}
	}
	for _, p := range []string{"only_three.py", "native.py", "README"} {
		if _, err := os.Stat(filepath.Join(sp, p)); err == nil {
			t.Errorf("%s installed, but it does not fit Python 2.7 on linux", p)
		}
	}
	script, err := os.ReadFile(filepath.Join(dir, "bin", "hello-two"))
	if err != nil || !strings.HasPrefix(string(script), "#!"+env.Python+"\n") {
		t.Errorf("script: %q %v", script, err)
	}
	// An upgrade: the files of 1.0 that 1.1 lacks are gone.
	os.Remove(filepath.Join(house, "hello_two-1.0-py2-none-any.whl"))
	writeWheel(t, filepath.Join(house, "hello_two-1.1-py2.py3-none-any.whl"), map[string]string{
		"hello_two/__init__.py":            "V = 2\n",
		"hello_two-1.1.dist-info/METADATA": "Name: hello-two\nVersion: 1.1\n",
	})
	if err := env.InstallFromWheelhouse(ctx, house); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(filepath.Join(sp, "hello_two", "__init__.py")); string(data) != "V = 2\n" {
		t.Errorf("upgrade: %q", data)
	}
	for _, p := range []string{"hello_two/old.py", "hello_two-1.0.dist-info"} {
		if _, err := os.Stat(filepath.Join(sp, p)); err == nil {
			t.Errorf("upgrade left %s behind", p)
		}
	}
	// Two versions that both fit: refused, naming both.
	writeWheel(t, filepath.Join(house, "hello_two-1.2-py27-none-any.whl"), map[string]string{"hello_two/__init__.py": ""})
	err = env.InstallFromWheelhouse(ctx, house)
	if err == nil || !strings.Contains(err.Error(), "hello_two-1.1") || !strings.Contains(err.Error(), "hello_two-1.2") || !strings.Contains(err.Error(), "keep one") {
		t.Errorf("two fitting wheels: %v", err)
	}
	// A source archive needs pip, which a minimal environment lacks.
	os.Remove(filepath.Join(house, "hello_two-1.2-py27-none-any.whl"))
	os.WriteFile(filepath.Join(house, "thing-1.0.tar.gz"), []byte("x"), 0o644)
	err = env.InstallFromWheelhouse(ctx, house)
	if err == nil || !strings.Contains(err.Error(), "thing-1.0.tar.gz") || !strings.Contains(err.Error(), "needs pip") {
		t.Errorf("sdist without pip: %v", err)
	}
}

func TestWheelEntriesStayInside(t *testing.T) {
	dir := t.TempDir()
	env := Env{Dir: dir, Version: "2.7.18", Minimal: true, SitePackages: filepath.Join(dir, "sp"), runner: proc.New(), log: slog.New(slog.DiscardHandler)}
	house := t.TempDir()
	writeWheel(t, filepath.Join(house, "evil-1.0-py2-none-any.whl"), map[string]string{"../../escaped.py": "x"})
	err := env.InstallFromWheelhouse(context.Background(), house)
	if err == nil || !strings.Contains(err.Error(), "leaves its directory") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "escaped.py")); err == nil {
		t.Fatal("a wheel wrote outside site-packages")
	}
}
