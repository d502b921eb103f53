package native

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

var svnTool = system.Prerequisite{Tool: "svn", Packages: map[system.Family]string{system.FamilyDebian: "subversion", system.FamilyRHEL: "subversion"}}

// svnRepo is common.svn: check repo out into path, then keep it at
// revision (default HEAD), with the instance's Subversion (installed
// first when missing), as user.
//
// Each round compares the revision the working copy's root last changed
// at with the one the repository's URL last changed at (svn info of
// each, the remote one a read): only when they differ does it update.
// Salt 2014 ran svn update every round. A revision number already checked
// out costs no network. BASE, COMMITTED and PREV name revisions of the
// working copy itself: a checkout takes HEAD, and an existing working
// copy is left where it is (updating to PREV each round would walk back
// one change per round).
//
// The password goes to svn on its standard input (--password-from-stdin,
// svn ≥ 1.10), never on a command line or into svn's credential cache
// (--no-auth-cache), and never into a comment. Local changes are merged
// by the update, as svn does; one that conflicts fails the state naming
// the files. force reverts local changes first, and replaces a path that
// is not a working copy of repo.
func (e *Executor) svnRepo(ctx context.Context, s *stateRun) (state.Result, error) {
	path, err := absPath(s.p, "path")
	if err != nil {
		return state.Result{}, err
	}
	repo, err := s.p.required("repo")
	if err != nil {
		return state.Result{}, err
	}
	repo = strings.TrimRight(strings.TrimSpace(repo), "/")
	rev, err := s.p.str("revision")
	if err != nil {
		return state.Result{}, err
	}
	kind, rev, err := svnRevision(rev)
	if err != nil {
		return state.Result{}, err
	}
	username, err := s.p.str("username")
	if err != nil {
		return state.Result{}, err
	}
	password, err := s.p.str("password")
	if err != nil {
		return state.Result{}, err
	}
	force, err := s.p.boolean("force", false)
	if err != nil {
		return state.Result{}, err
	}
	v, err := s.newVCSTool("svn", "Repository "+path)
	if err != nil {
		return state.Result{}, err
	}
	v.hide(repo)
	if password != "" {
		v.secrets = append(v.secrets, password)
	}
	note, err := s.prerequisite(ctx, svnTool)
	if err != nil {
		return state.Result{}, err
	}
	if s.test && note != "" {
		return changed(joinNotes(note, fmt.Sprintf("Repository %s would be checked out to %s, or updated", redactURL(repo), path))), nil
	}
	sv := &svnRun{s: s, v: v, cache: &e.svnLocal, path: path, repo: repo, kind: kind, rev: rev, username: strings.TrimSpace(username), password: password, force: force}
	res, err := sv.apply(ctx)
	if err != nil {
		return state.Result{}, err
	}
	if note != "" {
		res.Comment, res.Changed = note+"; "+res.Comment, true
	}
	return res, nil
}

// Kinds of svn revision.
const (
	svnHead     = "head"     // HEAD or a {date}: asked of the repository
	svnNumber   = "number"   // a revision number
	svnRelative = "relative" // BASE, COMMITTED, PREV: the working copy's own
)

var svnNumberRev = regexp.MustCompile(`^[rR]?([0-9]+)$`)

func svnRevision(rev string) (kind, value string, err error) {
	rev = strings.TrimSpace(rev)
	switch up := strings.ToUpper(rev); {
	case rev == "" || up == "HEAD":
		return svnHead, "HEAD", nil
	case up == "BASE" || up == "COMMITTED" || up == "COMMITED" || up == "PREV":
		if up == "COMMITED" { // module.json's spelling
			up = "COMMITTED"
		}
		return svnRelative, up, nil
	case strings.HasPrefix(rev, "{") && strings.HasSuffix(rev, "}"):
		return svnHead, rev, nil
	}
	if m := svnNumberRev.FindStringSubmatch(rev); m != nil {
		return svnNumber, m[1], nil
	}
	return "", "", &badParam{"revision", fmt.Sprintf("%q is not a Subversion revision: HEAD, a number, {DATE}, BASE, COMMITTED or PREV", rev)}
}

type svnRun struct {
	s                  *stateRun
	v                  *vcsTool
	cache              *svnInfoCache
	path, repo         string
	kind, rev          string
	username, password string
	force              bool
}

func (sv *svnRun) label() string { return sv.v.label }

// svn runs svn with the options every run takes and, for a run that may
// reach the server, the credentials.
func (sv *svnRun) svn(ctx context.Context, dir string, remote bool, args ...string) (string, error) {
	full := []string{"--non-interactive", "--no-auth-cache"}
	var stdin *strings.Reader
	if remote {
		if sv.username != "" {
			full = append(full, "--username", sv.username)
		}
		if sv.password != "" {
			full = append(full, "--password-from-stdin")
			stdin = strings.NewReader(sv.password + "\n")
		}
	}
	full = append(full, args...)
	if stdin == nil {
		return sv.v.run(ctx, dir, nil, nil, full...)
	}
	out, err := sv.v.run(ctx, dir, stdin, nil, full...)
	var tf *toolFailure
	if errors.As(err, &tf) && strings.Contains(tf.stderr, "password-from-stdin") {
		return out, failf("%s: this svn is older than 1.10 and cannot read a password from its standard input; the agent passes none on a command line: upgrade subversion", sv.label())
	}
	return out, err
}

// svnInfo is what svn info says of a working copy or a URL.
type svnInfo struct {
	Entry struct {
		Revision string `xml:"revision,attr"`
		URL      string `xml:"url"`
		Commit   struct {
			Revision string `xml:"revision,attr"`
		} `xml:"commit"`
	} `xml:"entry"`
}

func (sv *svnRun) info(ctx context.Context, dir string, remote bool, args ...string) (svnInfo, error) {
	out, err := sv.svn(ctx, dir, remote, append([]string{"info", "--xml"}, args...)...)
	if err != nil {
		return svnInfo{}, err
	}
	var in svnInfo
	if err := xml.Unmarshal([]byte(out), &in); err != nil || in.Entry.Revision == "" {
		return svnInfo{}, failf("%s: svn info printed what is not its XML (%v)", sv.label(), err)
	}
	return in, nil
}

// svnInfoCache remembers what svn info said of a working copy, with the
// identity and change times of its .svn/wc.db: svn writes that database
// whenever it changes the working copy, so an unchanged one saves an svn
// process per round (a pinned revision then runs none).
type svnInfoCache struct {
	mu sync.Mutex
	m  map[string]svnCached
}

type svnCached struct {
	stamp string
	info  svnInfo
}

// localInfo is svn info of the working copy at dir, from the cache when
// its database has not changed.
func (sv *svnRun) localInfo(ctx context.Context, dir string) (svnInfo, error) {
	stamp := ""
	if fi, err := sv.s.fs.Stat(dir + "/.svn/wc.db"); err == nil {
		if st, ok := fi.Sys().(*unix.Stat_t); ok {
			stamp = fmt.Sprintf("%d:%d:%d:%d:%d", st.Dev, st.Ino, st.Size, st.Mtim.Nano(), st.Ctim.Nano())
		}
	}
	sv.cache.mu.Lock()
	c, ok := sv.cache.m[dir]
	sv.cache.mu.Unlock()
	if ok && stamp != "" && c.stamp == stamp {
		return c.info, nil
	}
	in, err := sv.info(ctx, dir, false, "--", dir)
	if err != nil || stamp == "" {
		return in, err
	}
	sv.cache.mu.Lock()
	if sv.cache.m == nil {
		sv.cache.m = map[string]svnCached{}
	}
	sv.cache.m[dir] = svnCached{stamp: stamp, info: in}
	sv.cache.mu.Unlock()
	return in, nil
}

func (sv *svnRun) apply(ctx context.Context) (state.Result, error) {
	s := sv.s
	c, err := s.inspectCheckout(sv.path, ".svn")
	if err != nil {
		return state.Result{}, failf("%s: %v", sv.label(), err)
	}
	var local svnInfo
	if c.kind == pathCheckout {
		if err := sv.v.checkOwner(c); err != nil {
			return state.Result{}, err
		}
		if local, err = sv.localInfo(ctx, c.real); err != nil {
			return state.Result{}, err
		}
		if strings.TrimRight(local.Entry.URL, "/") != sv.repo {
			if !sv.force {
				return state.Result{}, failf("%s: %s is a working copy of %s, not of %s; set force to check %s out in its place", sv.label(), sv.path, redactURL(local.Entry.URL), redactURL(sv.repo), redactURL(sv.repo))
			}
			c.kind = pathOther
		}
	}
	if c.kind != pathCheckout {
		return sv.checkout(ctx, &c)
	}
	var ch changes
	switch sv.kind {
	case svnRelative:
		return unchanged(fmt.Sprintf("%s is at r%s; %s names a revision of the working copy itself: nothing to update", sv.label(), local.Entry.Revision, sv.rev)), nil
	case svnNumber:
		if local.Entry.Revision == sv.rev {
			return s.result(sv.label(), ch), nil
		}
		ch.add("revision r%s => r%s", local.Entry.Revision, sv.rev)
	default:
		remote, err := sv.info(ctx, c.real, true, "-r", sv.rev, "--", sv.repo)
		if err != nil {
			return state.Result{}, err
		}
		if remote.Entry.Commit.Revision == local.Entry.Commit.Revision {
			return s.result(sv.label(), ch), nil
		}
		ch.add("revision r%s => r%s", local.Entry.Commit.Revision, remote.Entry.Commit.Revision)
	}
	if s.test {
		return s.result(sv.label(), ch), nil
	}
	if sv.force {
		if _, err := sv.svn(ctx, c.real, false, "revert", "-R", "-q", "--", c.real); err != nil {
			return state.Result{}, err
		}
	}
	args := []string{"update", "--accept", "postpone", "-r", sv.rev}
	if sv.force {
		args = append(args, "--force")
	}
	out, err := sv.svn(ctx, c.real, true, append(args, "--", c.real)...)
	if err != nil {
		return state.Result{}, err
	}
	if conflicts := svnConflicts(out); len(conflicts) > 0 {
		return state.Result{Stdout: sv.v.redact(out)}, failf("%s: the update left conflicts with local changes in %s: resolve them (svn resolve), or set force to discard local changes", sv.label(), strings.Join(conflicts, ", "))
	}
	// Remembered now, so that the next round runs no local svn info.
	_, _ = sv.localInfo(ctx, c.real)
	return s.result(sv.label(), ch), nil
}

// checkout checks repo out into a missing or empty path (or, with force,
// one that holds something else).
func (sv *svnRun) checkout(ctx context.Context, c *checkout) (state.Result, error) {
	if err := sv.v.prepareCheckout(c, sv.force, "Subversion working copy of "+redactURL(sv.repo)); err != nil {
		return state.Result{}, err
	}
	if sv.s.test {
		return changed(fmt.Sprintf("Repository %s would be checked out to %s", redactURL(sv.repo), sv.path)), nil
	}
	rev := sv.rev
	if sv.kind == svnRelative {
		rev = "HEAD" // BASE, COMMITTED, PREV need a working copy
	}
	if _, err := sv.svn(ctx, c.real, true, "checkout", "-q", "-r", rev, "--", sv.repo, c.real); err != nil {
		sv.v.removeFailedClone(*c)
		return state.Result{}, err
	}
	in, err := sv.localInfo(ctx, c.real)
	if err != nil {
		return state.Result{}, err
	}
	return changed(fmt.Sprintf("Repository %s checked out to %s at r%s", redactURL(sv.repo), sv.path, in.Entry.Revision)), nil
}

// svnConflicts lists the paths svn update reported in conflict.
func svnConflicts(out string) []string {
	var paths []string
	for _, line := range strings.Split(out, "\n") {
		// "C    file", " C   dir" (properties), "   C file" (tree).
		if len(line) > 5 && strings.Contains(line[:4], "C") && strings.Trim(line[:4], "ACDUGEBR ") == "" {
			if f := strings.TrimSpace(line[4:]); f != "" {
				paths = append(paths, f)
			}
		}
	}
	if len(paths) == 0 && strings.Contains(out, "Summary of conflicts") {
		paths = append(paths, "(see the output)")
	}
	return paths
}
