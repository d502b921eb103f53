package rootfs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path"
	"strconv"

	"golang.org/x/sys/unix"
)

// open resolves p inside the root with open flags.
func (f *FS) open(p string, flags int) (int, error) {
	return f.resolve(f.fd, rel(p), flags)
}

// parent opens the directory that holds p's final component, following
// symlinks inside the root, and returns it with that name. For "/" it is
// the root itself and ".". The caller closes the descriptor.
func (f *FS) parent(p string, flags int) (dirfd int, name string, err error) {
	p = Clean(p)
	if p == "/" {
		fd, err := f.open("/", flags|unix.O_DIRECTORY)
		return fd, ".", err
	}
	fd, err := f.open(path.Dir(p), flags|unix.O_DIRECTORY)
	return fd, path.Base(p), err
}

func (f *FS) stat(p string, flags int) (fs.FileInfo, error) {
	fd, err := f.open(p, unix.O_PATH|flags)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	fi := &fileInfo{name: path.Base(Clean(p))}
	if err := unix.Fstat(fd, &fi.st); err != nil {
		return nil, err
	}
	return fi, nil
}

// Lstat describes p itself; a final symlink is not followed.
func (f *FS) Lstat(p string) (fs.FileInfo, error) {
	fi, err := f.stat(p, unix.O_NOFOLLOW)
	if err != nil {
		return nil, pathErr("lstat", Clean(p), err)
	}
	return fi, nil
}

// Stat describes what p names, following symlinks inside the root.
func (f *FS) Stat(p string) (fs.FileInfo, error) {
	fi, err := f.stat(p, 0)
	if err != nil {
		return nil, pathErr("stat", Clean(p), err)
	}
	return fi, nil
}

// ReadFile reads what p names (following symlinks inside the root), at
// most max bytes; a longer file fails with ErrTooLarge. O_NONBLOCK keeps a
// FIFO from blocking the caller forever.
func (f *FS) ReadFile(p string, max int64) ([]byte, error) {
	p = Clean(p)
	fd, err := f.open(p, unix.O_RDONLY|unix.O_NOCTTY|unix.O_NONBLOCK)
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	file := os.NewFile(uintptr(fd), p)
	defer file.Close()
	data, err := io.ReadAll(io.LimitReader(file, max+1))
	if err != nil {
		return nil, pathErr("read", p, err)
	}
	if int64(len(data)) > max {
		return nil, pathErr("read", p, fmt.Errorf("%w of %d bytes", ErrTooLarge, max))
	}
	return data, nil
}

// OpenFile opens p's final name in its directory (resolved inside the
// root) with flags, never following a symlink there (O_NOFOLLOW: a link
// at p fails with ELOOP), and O_NONBLOCK so that a FIFO planted at p
// cannot block the caller. With O_CREATE the file gets perm less the
// umask. The caller checks what it opened (Stat) when it needs a regular
// file.
func (f *FS) OpenFile(p string, flags int, perm fs.FileMode) (*os.File, error) {
	p = Clean(p)
	dirfd, name, err := f.parent(p, unix.O_PATH)
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	defer unix.Close(dirfd)
	if name == "." {
		return nil, pathErr("open", p, unix.EISDIR)
	}
	fd, err := unix.Openat(dirfd, name, flags|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, ModeBits(perm))
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	return os.NewFile(uintptr(fd), f.HostPath(p)), nil
}

// WriteFileAtomic replaces p with data so that a reader sees the old
// content or the new, never a mix, even across a crash. The data goes to a
// temporary file created in p's directory (resolved inside the root); it
// gets its owner (uid, gid; -1 keeps the agent's) and then perm, in that
// order because chown clears setuid and setgid; it is synced and renamed
// over p's name. A symlink at p is replaced, not followed (callers that
// want "follow" pass the path from ResolveLinks). The file is created
// 0600, so it is never readable by more than perm allows.
func (f *FS) WriteFileAtomic(p string, data []byte, perm fs.FileMode, uid, gid int) error {
	p = Clean(p)
	if err := f.writeFileAtomic(p, data, perm, uid, gid); err != nil {
		return pathErr("write", p, err)
	}
	return nil
}

func (f *FS) writeFileAtomic(p string, data []byte, perm fs.FileMode, uid, gid int) error {
	dirfd, name, err := f.parent(p, unix.O_RDONLY)
	if err != nil {
		return err
	}
	defer unix.Close(dirfd)
	if name == "." {
		return unix.EISDIR
	}
	tmp, fd, err := createTemp(dirfd, name)
	if err != nil {
		return err
	}
	file := os.NewFile(uintptr(fd), tmp)
	ok := false
	defer func() {
		if !ok {
			file.Close()
			unix.Unlinkat(dirfd, tmp, 0)
		}
	}()
	if _, err := file.Write(data); err != nil {
		return err
	}
	if err := fchownIfNeeded(fd, uid, gid); err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	if err := unix.Fchmod(fd, ModeBits(perm)); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	if err := file.Sync(); err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	if err := file.Close(); err != nil {
		return err
	}
	if err := unix.Renameat(dirfd, tmp, dirfd, name); err != nil {
		return fmt.Errorf("rename: %w", err)
	}
	ok = true
	if err := unix.Fsync(dirfd); err != nil {
		return fmt.Errorf("sync directory: %w", err)
	}
	return nil
}

// fchownIfNeeded gives fd the owner asked for unless it has it already: a
// non-root agent may keep its own ids but not give a file away.
func fchownIfNeeded(fd, uid, gid int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if (uid < 0 || uint32(uid) == st.Uid) && (gid < 0 || uint32(gid) == st.Gid) {
		return nil
	}
	return unix.Fchown(fd, uid, gid)
}

// createTemp creates a new file beside name in dirfd, mode 0600.
func createTemp(dirfd int, name string) (string, int, error) {
	for try := 0; ; try++ {
		tmp := "." + name + ".tmp-" + strconv.FormatUint(uint64(rand.Uint32()), 36)
		fd, err := unix.Openat(dirfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err == unix.EEXIST && try < 100 {
			continue
		}
		return tmp, fd, err
	}
}

// Mkdir creates directory p (perm, less the umask). A symlink at p is
// not followed: it makes Mkdir fail with fs.ErrExist.
func (f *FS) Mkdir(p string, perm fs.FileMode) error {
	p = Clean(p)
	dirfd, name, err := f.parent(p, unix.O_PATH)
	if err != nil {
		return pathErr("mkdir", p, err)
	}
	defer unix.Close(dirfd)
	if err := unix.Mkdirat(dirfd, name, ModeBits(perm)); err != nil {
		return pathErr("mkdir", p, err)
	}
	return nil
}

// MkdirAll creates p and its missing parents with perm (less the umask)
// and calls onCreate, if not nil, with each directory it created, parents
// first, right after creating it (to give it its owner and exact mode
// before anything is created inside). Existing components may be symlinks
// to directories inside the root.
func (f *FS) MkdirAll(p string, perm fs.FileMode, onCreate func(path string) error) error {
	p = Clean(p)
	if fi, err := f.Stat(p); err == nil {
		if !fi.IsDir() {
			return pathErr("mkdir", p, unix.ENOTDIR)
		}
		return nil
	}
	cur := "/"
	for _, name := range split(p) {
		cur = path.Join(cur, name)
		err := f.Mkdir(cur, perm)
		switch {
		case err == nil:
			if onCreate != nil {
				if err := onCreate(cur); err != nil {
					return err
				}
			}
		case errors.Is(err, fs.ErrExist):
			fi, err := f.Stat(cur)
			if err != nil {
				return err
			}
			if !fi.IsDir() {
				return pathErr("mkdir", cur, unix.ENOTDIR)
			}
		default:
			return err
		}
	}
	return nil
}

// Chmod sets p's mode (permissions and setuid, setgid, sticky bits). With
// follow a final symlink is followed inside the root; without, a symlink
// at p fails (symlinks have no mode of their own on Linux).
//
// Race resistance: the object is opened once with O_PATH and the mode set
// on that descriptor with fchmodat2(fd, "", AT_EMPTY_PATH) (Linux 6.6), so
// what is changed is exactly what was resolved. Before 6.6 fchmod cannot
// take an O_PATH descriptor and /proc/self/fd is not used, so the object's
// in-root path is resolved, opened from its parent with O_NOFOLLOW (a
// symlink swapped in fails), checked to be the same inode as the O_PATH
// descriptor, and fchmod'ed. That fallback handles only regular files and
// directories, which open without side effects (and, unless the agent is
// root, only readable ones).
func (f *FS) Chmod(p string, mode fs.FileMode, follow bool) error {
	p = Clean(p)
	if err := f.chmod(p, ModeBits(mode), follow); err != nil {
		return pathErr("chmod", p, err)
	}
	return nil
}

func (f *FS) chmod(p string, bits uint32, follow bool) error {
	flags := unix.O_PATH
	if !follow {
		flags |= unix.O_NOFOLLOW
	}
	fd, err := f.open(p, flags)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return errors.New("is a symbolic link, which has no mode of its own")
	}
	if f.fchmodat2 {
		err := unix.Fchmodat(fd, "", bits, unix.AT_EMPTY_PATH)
		// x/sys reports a missing fchmodat2 as EOPNOTSUPP; a seccomp
		// filter that does not know it may say ENOSYS or EPERM.
		if err != unix.EOPNOTSUPP && err != unix.ENOSYS && err != unix.EPERM {
			return err
		}
	}
	return f.chmodByOpen(p, &st, bits, follow)
}

// chmodByOpen is Chmod for kernels without fchmodat2.
func (f *FS) chmodByOpen(p string, want *unix.Stat_t, bits uint32, follow bool) error {
	typ := want.Mode & unix.S_IFMT
	if typ != unix.S_IFREG && typ != unix.S_IFDIR {
		return errors.New("not a regular file or directory (this kernel lacks fchmodat2)")
	}
	if follow {
		real, err := f.ResolveLinks(p)
		if err != nil {
			return err
		}
		p = real
	}
	dirfd, name, err := f.parent(p, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(dirfd)
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Dev != want.Dev || st.Ino != want.Ino {
		return errors.New("changed while its mode was being set; run again")
	}
	return unix.Fchmod(fd, bits)
}

// Chown sets p's owner; -1 leaves uid or gid unchanged. With follow a
// final symlink is followed inside the root; without, a symlink's own
// owner changes. It acts on the descriptor that resolution returned
// (fchownat AT_EMPTY_PATH), so nothing can be swapped in between.
func (f *FS) Chown(p string, uid, gid int, follow bool) error {
	p = Clean(p)
	flags := unix.O_PATH
	if !follow {
		flags |= unix.O_NOFOLLOW
	}
	fd, err := f.open(p, flags)
	if err != nil {
		return pathErr("chown", p, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return pathErr("chown", p, err)
	}
	return nil
}

// Remove removes the file, symlink (not its target) or empty directory p.
func (f *FS) Remove(p string) error {
	p = Clean(p)
	if p == "/" {
		return pathErr("remove", p, errRoot)
	}
	dirfd, name, err := f.parent(p, unix.O_PATH)
	if err != nil {
		return pathErr("remove", p, err)
	}
	defer unix.Close(dirfd)
	err = unix.Unlinkat(dirfd, name, 0)
	if err == unix.EISDIR {
		err = unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
	}
	if err != nil {
		return pathErr("remove", p, err)
	}
	return nil
}

// RemoveAll removes p and everything below it; a missing p is not an
// error. It never follows a symlink: a link is removed, not what it points
// to, and directories are opened from their parent's descriptor with
// O_NOFOLLOW. It refuses to remove the root.
func (f *FS) RemoveAll(p string) error {
	p = Clean(p)
	if p == "/" {
		return pathErr("remove", p, errRoot)
	}
	dirfd, name, err := f.parent(p, unix.O_PATH)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return pathErr("remove", p, err)
	}
	defer unix.Close(dirfd)
	return removeAllAt(dirfd, name, p)
}

// removeAllAt removes name in dirfd; p is its instance path for errors.
func removeAllAt(dirfd int, name, p string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	if err != unix.EISDIR {
		return pathErr("remove", p, err)
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return pathErr("remove", p, err)
	}
	dir := os.NewFile(uintptr(fd), p)
	names, err := dir.Readdirnames(-1)
	if err != nil {
		dir.Close()
		return pathErr("remove", p, err)
	}
	for _, n := range names {
		if err := removeAllAt(fd, n, path.Join(p, n)); err != nil {
			dir.Close()
			return err
		}
	}
	dir.Close()
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && err != unix.ENOENT {
		return pathErr("remove", p, err)
	}
	return nil
}

// Symlink creates linkpath pointing to target. The target is stored as
// given; it is resolved inside the root whenever this package follows it.
func (f *FS) Symlink(target, linkpath string) error {
	linkpath = Clean(linkpath)
	dirfd, name, err := f.parent(linkpath, unix.O_PATH)
	if err != nil {
		return pathErr("symlink", linkpath, err)
	}
	defer unix.Close(dirfd)
	if err := unix.Symlinkat(target, dirfd, name); err != nil {
		return pathErr("symlink", linkpath, err)
	}
	return nil
}

// Readlink is the target of symlink p, as stored.
func (f *FS) Readlink(p string) (string, error) {
	p = Clean(p)
	fd, err := f.open(p, unix.O_PATH|unix.O_NOFOLLOW)
	if err != nil {
		return "", pathErr("readlink", p, err)
	}
	defer unix.Close(fd)
	target, err := readlinkFD(fd)
	if err == unix.ENOENT {
		err = unix.EINVAL // readlinkat(fd, "") on a non-link, as readlink(2) says it
	}
	if err != nil {
		return "", pathErr("readlink", p, err)
	}
	return target, nil
}

// Rename renames oldpath to newpath, replacing a file or symlink there (a
// symlink at either name is renamed or replaced, never followed).
func (f *FS) Rename(oldpath, newpath string) error {
	oldpath, newpath = Clean(oldpath), Clean(newpath)
	odir, oname, err := f.parent(oldpath, unix.O_PATH)
	if err != nil {
		return pathErr("rename", oldpath, err)
	}
	defer unix.Close(odir)
	ndir, nname, err := f.parent(newpath, unix.O_PATH)
	if err != nil {
		return pathErr("rename", newpath, err)
	}
	defer unix.Close(ndir)
	if err := unix.Renameat(odir, oname, ndir, nname); err != nil {
		return pathErr("rename", oldpath, fmt.Errorf("to %s: %w", newpath, err))
	}
	return nil
}
