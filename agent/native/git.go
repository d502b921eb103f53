package native

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/go-git/go-billy/v5/osfs"
	gogit "github.com/go-git/go-git/v5"
	"github.com/go-git/go-git/v5/plumbing"
	"github.com/go-git/go-git/v5/plumbing/cache"
	"github.com/go-git/go-git/v5/storage/filesystem"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// The instance's git, and its ssh client for ssh repositories: the 2014
// adaptor's implicit requirements (ssh comes with git's Recommends on a
// full install, but not on a minimal one).
var (
	gitTool = system.Prerequisite{Tool: "git", Packages: map[system.Family]string{system.FamilyDebian: "git", system.FamilyRHEL: "git"}}
	sshTool = system.Prerequisite{Tool: "ssh", Packages: map[system.Family]string{system.FamilyDebian: "openssh-client", system.FamilyRHEL: "openssh-clients"}}
)

// gitRepo is common.git: clone repo into path, then keep it at revision.
//
// It runs the instance's git (installed first when missing), chrooted
// into the root, as user: an ssh key, the user's ssh configuration and
// known hosts, submodules, hooks and credential helpers behave as when
// the administrator runs git by hand. The agent's own go-git only reads
// the checkout (HEAD, refs, the origin URL), in process, so that a round
// with nothing to do runs no git but the one network read a branch
// needs.
//
// revision is a branch, a tag or a commit (default: the branch the
// remote's HEAD names, which the clone checks out). A branch is kept at
// the remote's: each round asks the remote where it is (git ls-remote, a
// read) and fetches and moves only when it moved. A tag or a commit
// already checked out costs nothing, no network at all. force discards
// local changes when the checkout must move (and local commits on a
// branch that cannot fast-forward), and replaces a path that is not a
// git checkout; without it those fail and nothing is lost.
func (e *Executor) gitRepo(ctx context.Context, s *stateRun) (state.Result, error) {
	path, err := absPath(s.p, "path")
	if err != nil {
		return state.Result{}, err
	}
	repo, err := s.p.required("repo")
	if err != nil {
		return state.Result{}, err
	}
	repo = strings.TrimSpace(repo)
	rev, err := s.p.str("revision")
	if err != nil {
		return state.Result{}, err
	}
	rev = strings.TrimSpace(rev)
	if rev == "HEAD" {
		rev = ""
	}
	if strings.HasPrefix(rev, "-") {
		return state.Result{}, &badParam{"revision", fmt.Sprintf("%q is not a branch, tag or commit", rev)}
	}
	force, err := s.p.boolean("force", false)
	if err != nil {
		return state.Result{}, err
	}
	key, err := s.p.str("ssh-key-file")
	if err != nil {
		return state.Result{}, err
	}
	key = strings.TrimSpace(key)
	if key != "" {
		if !strings.HasPrefix(key, "/") {
			return state.Result{}, &badParam{"ssh-key-file", fmt.Sprintf("must be an absolute path, got %q", key)}
		}
		if fi, err := s.fs.Stat(key); err != nil || !fi.Mode().IsRegular() {
			return state.Result{}, &badParam{"ssh-key-file", fmt.Sprintf("%s is not a file on this instance", key)}
		}
	}
	g := &gitRun{s: s, path: path, repo: repo, rev: rev, force: force}
	g.v, err = s.newVCSTool("git", "Repository "+path)
	if err != nil {
		return state.Result{}, err
	}
	g.v.hide(repo)
	// Never a prompt: a missing credential fails instead of hanging.
	g.v.env = append(g.v.env, "GIT_TERMINAL_PROMPT=0")
	if key != "" {
		g.v.env = append(g.v.env, "GIT_SSH_COMMAND=ssh -i "+shellQuote(key)+" -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o BatchMode=yes")
	}
	var notes []string
	note, err := s.prerequisite(ctx, gitTool)
	if err != nil {
		return state.Result{}, err
	}
	notes = append(notes, note)
	if key != "" || sshURL(repo) {
		note, err := s.prerequisite(ctx, sshTool)
		if err != nil {
			return state.Result{}, err
		}
		notes = append(notes, note)
	}
	res, err := g.apply(ctx)
	if err != nil {
		return state.Result{}, err
	}
	if pre := joinNotes(notes...); pre != "" {
		res.Comment = pre + "; " + res.Comment
		res.Changed = true
	}
	return res, nil
}

// sshURL reports whether repo is reached over ssh: ssh://, git+ssh://,
// or git's scp-like user@host:path.
func sshURL(repo string) bool {
	if strings.HasPrefix(repo, "ssh://") || strings.HasPrefix(repo, "git+ssh://") || strings.HasPrefix(repo, "ssh+git://") {
		return true
	}
	if strings.Contains(repo, "://") || strings.HasPrefix(repo, "/") {
		return false
	}
	colon := strings.Index(repo, ":")
	slash := strings.Index(repo, "/")
	return colon > 0 && (slash < 0 || colon < slash)
}

// shellQuote quotes s for sh (GIT_SSH_COMMAND is run by a shell).
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// gitRun is one common.git state being applied.
type gitRun struct {
	s     *stateRun
	v     *vcsTool
	path  string
	repo  string
	rev   string
	force bool
}

func (g *gitRun) label() string { return "Repository " + g.path }

// git runs git in the checkout.
func (g *gitRun) git(ctx context.Context, dir string, args ...string) (string, error) {
	return g.v.run(ctx, dir, nil, nil, args...)
}

func (g *gitRun) apply(ctx context.Context) (state.Result, error) {
	s := g.s
	c, err := s.inspectCheckout(g.path, ".git")
	if err != nil {
		return state.Result{}, failf("%s: %v", g.label(), err)
	}
	if s.test && !s.sys.HasTool("git") {
		// Nothing of the checkout can be asked of a git not installed yet.
		if c.kind == pathCheckout {
			return changed(fmt.Sprintf("%s would be brought to %s", g.label(), g.revLabel())), nil
		}
		return changed(fmt.Sprintf("Repository %s would be cloned to %s", redactURL(g.repo), g.path)), nil
	}
	if c.kind != pathCheckout {
		return g.clone(ctx, &c)
	}
	if err := g.v.checkOwner(c); err != nil {
		return state.Result{}, err
	}
	return g.update(ctx, c)
}

func (g *gitRun) revLabel() string {
	if g.rev == "" {
		return "the remote's default branch"
	}
	return g.rev
}

// clone clones into a missing or empty path (or, with force, one that
// holds something else), then checks out revision.
func (g *gitRun) clone(ctx context.Context, c *checkout) (state.Result, error) {
	if err := g.v.prepareCheckout(c, g.force, "git checkout"); err != nil {
		return state.Result{}, err
	}
	if g.s.test {
		return changed(fmt.Sprintf("Repository %s would be cloned to %s", redactURL(g.repo), g.path)), nil
	}
	if _, err := g.git(ctx, c.real, "clone", "-q", "--no-checkout", "--", g.repo, c.real); err != nil {
		g.v.removeFailedClone(*c)
		return state.Result{}, err
	}
	refs := g.refs(c.real)
	t, err := g.target(ctx, refs, c.real)
	if err == nil {
		err = g.moveTo(ctx, c.real, refs, t, true)
	}
	if err != nil {
		g.v.removeFailedClone(*c)
		return state.Result{}, err
	}
	head, _ := g.refs(c.real).head(ctx)
	return changed(fmt.Sprintf("Repository %s cloned to %s at %s (%s)", redactURL(g.repo), g.path, t.name, short(head))), nil
}

// update brings an existing checkout to revision.
func (g *gitRun) update(ctx context.Context, c checkout) (state.Result, error) {
	s := g.s
	refs := g.refs(c.real)
	var ch changes
	origin, err := refs.origin(ctx)
	if err != nil {
		return state.Result{}, err
	}
	if origin != g.repo {
		// As Salt's git.latest did: the state's repo is the origin.
		ch.add("remote origin %s => %s", redactURL(origin), redactURL(g.repo))
		if !s.test {
			args := []string{"remote", "set-url", "origin", g.repo}
			if origin == "" {
				args = []string{"remote", "add", "origin", g.repo}
			}
			if _, err := g.git(ctx, c.real, args...); err != nil {
				return state.Result{}, err
			}
		}
	}
	t, err := g.target(ctx, refs, c.real)
	if err != nil {
		return state.Result{}, err
	}
	head, err := refs.head(ctx)
	if err != nil {
		return state.Result{}, err
	}
	branch, err := refs.branch(ctx)
	if err != nil {
		return state.Result{}, err
	}
	if head == t.commit && (t.kind != "branch" || branch == t.name) {
		return s.result(g.label(), ch), nil
	}
	switch {
	case head == t.commit:
		ch.add("branch %s checked out", t.name)
	case t.commit == "":
		ch.add("revision %s => %s", short(head), t.name)
	default:
		ch.add("revision %s => %s (%s)", short(head), short(t.commit), t.name)
	}
	if s.test {
		return s.result(g.label(), ch), nil
	}
	if err := g.moveTo(ctx, c.real, refs, t, g.force); err != nil {
		return state.Result{}, err
	}
	if t.kind == "branch" {
		// A fast-forward that left HEAD elsewhere: local commits the
		// remote lacks. The state cannot hold without discarding them.
		if now, err := g.refs(c.real).head(ctx); err == nil && now != t.commit {
			return state.Result{}, failf("%s: branch %s has local commits that origin/%s lacks (at %s, the remote at %s): push them, or set force to reset %s to the remote's", g.label(), t.name, t.name, short(now), short(t.commit), t.name)
		}
	}
	return s.result(g.label(), ch), nil
}

// gitTarget is what revision names, resolved: a branch, a tag or a
// commit, and the commit it is at (for a branch: on the remote now).
type gitTarget struct {
	kind   string // "branch", "tag", "commit"
	name   string
	commit string
	// fetch is the refspec that brings commit, when it is not in the
	// checkout yet ("" when it is).
	fetch string
}

var hexRev = regexp.MustCompile(`^[0-9a-fA-F]{4,64}$`)

// target resolves revision, asking the remote only what the checkout
// cannot tell: where a branch is now (each round: it is kept at the
// remote's), and what a name unknown locally is.
func (g *gitRun) target(ctx context.Context, refs gitRefs, dir string) (gitTarget, error) {
	name := g.rev
	if name == "" {
		b, err := refs.branch(ctx)
		if err != nil {
			return gitTarget{}, err
		}
		if b == "" {
			if b, err = g.remoteHead(ctx, dir); err != nil {
				return gitTarget{}, err
			}
		}
		return g.branchTarget(ctx, refs, dir, b)
	}
	if _, ok, err := refs.ref(ctx, "refs/remotes/origin/"+name); err != nil {
		return gitTarget{}, err
	} else if ok {
		return g.branchTarget(ctx, refs, dir, name)
	}
	if _, ok, err := refs.ref(ctx, "refs/heads/"+name); err != nil {
		return gitTarget{}, err
	} else if ok {
		return g.branchTarget(ctx, refs, dir, name)
	}
	if c, ok, err := refs.ref(ctx, "refs/tags/"+name); err != nil {
		return gitTarget{}, err
	} else if ok {
		return gitTarget{kind: "tag", name: name, commit: c}, nil
	}
	if hexRev.MatchString(name) {
		if c, ok, err := refs.commit(ctx, name); err != nil {
			return gitTarget{}, err
		} else if ok {
			return gitTarget{kind: "commit", name: short(c), commit: c}, nil
		}
	}
	// Unknown here: ask the remote.
	remote, err := g.lsRemote(ctx, dir, "refs/heads/"+name, "refs/tags/"+name, "refs/tags/"+name+"^{}")
	if err != nil {
		return gitTarget{}, err
	}
	if c, ok := remote["refs/heads/"+name]; ok {
		return gitTarget{kind: "branch", name: name, commit: c, fetch: "+refs/heads/" + name + ":refs/remotes/origin/" + name}, nil
	}
	if c, ok := remote["refs/tags/"+name+"^{}"]; ok {
		return gitTarget{kind: "tag", name: name, commit: c, fetch: "+refs/tags/" + name + ":refs/tags/" + name}, nil
	}
	if c, ok := remote["refs/tags/"+name]; ok {
		return gitTarget{kind: "tag", name: name, commit: c, fetch: "+refs/tags/" + name + ":refs/tags/" + name}, nil
	}
	if hexRev.MatchString(name) {
		// A commit not in the checkout: fetched with every branch, where
		// it should be found.
		return gitTarget{kind: "commit", name: name, fetch: "+refs/heads/*:refs/remotes/origin/*"}, nil
	}
	return gitTarget{}, failf("%s: revision %s is neither a branch, a tag nor a commit of %s", g.label(), name, redactURL(g.repo))
}

// branchTarget is branch b where the remote has it now.
func (g *gitRun) branchTarget(ctx context.Context, refs gitRefs, dir, b string) (gitTarget, error) {
	remote, err := g.lsRemote(ctx, dir, "refs/heads/"+b)
	if err != nil {
		return gitTarget{}, err
	}
	c, ok := remote["refs/heads/"+b]
	if !ok {
		return gitTarget{}, failf("%s: %s has no branch %s", g.label(), redactURL(g.repo), b)
	}
	t := gitTarget{kind: "branch", name: b, commit: c}
	if tracked, ok, err := refs.ref(ctx, "refs/remotes/origin/"+b); err != nil {
		return t, err
	} else if !ok || tracked != c {
		t.fetch = "+refs/heads/" + b + ":refs/remotes/origin/" + b
	}
	return t, nil
}

// lsRemote asks the remote where refs are (a network read that changes
// nothing here).
func (g *gitRun) lsRemote(ctx context.Context, dir string, refs ...string) (map[string]string, error) {
	out, err := g.git(ctx, dir, append([]string{"ls-remote", "--", g.repo}, refs...)...)
	if err != nil {
		return nil, err
	}
	found := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		id, ref, ok := strings.Cut(strings.TrimSpace(line), "\t")
		if ok {
			found[ref] = id
		}
	}
	return found, nil
}

// remoteHead is the branch the remote's HEAD names.
func (g *gitRun) remoteHead(ctx context.Context, dir string) (string, error) {
	out, err := g.git(ctx, dir, "ls-remote", "--symref", "--", g.repo, "HEAD")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "ref: refs/heads/"); ok {
			if b, _, ok := strings.Cut(rest, "\t"); ok {
				return b, nil
			}
		}
	}
	return "", failf("%s: %s names no default branch (an empty repository?): set revision", g.label(), redactURL(g.repo))
}

// moveTo fetches what t needs and checks it out. A branch is checked out
// tracking origin's and fast-forwarded to it; with force (or in a fresh
// clone) it is reset to it, local changes and commits discarded. A tag or
// a commit is checked out detached.
func (g *gitRun) moveTo(ctx context.Context, dir string, refs gitRefs, t gitTarget, force bool) error {
	if t.fetch != "" {
		if _, err := g.git(ctx, dir, "fetch", "-q", "origin", t.fetch); err != nil {
			return err
		}
		refs = g.refs(dir) // read again: new packs and refs
	}
	if t.commit == "" {
		c, ok, err := refs.commit(ctx, t.name)
		if err != nil {
			return err
		}
		if !ok {
			return failf("%s: commit %s is not in %s (fetched every branch)", g.label(), t.name, redactURL(g.repo))
		}
		t.commit = c
	}
	quiet := []string{"-c", "advice.detachedHead=false", "checkout", "-q"}
	if force {
		quiet = append(quiet, "--force")
	}
	if t.kind != "branch" {
		_, err := g.git(ctx, dir, append(quiet, "--detach", t.commit)...)
		return g.explainLocal(err)
	}
	if force {
		_, err := g.git(ctx, dir, append(quiet, "-B", t.name, "--track", "origin/"+t.name)...)
		return err
	}
	branch, err := refs.branch(ctx)
	if err != nil {
		return err
	}
	if branch != t.name {
		_, has, err := refs.ref(ctx, "refs/heads/"+t.name)
		if err != nil {
			return err
		}
		args := append(quiet, t.name)
		if !has {
			args = append(quiet, "-b", t.name, "--track", "origin/"+t.name)
		}
		if _, err := g.git(ctx, dir, args...); err != nil {
			return g.explainLocal(err)
		}
	}
	_, err = g.git(ctx, dir, "merge", "-q", "--ff-only", "origin/"+t.name)
	return g.explainLocal(err)
}

// explainLocal adds the fix to a checkout or merge that local changes or
// commits stopped.
func (g *gitRun) explainLocal(err error) error {
	var tf *toolFailure
	if err == nil || !errors.As(err, &tf) {
		return err
	}
	return failf("%s; local changes or commits are in the way: commit or discard them, or set force to discard them", tf.msg)
}

// refs reads the checkout: in process with go-git when it can, else with
// git itself (a .git file, an extension go-git does not know).
func (g *gitRun) refs(dir string) gitRefs {
	if r := openGoGit(g.s.fs.HostPath(dir)); r != nil {
		return &goGitRefs{r: r}
	}
	return &cliRefs{g: g, dir: dir}
}

// gitRefs is what the state reads of a checkout.
type gitRefs interface {
	head(ctx context.Context) (string, error)   // HEAD's commit, "" when unborn
	branch(ctx context.Context) (string, error) // HEAD's branch, "" when detached
	origin(ctx context.Context) (string, error) // remote.origin.url
	// ref is a ref's commit (a tag peeled), and whether it exists.
	ref(ctx context.Context, name string) (string, bool, error)
	// commit is the full id of a commit of the checkout named by a
	// (possibly abbreviated) id.
	commit(ctx context.Context, id string) (string, bool, error)
}

// openGoGit opens the checkout at the host path dir, its .git a
// directory, reading through files bound below dir (a symlink in .git
// cannot lead the reads elsewhere); nil when go-git cannot.
func openGoGit(dir string) *gogit.Repository {
	dot := dir + "/.git"
	storage := filesystem.NewStorage(osfs.New(dot, osfs.WithBoundOS()), cache.NewObjectLRU(cache.MiByte))
	r, err := gogit.Open(storage, osfs.New(dir, osfs.WithBoundOS()))
	if err != nil {
		return nil
	}
	return r
}

type goGitRefs struct{ r *gogit.Repository }

func (g *goGitRefs) head(context.Context) (string, error) {
	ref, err := g.r.Head()
	if errors.Is(err, plumbing.ErrReferenceNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return ref.Hash().String(), nil
}

func (g *goGitRefs) branch(context.Context) (string, error) {
	ref, err := g.r.Storer.Reference(plumbing.HEAD)
	if err != nil {
		return "", err
	}
	if ref.Type() == plumbing.SymbolicReference && ref.Target().IsBranch() {
		return ref.Target().Short(), nil
	}
	return "", nil
}

func (g *goGitRefs) origin(context.Context) (string, error) {
	cfg, err := g.r.Config()
	if err != nil {
		return "", err
	}
	if o, ok := cfg.Remotes["origin"]; ok && len(o.URLs) > 0 {
		return o.URLs[0], nil
	}
	return "", nil
}

func (g *goGitRefs) ref(_ context.Context, name string) (string, bool, error) {
	ref, err := g.r.Reference(plumbing.ReferenceName(name), true)
	if errors.Is(err, plumbing.ErrReferenceNotFound) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	h := ref.Hash()
	// An annotated tag (or a tag of a tag) is peeled to its commit.
	for range 10 {
		tag, err := g.r.TagObject(h)
		if err != nil {
			break
		}
		h = tag.Target
	}
	return h.String(), true, nil
}

func (g *goGitRefs) commit(_ context.Context, id string) (string, bool, error) {
	if len(id) != 40 {
		// Abbreviated: found by prefix among what HEAD reaches first,
		// the common case of a checkout already there.
		if ref, err := g.r.Head(); err == nil && strings.HasPrefix(ref.Hash().String(), strings.ToLower(id)) {
			return ref.Hash().String(), true, nil
		}
		h, err := g.r.ResolveRevision(plumbing.Revision(id))
		if err != nil {
			return "", false, nil
		}
		return h.String(), true, nil
	}
	c, err := g.r.CommitObject(plumbing.NewHash(id))
	if errors.Is(err, plumbing.ErrObjectNotFound) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	return c.Hash.String(), true, nil
}

// cliRefs reads the checkout with git itself (local commands, no
// network).
type cliRefs struct {
	g   *gitRun
	dir string
}

func (c *cliRefs) revParse(ctx context.Context, args ...string) (string, bool, error) {
	out, err := c.g.git(ctx, c.dir, append([]string{"rev-parse", "-q", "--verify"}, args...)...)
	var tf *toolFailure
	if errors.As(err, &tf) && tf.code == 1 {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	return strings.TrimSpace(out), true, nil
}

func (c *cliRefs) head(ctx context.Context) (string, error) {
	h, _, err := c.revParse(ctx, "HEAD^{commit}")
	return h, err
}

func (c *cliRefs) branch(ctx context.Context) (string, error) {
	out, err := c.g.git(ctx, c.dir, "symbolic-ref", "-q", "--short", "HEAD")
	var tf *toolFailure
	if errors.As(err, &tf) && tf.code == 1 {
		return "", nil
	}
	return strings.TrimSpace(out), err
}

func (c *cliRefs) origin(ctx context.Context) (string, error) {
	out, err := c.g.git(ctx, c.dir, "config", "--get", "remote.origin.url")
	var tf *toolFailure
	if errors.As(err, &tf) && tf.code == 1 {
		return "", nil
	}
	return strings.TrimSpace(out), err
}

func (c *cliRefs) ref(ctx context.Context, name string) (string, bool, error) {
	return c.revParse(ctx, name+"^{commit}")
}

func (c *cliRefs) commit(ctx context.Context, id string) (string, bool, error) {
	return c.revParse(ctx, id+"^{commit}")
}
