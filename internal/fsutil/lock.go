package fsutil

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// ErrLocked is wrapped by Lock's error when another process holds the lock.
var ErrLocked = errors.New("already running")

// LockFile is an exclusive advisory lock (flock) held for the life of the
// process. The kernel releases it when the process dies, so a stale file
// left by a crash never blocks a restart.
type LockFile struct {
	f    *os.File
	path string
}

// Lock takes the exclusive lock on path without waiting and records this
// process's pid in it. When another process holds it the error says which
// pid, e.g. "lock /var/lib/visualops/opsagent/lock: already running as pid 42".
func Lock(path string) (*LockFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			if pid := readPID(f); pid > 0 {
				return nil, fmt.Errorf("lock %s: %w as pid %d (stop that agent first, e.g. systemctl stop opsagent)", path, ErrLocked, pid)
			}
			return nil, fmt.Errorf("lock %s: %w (held by another process)", path, ErrLocked)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		_ = f.Sync()
	}
	return &LockFile{f: f, path: path}, nil
}

// HolderPID returns the pid recorded in the lock file at path and whether a
// live process still holds the lock. It is how `opsagent status` tells if
// the agent runs.
func HolderPID(path string) (pid int, held bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("lock %s: %w", path, err)
	}
	defer f.Close()
	pid = readPID(f)
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return pid, true, nil
		}
		return pid, false, fmt.Errorf("lock %s: %w", path, err)
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return pid, false, nil
}

func readPID(f *os.File) int {
	buf := make([]byte, 32)
	n, _ := f.ReadAt(buf, 0)
	pid, err := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	if err != nil {
		return 0
	}
	return pid
}

// Path is the lock file's path.
func (l *LockFile) Path() string { return l.path }

// Unlock releases the lock. The file is left in place on purpose: removing
// it would race with a process that opened it and is about to lock it.
func (l *LockFile) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	cerr := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("unlock %s: %w", l.path, err)
	}
	return cerr
}
