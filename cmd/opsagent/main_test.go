package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
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

// Global flags work after the verb too, and --config is a host path
// (relative to the current directory), never re-joined below --root.
func TestGlobalFlagsAfterTheVerb(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.conf")
	for _, args := range [][]string{
		{"run", "--config", missing},
		{"--config", missing, "run"},
		{"--root", dir, "run", "--config", missing},
	} {
		code, _, errs := runCLI(t, args...)
		if code != exitFailure || !strings.Contains(errs, missing) || strings.Contains(errs, "flag provided but not defined") {
			t.Errorf("%v: exit %d, stderr %q", args, code, errs)
		}
	}
	code, out, errs := runCLI(t, "run", "--help")
	for _, want := range []string{"--config", "--root", "--log-level"} {
		if code != exitOK || !strings.Contains(out, want) {
			t.Errorf("run --help lacks %s:\n%s%s", want, out, errs)
		}
	}
	// A relative --config is taken from the current directory.
	t.Chdir(dir)
	code, _, errs = runCLI(t, "--root", "/nonexistent-root", "status", "--config", "rel.conf")
	if !strings.Contains(errs, filepath.Join(dir, "rel.conf")) {
		t.Errorf("relative --config: exit %d stderr %q", code, errs)
	}
}

func TestLogLevelValidated(t *testing.T) {
	code, _, errs := runCLI(t, "--log-level", "loud", "version")
	if code != exitUsage || !strings.Contains(errs, "expected debug, info, warn or error") {
		t.Errorf("exit %d stderr %q", code, errs)
	}
	for _, ok := range []string{"debug", "INFO", "warning", "Error"} {
		if code, _, errs := runCLI(t, "version", "--log-level", ok); code != exitOK {
			t.Errorf("--log-level %s: exit %d %q", ok, code, errs)
		}
	}
}

// A missing required flag is a usage error by its type, whatever the
// library's message says.
func TestRequiredFlagIsUsageError(t *testing.T) {
	code, _, errs := runCLI(t, "backend")
	if code != exitUsage || !strings.Contains(errs, "data") {
		t.Errorf("exit %d stderr %q", code, errs)
	}
}

// An unknown verb is reported as such whatever follows it, and a flag
// error names the command once, with the help that exists.
func TestUnknownVerbWithAFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"frobnicate", "--x"}, `opsagent: unknown command "frobnicate"; run 'opsagent help' for the list of commands` + "\n"},
		{[]string{"--root", "/nonexistent", "frobnicate", "-x"}, `opsagent: unknown command "frobnicate"; run 'opsagent help' for the list of commands` + "\n"},
		{[]string{"--x"}, "opsagent: flag provided but not defined: -x (see 'opsagent --help')\n"},
		{[]string{"release", "build", "--x"}, "opsagent: release build: flag provided but not defined: -x (see 'opsagent release build --help')\n"},
	} {
		code, _, errs := runCLI(t, c.args...)
		if code != exitUsage || errs != c.want {
			t.Errorf("%q: exit %d, stderr %q; want exit %d, %q", c.args, code, errs, exitUsage, c.want)
		}
	}
}
