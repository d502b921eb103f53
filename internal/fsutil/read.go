package fsutil

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

// ErrTooLarge is wrapped by ReadFileLimit's error for a file over the limit.
var ErrTooLarge = errors.New("file too large")

// ReadFileLimit reads a whole file of at most max bytes. Every file the
// agent reads (config, token, state files) goes through it or
// ReadFixedFile, so that a huge or endless file (a device, a runaway log
// linked in its place) cannot make a small agent allocate without bound.
// It takes what the path names, as an operator may name /dev/stdin or a
// pipe on purpose: files at the agent's own fixed paths use ReadFixedFile.
func ReadFileLimit(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readLimit(f, path, max)
}

func readLimit(f *os.File, path string, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("%s: %w: more than %d bytes", path, ErrTooLarge, max)
	}
	return data, nil
}

// ErrNotRegular is wrapped by OpenFixedFile's error for a path that holds a
// symbolic link, a FIFO, a device, a socket or a directory.
var ErrNotRegular = errors.New("not a regular file")

// ReadFixedFile is ReadFileLimit for a file the agent keeps at a fixed path
// (the config, the token, recipe.json, update.state, status.json, …): it
// opens it with OpenFixedFile.
func ReadFixedFile(path string, max int64) ([]byte, error) {
	f, err := OpenFixedFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readLimit(f, path, max)
}

// OpenFixedFile opens a file at one of the agent's fixed paths for reading,
// never blocking and never following a link: O_NONBLOCK (a FIFO planted
// there would block the open, and then the read, until a writer came: a
// wedged agent that ignores SIGTERM), O_NOFOLLOW, and then fstat must say
// regular file. Anything else is refused with an error naming the path.
func OpenFixedFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_NOCTTY, 0)
	return checkOpened(f, path, err)
}

// kind names what a non-regular file is, for an error message.
func kind(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe (FIFO)"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	case m.IsDir():
		return "a directory"
	}
	return "a file of type " + m.Type().String()
}
