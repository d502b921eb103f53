package fsutil

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// ErrLocked is wrapped by Lock's error when another process holds the lock.
var ErrLocked = errors.New("already running")

// LockFDEnv names the environment variable through which a process that
// re-executes itself (a self-update) hands its lock to the new image: the
// descriptor stays open across exec, so the lock is never released and no
// second agent can slip in between the two.
const LockFDEnv = "OPSAGENT_LOCK_FD"

// Open file description locks (fcntl F_OFD_*, Linux 3.15+). Unlike flock
// they can be queried without being taken (F_OFD_GETLK), so `opsagent
// status` never holds the agent's lock even for a moment; like flock they
// belong to the open file, so they survive exec when the descriptor is
// inherited, and the kernel drops them when the process dies.
const (
	fOFDGetLk = 36
	fOFDSetLk = 37
)

// LockFile is an exclusive advisory lock held for the life of the process.
// A stale file left by a crash never blocks a restart.
type LockFile struct {
	f    *os.File
	path string
}

// Lock takes the exclusive lock on path without waiting and records this
// process's pid in it. When another process holds it the error says which
// pid, e.g. "lock /var/lib/visualops/opsagent/lock: already running as pid 42".
// A lock handed over through LockFDEnv (see HandOver) is adopted.
func Lock(path string) (*LockFile, error) {
	if l := adopt(path); l != nil {
		return l, nil
	}
	f, err := openLockFile(path, os.O_RDWR|os.O_CREATE)
	if err != nil {
		return nil, err
	}
	if err := ofdLock(f, syscall.F_WRLCK); err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) {
			if pid := readPID(f); pid > 0 {
				return nil, fmt.Errorf("lock %s: %w as pid %d", path, ErrLocked, pid)
			}
			return nil, fmt.Errorf("lock %s: %w (held by another process)", path, ErrLocked)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	// The pid first, then the tail of a longer old one cut off: a reader
	// reads the first line (readPID), so it never sees an empty file.
	line := []byte(strconv.Itoa(os.Getpid()) + "\n")
	if _, err := f.WriteAt(line, 0); err == nil {
		_ = f.Truncate(int64(len(line)))
		_ = f.Sync()
	}
	return &LockFile{f: f, path: path}, nil
}

// openLockFile opens a lock file without following a link at its name
// (O_NOFOLLOW), without blocking on a FIFO, and without truncating it,
// and refuses anything but a regular file with one name: a link, device
// or hard link planted there would otherwise have the pid written into
// whatever it leads to.
func openLockFile(path string, flags int) (*os.File, error) {
	f, err := os.OpenFile(path, flags|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("lock %s is a symbolic link, %w: remove it (a lock file is never followed)", path, ErrNotRegular)
	}
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("lock %s is %s, %w: remove it", path, kind(st.Mode()), ErrNotRegular)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Nlink > 1 {
		f.Close()
		return nil, fmt.Errorf("lock %s has %d hard links: remove it (a lock file has one name)", path, sys.Nlink)
	}
	return f, nil
}

// adopt takes over a lock descriptor inherited through LockFDEnv when it
// names the same file as path; otherwise it returns nil and the variable
// is ignored (it may be stale, or meant for another root).
func adopt(path string) *LockFile {
	v := os.Getenv(LockFDEnv)
	if v == "" {
		return nil
	}
	_ = os.Unsetenv(LockFDEnv) // not for our children
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil
	}
	f := os.NewFile(uintptr(fd), path)
	if f == nil {
		return nil
	}
	var got, want syscall.Stat_t
	if syscall.Fstat(fd, &got) != nil || syscall.Stat(path, &want) != nil || got.Dev != want.Dev || got.Ino != want.Ino {
		_ = f.Close()
		return nil
	}
	// Our own open file description already holds the lock; setting it
	// again succeeds and proves it.
	if ofdLock(f, syscall.F_WRLCK) != nil {
		_ = f.Close()
		return nil
	}
	syscall.CloseOnExec(fd)
	return &LockFile{f: f, path: path}
}

func ofdLock(f *os.File, typ int16) error {
	lk := syscall.Flock_t{Type: typ, Whence: io.SeekStart}
	return syscall.FcntlFlock(f.Fd(), fOFDSetLk, &lk)
}

// HolderPID returns the pid recorded in the lock file at path and whether a
// live process holds the lock. It only asks the kernel (F_OFD_GETLK): it
// never takes the lock, so an agent starting at the same moment is not
// turned away. It is how `opsagent status` tells if the agent runs.
//
// The file's text is only a claim (anyone who can write the file, below
// a --root someone else prepared, can write any pid): the pid is returned
// only when that process has the lock file open, else 0. Callers signal
// that pid (stop, reload, update), so a forged one must never reach them.
func HolderPID(path string) (pid int, held bool, err error) {
	f, err := openLockFile(path, os.O_RDONLY)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, false, nil
		}
		return 0, false, err
	}
	defer f.Close()
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: io.SeekStart}
	if err := syscall.FcntlFlock(f.Fd(), fOFDGetLk, &lk); err != nil {
		return 0, false, fmt.Errorf("lock %s: %w", path, err)
	}
	held = lk.Type != syscall.F_UNLCK
	if pid = readPID(f); pid > 0 && !hasOpen(pid, f) {
		pid = 0
	}
	return pid, held, nil
}

// hasOpen reports whether process pid has the file f is open on among its
// descriptors (/proc/<pid>/fd). Not being allowed to look is a no.
func hasOpen(pid int, f *os.File) bool {
	want, err := f.Stat()
	if err != nil {
		return false
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if got, err := os.Stat(dir + "/" + e.Name()); err == nil && os.SameFile(got, want) {
			return true
		}
	}
	return false
}

// readPID reads the pid on the lock file's first line (0: none).
func readPID(f *os.File) int {
	buf := make([]byte, 32)
	n, _ := f.ReadAt(buf, 0)
	line, _, _ := strings.Cut(string(buf[:n]), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// Path is the lock file's path.
func (l *LockFile) Path() string { return l.path }

// HandOver keeps the lock open across the exec that is about to happen and
// returns the environment entry that tells the new image where it is
// ("OPSAGENT_LOCK_FD=3"). The caller must exec right after; if the exec
// fails, Unlock still releases the lock.
func (l *LockFile) HandOver() (string, error) {
	if l == nil || l.f == nil {
		return "", errors.New("lock: nothing to hand over")
	}
	fd := int(l.f.Fd())
	if _, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_SETFD, 0); errno != 0 {
		return "", fmt.Errorf("lock %s: keep across exec: %w", l.path, errno)
	}
	return LockFDEnv + "=" + strconv.Itoa(fd), nil
}

// Unlock releases the lock. The file is left in place on purpose: removing
// it would race with a process that opened it and is about to lock it.
func (l *LockFile) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := ofdLock(l.f, syscall.F_UNLCK)
	cerr := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("unlock %s: %w", l.path, err)
	}
	return cerr
}
