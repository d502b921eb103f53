package layering

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// moduleRoot returns the module's directory and path.
func moduleRoot(t *testing.T) (dir, module string) {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || len(bytes.TrimSpace(out)) == 0 {
		t.Fatalf("go env GOMOD: %v", err)
	}
	dir = filepath.Dir(string(bytes.TrimSpace(out)))
	out, err = exec.Command("go", "list", "-m").Output()
	if err != nil {
		t.Fatalf("go list -m: %v", err)
	}
	return dir, string(bytes.TrimSpace(out))
}

// goList lists every package of the module with its imports, as the
// build sees them (extra: more go list flags, e.g. an overlay).
func goList(t *testing.T, dir string, extra ...string) []Package {
	t.Helper()
	args := append([]string{"list", "-e", "-json=ImportPath,Imports,Error"}, extra...)
	cmd := exec.Command("go", append(args, "./...")...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.Bytes())
	}
	var pkgs []Package
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p struct {
			Package
			Error *struct{ Err string }
		}
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		if p.Error != nil {
			t.Errorf("go list %s: %s", p.ImportPath, p.Error.Err)
		}
		pkgs = append(pkgs, p.Package)
	}
	if len(pkgs) < 20 {
		t.Fatalf("go list found %d packages: not the module", len(pkgs))
	}
	return pkgs
}

// Every import of every package of the module follows the layering.
func TestLayering(t *testing.T) {
	dir, module := moduleRoot(t)
	for _, v := range Check(module, goList(t, dir)) {
		t.Error(v)
	}
}

// The check catches an import that runs up the layering: one planted in
// virtualenv (through a go list overlay, the tree untouched) of the
// updater, and one of a test helper from production code.
func TestLayeringCatchesAPlantedUpwardImport(t *testing.T) {
	dir, module := moduleRoot(t)
	tmp := t.TempDir()
	plants := map[string]string{
		"virtualenv/zz_planted.go": "package virtualenv\n\nimport _ \"" + module + "/updater\"\n",
		"updater/zz_planted.go":    "package updater\n\nimport _ \"" + module + "/internal/rootfs/rootfstest\"\n",
	}
	replace := map[string]string{}
	for rel, src := range plants {
		p := filepath.Join(tmp, strings.ReplaceAll(rel, "/", "_"))
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		replace[filepath.Join(dir, rel)] = p
	}
	overlay, _ := json.Marshal(map[string]any{"Replace": replace})
	overlayFile := filepath.Join(tmp, "overlay.json")
	if err := os.WriteFile(overlayFile, overlay, 0o644); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, v := range Check(module, goList(t, dir, "-overlay", overlayFile)) {
		got = append(got, v.From+" -> "+v.To+": "+v.String())
	}
	want := []string{"updater -> internal/rootfs/rootfstest", "virtualenv -> updater"}
	if len(got) != len(want) {
		t.Fatalf("violations:\n%s\nwant exactly %q", strings.Join(got, "\n"), want)
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]+": ") {
			t.Errorf("violation %d: %s, want %s", i, got[i], want[i])
		}
	}
	if !strings.Contains(got[1], "virtualenv/... may import virtualenv, internal/... only") {
		t.Errorf("the message does not say what virtualenv may import: %s", got[1])
	}
}

// The rules on their own: the first matching rule decides, "pkg/..."
// covers pkg itself, and a package in no layer is reported.
func TestCheck(t *testing.T) {
	const m = "example.com/m"
	pkgs := []Package{
		{ImportPath: m + "/agent", Imports: []string{"fmt", m + "/agent/rounds", m + "/updater", m + "/installer", "golang.org/x/sys/unix"}},
		{ImportPath: m + "/agent/native", Imports: []string{m + "/agent/state", m + "/agent/rounds"}},
		{ImportPath: m + "/internal/config", Imports: []string{m + "/internal/fsutil", m + "/agent"}},
		{ImportPath: m + "/newthing", Imports: nil},
		{ImportPath: "other.org/x", Imports: []string{m + "/agent"}},
	}
	var got []string
	for _, v := range Check(m, pkgs) {
		got = append(got, v.From+">"+v.To)
	}
	want := "agent>installer agent/native>agent/rounds internal/config>agent newthing>"
	if strings.Join(got, " ") != want {
		t.Errorf("got %q, want %q", strings.Join(got, " "), want)
	}
}
