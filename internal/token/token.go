// Package token reads and creates the instance token (/etc/opsagent.token):
// 256 random bits, hex, mode 0400. The agent creates it when it is
// missing and the installer creates it once; both go through here.
package token

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/visualops/opsagent/internal/fsutil"
)

// Bytes is the size of a generated token (256 bits).
const Bytes = 32

// Mode is the token file's mode.
const Mode = 0o400

// maxFile bounds what is read of the token file (a token is 65 bytes).
const maxFile = 4 << 10

// Create writes a fresh random token to path, atomically, replacing any.
func Create(path string) error {
	buf := make([]byte, Bytes)
	if _, err := rand.Read(buf); err != nil {
		return fmt.Errorf("instance token: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("instance token %s: %w", path, err)
	}
	if err := fsutil.WriteFileAtomic(path, []byte(hex.EncodeToString(buf)+"\n"), Mode); err != nil {
		return fmt.Errorf("instance token %s: %w", path, err)
	}
	return nil
}

// Problem says what is wrong with the token file at path as it is:
// ErrMissing, a file that is not regular (a link or a directory: an error
// that says to remove it), one with other names (a hard link: the token
// would be read from, and chmodded as, a file that is someone else's
// too), or one others can read (ErrTooOpen; the caller tightens it and
// warns). nil means a usable file.
func Problem(path string) error {
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return ErrMissing
	case err != nil:
		return fmt.Errorf("instance token %s: %w", path, err)
	}
	return problemOf(path, st)
}

// problemOf is Problem for what Lstat or fstat said of the file at path.
func problemOf(path string, st fs.FileInfo) error {
	switch {
	case !st.Mode().IsRegular():
		return fmt.Errorf("instance token %s is not a regular file (%s): remove it; a new token is created at the next start", path, st.Mode().Type())
	case links(st) > 1:
		return fmt.Errorf("instance token %s has %d names (a hard link to another file): remove it; a new token is created at the next start", path, links(st))
	case st.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("instance token %s has mode %04o: %w", path, st.Mode().Perm(), ErrTooOpen)
	}
	return nil
}

func links(st fs.FileInfo) uint64 {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(sys.Nlink)
	}
	return 1
}

// ErrMissing: there is no token file yet.
var ErrMissing = errors.New("no instance token")

// ErrTooOpen: the token file is readable by others than its owner.
var ErrTooOpen = errors.New("readable by others")

// Read returns the token in path ("" for an empty file).
func Read(path string) (string, error) {
	data, err := fsutil.ReadFixedFile(path, maxFile)
	if err != nil {
		return "", fmt.Errorf("instance token %s: %w", path, err)
	}
	return strings.TrimSpace(string(data)), nil
}

// Ensure returns the token in path, creating one when the file is missing
// or empty, and tightening a file others can read to 0400 (warn is told).
// The file is checked, tightened and read through one descriptor opened
// without following a link (fsutil.OpenFixedFile), so that a link put at
// path after the check is never chmodded or read through. A link, a
// directory or a hard link in its place is an error that says what to do.
func Ensure(path string, warn func(msg string)) (string, error) {
	tok, err := ensure(path, warn)
	if err != nil || tok != "" {
		return tok, err
	}
	if err := Create(path); err != nil {
		return "", err
	}
	return Read(path)
}

// ensure is Ensure up to an empty token ("", nil).
func ensure(path string, warn func(msg string)) (string, error) {
	if err := Problem(path); errors.Is(err, ErrMissing) {
		if err := Create(path); err != nil {
			return "", err
		}
	}
	f, err := fsutil.OpenFixedFile(path)
	if err != nil {
		return "", fmt.Errorf("instance token: %w (remove it; a new token is created at the next start)", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("instance token %s: %w", path, err)
	}
	switch err := problemOf(path, st); {
	case errors.Is(err, ErrTooOpen):
		warn(err.Error() + "; mode set to 0400")
		if err := f.Chmod(Mode); err != nil {
			return "", fmt.Errorf("instance token %s: %w", path, err)
		}
	case err != nil:
		return "", err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return "", fmt.Errorf("instance token %s: %w", path, err)
	}
	if len(data) > maxFile {
		return "", fmt.Errorf("instance token %s: %w: more than %d bytes", path, fsutil.ErrTooLarge, maxFile)
	}
	return strings.TrimSpace(string(data)), nil
}
