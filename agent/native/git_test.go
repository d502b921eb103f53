package native

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/sshd"
)

// gitParam is a common.git parameter object.
func gitParam(kv ...string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	data, _ := json.Marshal(m)
	return string(data)
}

// headIn is the commit HEAD of the checkout at p (inside root) is at, as
// the root's git says.
func headIn(t testing.TB, root, p string) string {
	t.Helper()
	return strings.TrimSpace(inRoot(t, root, "git", "-C", p, "rev-parse", "HEAD"))
}

func mustApply(t testing.TB, r *debianRig, module, param string) state.Result {
	t.Helper()
	res := r.e.Execute(context.Background(), state.Request{RecipeVersion: 1, StateID: "s-" + module, Module: module, Parameter: json.RawMessage(param)})
	if !res.OK {
		t.Fatalf("%s %s: %s", module, param, res.Comment)
	}
	return res
}

// On a fresh Debian with no git, the first state installs git from the
// distribution's repository (the 2014 adaptor's implicit requirement) and
// clones; the next round changes nothing and runs no package manager,
// and git only to ask the remote where the branch is.
func TestGitInstallsGitAndClones(t *testing.T) {
	r := newDebianRig(t)
	debroot.UseExtras(t, r.root)
	srv := gitserver.New(t)
	url := srv.CreateRepo("app", map[string]string{"index.html": "v1\n"})
	param := gitParam("path", "/srv/app", "repo", url)

	first := mustApply(t, r, "common.git", param)
	if !first.Changed || !strings.Contains(first.Comment, "git installed (prerequisite)") || !strings.Contains(first.Comment, "cloned to /srv/app at master") {
		t.Fatalf("first round: %+v", first)
	}
	if got := readIn(t, r.root, "/srv/app/index.html"); got != "v1\n" {
		t.Fatalf("index.html = %q", got)
	}
	if head := headIn(t, r.root, "/srv/app"); head != srv.Head("app") {
		t.Fatalf("HEAD %s, want %s", head, srv.Head("app"))
	}
	mark := r.runs.Mark()
	second := r.apply(t, "common.git", param, false)
	if !second.OK || second.Changed || !strings.Contains(second.Comment, "already in the correct state") {
		t.Fatalf("second round: %+v", second)
	}
	only(t, r.runs, mark, "git", "ls-remote")
	if check := r.apply(t, "common.git", param, true); !check.OK || check.Changed {
		t.Fatalf("check mode: %+v", check)
	}
}

// A branch follows the remote: a round after the remote moved fetches
// and moves the checkout; the round after that asks the remote (git
// ls-remote, a read) and changes nothing on disk.
func TestGitBranchFollowsTheRemote(t *testing.T) {
	r := newGitRig(t)
	srv := gitserver.New(t)
	url := srv.CreateRepo("app", map[string]string{"index.html": "v1\n"})
	param := gitParam("path", "/srv/app", "repo", url, "revision", "master")
	mustApply(t, r, "common.git", param)
	old := srv.Head("app")

	srv.Commit("app", map[string]string{"index.html": "v2\n"}, "second")
	// Check mode sees the move and changes nothing.
	check := r.apply(t, "common.git", param, true)
	if !check.OK || !check.Changed || !strings.Contains(check.Comment, "would be updated: revision "+short(old)) {
		t.Fatalf("check mode: %+v", check)
	}
	if head := headIn(t, r.root, "/srv/app"); head != old {
		t.Fatalf("check mode moved HEAD to %s", head)
	}
	second := mustApply(t, r, "common.git", param)
	want := fmt.Sprintf("revision %s => %s (master)", short(old), short(srv.Head("app")))
	if !second.Changed || !strings.Contains(second.Comment, want) {
		t.Fatalf("second round: %+v, want %q", second, want)
	}
	if got := readIn(t, r.root, "/srv/app/index.html"); got != "v2\n" {
		t.Fatalf("index.html = %q after the pull", got)
	}

	before := treeStamp(t, filepath.Join(r.root, "srv/app"))
	mark := r.runs.Mark()
	third := mustApply(t, r, "common.git", param)
	if third.Changed {
		t.Fatalf("third round: %+v", third)
	}
	only(t, r.runs, mark, "git", "ls-remote")
	assertStampSame(t, before, treeStamp(t, filepath.Join(r.root, "srv/app")))

	// Detached by hand, with no revision: the remote's HEAD names the
	// branch to go back to.
	inRoot(t, r.root, "git", "-C", "/srv/app", "checkout", "-q", "--detach")
	noRev := gitParam("path", "/srv/app", "repo", url)
	if res := mustApply(t, r, "common.git", noRev); !res.Changed || !strings.Contains(res.Comment, "branch master checked out") {
		t.Fatalf("detached: %+v", res)
	}
	if b := strings.TrimSpace(inRoot(t, r.root, "git", "-C", "/srv/app", "symbolic-ref", "--short", "HEAD")); b != "master" {
		t.Fatalf("on %q after the state, want master", b)
	}
}

// A tag or a commit already checked out costs nothing: no git runs, so
// no network. Moving the revision to another tag fetches only then.
func TestGitTagAndCommitOverGitDaemon(t *testing.T) {
	r := newGitRig(t)
	srv := gitserver.New(t)
	srv.CreateRepo("lib", map[string]string{"VERSION": "1\n"})
	v1 := srv.Head("lib")
	srv.AnnotatedTag("lib", "v1", "release 1")
	srv.Commit("lib", map[string]string{"VERSION": "2\n"}, "two")
	url := srv.Daemon() + "/lib.git"

	tag := gitParam("path", "/opt/lib", "repo", url, "revision", "v1")
	first := mustApply(t, r, "common.git", tag)
	if !strings.Contains(first.Comment, "at v1") || headIn(t, r.root, "/opt/lib") != v1 {
		t.Fatalf("tag clone: %+v, HEAD %s, want %s", first, headIn(t, r.root, "/opt/lib"), v1)
	}
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.git", tag); res.Changed {
		t.Fatalf("tag second round: %+v", res)
	}
	none(t, r.runs, mark)

	// A tag made after the clone is fetched when the state names it.
	srv.Tag("lib", "v2")
	v2 := srv.Head("lib")
	res := mustApply(t, r, "common.git", gitParam("path", "/opt/lib", "repo", url, "revision", "v2"))
	if !res.Changed || headIn(t, r.root, "/opt/lib") != v2 || readIn(t, r.root, "/opt/lib/VERSION") != "2\n" {
		t.Fatalf("to v2: %+v", res)
	}

	// A commit, full or abbreviated, already there: nothing runs.
	for _, id := range []string{v1, v1[:10]} {
		commit := gitParam("path", "/opt/lib", "repo", url, "revision", id)
		res := mustApply(t, r, "common.git", commit)
		if headIn(t, r.root, "/opt/lib") != v1 {
			t.Fatalf("commit %s: %+v", id, res)
		}
		mark := r.runs.Mark()
		if res := mustApply(t, r, "common.git", commit); res.Changed {
			t.Fatalf("commit second round: %+v", res)
		}
		none(t, r.runs, mark)
	}
	if res := r.apply(t, "common.git", gitParam("path", "/opt/lib", "repo", url, "revision", "nosuch"), false); res.OK || !strings.Contains(res.Comment, "revision nosuch is neither a branch, a tag nor a commit") {
		t.Fatalf("unknown revision: %+v", res)
	}

	// A commit pushed after the clone is fetched (every branch) and
	// checked out.
	srv.Commit("lib", map[string]string{"VERSION": "3\n"}, "three")
	v3 := srv.Head("lib")
	if res := mustApply(t, r, "common.git", gitParam("path", "/opt/lib", "repo", url, "revision", v3)); !res.Changed || headIn(t, r.root, "/opt/lib") != v3 {
		t.Fatalf("new commit: %+v", res)
	}

	// The same repository over another URL: the origin follows the state
	// (as Salt's git.latest did), and nothing needs fetching.
	httpURL := srv.RepoURL("lib")
	res = mustApply(t, r, "common.git", gitParam("path", "/opt/lib", "repo", httpURL, "revision", v3))
	if !res.Changed || !strings.Contains(res.Comment, "remote origin "+url+" => "+httpURL) || headIn(t, r.root, "/opt/lib") != v3 {
		t.Fatalf("new origin: %+v", res)
	}
	if origin := strings.TrimSpace(inRoot(t, r.root, "git", "-C", "/opt/lib", "config", "remote.origin.url")); origin != httpURL {
		t.Fatalf("origin %s", origin)
	}
	mark = r.runs.Mark()
	if res := mustApply(t, r, "common.git", gitParam("path", "/opt/lib", "repo", httpURL, "revision", v3)); res.Changed {
		t.Fatalf("new origin, second round: %+v", res)
	}
	none(t, r.runs, mark)

	// A repository that is not there: the clone fails and leaves nothing
	// half made.
	res = r.apply(t, "common.git", gitParam("path", "/opt/none", "repo", srv.Daemon()+"/none.git"), false)
	if res.OK {
		t.Fatalf("missing repository: %+v", res)
	}
	if entries, _ := os.ReadDir(filepath.Join(r.root, "opt/none")); len(entries) > 0 {
		t.Fatalf("a failed clone left %v", entries)
	}
}

// force discards local changes that are in the way of a move, and
// replaces a path that is not a git checkout; without it both fail,
// naming force, and nothing is lost.
func TestGitForce(t *testing.T) {
	r := newGitRig(t)
	srv := gitserver.New(t)
	url := srv.CreateRepo("app", map[string]string{"conf": "remote 1\n"})
	param := gitParam("path", "/srv/app", "repo", url)
	mustApply(t, r, "common.git", param)
	if err := os.WriteFile(filepath.Join(r.root, "srv/app/conf"), []byte("local edit\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Nothing moved upstream: the local change stays, force or not.
	if res := mustApply(t, r, "common.git", gitParam("path", "/srv/app", "repo", url, "force", "true")); res.Changed {
		t.Fatalf("force with nothing to move: %+v", res)
	}
	srv.Commit("app", map[string]string{"conf": "remote 2\n"}, "two")
	res := r.apply(t, "common.git", param, false)
	if res.OK || !strings.Contains(res.Comment, "set force") {
		t.Fatalf("local change in the way, no force: %+v", res)
	}
	if got := readIn(t, r.root, "/srv/app/conf"); got != "local edit\n" {
		t.Fatalf("the local change was lost: %q", got)
	}
	res = mustApply(t, r, "common.git", gitParam("path", "/srv/app", "repo", url, "force", "true"))
	if !res.Changed || readIn(t, r.root, "/srv/app/conf") != "remote 2\n" || headIn(t, r.root, "/srv/app") != srv.Head("app") {
		t.Fatalf("force: %+v, conf %q", res, readIn(t, r.root, "/srv/app/conf"))
	}

	// A local commit the remote lacks: the branch cannot be at the
	// remote's without losing it.
	inRoot(t, r.root, "sh", "-c", "cd /srv/app && echo mine > mine && git add mine && git -c user.name=t -c user.email=t@e commit -q -m mine")
	srv.Commit("app", map[string]string{"other": "x\n"}, "three")
	res = r.apply(t, "common.git", param, false)
	if res.OK || !strings.Contains(res.Comment, "set force") {
		t.Fatalf("local commit, remote moved, no force: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(r.root, "srv/app/mine")); err != nil {
		t.Fatal("the local commit was lost without force")
	}
	res = mustApply(t, r, "common.git", gitParam("path", "/srv/app", "repo", url, "force", "true"))
	if _, err := os.Stat(filepath.Join(r.root, "srv/app/mine")); !res.Changed || err == nil || headIn(t, r.root, "/srv/app") != srv.Head("app") {
		t.Fatalf("force over a local commit: %+v", res)
	}

	// Ahead of the remote, which did not move: the same.
	inRoot(t, r.root, "sh", "-c", "cd /srv/app && echo mine > mine && git add mine && git -c user.name=t -c user.email=t@e commit -q -m mine")
	if res := r.apply(t, "common.git", param, false); res.OK || !strings.Contains(res.Comment, "local commits that origin/master lacks") {
		t.Fatalf("ahead of the remote: %+v", res)
	}
	if res := mustApply(t, r, "common.git", gitParam("path", "/srv/app", "repo", url, "force", "true")); !res.Changed || headIn(t, r.root, "/srv/app") != srv.Head("app") {
		t.Fatalf("force, ahead: %+v", res)
	}

	// A directory that is not a checkout.
	if err := os.MkdirAll(filepath.Join(r.root, "srv/other"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.root, "srv/other/keep"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	other := gitParam("path", "/srv/other", "repo", url)
	if res := r.apply(t, "common.git", other, false); res.OK || !strings.Contains(res.Comment, "is not empty and is not a git checkout; set force") {
		t.Fatalf("non-checkout, no force: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(r.root, "srv/other/keep")); err != nil {
		t.Fatal("the directory was touched without force")
	}
	res = mustApply(t, r, "common.git", gitParam("path", "/srv/other", "repo", url, "force", "true"))
	if _, err := os.Stat(filepath.Join(r.root, "srv/other/keep")); !res.Changed || err == nil || readIn(t, r.root, "/srv/other/conf") != "remote 2\n" || readIn(t, r.root, "/srv/other/other") != "x\n" {
		t.Fatalf("non-checkout with force: %+v", res)
	}
}

// user owns the checkout: git runs as that user (so that git's own
// ownership checks pass and the files are the user's), and a state
// without user on that checkout says whose it is.
func TestGitUserOwnsTheCheckout(t *testing.T) {
	r := newGitRig(t)
	inRoot(t, r.root, "useradd", "-m", "-s", "/bin/sh", "deploy")
	uid := strings.TrimSpace(inRoot(t, r.root, "id", "-u", "deploy"))
	srv := gitserver.New(t)
	url := srv.CreateRepo("site", map[string]string{"a.txt": "a\n"})
	param := gitParam("path", "/var/www/site", "repo", url, "user", "deploy")
	first := mustApply(t, r, "common.git", param)
	if !first.Changed {
		t.Fatalf("first: %+v", first)
	}
	for _, p := range []string{"var/www/site", "var/www/site/a.txt", "var/www/site/.git/HEAD"} {
		if owner := strings.TrimSpace(inRoot(t, r.root, "stat", "-c", "%u", "/"+p)); owner != uid {
			t.Errorf("%s owned by %s, want deploy (%s)", p, owner, uid)
		}
	}
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.git", param); res.Changed {
		t.Fatalf("second: %+v", res)
	}
	only(t, r.runs, mark, "git", "ls-remote")
	res := r.apply(t, "common.git", gitParam("path", "/var/www/site", "repo", url), false)
	if res.OK || !strings.Contains(res.Comment, "owned by deploy") || !strings.Contains(res.Comment, "set user to deploy") {
		t.Fatalf("as root on deploy's checkout: %+v", res)
	}
}

// A private repository over ssh: ssh-key-file is the key git's ssh uses
// (no other key is tried), the host key is accepted on first contact and
// checked after, and the key never reaches a comment.
func TestGitSSHKeyFile(t *testing.T) {
	r := newGitRig(t)
	server := sshd.Start(t, r.root, "/etc/opsagent-test/deploy_key")
	inRoot(t, r.root, "git", "init", "-q", "--bare", "-b", "main", "/srv/git/app.git")
	inRoot(t, r.root, "git", "clone", "-q", "/srv/git/app.git", "/tmp/work")
	inRoot(t, r.root, "sh", "-c", "cd /tmp/work && echo one > f && git add f && git commit -q -m one && git push -q origin HEAD:main")
	url := fmt.Sprintf("ssh://root@127.0.0.1:%d/srv/git/app.git", server.Port)
	key, err := os.ReadFile(filepath.Join(r.root, server.ClientKey))
	if err != nil {
		t.Fatal(err)
	}

	// Without the key, ssh has nothing the server accepts.
	res := r.apply(t, "common.git", gitParam("path", "/srv/app", "repo", url), false)
	if res.OK {
		t.Fatalf("cloned without the key: %+v", res)
	}
	param := gitParam("path", "/srv/app", "repo", url, "ssh-key-file", server.ClientKey)
	first := mustApply(t, r, "common.git", param)
	if !first.Changed || readIn(t, r.root, "/srv/app/f") != "one\n" {
		t.Fatalf("ssh clone: %+v", first)
	}
	// Debian's ssh hashes the names it records.
	if hosts := readIn(t, r.root, "/root/.ssh/known_hosts"); strings.Count(hosts, "ssh-ed25519 ") != 1 {
		t.Fatalf("known_hosts = %q, want the server's key accepted once", hosts)
	}
	mark := r.runs.Mark()
	second := mustApply(t, r, "common.git", param)
	if second.Changed {
		t.Fatalf("second: %+v", second)
	}
	only(t, r.runs, mark, "git", "ls-remote")
	for _, res := range []state.Result{first, second} {
		if strings.Contains(res.Comment+res.Stdout, strings.TrimSpace(string(key))[40:80]) {
			t.Fatal("the key reached a comment")
		}
	}
}

// A checkout go-git cannot read (its .git a file, as --separate-git-dir
// makes) is read with git itself: still no fetch when nothing moved.
func TestGitSeparateGitDir(t *testing.T) {
	r := newGitRig(t)
	srv := gitserver.New(t)
	url := srv.CreateRepo("app", map[string]string{"f": "1\n"})
	inRoot(t, r.root, "git", "clone", "-q", "--separate-git-dir=/var/lib/app.git", url, "/srv/app")
	param := gitParam("path", "/srv/app", "repo", url)
	mark := r.runs.Mark()
	if res := mustApply(t, r, "common.git", param); res.Changed {
		t.Fatalf("hand-made checkout: %+v", res)
	}
	for _, c := range r.runs.Since(mark) {
		if c[0] != "git" || (c[1] != "ls-remote" && c[1] != "rev-parse" && c[1] != "symbolic-ref" && c[1] != "config") {
			t.Fatalf("ran %v: only local reads and ls-remote expected", c)
		}
	}
	srv.Commit("app", map[string]string{"f": "2\n"}, "two")
	if res := mustApply(t, r, "common.git", param); !res.Changed || readIn(t, r.root, "/srv/app/f") != "2\n" {
		t.Fatalf("after a push: %+v", res)
	}
}

// Check mode on a missing checkout says it would clone and clones
// nothing.
func TestGitCheckModeClonesNothing(t *testing.T) {
	r := newGitRig(t)
	srv := gitserver.New(t)
	url := srv.CreateRepo("app", map[string]string{"f": "1\n"})
	res := r.apply(t, "common.git", gitParam("path", "/srv/app", "repo", url), true)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "would be cloned to /srv/app") {
		t.Fatalf("check mode: %+v", res)
	}
	if _, err := os.Lstat(filepath.Join(r.root, "srv/app")); err == nil {
		t.Fatal("check mode created the path")
	}
}

// Check mode on a root with neither git nor ssh says both would be
// installed for an ssh repository, and installs nothing.
func TestGitCheckModeNamesThePrerequisites(t *testing.T) {
	r := newDebianRig(t)
	res := r.apply(t, "common.git", gitParam("path", "/srv/app", "repo", "git@example.com:team/app.git"), true)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "git would be installed (prerequisite); openssh-client would be installed (prerequisite); Repository git@example.com:team/app.git would be cloned to /srv/app") {
		t.Fatalf("check mode: %+v", res)
	}
	if ran := r.runs.Ran(0, "apt-get", "dpkg", "git"); len(ran) > 0 {
		t.Fatalf("check mode ran %v", ran)
	}
}

// newGitRig is a rig on a root with git, its ssh client and an ssh
// server installed: one cached layer for every git test.
func newGitRig(t testing.TB) *debianRig {
	t.Helper()
	return newDebianRigWith(t, "git", "openssh-client", "openssh-server")
}
