package native

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/visualops/opsagent/internal/rootfs"
)

// linkRig is a root whose symlinks point to absolute in-root paths that,
// read as host paths, lie in a decoy directory outside the root: a state
// that resolved links on the host would touch the decoy instead (and
// never anything but test files).
type linkRig struct {
	e           *Executor
	root, decoy string // host paths
}

func newLinkRig(t *testing.T, legacy bool) *linkRig {
	t.Helper()
	r := &linkRig{root: t.TempDir(), decoy: t.TempDir()}
	r.e = newExecAt(t, r.root, legacy)
	return r
}

// in is the host path of instance path p.
func (r *linkRig) in(p string) string { return filepath.Join(r.root, p) }

func (r *linkRig) file(t *testing.T, p, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(r.in(p)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.in(p), []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(r.in(p), mode); err != nil {
		t.Fatal(err)
	}
}

func (r *linkRig) link(t *testing.T, target, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(r.in(p)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, r.in(p)); err != nil {
		t.Fatal(err)
	}
}

// isLink fails the test unless instance path p is still a link to target.
func (r *linkRig) isLink(t *testing.T, p, target string) {
	t.Helper()
	if got, err := os.Readlink(r.in(p)); err != nil || got != target {
		t.Errorf("%s is no longer a link to %s: %q %v", p, target, got, err)
	}
}

func (r *linkRig) decoyEmpty(t *testing.T) {
	t.Helper()
	if entries, _ := os.ReadDir(r.decoy); len(entries) != 0 {
		t.Errorf("the decoy outside the root was written: %v", entries)
	}
}

func stat(t *testing.T, p string) (mode uint32, uid int, content string) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	uid, _, _ = rootfs.Owner(fi)
	data, _ := os.ReadFile(p)
	return rootfs.ModeBits(fi.Mode()), uid, string(data)
}

// linux.file follows a symlink as Salt's file.managed does: content, mode
// and owner apply to the file it names, resolved inside the root, and the
// link stays.
func TestFileThroughSymlink(t *testing.T) {
	needRoot(t)
	resolvers(t, func(t *testing.T, legacy bool) {
		r := newLinkRig(t, legacy)
		real := r.decoy + "/real" // an absolute target, meant inside the root
		r.file(t, real, "old", 0o600)
		r.link(t, real, "/etc/abs")
		r.link(t, "../"+real[1:], "/etc/rel")
		r.link(t, "rel", "/etc/chain")

		// A new content keeps the target's mode: the link's 0777 never
		// leaks into the file.
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/abs","content":"new"}`), "File /etc/abs updated: content")
		if mode, _, content := stat(t, r.in(real)); mode != 0o600 || content != "new" {
			t.Errorf("target %04o %q", mode, content)
		}
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/rel","content":"rel","mode":"0640","user":"65534"}`), "updated: content, owner, mode 0640")
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/chain","content":"rel","mode":"0640","user":"65534"}`), "File /etc/chain is already in the correct state")
		if mode, uid, content := stat(t, r.in(real)); mode != 0o640 || uid != 65534 || content != "rel" {
			t.Errorf("target %04o uid %d %q", mode, uid, content)
		}
		// Rewriting through the link keeps the target's owner and mode.
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/chain","content":"chain"}`), "updated: content")
		if mode, uid, content := stat(t, r.in(real)); mode != 0o640 || uid != 65534 || content != "chain" {
			t.Errorf("target %04o uid %d %q", mode, uid, content)
		}
		r.isLink(t, "/etc/abs", real)
		r.isLink(t, "/etc/chain", "rel")
		if fi, _ := os.Lstat(r.in("/etc/abs")); fi.Sys() != nil {
			if uid, _, _ := rootfs.Owner(fi); uid != 0 {
				t.Errorf("the link's own owner changed to %d", uid)
			}
		}
		// absent removes the link, not its target.
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/abs","absent":true}`), "File /etc/abs removed")
		if _, err := os.Lstat(r.in("/etc/abs")); !os.IsNotExist(err) {
			t.Error("link not removed")
		}
		if _, _, content := stat(t, r.in(real)); content != "chain" {
			t.Error("absent removed the target")
		}
		r.decoyEmpty(t)
	})
}

// A dangling link's target is created inside the root, with 0644 or the
// mode asked for; its directory must exist.
func TestFileThroughDanglingSymlink(t *testing.T) {
	resolvers(t, func(t *testing.T, legacy bool) {
		r := newLinkRig(t, legacy)
		if err := os.MkdirAll(r.in(r.decoy), 0o755); err != nil {
			t.Fatal(err)
		}
		r.link(t, r.decoy+"/new", "/etc/dangling")
		r.link(t, "../"+r.decoy[1:]+"/new600", "/etc/dangling600")
		r.link(t, r.decoy+"/missing/new", "/etc/nodir")
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/dangling","content":"x"}`), "File /etc/dangling updated: created")
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/dangling","content":"x"}`), "already in the correct state")
		if mode, _, content := stat(t, r.in(r.decoy+"/new")); mode != 0o644 || content != "x" {
			t.Errorf("created %04o %q", mode, content)
		}
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/etc/dangling600","mode":"0600"}`), "created")
		if mode, _, _ := stat(t, r.in(r.decoy+"/new600")); mode != 0o600 {
			t.Errorf("created %04o", mode)
		}
		r.isLink(t, "/etc/dangling", r.decoy+"/new")
		mustFail(t, run(t, r.e, "linux.file", `{"path":"/etc/nodir","content":"x"}`), "File /etc/nodir: is a symlink that cannot be followed")
		if _, err := os.Lstat(r.in(r.decoy + "/missing")); !os.IsNotExist(err) {
			t.Error("the dangling link's directory was created")
		}
		r.decoyEmpty(t)
	})
}

func TestFileSymlinkToDirectory(t *testing.T) {
	resolvers(t, func(t *testing.T, legacy bool) {
		r := newLinkRig(t, legacy)
		data := r.decoy + "/data"
		r.file(t, data+"/f", "", 0o644)
		r.link(t, data, "/etc/dl")
		r.link(t, ".."+data+"/", "/etc/dl2")
		mustFail(t, run(t, r.e, "linux.file", `{"path":"/etc/dl","content":"x"}`), "File /etc/dl: a directory is in the way")
		mustFail(t, run(t, r.e, "linux.file", `{"path":"/etc/dl2","mode":"0600"}`), "File /etc/dl2: a directory is in the way")
		if fi, _ := os.Stat(r.in(data)); fi.Mode().Perm() != 0o755 {
			t.Errorf("directory mode changed: %v", fi.Mode())
		}
	})
}

// linux.dir manages the directory a symlink points to; recursive changes
// do not follow links inside the tree.
func TestDirThroughSymlink(t *testing.T) {
	needRoot(t)
	resolvers(t, func(t *testing.T, legacy bool) {
		r := newLinkRig(t, legacy)
		d := r.decoy + "/d"
		r.file(t, d+"/sub/f", "", 0o644)
		elsewhere := r.decoy + "/elsewhere"
		r.file(t, elsewhere+"/f", "", 0o644)
		r.link(t, d, "/srv/dl")
		r.link(t, elsewhere, d+"/sub/out")
		r.link(t, r.decoy+"/none", "/srv/dangling")
		r.link(t, elsewhere+"/f", "/srv/file")
		mustOK(t, run(t, r.e, "linux.dir", `{"path":["/srv/dl"],"mode":"0711","user":"65534"}`), "Directory /srv/dl updated: owner, mode 0711")
		mustOK(t, run(t, r.e, "linux.dir", `{"path":["/srv/dl"],"mode":"0711","user":"65534"}`), "already in the correct state")
		for _, p := range []string{d, d + "/sub"} {
			if mode, uid, _ := stat(t, r.in(p)); mode != 0o711 || uid != 65534 {
				t.Errorf("%s: %04o uid %d", p, mode, uid)
			}
		}
		if mode, uid, _ := stat(t, r.in(elsewhere)); mode != 0o755 || uid != 0 {
			t.Errorf("followed a link inside the tree: %04o uid %d", mode, uid)
		}
		r.isLink(t, "/srv/dl", d)
		mustFail(t, run(t, r.e, "linux.dir", `{"path":["/srv/dangling"]}`), "is a symlink to "+r.decoy+"/none, which does not exist")
		mustFail(t, run(t, r.e, "linux.dir", `{"path":["/srv/file"]}`), "a file is in the way")
		mustOK(t, run(t, r.e, "linux.dir", `{"path":["/srv/dl"],"absent":true}`), "Directory /srv/dl removed")
		if _, err := os.Stat(r.in(d + "/sub/f")); err != nil {
			t.Errorf("absent on a link removed its target: %v", err)
		}
		r.decoyEmpty(t)
	})
}
