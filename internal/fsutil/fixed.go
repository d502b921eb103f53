package fsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// The agent's fixed paths (its state directory, its log, the update's
// download and staged binary, …) are its own files and directories: a
// symbolic link or anything else planted at one is refused with the path's
// name, never followed, written through or chmodded through. OpenFixedFile
// is the reading side; these are the writing side.

// ErrNotDirectory is wrapped by EnsureDir's error for a path that holds
// a symbolic link or anything else but a directory.
var ErrNotDirectory = errors.New("not a directory")

// EnsureDir makes sure the directory at path exists, creating it (and
// missing parents) with mode when it does not. A symbolic link at path is
// refused, not followed, and so is anything else but a directory; the
// mode of a directory already there is left as it is.
func EnsureDir(path string, mode fs.FileMode) error {
	if err := checkDir(path); !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(path, mode); err != nil {
		return err
	}
	return checkDir(path) // a link put there in between
}

func checkDir(path string) error {
	st, err := os.Lstat(path)
	switch {
	case err != nil:
		return err
	case st.Mode()&fs.ModeSymlink != 0:
		target, _ := os.Readlink(path)
		return &fs.PathError{Op: "mkdir", Path: path, Err: fmt.Errorf("is a symbolic link (to %s), %w: the agent does not follow links at its own paths; remove the link", target, ErrNotDirectory)}
	case !st.IsDir():
		return &fs.PathError{Op: "mkdir", Path: path, Err: fmt.Errorf("is %s, %w: move it away", kind(st.Mode()), ErrNotDirectory)}
	}
	return nil
}

// AppendFixedFile opens the file at path for appending, creating it with
// perm when it does not exist: never following a link at its name
// (O_NOFOLLOW) and never blocking on a FIFO (O_NONBLOCK), and then fstat
// must say regular file.
func AppendFixedFile(path string, perm fs.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_NOCTTY, perm)
	return checkOpened(f, path, err)
}

// CreateFixedFile creates the file at path with perm for writing,
// replacing a regular file there: the old file is removed and the new one
// created with O_EXCL|O_NOFOLLOW, so that neither a link planted at the
// name nor one put there in between is followed. A link, a directory or
// anything else at path is refused.
func CreateFixedFile(path string, perm fs.FileMode) (*os.File, error) {
	switch st, err := os.Lstat(path); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, err
	case !st.Mode().IsRegular():
		return nil, notRegular("create", path, st.Mode())
	default:
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_NOCTTY, perm)
	if errors.Is(err, fs.ErrExist) {
		return nil, &fs.PathError{Op: "create", Path: path, Err: fmt.Errorf("was put back while it was being replaced: %w", ErrNotRegular)}
	}
	f, err = checkOpened(f, path, err)
	if err != nil {
		return nil, err
	}
	if err := f.Chmod(perm); err != nil { // past the umask
		f.Close()
		return nil, err
	}
	return f, nil
}

// checkOpened turns an O_NOFOLLOW open's ELOOP into an error naming the
// link, and refuses what fstat says is not a regular file.
func checkOpened(f *os.File, path string, err error) (*os.File, error) {
	if errors.Is(err, syscall.ELOOP) {
		return nil, notRegular("open", path, fs.ModeSymlink)
	}
	if errors.Is(err, syscall.ENXIO) { // a FIFO with no reader, opened O_NONBLOCK for writing
		return nil, notRegular("open", path, fs.ModeNamedPipe)
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, notRegular("open", path, st.Mode())
	}
	return f, nil
}

func notRegular(op, path string, m fs.FileMode) error {
	if m&fs.ModeSymlink != 0 {
		target := ""
		if t, err := os.Readlink(path); err == nil {
			target = " (to " + t + ")"
		}
		return &fs.PathError{Op: op, Path: path, Err: fmt.Errorf("is a symbolic link%s, %w: the agent does not follow links at its own paths; remove the link", target, ErrNotRegular)}
	}
	return &fs.PathError{Op: op, Path: path, Err: fmt.Errorf("is %s, %w: remove it", kind(m), ErrNotRegular)}
}
