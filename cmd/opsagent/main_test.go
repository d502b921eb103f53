package main

import (
	"bytes"
	"context"
	"encoding/json"
	"runtime"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/version"
)

// runCLI runs one command line in-process with a fresh App.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), append([]string{"opsagent"}, args...), streams{strings.NewReader(""), &out, &errb})
	return code, out.String(), errb.String()
}

func TestVersionText(t *testing.T) {
	code, out, errs := runCLI(t, "version")
	if code != exitOK {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{version.Version, version.Commit, runtime.Version(), runtime.GOOS + "/" + runtime.GOARCH} {
		if !strings.Contains(out, want) {
			t.Errorf("version output %q lacks %q", out, want)
		}
	}
}

func TestVersionJSON(t *testing.T) {
	code, out, _ := runCLI(t, "version", "--json")
	if code != exitOK {
		t.Fatalf("exit %d", code)
	}
	var info version.Info
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("not JSON: %v: %q", err, out)
	}
	if info != version.Get() {
		t.Errorf("got %+v, want %+v", info, version.Get())
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"no-such-verb"},
		{"--no-such-flag", "version"},
		{"version", "--bogus"},
		{"version", "extra"},
	} {
		code, _, errs := runCLI(t, args...)
		if code != exitUsage {
			t.Errorf("%v: exit %d, want %d (stderr %q)", args, code, exitUsage, errs)
		}
		if !strings.HasPrefix(errs, "opsagent: ") || strings.Count(errs, "\n") != 1 {
			t.Errorf("%v: stderr should be one line starting with 'opsagent: ', got %q", args, errs)
		}
	}
}

func TestHelpSucceeds(t *testing.T) {
	code, out, _ := runCLI(t)
	if code != exitOK || !strings.Contains(out, "version") {
		t.Fatalf("exit %d, out %q", code, out)
	}
}
