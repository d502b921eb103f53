package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReleaseUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"release", "build", "--version", "v2"},
		{"release", "build"},
		{"release", "publish", "--bucket", "b", "--version", "2.x"},
	} {
		code, _, errs := runCLI(t, args...)
		if code != exitUsage || !strings.HasPrefix(errs, "opsagent: ") {
			t.Errorf("%v: exit %d stderr %q", args, code, errs)
		}
	}
}

func TestReleaseKeygen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	code, out, errs := runCLI(t, "release", "keygen", "--out", dir, "--unencrypted")
	if code != exitOK || !strings.Contains(out, "public key") {
		t.Fatalf("exit %d out %q err %q", code, out, errs)
	}
	for _, f := range []string{"minisign.pub", "minisign.key"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Error(err)
		}
	}
	// Encrypted without a passphrase on input: a clear error, no key.
	code, _, errs = runCLI(t, "release", "keygen", "--out", filepath.Join(t.TempDir(), "k2"))
	if code != exitFailure || !strings.Contains(errs, "OPSAGENT_SIGNING_PASSPHRASE") {
		t.Errorf("exit %d stderr %q", code, errs)
	}
}
