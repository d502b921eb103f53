package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestChildrenGetSIGHUPUnderNohup: opsagent started ignoring SIGHUP (nohup)
// still starts its commands with SIGHUP at its default, so a daemon that
// a state starts can trap it, its reload (a shell cannot trap a signal it
// was started ignoring).
func TestChildrenGetSIGHUPUnderNohup(t *testing.T) {
	nohup, err := exec.LookPath("nohup")
	if err != nil {
		t.Skip("no nohup")
	}
	dir := t.TempDir()
	recipe := filepath.Join(dir, "r.json")
	os.WriteFile(recipe, []byte(`{"state":[{"id":"s","module":"linux.cmd","parameter":{"cmd":"grep ^SigIgn: /proc/self/status"}}]}`), 0o644)
	cmd := exec.Command(nohup, binary, "apply", "--json", "--root", dir, recipe)
	cmd.Dir = dir // nohup writes nohup.out here when stdout is a terminal
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("apply under nohup: %v %s", err, out)
	}
	var res struct {
		States []struct{ Stdout string } `json:"states"`
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.States) != 1 {
		t.Fatalf("apply output %s: %v", out, err)
	}
	field := strings.TrimSpace(strings.TrimPrefix(res.States[0].Stdout, "SigIgn:"))
	mask, err := strconv.ParseUint(field, 16, 64)
	if err != nil {
		t.Fatalf("SigIgn %q: %v", res.States[0].Stdout, err)
	}
	if mask&1 != 0 { // bit 0 is SIGHUP (signal 1)
		t.Fatalf("the command was started ignoring SIGHUP (SigIgn %s)", field)
	}
}
