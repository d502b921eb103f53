package rootfs

import (
	"golang.org/x/sys/unix"
)

// A resolver opens path, relative to the root descriptor and already
// cleaned, as openat(2) would with flags, except that every symlink and
// ".." resolves inside the root. The final component is followed unless
// flags has O_NOFOLLOW. Flags never include O_CREAT: files are created
// with an *at call on their parent directory's descriptor.
type resolver func(root int, path string, flags int) (int, error)

// inRoot is how openat2 resolves: like a chroot at the root descriptor.
// Magic links (/proc/*/fd/*, /proc/*/exe) are refused: they jump anywhere.
const inRoot = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS

// haveOpenat2 probes the kernel. ENOSYS is a kernel before 5.6; EPERM is a
// seccomp filter (older container runtimes) that does not know openat2.
func haveOpenat2(root int) (bool, error) {
	fd, err := openat2Resolve(root, ".", unix.O_PATH)
	switch err {
	case nil:
		unix.Close(fd)
		return true, nil
	case unix.ENOSYS, unix.EPERM:
		return false, nil
	}
	return false, err
}

// openat2Resolve lets the kernel resolve in the root. EAGAIN means a
// rename or mount raced with a ".." lookup; the kernel asks to retry.
func openat2Resolve(root int, path string, flags int) (int, error) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: inRoot}
	for try := 0; ; try++ {
		fd, err := unix.Openat2(root, path, &how)
		if (err == unix.EAGAIN || err == unix.EINTR) && try < 64 {
			continue
		}
		return fd, err
	}
}

// walkResolve resolves in user space for kernels without openat2: one
// component at a time with openat(O_PATH|O_NOFOLLOW), symlinks read with
// readlinkat and spliced into the rest of the path, absolute targets
// restarted at the root, ".." clamped at the root, at most maxLinks links.
// ".." goes back to the descriptor the walk came through, never to a
// parent looked up by name, so it cannot climb out of the root.
func walkResolve(root int, path string, flags int) (int, error) {
	w := walker{root: root, rest: split(path)}
	defer w.reset()
	follow := flags&unix.O_NOFOLLOW == 0
	for len(w.rest) > 0 {
		name := w.rest[0]
		w.rest = w.rest[1:]
		if name == ".." {
			w.up()
			continue
		}
		last := len(w.rest) == 0
		fd, typ, err := lookup(w.cur(), name)
		switch {
		case err != nil:
			return -1, err
		case typ == unix.S_IFLNK && (follow || !last):
			err = w.splice(fd)
		case last:
			unix.Close(fd)
			// O_NOFOLLOW: if the name became a symlink since the lookup,
			// fail (or, for O_PATH, get the link itself) rather than follow.
			return unix.Openat(w.cur(), name, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		case typ == unix.S_IFDIR:
			w.stack = append(w.stack, fd)
		default:
			unix.Close(fd)
			err = unix.ENOTDIR
		}
		if err != nil {
			return -1, err
		}
	}
	// The path named a directory already walked into ("/", "a/..").
	return unix.Openat(w.cur(), ".", flags|unix.O_CLOEXEC, 0)
}

// lookup opens name in dir without following it and says its type.
func lookup(dir int, name string) (int, uint32, error) {
	fd, err := unix.Openat(dir, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, 0, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, 0, err
	}
	return fd, st.Mode & unix.S_IFMT, nil
}

// walker is where a walk is: the directories it went through below the
// root, the components still to resolve, and the links followed so far.
type walker struct {
	root  int
	stack []int
	rest  []string
	links int
}

func (w *walker) cur() int {
	if len(w.stack) == 0 {
		return w.root
	}
	return w.stack[len(w.stack)-1]
}

// up is "..": back one directory, staying at the root when at the root.
func (w *walker) up() {
	if n := len(w.stack); n > 0 {
		unix.Close(w.stack[n-1])
		w.stack = w.stack[:n-1]
	}
}

// reset goes back to the root (an absolute symlink target, or the end).
func (w *walker) reset() {
	for _, fd := range w.stack {
		unix.Close(fd)
	}
	w.stack = w.stack[:0]
}

// splice replaces the symlink open at fd (and closes it) by its target's
// components.
func (w *walker) splice(fd int) error {
	target, err := readlinkFD(fd)
	unix.Close(fd)
	if err != nil {
		return err
	}
	if w.links++; w.links > maxLinks {
		return unix.ELOOP
	}
	if target == "" {
		return unix.ENOENT
	}
	if target[0] == '/' {
		w.reset()
	}
	w.rest = append(split(target), w.rest...)
	return nil
}

// readlinkFD reads the target of a symlink opened with O_PATH|O_NOFOLLOW.
func readlinkFD(fd int) (string, error) {
	return readlinkAt(fd, "")
}

// readlinkAt reads a symlink's target, growing the buffer until it fits.
func readlinkAt(dirfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}
