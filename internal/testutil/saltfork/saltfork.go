// Package saltfork gives tests the real states repository: a clone of
// testdata/fixtures/salt-fork.bundle (MadeiraCloud/salt at tag
// v2015-03-26: the 2014 adaptor and Salt 2014.1.0, Python 2 only). The
// Python 2.7 to run it is virtualenv/venvtest's (Python2): a test helper
// lives beside the package it belongs to, and internal/testutil imports
// nothing above internal/.
package saltfork

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Tag is the fork's tag the bundle holds.
const Tag = "v2015-03-26"

// Root returns the project's root: the nearest directory above the working
// directory (a package's, under go test) that holds go.mod.
func Root(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("saltfork: no go.mod above the working directory; run the test with go test inside the module")
		}
		dir = parent
	}
}

// Libs returns testdata/fixtures/salt-py2-libs: PyYAML, Jinja2, MarkupSafe
// and msgpack as plain package directories, in versions that run on
// Python 2 (a wheelhouse for virtualenv.Env.InstallFromWheelhouse).
func Libs(t testing.TB) string {
	t.Helper()
	return filepath.Join(Root(t), "testdata", "fixtures", "salt-py2-libs")
}

// Clone clones the bundle into a new temporary directory, checks out Tag
// and returns the clone. Skips when git is not installed.
func Clone(t testing.TB) string {
	t.Helper()
	git, err := exec.LookPath("git")
	if err != nil {
		t.Skip("saltfork: git is not installed; it is needed to clone testdata/fixtures/salt-fork.bundle")
	}
	bundle := filepath.Join(Root(t), "testdata", "fixtures", "salt-fork.bundle")
	dir := filepath.Join(t.TempDir(), "salt")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"clone", "--quiet", bundle, dir},
		{"-C", dir, "checkout", "--quiet", Tag},
	} {
		cmd := exec.CommandContext(ctx, git, args...)
		// Neither the user's nor the system's git configuration.
		cmd.Env = append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_TERMINAL_PROMPT=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("saltfork: git %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return dir
}
