package native

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// newRigOn is a debianRig on root, a debroot the test made (NewWith, to
// have tools installed already).
func newRigOn(t testing.TB, root string) *debianRig {
	t.Helper()
	r, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	runs := &recordingRunner{Runner: proc.New()}
	return &debianRig{root: root, runs: runs, e: New(Options{Root: r, Runner: runs, KillGrace: time.Second, StateDir: filepath.Join(root, "var/lib/visualops/opsagent")})}
}

// newDebianRigWith is a debianRig on a fresh root with pkgs installed.
func newDebianRigWith(t testing.TB, pkgs ...string) *debianRig {
	t.Helper()
	return newRigOn(t, debroot.NewWith(t, pkgs...))
}

// inRoot runs a command chrooted in root (as the test's own hand would)
// and returns its output.
func inRoot(t testing.TB, root string, args ...string) string {
	t.Helper()
	cmd := exec.Command("chroot", append([]string{root}, args...)...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "HOME=/root",
		"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// treeStamp describes every path under dir (type, mode, size, mtime,
// inode, owner): equal stamps mean nothing on disk changed.
func treeStamp(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		out[p] = fmt.Sprintf("%v %d %d ino=%d uid=%d", fi.Mode(), fi.Size(), fi.ModTime().UnixNano(), st.Ino, st.Uid)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func assertStampSame(t testing.TB, before, after map[string]string) {
	t.Helper()
	for p, d := range before {
		if after[p] != d {
			t.Errorf("%s changed: %q, was %q", p, after[p], d)
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s appeared", p)
		}
	}
}

// only asserts that the commands since mark were exactly one run of tool
// whose first argument is sub (e.g. git ls-remote), and returns it.
func only(t testing.TB, r *recordingRunner, mark int, tool, sub string) {
	t.Helper()
	cmds := r.Since(mark)
	if len(cmds) != 1 || cmds[0][0] != tool || len(cmds[0]) < 2 || cmds[0][1] != sub {
		t.Fatalf("ran %v, want only %s %s", cmds, tool, sub)
	}
}

// none asserts that no command ran since mark.
func none(t testing.TB, r *recordingRunner, mark int) {
	t.Helper()
	if cmds := r.Since(mark); len(cmds) > 0 {
		t.Fatalf("ran %v, want nothing", cmds)
	}
}

func readIn(t testing.TB, root, p string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, p))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
