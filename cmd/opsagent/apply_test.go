package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type appliedOut struct {
	States []struct {
		ID      string `json:"id"`
		Module  string `json:"module"`
		Result  bool   `json:"result"`
		Changed bool   `json:"changed"`
		Comment string `json:"comment"`
		NotRun  bool   `json:"not_run"`
	} `json:"states"`
	Summary struct {
		Changed, Unchanged, Failed, NotRun int
	} `json:"summary"`
}

func applyJSON(t *testing.T, want int, args ...string) appliedOut {
	t.Helper()
	code, out, errs := runCLI(t, append([]string{"apply", "--json"}, args...)...)
	if code != want {
		t.Fatalf("apply %v: exit %d, want %d; stderr %q; stdout %s", args, code, want, errs, out)
	}
	var got appliedOut
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("not JSON: %v: %s", err, out)
	}
	return got
}

// TestApplyLocally applies a recipe with no backend and no config: check
// mode changes nothing, the first apply changes what it says, the second
// changes nothing, and a failing state ends it with the rest not run.
func TestApplyLocally(t *testing.T) {
	root := t.TempDir()
	recipe := filepath.Join(t.TempDir(), "recipe.json")
	body := `{"state":[
		{"id":"c","module":"meta.comment","parameter":{"comment":"hello"}},
		{"id":"d","module":"linux.dir","parameter":{"path":["/srv/app"],"mode":"0750"}},
		{"id":"f","module":"linux.file","parameter":{"path":"/srv/app/conf","content":"x=1\n"}},
		{"id":"w","module":"meta.wait","parameter":{"state":"@{other.state.x}"}},
		{"id":"k","module":"linux.cmd","parameter":{"cmd":"true","if-path-absent":["/srv/app/conf"]}}]}`
	if err := os.WriteFile(recipe, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	check := applyJSON(t, exitOK, "--root", root, "--test", recipe)
	if check.Summary.Changed != 3 || check.States[1].Comment != "Directory /srv/app would be updated: created" {
		t.Fatalf("check mode: %+v", check)
	}
	if _, err := os.Stat(filepath.Join(root, "srv")); !os.IsNotExist(err) {
		t.Fatalf("check mode created /srv: %v", err)
	}
	first := applyJSON(t, exitOK, "--root", root, recipe)
	if first.Summary.Changed != 2 || first.Summary.Failed != 0 || first.States[4].Changed {
		t.Fatalf("first apply: %+v", first)
	}
	if data, err := os.ReadFile(filepath.Join(root, "srv/app/conf")); err != nil || string(data) != "x=1\n" {
		t.Fatalf("conf: %q %v", data, err)
	}
	second := applyJSON(t, exitOK, "--root", root, recipe)
	if second.Summary.Changed != 0 || second.Summary.Unchanged != 5 {
		t.Fatalf("second apply: %+v", second)
	}

	failing := filepath.Join(t.TempDir(), "failing.json")
	if err := os.WriteFile(failing, []byte(`{"state":[{"id":"bad","module":"linux.cmd","parameter":{"cmd":"exit 3"}},{"id":"after","module":"linux.file","parameter":{"path":"/after","content":""}}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	got := applyJSON(t, exitFailure, "--root", root, failing)
	if got.Summary.Failed != 1 || !got.States[1].NotRun || !strings.Contains(got.States[0].Comment, "exit code 3") {
		t.Fatalf("failing recipe: %+v", got)
	}
	if _, err := os.Stat(filepath.Join(root, "after")); !os.IsNotExist(err) {
		t.Fatal("a state after the failure ran")
	}
	code, out, _ := runCLI(t, "apply", "--root", root, failing)
	if code != exitFailure || !strings.Contains(out, "FAILED   bad  linux.cmd") || !strings.Contains(out, "1 failed, 1 not run") {
		t.Fatalf("text output: %d %q", code, out)
	}
}

func TestApplyRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"state":[{"id":"x","module":"rm -rf /"}]}`), 0o644)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"apply"}, exitUsage, "apply takes one recipe file"},
		{[]string{"apply", filepath.Join(dir, "missing.json")}, exitFailure, "missing.json"},
		{[]string{"apply", bad}, exitFailure, "state[0].module"},
	} {
		code, _, errs := runCLI(t, append(tc.args, "--root", dir)...)
		if code != tc.code || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d %q, want %d with %q", tc.args, code, errs, tc.code, tc.want)
		}
	}
}

// TestModulesJSON lists every catalogue module with how it runs.
func TestModulesJSON(t *testing.T) {
	code, out, errs := runCLI(t, "modules", "--json", "--root", t.TempDir())
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var mods []struct{ Module, Runs, Why string }
	if err := json.Unmarshal([]byte(out), &mods); err != nil {
		t.Fatal(err)
	}
	if len(mods) != 44 {
		t.Fatalf("%d modules", len(mods))
	}
	runs := map[string]string{}
	for _, m := range mods {
		runs[m.Module] = m.Runs
		if m.Runs == "unavailable" && m.Why == "" {
			t.Errorf("%s unavailable without a reason", m.Module)
		}
	}
	for _, m := range []string{"linux.cmd", "linux.file", "meta.wait"} {
		if runs[m] != "native" {
			t.Errorf("%s runs %q", m, runs[m])
		}
	}
}
