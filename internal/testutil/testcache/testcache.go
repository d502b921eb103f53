// Package testcache is where tests keep what is slow to make and safe to
// reuse between runs (a debootstrapped root, built packages, a nats-server
// binary, an older backend built from git): $OPSAGENT_TEST_CACHE, else
// opsagent-test in the user's cache directory. CI points it at an empty
// directory to prove a cold run.
package testcache

import (
	"os"
	"path/filepath"
)

// Dir is the test cache's directory (not created).
func Dir() string {
	if d := os.Getenv("OPSAGENT_TEST_CACHE"); d != "" {
		return d
	}
	d, err := os.UserCacheDir()
	if err != nil {
		d = os.TempDir()
	}
	return filepath.Join(d, "opsagent-test")
}
