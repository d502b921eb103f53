package native

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/svnserve"
)

func svnWCRevision(t testing.TB, root, p string) string {
	t.Helper()
	return strings.TrimSpace(inRoot(t, root, "svn", "info", "--show-item", "revision", p))
}

// On a fresh Debian with no Subversion, the first state installs it and
// checks out from a password-protected svnserve; the next round asks the
// repository where trunk last changed and does nothing else (Salt 2014
// ran svn update every round). The password goes on svn's standard
// input: never in a command line, the environment, or a comment.
func TestSvnInstallsSubversionAndKeepsThePasswordOffCommandLines(t *testing.T) {
	server := svnserve.Start(t, debroot.NewWith(t, "subversion"), "deploy", "s3cret-svn-pw")
	server.Mkdir("trunk")
	rev := server.Put(map[string]string{"trunk/README": "one\n"}, "one")
	r := newDebianRig(t)
	debroot.UseExtras(t, r.root)
	watch := &secretWatch{Runner: r.runs, secret: "s3cret-svn-pw"}
	r.e = New(Options{Root: r.e.opts.Root, Runner: watch, StateDir: r.e.opts.StateDir})

	param := gitParam("path", "/srv/app", "repo", server.URL+"/trunk", "username", "deploy", "password", "s3cret-svn-pw")
	first := mustApply(t, r, "common.svn", param)
	if !first.Changed || !strings.Contains(first.Comment, "subversion installed (prerequisite)") || !strings.Contains(first.Comment, fmt.Sprintf("checked out to /srv/app at r%d", rev)) {
		t.Fatalf("first round: %+v", first)
	}
	if readIn(t, r.root, "/srv/app/README") != "one\n" {
		t.Fatal("not checked out")
	}
	mark := r.runs.Mark()
	second := mustApply(t, r, "common.svn", param)
	if second.Changed {
		t.Fatalf("second round: %+v", second)
	}
	for _, c := range r.runs.Since(mark) {
		if c[0] != "svn" || !strings.Contains(strings.Join(c, " "), " info ") {
			t.Fatalf("second round ran %v, want svn info only", r.runs.Since(mark))
		}
	}
	if len(watch.leaks) > 0 {
		t.Fatalf("the password was passed in %v", watch.leaks)
	}
	for _, s := range []string{first.Comment, first.Stdout, second.Comment} {
		if strings.Contains(s, "s3cret-svn-pw") {
			t.Fatalf("the password reached a comment: %s", s)
		}
	}
	// svn kept no copy of it.
	if out := inRoot(t, r.root, "sh", "-c", "grep -rl s3cret-svn-pw /root/.subversion || true"); strings.TrimSpace(out) != "" {
		t.Fatalf("the password was cached in %s", out)
	}
	// A wrong password fails, and is not echoed.
	bad := gitParam("path", "/srv/other", "repo", server.URL+"/trunk", "username", "deploy", "password", "wrong-pw-xyz")
	if res := r.apply(t, "common.svn", bad, false); res.OK || strings.Contains(res.Comment+res.Stdout, "wrong-pw-xyz") {
		t.Fatalf("wrong password: %+v", res)
	}
}

// HEAD follows the repository's changes to the URL, not its other
// paths; a number already checked out costs no network; local changes
// that conflict fail the state unless force.
func TestSvnFollowsPinsAndForce(t *testing.T) {
	r := newDebianRigWith(t, "subversion")
	server := svnserve.Start(t, r.root, "u", "p")
	server.Mkdir("trunk", "other")
	one := server.Put(map[string]string{"trunk/conf": "one\n"}, "one")
	param := gitParam("path", "/srv/app", "repo", server.URL+"/trunk", "username", "u", "password", "p")
	mustApply(t, r, "common.svn", param)

	// A commit elsewhere in the repository: trunk did not change.
	server.Put(map[string]string{"other/x": "x\n"}, "elsewhere")
	before := treeStamp(t, filepath.Join(r.root, "srv/app"))
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.svn", param); res.Changed {
		t.Fatalf("a change elsewhere: %+v", res)
	}
	// One svn info, of the URL: the working copy's is remembered while
	// its database does not change.
	if runs := r.runs.Since(mark); len(runs) != 1 || !strings.Contains(strings.Join(runs[0], " "), "info --xml -r HEAD -- svn://") {
		t.Fatalf("ran %v, want one svn info of the URL", runs)
	}
	assertStampSame(t, before, treeStamp(t, filepath.Join(r.root, "srv/app")))

	two := server.Put(map[string]string{"trunk/conf": "two\n"}, "two")
	if check := r.apply(t, "common.svn", param, true); !check.Changed || svnWCRevision(t, r.root, "/srv/app") == fmt.Sprint(two) {
		t.Fatalf("check mode: %+v", check)
	}
	res := mustApply(t, r, "common.svn", param)
	if !res.Changed || !strings.Contains(res.Comment, fmt.Sprintf("=> r%d", two)) || readIn(t, r.root, "/srv/app/conf") != "two\n" {
		t.Fatalf("after a commit to trunk: %+v", res)
	}

	// Pinned to a number: no network once there.
	pinned := gitParam("path", "/srv/app", "repo", server.URL+"/trunk", "username", "u", "password", "p", "revision", fmt.Sprint(one))
	if res := mustApply(t, r, "common.svn", pinned); !res.Changed || readIn(t, r.root, "/srv/app/conf") != "one\n" {
		t.Fatalf("pin: %+v", res)
	}
	mark = r.runs.Mark()
	if res := mustApply(t, r, "common.svn", pinned); res.Changed {
		t.Fatalf("pinned, second round: %+v", res)
	}
	none(t, r.runs, mark)
	// A new agent (nothing remembered) asks svn once, locally.
	fresh := New(Options{Root: r.e.opts.Root, Runner: r.runs, StateDir: r.e.opts.StateDir})
	mark = r.runs.Mark()
	if res := fresh.Execute(context.Background(), state.Request{StateID: "s", Module: "common.svn", Parameter: json.RawMessage(pinned)}); !res.OK || res.Changed {
		t.Fatalf("pinned, new agent: %+v", res)
	}
	if runs := r.runs.Since(mark); len(runs) != 1 || strings.Contains(strings.Join(runs[0], " "), "svn://") {
		t.Fatalf("ran %v, want one local svn info", runs)
	}
	// Moved by hand: the working copy's database changed, so svn is
	// asked again and the pin restored.
	inRoot(t, r.root, "svn", "update", "-q", "--non-interactive", "--no-auth-cache", "--username", "u", "--password", "p", "/srv/app")
	if res := fresh.Execute(context.Background(), state.Request{StateID: "s", Module: "common.svn", Parameter: json.RawMessage(pinned)}); !res.Changed || readIn(t, r.root, "/srv/app/conf") != "one\n" {
		t.Fatalf("pinned after a hand update: %+v", res)
	}

	// PREV, relative to the working copy, does not walk back each round.
	prev := gitParam("path", "/srv/app", "repo", server.URL+"/trunk", "revision", "PREV")
	if res := mustApply(t, r, "common.svn", prev); res.Changed {
		t.Fatalf("PREV: %+v", res)
	}

	// A local change that conflicts with the update.
	if err := os.WriteFile(filepath.Join(r.root, "srv/app/conf"), []byte("local\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res = r.apply(t, "common.svn", param, false)
	if res.OK || !strings.Contains(res.Comment, "conflicts") || !strings.Contains(res.Comment, "set force") {
		t.Fatalf("conflict, no force: %+v", res)
	}
	forced := gitParam("path", "/srv/app", "repo", server.URL+"/trunk", "username", "u", "password", "p", "force", "true")
	// The conflicted working copy is at HEAD already; force reverts and
	// updates whenever trunk moves next.
	server.Put(map[string]string{"trunk/conf": "three\n"}, "three")
	if res := mustApply(t, r, "common.svn", forced); !res.Changed || readIn(t, r.root, "/srv/app/conf") != "three\n" {
		t.Fatalf("force: %+v, conf %q", res, readIn(t, r.root, "/srv/app/conf"))
	}
	// Another repository's working copy is replaced only with force.
	other := gitParam("path", "/srv/app", "repo", server.URL+"/other", "username", "u", "password", "p")
	if res := r.apply(t, "common.svn", other, false); res.OK || !strings.Contains(res.Comment, "set force") {
		t.Fatalf("other URL, no force: %+v", res)
	}
	otherForced := gitParam("path", "/srv/app", "repo", server.URL+"/other", "username", "u", "password", "p", "force", "true")
	if res := mustApply(t, r, "common.svn", otherForced); !res.Changed || readIn(t, r.root, "/srv/app/x") != "x\n" {
		t.Fatalf("other URL with force: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(r.root, "srv/app/conf")); err == nil {
		t.Fatal("trunk's files are still there")
	}
}

// fakeSvn answers every run as an svn older than 1.10 would a
// --password-from-stdin.
type fakeSvn struct{ runs [][]string }

func (f *fakeSvn) Run(_ context.Context, c proc.Cmd) (proc.Result, error) {
	f.runs = append(f.runs, append([]string{c.Path}, c.Args...))
	io.WriteString(c.Stderr, "svn: invalid option: --password-from-stdin\nType 'svn help' for usage.\n")
	return proc.Result{ExitCode: 1}, nil
}

// An svn that cannot read the password from its standard input is not
// given it on the command line instead: the state fails saying why.
func TestSvnTooOldForAPasswordOnStdin(t *testing.T) {
	dir := t.TempDir()
	for p, content := range map[string]string{"usr/bin/svn": "#!/bin/sh\n", "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/os-release": "ID=debian\n"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, p), []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	root, err := fsutil.NewRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeSvn{}
	e := New(Options{Root: root, Runner: fake, StateDir: filepath.Join(dir, "state")})
	res := e.Execute(context.Background(), state.Request{StateID: "s", Module: "common.svn", Parameter: json.RawMessage(gitParam("path", "/srv/app", "repo", "svn://127.0.0.1:1/repo", "username", "u", "password", "pw-xyz"))})
	if res.OK || !strings.Contains(res.Comment, "older than 1.10") || strings.Contains(res.Comment, "pw-xyz") {
		t.Fatalf("old svn: %+v", res)
	}
	if len(fake.runs) != 1 || !slices.Contains(fake.runs[0], "--password-from-stdin") || slices.Contains(fake.runs[0], "pw-xyz") {
		t.Fatalf("ran %v", fake.runs)
	}
}
