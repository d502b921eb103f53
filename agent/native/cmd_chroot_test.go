package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCmdChrootedInASystemRoot: below a root that holds its own shell,
// linux.cmd runs chrooted into it, so the command's paths are the
// instance's and nothing it writes lands on the machine running it.
func TestCmdChrootedInASystemRoot(t *testing.T) {
	rig := newDebianRig(t)
	marker := "/tmp/opsagent-cmd-" + filepath.Base(rig.root)
	r := rig.apply(t, "linux.cmd", `{"cmd":"cat /etc/debian_version > `+marker+`; pwd","cwd":"/srv/work"}`, false)
	if !r.OK || strings.TrimSpace(r.Stdout) != "/srv/work" {
		t.Fatalf("cmd in a Debian root: %+v", r)
	}
	got, err := os.ReadFile(filepath.Join(rig.root, marker))
	want, _ := os.ReadFile(filepath.Join(rig.root, "etc/debian_version"))
	if err != nil || string(got) != string(want) {
		t.Fatalf("the command did not run in the root: %q %v", got, err)
	}
	if _, err := os.Stat(marker); err == nil {
		os.Remove(marker)
		t.Fatal("the command wrote on the machine running the test")
	}
}
