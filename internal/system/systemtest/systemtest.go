// Package systemtest holds test helpers for roots that package system
// reads: the accounts files a bare temporary root lacks.
package systemtest

import (
	"os"
	"path/filepath"
	"testing"
)

// SeedAccounts copies the machine's /etc/passwd and /etc/group into
// root/etc, so that states naming users such as nobody find them in a
// temporary root the way they would on an instance. It changes nothing
// outside root.
func SeedAccounts(tb testing.TB, root string) {
	tb.Helper()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		tb.Fatal(err)
	}
	for _, name := range []string{"passwd", "group"} {
		data, err := os.ReadFile(filepath.Join("/etc", name))
		if err != nil {
			tb.Fatalf("seed accounts: %v", err)
		}
		if err := os.WriteFile(filepath.Join(root, "etc", name), data, 0o644); err != nil {
			tb.Fatal(err)
		}
	}
}
