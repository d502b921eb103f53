package version

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/proc"
)

func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "opsagent")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// Only the standard output is JSON: a warning on standard error does not
// make a good binary look broken, and what a broken one says there is
// quoted.
func TestQuery(t *testing.T) {
	ctx := context.Background()
	r := proc.New()
	good := script(t, "echo 'warning: something' >&2\nprintf '{\"version\": \"2.0.0\", \"commit\": \"x\"}\\n'\n")
	if v, err := Query(ctx, r, good); err != nil || v != "2.0.0" {
		t.Errorf("a binary that warns on stderr: %q, %v", v, err)
	}
	for body, want := range map[string]string{
		"echo 'cannot execute' >&2\nexit 3\n": "exited 3: cannot execute",
		"echo not json\n":                     "printed no version",
		"echo '{}'\n":                         "printed no version",
	} {
		if _, err := Query(ctx, r, script(t, body)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want %q", body, err, want)
		}
	}
	if _, err := Query(ctx, r, filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "does not run") {
		t.Errorf("a missing binary: err = %v", err)
	}
}
