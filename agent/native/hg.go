package native

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

var hgTool = system.Prerequisite{Tool: "hg", Packages: map[system.Family]string{system.FamilyDebian: "mercurial", system.FamilyRHEL: "mercurial"}}

// hgRepo is common.hg: clone repo into path, then keep it at revision
// (default: the branch "default"), with the instance's Mercurial
// (installed first when missing), as user.
//
// A revision that is a full changeset id already checked out costs
// nothing. Any other (a branch, a tag, a bookmark) is asked of the remote
// each round (hg identify, a read); only when it names another changeset
// than the working copy's is it pulled and updated to. Salt 2014 pulled
// every round. Local changes stop an update
// (nothing is merged into them); force updates with --clean, discarding
// them, and replaces a path that is not a Mercurial checkout.
//
// A password in repo's URL is taken out of it: Mercurial gets it from an
// [auth] section of a temporary configuration file only the user can
// read, removed after the state, so that it is on no command line and in
// no comment.
func (e *Executor) hgRepo(ctx context.Context, s *stateRun) (state.Result, error) {
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
	if rev = strings.TrimSpace(rev); rev == "" {
		// The 2014 adaptor mapped branch to the revision too.
		if rev, err = s.p.str("branch"); err != nil {
			return state.Result{}, err
		}
		if rev = strings.TrimSpace(rev); rev == "" {
			rev = "default"
		}
	}
	if strings.HasPrefix(rev, "-") {
		return state.Result{}, &badParam{"revision", fmt.Sprintf("%q is not a revision", rev)}
	}
	force, err := s.p.boolean("force", false)
	if err != nil {
		return state.Result{}, err
	}
	v, err := s.newVCSTool("hg", "Repository "+path)
	if err != nil {
		return state.Result{}, err
	}
	v.hide(repo)
	v.env = append(v.env, "HGPLAIN=1")
	note, err := s.prerequisite(ctx, hgTool)
	if err != nil {
		return state.Result{}, err
	}
	h := &hgRun{s: s, v: v, path: path, repo: repo, rev: rev, force: force}
	if s.test && note != "" {
		return changed(joinNotes(note, fmt.Sprintf("Repository %s would be cloned to %s, or updated", redactURL(repo), path))), nil
	}
	cleanup, err := h.credentials()
	if err != nil {
		return state.Result{}, err
	}
	defer cleanup()
	res, err := h.apply(ctx)
	if err != nil {
		return state.Result{}, err
	}
	if note != "" {
		res.Comment, res.Changed = note+"; "+res.Comment, true
	}
	return res, nil
}

type hgRun struct {
	s     *stateRun
	v     *vcsTool
	path  string
	repo  string // as the state gives it
	url   string // without a password
	rev   string
	force bool
}

func (h *hgRun) label() string { return h.v.label }

func (h *hgRun) hg(ctx context.Context, dir string, args ...string) (string, error) {
	return h.v.run(ctx, dir, nil, nil, append([]string{"-y"}, args...)...)
}

// credentials moves a password out of the URL into a temporary hgrc.
func (h *hgRun) credentials() (func(), error) {
	h.url = h.repo
	u, err := url.Parse(h.repo)
	if err != nil || u.User == nil || (u.Scheme != "http" && u.Scheme != "https") {
		return func() {}, nil
	}
	pw, ok := u.User.Password()
	if !ok {
		return func() {}, nil
	}
	name := u.User.Username()
	u.User = nil
	h.url = u.String()
	if h.s.test {
		return func() {}, nil
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	file := "/tmp/.opsagent-hgrc-" + hex.EncodeToString(rnd[:])
	conf := fmt.Sprintf("[auth]\nopsagent.prefix = %s\nopsagent.username = %s\nopsagent.password = %s\n", hgrcValue(h.url), hgrcValue(name), hgrcValue(pw))
	gid := 0
	if h.v.cred != nil {
		gid = int(h.v.cred.Gid)
	}
	if err := h.s.fs.MkdirAll("/tmp", 0o1777, nil); err != nil {
		return nil, failf("%s: %v", h.label(), err)
	}
	if err := h.s.fs.WriteFileAtomic(file, []byte(conf), 0o600, h.v.uid, gid); err != nil {
		return nil, failf("%s: writing the credentials for hg: %v", h.label(), err)
	}
	// HGRCPATH replaces Mercurial's search path: the system's and the
	// user's files are listed again before ours.
	home := ""
	for _, kv := range h.v.env {
		if v, ok := strings.CutPrefix(kv, "HOME="); ok {
			home = v
		}
	}
	h.v.env = append(h.v.env, "HGRCPATH="+strings.Join([]string{"/etc/mercurial/hgrc", "/etc/mercurial/hgrc.d", home + "/.hgrc", home + "/.config/hg/hgrc", file}, ":"))
	return func() { _ = h.s.fs.Remove(file) }, nil
}

// hgrcValue keeps a value on its line.
func hgrcValue(s string) string {
	return strings.NewReplacer("\n", "", "\r", "").Replace(s)
}

var fullNode = regexp.MustCompile(`^[0-9a-f]{40}$`)

func (h *hgRun) apply(ctx context.Context) (state.Result, error) {
	s := h.s
	c, err := s.inspectCheckout(h.path, ".hg")
	if err != nil {
		return state.Result{}, failf("%s: %v", h.label(), err)
	}
	if c.kind != pathCheckout {
		if err := h.v.prepareCheckout(&c, h.force, "Mercurial checkout"); err != nil {
			return state.Result{}, err
		}
		if s.test {
			return changed(fmt.Sprintf("Repository %s would be cloned to %s", redactURL(h.repo), h.path)), nil
		}
		if _, err := h.hg(ctx, c.real, "clone", "-q", "--noupdate", "--", h.url, c.real); err != nil {
			h.v.removeFailedClone(c)
			return state.Result{}, err
		}
		if _, err := h.hg(ctx, c.real, "update", "-q", "--clean", "-r", h.rev); err != nil {
			h.v.removeFailedClone(c)
			return state.Result{}, err
		}
		node, err := h.parent(ctx, c.real)
		if err != nil {
			return state.Result{}, err
		}
		return changed(fmt.Sprintf("Repository %s cloned to %s at %s (%s)", redactURL(h.repo), h.path, h.rev, short(node))), nil
	}
	if err := h.v.checkOwner(c); err != nil {
		return state.Result{}, err
	}
	local, err := h.parent(ctx, c.real)
	if err != nil {
		return state.Result{}, err
	}
	want := strings.ToLower(h.rev)
	if !fullNode.MatchString(want) {
		// Where the remote has the revision now (a read).
		out, err := h.hg(ctx, c.real, "identify", "--debug", "-i", "-r", h.rev, "--", h.url)
		if err != nil {
			return state.Result{}, err
		}
		// --debug gives the full id, among debugging lines.
		want = ""
		for _, line := range strings.Split(out, "\n") {
			if line = strings.TrimSuffix(strings.TrimSpace(line), "+"); fullNode.MatchString(line) {
				want = line
			}
		}
		if want == "" {
			return state.Result{}, failf("%s: hg identify of %s at %s printed no changeset id: %s", h.label(), redactURL(h.repo), h.rev, h.v.redact(out))
		}
	}
	var ch changes
	if local == want {
		return s.result(h.label(), ch), nil
	}
	ch.add("revision %s => %s (%s)", short(local), short(want), h.rev)
	if s.test {
		return s.result(h.label(), ch), nil
	}
	if _, err := h.hg(ctx, c.real, "pull", "-q", "-r", want, "--", h.url); err != nil {
		return state.Result{}, err
	}
	// --check: local changes stop the update rather than being merged
	// into, and perhaps left in conflict with, the new revision.
	args := []string{"update", "-q", "--check", "-r", want}
	if h.force {
		args = []string{"update", "-q", "--clean", "-r", want}
	}
	if _, err := h.hg(ctx, c.real, args...); err != nil {
		var tf *toolFailure
		if errors.As(err, &tf) {
			return state.Result{}, failf("%s; local changes are in the way: commit or discard them, or set force to discard them", tf.msg)
		}
		return state.Result{}, err
	}
	return s.result(h.label(), ch), nil
}

// parent is the changeset the working directory is at: read from
// .hg/dirstate (its first 20 bytes) without running hg, or asked of hg
// for a dirstate format it does not know.
func (h *hgRun) parent(ctx context.Context, dir string) (string, error) {
	head, err := h.readHead(dir + "/.hg/dirstate")
	switch {
	case err == nil && len(head) == 40 && !strings.HasPrefix(string(head), "dirstate-v2"):
		return hex.EncodeToString(head[:20]), nil
	case errors.Is(err, fs.ErrNotExist):
		return strings.Repeat("0", 40), nil // nothing checked out
	}
	out, err := h.hg(ctx, dir, "log", "-r", ".", "-T", "{node}")
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(out), nil
}

// readHead reads the first 40 bytes of p, resolved inside the root.
func (h *hgRun) readHead(p string) ([]byte, error) {
	real, err := h.s.fs.ResolveLinks(p)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(h.s.fs.HostPath(real))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	head := make([]byte, 40)
	n, err := io.ReadFull(f, head)
	return head[:n], err
}
