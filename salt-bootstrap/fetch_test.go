package saltbootstrap

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/gitserver"
)

func newFetcher(t *testing.T, version string) (*Fetcher, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "bootstrap", "salt")
	return New(Options{Dir: dir, StampFile: dir + ".state.json", ConfigPath: "/etc/opsagent.conf", InterfaceVersion: version, BootstrapScript: "scripts/bootstrap.sh"}), dir
}

func read(t *testing.T, dir, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func wantComment(t *testing.T, err error, prefix string) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || !strings.HasPrefix(e.Comment, prefix) {
		t.Fatalf("err = %v, want a comment starting %q", err, prefix)
	}
}

func TestCloneUpdateAndTagSwitch(t *testing.T) {
	gs := gitserver.New(t)
	url := gs.CreateRepo("states", map[string]string{"compat.txt": ">= 2.0\n", "sources/adaptor.py": "v1\n"})
	gs.Tag("states", "v1")
	f, dir := newFetcher(t, "2.1")
	res, err := f.Ensure(context.Background(), url, "master", nil)
	changed := res.Changed
	if err != nil || !changed || read(t, dir, "sources/adaptor.py") != "v1\n" {
		t.Fatalf("clone: %v %v", changed, err)
	}
	// A new commit on the moving branch is picked up at the next Ensure.
	gs.Commit("states", map[string]string{"sources/adaptor.py": "v2\n"}, "second")
	res, err = f.Ensure(context.Background(), url, "master", nil)
	changed = res.Changed
	if err != nil || !changed || read(t, dir, "sources/adaptor.py") != "v2\n" {
		t.Fatalf("update: %v %v", changed, err)
	}
	// Nothing new: no change reported.
	if res, err := f.Ensure(context.Background(), url, "master", nil); err != nil || res.Changed {
		t.Fatalf("idle update: %v %v", changed, err)
	}
	// Switch to a fixed tag: the old content comes back.
	res, err = f.Ensure(context.Background(), url, "v1", nil)
	changed = res.Changed
	if err != nil || !changed || read(t, dir, "sources/adaptor.py") != "v1\n" {
		t.Fatalf("tag switch: %v %v", changed, err)
	}
	// A fixed tag is not fetched again (moving the tag on the server is not seen).
	gs.Tag("states", "v1")
	if res, err := f.Ensure(context.Background(), url, "v1", nil); err != nil || res.Changed {
		t.Fatalf("fixed tag re-fetched: %v %v", changed, err)
	}
	// No half trees or temporary clones are left beside the clone.
	entries, _ := os.ReadDir(filepath.Dir(dir))
	for _, e := range entries {
		if e.Name() != "salt" && e.Name() != "salt.state.json" {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}

func TestBrokenURLAndBadTag(t *testing.T) {
	gs := gitserver.New(t)
	url := gs.CreateRepo("states", map[string]string{"compat.txt": ""})
	f, dir := newFetcher(t, "2.1")
	_, err := f.Ensure(context.Background(), gs.URL+"/missing.git", "master", nil)
	wantComment(t, err, "Can't clone states repo "+gs.URL+"/missing.git")
	if _, statErr := os.Stat(dir); !os.IsNotExist(statErr) {
		t.Error("a failed clone left a tree")
	}
	_, err = f.Ensure(context.Background(), url, "no-such-tag", nil)
	wantComment(t, err, "Can't checkout required states tag no-such-tag")
	_, err = f.Ensure(context.Background(), "", "", nil)
	wantComment(t, err, "no states repository configured")
}

func TestIncompatibleAndMissingCompat(t *testing.T) {
	gs := gitserver.New(t)
	url := gs.CreateRepo("old", map[string]string{"compat.txt": "< 2.0\n"})
	f, _ := newFetcher(t, "2.1")
	_, err := f.Ensure(context.Background(), url, "master", nil)
	wantComment(t, err, "States not compatible with agent version 2.1 (the states interface this agent offers; compat.txt: < 2.0)")
	// It keeps failing on the next round rather than trusting the tree.
	_, err = f.Ensure(context.Background(), url, "master", nil)
	wantComment(t, err, "States not compatible with agent version 2.1")

	url2 := gs.CreateRepo("nocompat", map[string]string{"README": "x\n"})
	f2, _ := newFetcher(t, "2.1")
	if _, err := f2.Ensure(context.Background(), url2, "master", nil); err != nil {
		t.Fatalf("missing compat.txt: %v", err)
	}
}

func TestBootstrapScript(t *testing.T) {
	gs := gitserver.New(t)
	url := gs.CreateRepo("ok", map[string]string{"scripts/bootstrap.sh": "#!/bin/bash\necho configured with \"$1\" > bootstrapped\n"})
	f, dir := newFetcher(t, "2.1")
	if _, err := f.Ensure(context.Background(), url, "master", nil); err != nil {
		t.Fatal(err)
	}
	if got := read(t, dir, "bootstrapped"); got != "configured with /etc/opsagent.conf\n" {
		t.Errorf("bootstrap.sh output %q", got)
	}
	// A failing script is a warning, as in 2014: the checkout is usable,
	// and the warning stays visible until the next checkout.
	bad := gs.CreateRepo("bad", map[string]string{"scripts/bootstrap.sh": "#!/bin/bash\necho step one\necho missing dependency >&2\nexit 3\n"})
	f2, _ := newFetcher(t, "2.1")
	res, err := f2.Ensure(context.Background(), bad, "master", nil)
	if err != nil || !strings.HasPrefix(res.Warning, "Can't bootstrap modules: scripts/bootstrap.sh failed (exit code 3): step one | missing dependency") {
		t.Fatalf("failing bootstrap: %+v %v", res, err)
	}
	if res, err := f2.Ensure(context.Background(), bad, "master", nil); err != nil || res.Warning == "" || res.Changed {
		t.Fatalf("the warning must stay until the next checkout: %+v %v", res, err)
	}
	// An empty [module] bootstrap means no script, even when the clone has one.
	f3, dir3 := newFetcher(t, "2.1")
	f3.opts.BootstrapScript = ""
	if res, err := f3.Ensure(context.Background(), url, "master", nil); err != nil || res.Warning != "" {
		t.Fatalf("empty bootstrap: %+v %v", res, err)
	}
	if _, err := os.Stat(filepath.Join(dir3, "bootstrapped")); err == nil {
		t.Error("the script ran although [module] bootstrap is empty")
	}
}

// The real fork says "< 2.0": it is checked against the states interface
// the agent offers (1.x), not the release number, so a 2.x agent accepts it.
func TestCompatAgainstTheStatesInterface(t *testing.T) {
	gs := gitserver.New(t)
	url := gs.CreateRepo("fork", map[string]string{"compat.txt": "< 2.0\n"})
	f, _ := newFetcher(t, "1.0")
	if _, err := f.Ensure(context.Background(), url, "master", nil); err != nil {
		t.Fatalf("interface 1.0 against < 2.0: %v", err)
	}
	url2 := gs.CreateRepo("future", map[string]string{"compat.txt": ">= 2.0\n"})
	f2, _ := newFetcher(t, "1.0")
	_, err := f2.Ensure(context.Background(), url2, "master", nil)
	wantComment(t, err, "States not compatible with agent version 1.0")
}

func TestCorruptedCloneIsReplaced(t *testing.T) {
	gs := gitserver.New(t)
	url := gs.CreateRepo("states", map[string]string{"a": "1\n"})
	f, dir := newFetcher(t, "2.1")
	if _, err := f.Ensure(context.Background(), url, "master", nil); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, ".git", "objects")); err != nil {
		t.Fatal(err)
	}
	gs.Commit("states", map[string]string{"a": "2\n"}, "second")
	if _, err := f.Ensure(context.Background(), url, "master", nil); err != nil {
		t.Fatalf("retry with a fresh clone: %v", err)
	}
	if read(t, dir, "a") != "2\n" {
		t.Error("fresh clone not checked out")
	}
}

func TestLocalPathRepository(t *testing.T) {
	gs := gitserver.New(t)
	gs.CreateRepo("local", map[string]string{"a": "local\n"})
	f, dir := newFetcher(t, "2.1")
	if _, err := f.Ensure(context.Background(), filepath.Join(gs.Dir, "local.git"), "master", nil); err != nil {
		t.Fatal(err)
	}
	if read(t, dir, "a") != "local\n" {
		t.Error("local clone content")
	}
}

func TestCompatible(t *testing.T) {
	cases := []struct {
		text, version string
		ok            bool
		err           bool
	}{
		{"< 2.0", "1.9", true, false},
		{"< 2.0", "2.0", false, false},
		{">= 2.1\n< 3", "2.10", true, false},
		{">= 2.10", "2.9", false, false}, // numeric, not string, comparison
		{"== 2.1", "2.1.0", true, false},
		{"!= 2.1", "2.1", false, false},
		{"> 1\n# comment\n\n<= 2.1.5", "2.1.5", true, false},
		{"~> 2", "2.1", false, true},
		{"< two", "2.1", false, true},
		{"", "2.1", true, false},
	}
	for _, tc := range cases {
		ok, err := Compatible(tc.text, tc.version)
		if ok != tc.ok || (err != nil) != tc.err {
			t.Errorf("Compatible(%q, %s) = %v, %v", tc.text, tc.version, ok, err)
		}
	}
}
