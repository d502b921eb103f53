// Package rootfs performs file operations on instance paths ("/etc/x")
// below a root directory so that no symlink, wherever it sits and whatever
// it points to, can lead an operation outside the root.
//
// Every lookup starts at a descriptor of the root and resolves like a
// chroot: absolute symlink targets and ".." resolve inside the root. With
// the root "/" this is ordinary path resolution, so a host's absolute links
// (/etc/resolv.conf -> /run/...) keep working, which os.Root refuses. The
// kernel does the resolving with openat2(RESOLVE_IN_ROOT) since Linux 5.6;
// on older kernels a component-by-component walk with openat(O_NOFOLLOW) and
// readlinkat does the same in user space.
//
// An operation resolves the parent directory of its path (following links
// inside the root) and acts on the final name with an *at call, so the
// final component is never followed unless the operation says it follows.
// Errors are *fs.PathError values naming the instance path, never the host
// path.
//
// A concurrent rename that moves a directory out of the root while a
// lookup is inside it is not detected (openat2 does not detect it either);
// it needs write access both inside and outside the root.
package rootfs

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// maxLinks is the kernel's limit of symlinks followed in one lookup
// (MAXSYMLINKS); more fail with ELOOP.
const maxLinks = 40

// ErrTooLarge is returned by ReadFile for a file over its limit.
var ErrTooLarge = errors.New("file is larger than the limit")

// errRoot refuses to remove the root itself.
var errRoot = errors.New("refusing to remove the root directory")

// Options tunes OpenWith. The zero value uses the best the kernel offers.
type Options struct {
	// Legacy takes the code paths of kernels without openat2 (before 5.6)
	// and fchmodat2 (before 6.6) even where those exist: the user-space
	// walk resolves paths and chmod goes through an opened descriptor. Tests
	// set it to cover those paths on a new kernel.
	Legacy bool
}

// FS is a root directory. It holds only immutable values and one
// descriptor, so it is safe for concurrent use.
type FS struct {
	dir string // the root as a host path (HostPath, messages about the root)
	fd  int    // O_PATH descriptor of the root: every lookup starts here
	// resolve opens a root-relative path inside the root; it is a field so
	// tests can force the user-space walk.
	resolve resolver
	// fchmodat2 says whether to try fchmodat2(2) before the fallback.
	fchmodat2 bool
}

// Open opens dir as a root.
func Open(dir string) (*FS, error) { return OpenWith(dir, Options{}) }

// OpenWith opens dir as a root with options.
func OpenWith(dir string, o Options) (*FS, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("root %q: %w", dir, err)
	}
	fd, err := unix.Open(abs, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("root %s: %w (it must be an existing directory)", abs, err)
	}
	f := &FS{dir: abs, fd: fd, resolve: walkResolve, fchmodat2: !o.Legacy}
	if !o.Legacy {
		ok, err := haveOpenat2(fd)
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("root %s: %w", abs, err)
		}
		if ok {
			f.resolve = openat2Resolve
		}
	}
	return f, nil
}

// Close releases the root's descriptor.
func (f *FS) Close() error { return unix.Close(f.fd) }

// Dir is the root as a host path.
func (f *FS) Dir() string { return f.dir }

// HostPath maps an instance path to the host path below the root as text.
// It is only meaningful for a path without symlinks, such as one returned
// by ResolveLinks, and only for handing to something that cannot take a
// descriptor (a command's working directory).
func (f *FS) HostPath(p string) string { return filepath.Join(f.dir, Clean(p)) }

// Clean is p as an absolute, cleaned instance path: ".." cannot climb above
// "/", and a relative p is taken from "/".
func Clean(p string) string { return path.Clean("/" + p) }

// rel is the cleaned instance path p relative to the root, as the
// resolvers take it.
func rel(p string) string {
	if r := Clean(p)[1:]; r != "" {
		return r
	}
	return "."
}

// split is the names of a path's components, without empty ones and ".".
func split(p string) []string {
	var out []string
	for len(p) > 0 {
		var name string
		i := 0
		for i < len(p) && p[i] != '/' {
			i++
		}
		name, p = p[:i], p[i:]
		for len(p) > 0 && p[0] == '/' {
			p = p[1:]
		}
		if name != "" && name != "." {
			out = append(out, name)
		}
	}
	return out
}

func pathErr(op, p string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return err
	}
	return &fs.PathError{Op: op, Path: p, Err: err}
}

// fileInfo is an fs.FileInfo from a stat(2) result; Sys is *unix.Stat_t.
type fileInfo struct {
	name string
	st   unix.Stat_t
}

func (fi *fileInfo) Name() string       { return fi.name }
func (fi *fileInfo) Size() int64        { return fi.st.Size }
func (fi *fileInfo) Mode() fs.FileMode  { return modeFromStat(fi.st.Mode) }
func (fi *fileInfo) ModTime() time.Time { return time.Unix(fi.st.Mtim.Unix()) }
func (fi *fileInfo) IsDir() bool        { return fi.st.Mode&unix.S_IFMT == unix.S_IFDIR }
func (fi *fileInfo) Sys() any           { return &fi.st }

// Owner is the uid and gid of a FileInfo returned by this package (or by
// package os on Linux); ok is false for any other.
func Owner(fi fs.FileInfo) (uid, gid int, ok bool) {
	switch st := fi.Sys().(type) {
	case *unix.Stat_t:
		return int(st.Uid), int(st.Gid), true
	case *syscall.Stat_t:
		return int(st.Uid), int(st.Gid), true
	}
	return -1, -1, false
}

// modeFromStat converts st_mode to an fs.FileMode, as package os does.
func modeFromStat(m uint32) fs.FileMode {
	mode := FileMode(m & 0o7777)
	switch m & unix.S_IFMT {
	case unix.S_IFBLK:
		mode |= fs.ModeDevice
	case unix.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFDIR:
		mode |= fs.ModeDir
	case unix.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case unix.S_IFLNK:
		mode |= fs.ModeSymlink
	case unix.S_IFSOCK:
		mode |= fs.ModeSocket
	}
	return mode
}

// FileMode is the octal mode a recipe writes (0755, 4755) as an
// fs.FileMode; Go's fs.FileMode(0o4755) is not setuid, which is why this
// exists.
func FileMode(bits uint32) fs.FileMode {
	m := fs.FileMode(bits & 0o777)
	if bits&unix.S_ISUID != 0 {
		m |= fs.ModeSetuid
	}
	if bits&unix.S_ISGID != 0 {
		m |= fs.ModeSetgid
	}
	if bits&unix.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	return m
}

// ModeBits is the octal mode of m (permissions and setuid, setgid and
// sticky bits), the inverse of FileMode.
func ModeBits(m fs.FileMode) uint32 {
	b := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		b |= unix.S_ISUID
	}
	if m&fs.ModeSetgid != 0 {
		b |= unix.S_ISGID
	}
	if m&fs.ModeSticky != 0 {
		b |= unix.S_ISVTX
	}
	return b
}
