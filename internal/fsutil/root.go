// Package fsutil holds the few file-system primitives every verb shares: the
// configurable root that all instance paths go through, atomic writes, and
// the single-instance lock.
package fsutil

import (
	"fmt"
	"path/filepath"
	"strings"
)

// Root is the directory every instance path is relative to. On an instance it
// is "/"; tests and demos use a temporary directory so that nothing touches
// the host.
type Root struct{ dir string }

// NewRoot returns a Root for dir, which is made absolute.
func NewRoot(dir string) (Root, error) {
	if dir == "" {
		dir = "/"
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Root{}, fmt.Errorf("root %q: %w", dir, err)
	}
	return Root{dir: abs}, nil
}

// Dir is the absolute root directory.
func (r Root) Dir() string {
	if r.dir == "" {
		return "/"
	}
	return r.dir
}

// Path maps an instance path such as "/etc/opsagent.conf" below the root.
// The path is cleaned as if absolute first, so ".." can never climb above
// the root.
func (r Root) Path(p string) string {
	return filepath.Join(r.Dir(), filepath.Clean("/"+p))
}

// IsHost reports whether the root is the real file system root.
func (r Root) IsHost() bool { return r.Dir() == "/" }

// Instance maps a host path below the root back to the instance path (the
// form the config and the states repository's scripts use). It reports
// false for a path outside the root.
func (r Root) Instance(host string) (string, bool) {
	rel, err := filepath.Rel(r.Dir(), host)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", false
	}
	return filepath.Clean("/" + rel), true
}
