package fsutil

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// ErrTooLarge is wrapped by ReadFileLimit's error for a file over the limit.
var ErrTooLarge = errors.New("file too large")

// ReadFileLimit reads a whole file of at most max bytes. Every file the
// agent reads (config, token, state files) goes through it, so that a huge
// or endless file (a device, a runaway log linked in its place) cannot make
// a small agent allocate without bound.
func ReadFileLimit(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("%s: %w: more than %d bytes", path, ErrTooLarge, max)
	}
	return data, nil
}
