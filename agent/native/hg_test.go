package native

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/hgserve"
)

func hgParent(t testing.TB, root, p string) string {
	t.Helper()
	return strings.TrimSuffix(strings.TrimSpace(inRoot(t, root, "hg", "-R", p, "identify", "--debug", "-i")), "+")
}

// On a fresh Debian with no Mercurial, the first state installs it and
// clones; the next round asks the remote where "default" is and does
// nothing else (Salt 2014 pulled every round).
func TestHgInstallsMercurialAndClones(t *testing.T) {
	server := hgserve.Start(t, debroot.NewWith(t, "mercurial"))
	tip := server.Commit(map[string]string{"README": "one\n"}, "one")
	r := newDebianRig(t)
	debroot.UseExtras(t, r.root)
	param := gitParam("path", "/srv/app", "repo", server.URL)
	first := mustApply(t, r, "common.hg", param)
	if !first.Changed || !strings.Contains(first.Comment, "mercurial installed (prerequisite)") || !strings.Contains(first.Comment, "cloned to /srv/app at default") {
		t.Fatalf("first round: %+v", first)
	}
	if readIn(t, r.root, "/srv/app/README") != "one\n" || hgParent(t, r.root, "/srv/app") != tip {
		t.Fatal("not cloned at the tip")
	}
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.hg", param); res.Changed {
		t.Fatalf("second round: %+v", res)
	}
	only(t, r.runs, mark, "hg", "-y")
	if c := r.runs.Since(mark)[0]; c[2] != "identify" {
		t.Fatalf("second round ran %v, want hg identify", c)
	}
	if check := r.apply(t, "common.hg", param, true); !check.OK || check.Changed {
		t.Fatalf("check mode: %+v", check)
	}
}

// The branch follows the remote; a full changeset id already there
// costs nothing; local changes stop an update unless force.
func TestHgFollowsPinsAndForce(t *testing.T) {
	r := newDebianRigWith(t, "mercurial")
	server := hgserve.Start(t, r.root)
	one := server.Commit(map[string]string{"conf": "one\n"}, "one")
	param := gitParam("path", "/srv/app", "repo", server.URL, "revision", "default")
	mustApply(t, r, "common.hg", param)

	two := server.Commit(map[string]string{"conf": "two\n"}, "two")
	if check := r.apply(t, "common.hg", param, true); !check.Changed || hgParent(t, r.root, "/srv/app") != one {
		t.Fatalf("check mode: %+v", check)
	}
	res := mustApply(t, r, "common.hg", param)
	if !res.Changed || !strings.Contains(res.Comment, "revision "+short(one)+" => "+short(two)) || readIn(t, r.root, "/srv/app/conf") != "two\n" {
		t.Fatalf("after a commit: %+v", res)
	}
	before := treeStamp(t, filepath.Join(r.root, "srv/app"))
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.hg", param); res.Changed {
		t.Fatalf("unchanged remote: %+v", res)
	}
	if runs := r.runs.Since(mark); len(runs) != 1 || runs[0][2] != "identify" {
		t.Fatalf("ran %v, want one hg identify", runs)
	}
	assertStampSame(t, before, treeStamp(t, filepath.Join(r.root, "srv/app")))

	// Pinned to a changeset: nothing runs once there.
	pinned := gitParam("path", "/srv/app", "repo", server.URL, "revision", one)
	if res := mustApply(t, r, "common.hg", pinned); !res.Changed || readIn(t, r.root, "/srv/app/conf") != "one\n" {
		t.Fatalf("pin: %+v", res)
	}
	mark = r.runs.Mark()
	if res := mustApply(t, r, "common.hg", pinned); res.Changed {
		t.Fatalf("pinned, second round: %+v", res)
	}
	none(t, r.runs, mark)

	// A local change in the way.
	if err := os.WriteFile(filepath.Join(r.root, "srv/app/conf"), []byte("local\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := r.apply(t, "common.hg", param, false); res.OK || !strings.Contains(res.Comment, "set force") {
		t.Fatalf("local change, no force: %+v", res)
	}
	if readIn(t, r.root, "/srv/app/conf") != "local\n" {
		t.Fatal("the local change was lost without force")
	}
	forced := gitParam("path", "/srv/app", "repo", server.URL, "force", "true")
	if res := mustApply(t, r, "common.hg", forced); !res.Changed || readIn(t, r.root, "/srv/app/conf") != "two\n" {
		t.Fatalf("force: %+v", res)
	}
	// A tag is asked of the remote too (tags live in .hgtags).
	server.Tag("v1")
	tag := gitParam("path", "/srv/app", "repo", server.URL, "revision", "v1")
	if res := mustApply(t, r, "common.hg", tag); hgParent(t, r.root, "/srv/app") != two {
		t.Fatalf("tag: %+v", res)
	}
}

// secretWatch runs commands and remembers any whose arguments or
// environment hold the secret.
type secretWatch struct {
	proc.Runner
	secret string
	mu     sync.Mutex
	leaks  []string
	runs   int
}

func (w *secretWatch) Run(ctx context.Context, c proc.Cmd) (proc.Result, error) {
	w.mu.Lock()
	w.runs++
	for _, s := range append(append([]string{c.Path}, c.Args...), c.Env...) {
		if strings.Contains(s, w.secret) {
			w.leaks = append(w.leaks, s)
		}
	}
	w.mu.Unlock()
	return w.Runner.Run(ctx, c)
}

// A password in the repository URL reaches Mercurial through a temporary
// hgrc only the user reads: never a command line, the environment, a
// comment, or the clone's own configuration.
func TestHgPasswordStaysOffCommandLines(t *testing.T) {
	r := newDebianRigWith(t, "mercurial")
	server := hgserve.Start(t, r.root)
	server.Commit(map[string]string{"f": "1\n"}, "one")
	front, refused := server.BasicAuth("deploy", "s3cret-hg-pw")
	watch := &secretWatch{Runner: r.runs, secret: "s3cret-hg-pw"}
	r.e = New(Options{Root: r.e.opts.Root, Runner: watch, StateDir: r.e.opts.StateDir})

	repo := strings.Replace(front, "http://", "http://deploy:s3cret-hg-pw@", 1)
	param := gitParam("path", "/srv/app", "repo", repo)
	first := mustApply(t, r, "common.hg", param)
	second := mustApply(t, r, "common.hg", param)
	if !first.Changed || second.Changed {
		t.Fatalf("rounds: %+v %+v", first, second)
	}
	if watch.runs < 3 || len(watch.leaks) > 0 {
		t.Fatalf("%d runs; the password was passed in %v", watch.runs, watch.leaks)
	}
	for _, res := range []string{first.Comment, first.Stdout, second.Comment} {
		if strings.Contains(res, "s3cret-hg-pw") {
			t.Fatalf("the password reached a comment: %s", res)
		}
	}
	if strings.Contains(readIn(t, r.root, "/srv/app/.hg/hgrc"), "s3cret") {
		t.Fatal("the password was stored in the clone's hgrc")
	}
	if left, _ := filepath.Glob(filepath.Join(r.root, "tmp/.opsagent-hgrc-*")); len(left) > 0 {
		t.Fatalf("credentials left behind: %v", left)
	}
	// A wrong password is refused by the server and not echoed either.
	bad := strings.Replace(front, "http://", "http://deploy:wrong-pw-xyz@", 1)
	res := r.apply(t, "common.hg", gitParam("path", "/srv/other", "repo", bad), false)
	if res.OK || refused.Load() == 0 || strings.Contains(res.Comment, "wrong-pw-xyz") {
		t.Fatalf("wrong password: %+v (refused %d)", res, refused.Load())
	}
}

// A working copy in the dirstate-v2 format (whose first bytes are not
// the parent) is read with hg itself.
func TestHgDirstateV2(t *testing.T) {
	r := newDebianRigWith(t, "mercurial")
	server := hgserve.Start(t, r.root)
	tip := server.Commit(map[string]string{"f": "1\n"}, "one")
	// Debian's Mercurial has no fast dirstate-v2 code: allowed here.
	if err := os.WriteFile(filepath.Join(r.root, "etc/mercurial/hgrc"), []byte("[storage]\ndirstate-v2.slow-path = allow\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	inRoot(t, r.root, "hg", "--config", "format.use-dirstate-v2=yes", "clone", "-q", server.URL, "/srv/app")
	if !strings.Contains(readIn(t, r.root, "/srv/app/.hg/requires"), "dirstate-v2") {
		t.Fatal("not a dirstate-v2 working copy")
	}
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.hg", gitParam("path", "/srv/app", "repo", server.URL)); res.Changed {
		t.Fatalf("hand-made dirstate-v2 clone at the tip %s: %+v", short(tip), res)
	}
	var ran []string
	for _, c := range r.runs.Since(mark) {
		ran = append(ran, c[2])
	}
	if strings.Join(ran, " ") != "log identify" {
		t.Fatalf("ran hg %v, want log (the working copy) and identify (the remote)", ran)
	}
}
