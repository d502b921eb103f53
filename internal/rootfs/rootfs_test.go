package rootfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/visualops/opsagent/internal/rootfs/rootfstest"
	"golang.org/x/sys/unix"
)

// resolvers runs a test with the kernel's openat2 and with the user-space
// walk (and chmod fallback) of older kernels.
func resolvers(t *testing.T, test func(t *testing.T, o Options)) {
	for _, r := range []struct {
		name string
		o    Options
	}{{"openat2", Options{}}, {"walk", Options{Legacy: true}}} {
		t.Run(r.name, func(t *testing.T) { test(t, r.o) })
	}
}

func open(t *testing.T, dir string, o Options) *FS {
	t.Helper()
	f, err := OpenWith(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func write(t *testing.T, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// decoy is a prefix for absolute symlink targets meant inside the root.
// Read as a host path it is an empty temporary directory, so even a
// resolver that wrongly followed such a link on the host would touch only
// test files.
func decoy(t *testing.T) string { return t.TempDir() }

func link(t *testing.T, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

// Symlinks and ".." resolve as in a chroot: absolute targets and ".."
// above the root land inside the root, as /etc/resolv.conf's absolute link
// does on a host.
func TestReadsResolveInRoot(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		l := rootfstest.Plant(t)
		write(t, filepath.Join(l.Root, "etc/hosts"), "in root")
		write(t, filepath.Join(l.Root, "run/systemd/resolve/stub-resolv.conf"), "stub")
		link(t, "/run/systemd/resolve/stub-resolv.conf", filepath.Join(l.Root, "etc/resolv.conf"))
		link(t, "/etc", filepath.Join(l.Root, "etclink"))
		link(t, "../../../../../..", filepath.Join(l.Root, "etc/up"))
		f := open(t, l.Root, o)
		for p, want := range map[string]string{
			"/etc/resolv.conf":         "stub",
			"/etclink/hosts":           "in root",
			"/etc/up/etc/hosts":        "in root",
			"/../../../etc/hosts":      "in root",
			"/etclink/../etc/hosts":    "in root",
			"/etc/up/etclink/../hosts": "",
		} {
			data, err := f.ReadFile(p, 100)
			if want == "" {
				if !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("ReadFile(%s) = %q, %v; want not found", p, data, err)
				}
				continue
			}
			if err != nil || string(data) != want {
				t.Errorf("ReadFile(%s) = %q, %v; want %q", p, data, err, want)
			}
		}
		for p, want := range map[string]string{
			"/etc/resolv.conf":       "/run/systemd/resolve/stub-resolv.conf",
			"/etclink/hosts":         "/etc/hosts",
			"/etclink/new":           "/etc/new", // a missing final name is fine
			"/etc/up/etclink":        "/etc",
			"/etclink/../x":          "/x", // ".." of the link's target, like the kernel
			"/tree/a/../f":           "/tree/f",
			"/../etc/up/etc/up/tree": "/tree",
		} {
			if got, err := f.ResolveLinks(p); err != nil || got != want {
				t.Errorf("ResolveLinks(%s) = %q, %v; want %q", p, got, err, want)
			}
		}
		// The planted links point at nothing inside the root.
		for _, p := range []string{"/abs/secret", "/rel/secret", "/deeprel/secret", "/absfile", "/relfile", "/chain1/secret", "/tree/out/secret", "/tree/outrel/secret"} {
			if data, err := f.ReadFile(p, 100); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("ReadFile(%s) = %q, %v; want not found inside the root", p, data, err)
			}
			if _, err := f.Stat(p); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Stat(%s): %v", p, err)
			}
			if got, err := f.ResolveLinks(p); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("ResolveLinks(%s) = %q, %v; want its missing directory", p, got, err)
			}
		}
		if fi, err := f.Lstat("/absfile"); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
			t.Errorf("Lstat follows the final link: %v %v", fi, err)
		}
		l.Check(t)
	})
}

// No operation through any planted link changes anything outside the
// root, and operations that can act inside the root do so there.
func TestWritesStayInRoot(t *testing.T) {
	nobody := 65534
	ops := map[string]func(f *FS) error{
		"write via parent":      func(f *FS) error { return f.WriteFileAtomic("/abs/secret", []byte("x"), 0o777, -1, -1) },
		"write via rel parent":  func(f *FS) error { return f.WriteFileAtomic("/rel/secret", []byte("x"), 0o777, -1, -1) },
		"write via deep parent": func(f *FS) error { return f.WriteFileAtomic("/deeprel/secret", []byte("x"), 0o777, -1, -1) },
		"write via chain":       func(f *FS) error { return f.WriteFileAtomic("/chain1/secret", []byte("x"), 0o777, -1, -1) },
		"write final link":      func(f *FS) error { return f.WriteFileAtomic("/absfile", []byte("x"), 0o777, nobody, nobody) },
		"write dangling":        func(f *FS) error { return f.WriteFileAtomic("/dangling", []byte("x"), 0o777, -1, -1) },
		"open via parent":       func(f *FS) error { return openWrite(f, "/abs/secret") },
		"open final link":       func(f *FS) error { return openWrite(f, "/absfile") },
		"open dangling":         func(f *FS) error { return openWrite(f, "/dangling") },
		"open via rel parent":   func(f *FS) error { return openWrite(f, "/rel/sub/inner") },
		"mkdir via parent":      func(f *FS) error { return f.Mkdir("/abs/new", 0o777) },
		"mkdirall via parent":   func(f *FS) error { return f.MkdirAll("/rel/new/deeper", 0o777, nil) },
		"mkdirall via chain":    func(f *FS) error { return f.MkdirAll("/chain1/sub/x", 0o777, nil) },
		"mkdir dangling":        func(f *FS) error { return f.Mkdir("/dangling", 0o777) },
		"chmod follow":          func(f *FS) error { return f.Chmod("/absfile", 0o777, true) },
		"chmod rel follow":      func(f *FS) error { return f.Chmod("/relfile", 0o777, true) },
		"chmod via parent":      func(f *FS) error { return f.Chmod("/abs/sub", 0o777, false) },
		"chmod link":            func(f *FS) error { return f.Chmod("/abs", 0o777, false) },
		"chown follow":          func(f *FS) error { return f.Chown("/absfile", nobody, nobody, true) },
		"chown via parent":      func(f *FS) error { return f.Chown("/deeprel/secret", nobody, nobody, false) },
		"chown link":            func(f *FS) error { return f.Chown("/abs", nobody, nobody, false) },
		"remove via parent":     func(f *FS) error { return f.Remove("/abs/secret") },
		"remove final link":     func(f *FS) error { return f.Remove("/absfile") },
		"remove via rel":        func(f *FS) error { return f.Remove("/rel/sub/inner") },
		"removeall link":        func(f *FS) error { return f.RemoveAll("/abs") },
		"removeall via parent":  func(f *FS) error { return f.RemoveAll("/rel/sub") },
		"removeall tree":        func(f *FS) error { return f.RemoveAll("/tree") },
		"symlink via parent":    func(f *FS) error { return f.Symlink("x", "/abs/newlink") },
		"rename out":            func(f *FS) error { return f.Rename("/tree/f", "/abs/f") },
		"rename in":             func(f *FS) error { return f.Rename("/abs/secret", "/stolen") },
		"walk": func(f *FS) error {
			return f.WalkDir("/", func(p string, d fs.DirEntry, err error) error {
				if strings.Contains(p, "secret") {
					return fmt.Errorf("walked into %s", p)
				}
				return err
			})
		},
	}
	resolvers(t, func(t *testing.T, o Options) {
		for name, op := range ops {
			t.Run(name, func(t *testing.T) {
				l := rootfstest.Plant(t)
				_ = op(open(t, l.Root, o)) // failing is fine; escaping is not
				l.Check(t)
			})
		}
	})
}

// Where the planted link's in-root target exists, the write lands there.
func TestWritesThroughLinksLandInRoot(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		l := rootfstest.Plant(t)
		if err := os.Mkdir(filepath.Join(l.Root, "outside"), 0o755); err != nil {
			t.Fatal(err)
		}
		f := open(t, l.Root, o)
		if err := f.MkdirAll("/rel/new", 0o755, nil); err != nil {
			t.Fatal(err)
		}
		if err := f.WriteFileAtomic("/chain1/new/file", []byte("x"), 0o600, -1, -1); err != nil {
			t.Fatal(err)
		}
		if err := f.Symlink("target", "/tree/outrel/l"); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(l.Root, "outside/new/file"))
		if err != nil || string(data) != "x" {
			t.Errorf("in-root file: %q %v", data, err)
		}
		if _, err := os.Lstat(filepath.Join(l.Root, "outside/l")); err != nil {
			t.Error(err)
		}
		l.Check(t)
	})
}

func TestLinkLimit(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		dir := t.TempDir()
		write(t, filepath.Join(dir, "f"), "f")
		prev := "f"
		for i := 1; i <= 41; i++ {
			name := fmt.Sprintf("l%d", i)
			link(t, prev, filepath.Join(dir, name))
			prev = name
		}
		link(t, "loop2", filepath.Join(dir, "loop1"))
		link(t, "/loop1", filepath.Join(dir, "loop2"))
		f := open(t, dir, o)
		if _, err := f.Stat("/l40"); err != nil {
			t.Errorf("40 links: %v", err)
		}
		if got, err := f.ResolveLinks("/l40"); err != nil || got != "/f" {
			t.Errorf("ResolveLinks 40 links = %q, %v", got, err)
		}
		for _, p := range []string{"/l41", "/loop1", "/loop2/x"} {
			if _, err := f.Stat(p); !errors.Is(err, syscall.ELOOP) {
				t.Errorf("Stat(%s): %v, want ELOOP", p, err)
			}
			if _, err := f.ResolveLinks(p); !errors.Is(err, syscall.ELOOP) {
				t.Errorf("ResolveLinks(%s): %v, want ELOOP", p, err)
			}
		}
	})
}

func TestChmodChown(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		dir, d := t.TempDir(), decoy(t)+"/d"
		write(t, filepath.Join(dir, d, "f"), "f")
		link(t, d+"/f", filepath.Join(dir, "l"))
		link(t, d[1:], filepath.Join(dir, "dl"))
		f := open(t, dir, o)
		for _, bits := range []uint32{0o4755, 0o2750, 0o1777, 0o600} {
			if err := f.Chmod("/l", FileMode(bits), true); err != nil {
				t.Fatal(err)
			}
			if fi, _ := os.Stat(filepath.Join(dir, d, "f")); ModeBits(fi.Mode()) != bits {
				t.Errorf("chmod %04o through a link: %v", bits, fi.Mode())
			}
		}
		if err := f.Chmod("/dl", FileMode(0o1777), true); err != nil {
			t.Fatal(err)
		}
		if fi, _ := os.Stat(filepath.Join(dir, d)); ModeBits(fi.Mode()) != 0o1777 {
			t.Errorf("directory mode %v", fi.Mode())
		}
		if err := f.Chmod("/l", 0o777, false); err == nil || !strings.Contains(err.Error(), "chmod /l: is a symbolic link") {
			t.Errorf("chmod of a link without follow: %v", err)
		}
		if os.Geteuid() != 0 {
			return
		}
		if err := f.Chown("/l", 65534, 65534, true); err != nil {
			t.Fatal(err)
		}
		if err := f.Chown("/dl", 65533, -1, false); err != nil {
			t.Fatal(err)
		}
		target, _ := os.Stat(filepath.Join(dir, d, "f"))
		lnk, _ := os.Lstat(filepath.Join(dir, "dl"))
		dirst, _ := os.Stat(filepath.Join(dir, d))
		if uid, gid, _ := Owner(target); uid != 65534 || gid != 65534 {
			t.Errorf("chown through a link: %d:%d", uid, gid)
		}
		if uid, _, _ := Owner(lnk); uid != 65533 {
			t.Errorf("chown of the link itself: uid %d", uid)
		}
		if uid, _, _ := Owner(dirst); uid != 0 {
			t.Errorf("chown without follow changed the target: uid %d", uid)
		}
	})
}

func TestWriteFileAtomic(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		dir := t.TempDir()
		f := open(t, dir, o)
		if err := f.Mkdir("/d", 0o755); err != nil {
			t.Fatal(err)
		}
		uid := -1
		if os.Geteuid() == 0 {
			uid = 65534
		}
		// chown clears setuid, so it must come first.
		if err := f.WriteFileAtomic("/d/f", []byte("one"), FileMode(0o4755), uid, -1); err != nil {
			t.Fatal(err)
		}
		fi, err := f.Lstat("/d/f")
		if err != nil || ModeBits(fi.Mode()) != 0o4755 || fi.Size() != 3 {
			t.Fatalf("written file: %v %v", fi, err)
		}
		if got, _, _ := Owner(fi); uid >= 0 && got != uid {
			t.Errorf("owner %d", got)
		}
		// A symlink at the path is replaced, not written through.
		other := decoy(t) + "/other"
		write(t, filepath.Join(dir, other), "other")
		link(t, other, filepath.Join(dir, "d/l"))
		if err := f.WriteFileAtomic("/d/l", []byte("two"), 0o644, -1, -1); err != nil {
			t.Fatal(err)
		}
		if data, _ := os.ReadFile(filepath.Join(dir, other)); string(data) != "other" {
			t.Errorf("written through the link: %q", data)
		}
		entries, _ := os.ReadDir(filepath.Join(dir, "d"))
		if len(entries) != 2 {
			t.Errorf("temporary files left: %v", entries)
		}
		if err := f.WriteFileAtomic("/", nil, 0o644, -1, -1); err == nil {
			t.Error("wrote the root")
		}
		err = f.WriteFileAtomic("/missing/f", nil, 0o644, -1, -1)
		if !errors.Is(err, fs.ErrNotExist) || err.Error() != "write /missing/f: no such file or directory" {
			t.Errorf("error %q does not name the instance path", err)
		}
	})
}

func TestReadFileLimit(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "f"), "12345")
	f := open(t, dir, Options{})
	if data, err := f.ReadFile("/f", 5); err != nil || string(data) != "12345" {
		t.Fatalf("at the limit: %q %v", data, err)
	}
	if _, err := f.ReadFile("/f", 4); !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "/f") {
		t.Fatalf("over the limit: %v", err)
	}
}

func TestMkdirAll(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		dir, real := t.TempDir(), decoy(t)+"/real"
		if err := os.MkdirAll(filepath.Join(dir, real), 0o755); err != nil {
			t.Fatal(err)
		}
		link(t, real, filepath.Join(dir, "l"))
		write(t, filepath.Join(dir, "file"), "")
		f := open(t, dir, o)
		var created []string
		onCreate := func(p string) error { created = append(created, p); return f.Chmod(p, 0o711, false) }
		if err := f.MkdirAll("/l/a/b", 0o700, onCreate); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(created, []string{"/l/a", "/l/a/b"}) {
			t.Errorf("created %v", created)
		}
		if fi, err := os.Stat(filepath.Join(dir, real, "a/b")); err != nil || fi.Mode().Perm() != 0o711 {
			t.Errorf("created through the link: %v %v", fi, err)
		}
		created = nil
		if err := f.MkdirAll("/l/a/b", 0o700, onCreate); err != nil || created != nil {
			t.Errorf("existing: %v %v", created, err)
		}
		if err := f.MkdirAll("/file/x", 0o700, nil); !errors.Is(err, syscall.ENOTDIR) {
			t.Errorf("through a file: %v", err)
		}
	})
}

func TestRemove(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		l := rootfstest.Plant(t)
		keep := decoy(t) + "/keep"
		write(t, filepath.Join(l.Root, keep, "target/f"), "f")
		link(t, keep+"/target", filepath.Join(l.Root, "tree/a/in"))
		f := open(t, l.Root, o)
		for _, p := range []string{"/", "/..", ""} {
			if err := f.RemoveAll(p); err == nil || !strings.Contains(err.Error(), "refusing to remove the root") {
				t.Errorf("RemoveAll(%q): %v", p, err)
			}
			if err := f.Remove(p); err == nil {
				t.Errorf("Remove(%q) succeeded", p)
			}
		}
		if err := f.RemoveAll("/tree"); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(filepath.Join(l.Root, "tree")); !os.IsNotExist(err) {
			t.Errorf("tree left: %v", err)
		}
		if _, err := os.Stat(filepath.Join(l.Root, keep, "target/f")); err != nil {
			t.Errorf("RemoveAll followed a link inside the tree: %v", err)
		}
		if err := f.RemoveAll("/nothing/here"); err != nil {
			t.Errorf("missing: %v", err)
		}
		if err := f.Remove("/absfile"); err != nil {
			t.Fatal(err)
		}
		if err := f.Remove(keep + "/target"); !errors.Is(err, syscall.ENOTEMPTY) {
			t.Errorf("non-empty directory: %v", err)
		}
		l.Check(t)
	})
}

func TestWalkDirDoesNotFollow(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		l := rootfstest.Plant(t)
		write(t, filepath.Join(l.Root, "tree/a/b/f"), "")
		link(t, "/tree", filepath.Join(l.Root, "tree/a/loop"))
		f := open(t, l.Root, o)
		var got []string
		err := f.WalkDir("/tree", func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			got = append(got, fmt.Sprintf("%s %v", p, d.Type()))
			return nil
		})
		want := []string{"/tree d---------", "/tree/a d---------", "/tree/a/b d---------", "/tree/a/b/f ----------",
			"/tree/a/loop L---------", "/tree/f ----------", "/tree/out L---------", "/tree/outrel L---------"}
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("walk %v, %v; want %v", got, err, want)
		}
		got = nil
		if err := f.WalkDir("/abs", func(p string, d fs.DirEntry, err error) error {
			got = append(got, p)
			return err
		}); err != nil || !slices.Equal(got, []string{"/abs"}) {
			t.Errorf("walk of a link: %v %v", got, err)
		}
	})
}

// With the root "/" paths behave as on the host. Read-only: never write
// to the host.
func TestHostRootReadOnly(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		f := open(t, "/", o)
		fi, err := f.Lstat("/proc/self/exe")
		if err != nil || fi.Mode()&fs.ModeSymlink == 0 {
			t.Fatalf("Lstat /proc/self/exe: %v %v", fi, err)
		}
		exe, _ := os.Readlink("/proc/self/exe")
		if got, err := f.ResolveLinks("/proc/self/exe"); err != nil || got != exe {
			t.Errorf("ResolveLinks /proc/self/exe = %q, %v; want %q", got, err, exe)
		}
		if fi, err := f.Stat("/etc"); err != nil || !fi.IsDir() {
			t.Errorf("Stat /etc: %v %v", fi, err)
		}
		if fi, err := f.Stat("/../../etc"); err != nil || !fi.IsDir() {
			t.Errorf("Stat /../../etc: %v %v", fi, err)
		}
		if want, err := filepath.EvalSymlinks("/etc/resolv.conf"); err == nil {
			if got, err := f.ResolveLinks("/etc/resolv.conf"); err != nil || got != want {
				t.Errorf("ResolveLinks /etc/resolv.conf = %q, %v; want %q", got, err, want)
			}
		}
		if f.HostPath("/etc/x") != "/etc/x" {
			t.Errorf("HostPath %q", f.HostPath("/etc/x"))
		}
	})
}

// The kernel's resolver is used where it exists: it refuses magic links,
// which the user-space walk cannot tell from ordinary ones.
func TestOpenPrefersOpenat2(t *testing.T) {
	probe, err := unix.Open("/", unix.O_PATH, 0)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := haveOpenat2(probe)
	unix.Close(probe)
	if err != nil || !ok {
		t.Skipf("no openat2 on this kernel: %v", err)
	}
	f := open(t, "/", Options{})
	if _, err := f.Stat("/proc/self/exe"); !errors.Is(err, syscall.ELOOP) {
		t.Errorf("magic link followed: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	write(t, file, "")
	for _, dir := range []string{file, filepath.Join(file, "missing")} {
		if _, err := Open(dir); err == nil || !strings.Contains(err.Error(), dir) {
			t.Errorf("Open(%s): %v", dir, err)
		}
	}
}

func TestModeConversion(t *testing.T) {
	for _, bits := range []uint32{0, 0o644, 0o4755, 0o2775, 0o1777, 0o7777} {
		if got := ModeBits(FileMode(bits)); got != bits {
			t.Errorf("%04o -> %v -> %04o", bits, FileMode(bits), got)
		}
	}
	if FileMode(0o4755)&fs.ModeSetuid == 0 {
		t.Error("4755 is not setuid")
	}
}

func TestSymlinkReadlinkRename(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		dir := t.TempDir()
		write(t, filepath.Join(dir, "d/f"), "f")
		link(t, "d", filepath.Join(dir, "dl"))
		f := open(t, dir, o)
		if err := f.Symlink("/anywhere/../x", "/dl/l"); err != nil {
			t.Fatal(err)
		}
		if got, err := f.Readlink("/d/l"); err != nil || got != "/anywhere/../x" {
			t.Errorf("Readlink = %q, %v", got, err)
		}
		if _, err := f.Readlink("/d/f"); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Readlink of a file: %v", err)
		}
		if err := f.Rename("/dl/l", "/dl/l2"); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.Readlink(filepath.Join(dir, "d/l2")); got != "/anywhere/../x" {
			t.Errorf("renamed link -> %q", got)
		}
		// Renaming onto a link replaces the link, not its target.
		if err := f.Rename("/d/f", "/dl"); err != nil {
			t.Fatal(err)
		}
		if fi, err := os.Lstat(filepath.Join(dir, "dl")); err != nil || !fi.Mode().IsRegular() {
			t.Errorf("/dl after rename: %v %v", fi, err)
		}
		if err := f.Rename("/missing", "/x"); err == nil || !strings.HasPrefix(err.Error(), "rename /missing: to /x: ") {
			t.Errorf("rename error %v", err)
		}
	})
}

func TestWalkDirSkip(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"a/x/f", "b/f", "c/f"} {
		write(t, filepath.Join(dir, p), "")
	}
	f := open(t, dir, Options{})
	var got []string
	err := f.WalkDir("/", func(p string, d fs.DirEntry, err error) error {
		got = append(got, p)
		switch p {
		case "/a/x":
			return fs.SkipDir
		case "/b/f":
			return fs.SkipAll
		}
		return err
	})
	if want := []string{"/", "/a", "/a/x", "/b", "/b/f"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("walk %v %v, want %v", got, err, want)
	}
	if err := f.WalkDir("/missing", func(p string, d fs.DirEntry, err error) error { return err }); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("walk of a missing path: %v", err)
	}
}

// openWrite appends to p, creating it, as a log does.
func openWrite(f *FS, p string) error {
	file, err := f.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o666)
	if err != nil {
		return err
	}
	defer file.Close()
	_, err = file.WriteString("appended")
	return err
}

// OpenFile appends inside the root, refuses a link at the name and does
// not block on a FIFO.
func TestOpenFile(t *testing.T) {
	resolvers(t, func(t *testing.T, o Options) {
		l := rootfstest.Plant(t)
		f := open(t, l.Root, o)
		if err := openWrite(f, "/tree/f"); err != nil {
			t.Fatal(err)
		}
		if data, _ := os.ReadFile(filepath.Join(l.Root, "tree/f")); string(data) != "fappended" {
			t.Errorf("tree/f = %q", data)
		}
		if err := openWrite(f, "/absfile"); !errors.Is(err, syscall.ELOOP) || !strings.Contains(err.Error(), "/absfile") {
			t.Errorf("a link at the name: %v", err)
		}
		if err := syscall.Mkfifo(filepath.Join(l.Root, "tree/fifo"), 0o600); err != nil {
			t.Fatal(err)
		}
		r, err := f.OpenFile("/tree/fifo", os.O_RDONLY, 0)
		if err != nil {
			t.Fatalf("a FIFO blocked or failed: %v", err)
		}
		r.Close()
		l.Check(t)
	})
}
