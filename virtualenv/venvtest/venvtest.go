// Package venvtest holds test helpers for code that needs what package
// virtualenv finds on the machine, kept beside the package they belong
// to (as Nomad's client/config/testing.go is), so that internal/testutil
// never imports upward.
package venvtest

import (
	"context"
	"testing"

	"github.com/visualops/opsagent/virtualenv"
)

// Python2 returns a Python 2.7 interpreter, found as the agent finds it
// (virtualenv.FindPython2), or skips the test when the machine has none.
func Python2(t testing.TB) string {
	t.Helper()
	py, err := virtualenv.FindPython2(context.Background(), nil)
	if err != nil {
		t.Skipf("venvtest: this test needs Python 2.7 (pyenv's 2.7.18 on the project's machines): %v", err)
	}
	return py
}
