package native

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"slices"
	"strings"
	"syscall"

	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/textcut"
)

// What the source modules (common.git, common.hg, common.svn) share: the
// instance's own tool, installed first when missing (the 2014 adaptor's
// implicit requirement), run chrooted into the root as the state's user
// with that user's home, so that the user's ssh configuration, known
// hosts and credential helpers apply as when an administrator runs the
// tool by hand, and the checkout is the user's.

// vcsTool runs one version control tool for one state.
type vcsTool struct {
	s     *stateRun
	tool  string
	label string // "Repository /srv/app", for messages
	user  string // who runs it ("root" when the state names nobody)
	cred  *syscall.Credential
	uid   int
	env   []string
	// secrets are hidden wherever the tool's output or arguments could
	// reach a comment (a password in a repository URL).
	secrets []string
}

// newVCSTool prepares tool to run as the state's user parameter (root by
// default, as module.json says).
func (s *stateRun) newVCSTool(tool, label string) (*vcsTool, error) {
	name, err := s.p.str("user")
	if err != nil {
		return nil, err
	}
	name = strings.TrimSpace(name)
	if name == "" {
		name = "root"
	}
	u, err := s.sys.LookupUser(name)
	if err != nil {
		return nil, &badParam{"user", err.Error()}
	}
	v := &vcsTool{s: s, tool: tool, label: label, user: name, uid: u.UID}
	home := u.Home
	if home == "" {
		home = "/"
	}
	// The agent's own HOME (none under systemd) says nothing of the user.
	v.env = []string{"HOME=" + home, "USER=" + u.Name, "LOGNAME=" + u.Name}
	if u.UID != 0 {
		gid := u.GID
		if gid < 0 {
			gid = u.UID
		}
		v.cred = &syscall.Credential{Uid: uint32(u.UID), Gid: uint32(gid), Groups: s.supplementaryGroups(u.Name, gid)}
	}
	return v, nil
}

// supplementaryGroups are the groups of the root's /etc/group that list
// name as a member, as login(1) would give them.
func (s *stateRun) supplementaryGroups(name string, primary int) []uint32 {
	groups, err := s.sys.Groups()
	if err != nil {
		return nil
	}
	var out []uint32
	for _, g := range groups {
		if g.GID != primary && slices.Contains(g.Members, name) {
			out = append(out, uint32(g.GID))
		}
	}
	return out
}

// hide adds the password of a URL to the secrets.
func (v *vcsTool) hide(raw string) {
	if u, err := url.Parse(raw); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			v.secrets = append(v.secrets, pw, url.QueryEscape(pw), url.PathEscape(pw))
		}
	}
}

// redact hides the secrets in s.
func (v *vcsTool) redact(s string) string {
	for _, sec := range v.secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, "xxxxx")
		}
	}
	return s
}

// maxQuotedOutput bounds the tool output quoted in a failure comment.
const maxQuotedOutput = 1 << 10

// run runs the tool in dir (inside the root) and returns its standard
// output. A tool that exits non-zero is an error naming the command and
// quoting the end of what it printed, with secrets hidden.
func (v *vcsTool) run(ctx context.Context, dir string, stdin io.Reader, env []string, args ...string) (string, error) {
	var stderr bytes.Buffer
	res, err := v.s.sys.Run(ctx, system.Cmd{
		Tool:       v.tool,
		Args:       args,
		Dir:        dir,
		Stdin:      stdin,
		Env:        append(append([]string{}, v.env...), env...),
		Stderr:     &limitedBuffer{buf: &stderr, max: 64 << 10},
		Credential: v.cred,
	})
	if err != nil {
		return "", failf("%s: %s %s could not run: %v", v.label, v.tool, v.redact(strings.Join(args, " ")), err)
	}
	if res.ExitCode != 0 {
		out := strings.TrimSpace(stderr.String())
		if out == "" {
			out = strings.TrimSpace(res.Output)
		}
		if cut := textcut.Suffix(out, maxQuotedOutput); cut != out {
			out = "…" + cut
		}
		return res.Output, &toolFailure{fmt.Sprintf("%s: %s %s failed with exit code %d: %s", v.label, v.tool, v.redact(strings.Join(args, " ")), res.ExitCode, v.redact(out)), res.ExitCode, v.redact(stderr.String())}
	}
	return res.Output, nil
}

// toolFailure is a tool that ran and failed; its message is the state's
// comment.
type toolFailure struct {
	msg    string
	code   int
	stderr string
}

func (e *toolFailure) Error() string { return e.msg }

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	buf *bytes.Buffer
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.buf.Len(); room > 0 {
		if len(p) > room {
			b.buf.Write(p[:room])
		} else {
			b.buf.Write(p)
		}
	}
	return len(p), nil
}

// prerequisite is need for the source modules, which say what they
// installed before their own comment ("" when the tool was there).
func (s *stateRun) prerequisite(ctx context.Context, pre system.Prerequisite) (string, error) {
	var ch changes
	if _, err := s.need(ctx, pre, &ch); err != nil {
		return "", failf("%v", err)
	}
	return strings.Join(ch, ", "), nil
}

// checkoutKind is what a state's path holds.
type checkoutKind int

const (
	pathMissing  checkoutKind = iota
	pathEmpty                 // an empty directory: cloned into
	pathCheckout              // a directory with the tool's metadata directory
	pathOther                 // anything else: replaced only with force
)

// checkout is a state's path, resolved inside the root.
type checkout struct {
	path string // as the state names it
	real string // symlinks resolved inside the root
	kind checkoutKind
	fi   fs.FileInfo
}

// inspectCheckout looks at path: a symlink to a directory is followed
// (inside the root), as Salt's os.path.isdir did; meta is the tool's
// metadata entry (".git").
func (s *stateRun) inspectCheckout(path, meta string) (checkout, error) {
	c := checkout{path: path, real: path}
	real, err := s.fs.ResolveLinks(path)
	if err == nil {
		c.real = real
	}
	fi, err := s.fs.Stat(c.real)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if lfi, lerr := s.fs.Lstat(path); lerr == nil {
			c.kind, c.fi = pathOther, lfi // a dangling link
			return c, nil
		}
		c.kind = pathMissing
		return c, nil
	case err != nil:
		return c, err
	}
	c.fi = fi
	if !fi.IsDir() {
		c.kind = pathOther
		return c, nil
	}
	if _, err := s.fs.Lstat(c.real + "/" + meta); err == nil {
		c.kind = pathCheckout
		return c, nil
	}
	empty, err := s.emptyDir(c.real)
	if err != nil {
		return c, err
	}
	if empty {
		c.kind = pathEmpty
	} else {
		c.kind = pathOther
	}
	return c, nil
}

func (s *stateRun) emptyDir(p string) (bool, error) {
	empty := true
	err := s.fs.WalkDir(p, func(q string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if q == p {
			return nil
		}
		empty = false
		return fs.SkipAll
	})
	return empty, err
}

// prepareCheckout makes c an empty directory owned by the tool's user,
// ready to clone into: a missing one is created (its parents as the
// agent, 0755), anything else but an empty directory is removed first,
// which only force allows. In check mode it changes nothing.
func (v *vcsTool) prepareCheckout(c *checkout, force bool, what string) error {
	s := v.s
	if c.kind == pathOther {
		if !force {
			desc := "is not empty"
			if c.fi != nil && !c.fi.IsDir() {
				desc = "is not a directory"
			}
			return failf("%s: %s exists, %s and is not a %s; set force to replace it, or choose another path", v.label, c.path, desc, what)
		}
		if s.test {
			return nil
		}
		target := c.real
		if fi, err := s.fs.Lstat(c.path); err == nil && fi.Mode()&fs.ModeSymlink != 0 && (c.fi == nil || !c.fi.IsDir()) {
			target = c.path // a link to a file or to nothing: the link goes
		}
		if err := s.fs.RemoveAll(target); err != nil {
			return failf("%s: removing %s: %v", v.label, target, err)
		}
		c.real = target
		c.kind = pathMissing
	}
	if s.test {
		return nil
	}
	if c.kind == pathMissing {
		if err := s.fs.MkdirAll(c.real, defaultDirMode, nil); err != nil {
			return failf("%s: creating %s: %v", v.label, c.real, err)
		}
	}
	// The checkout is its user's, root included: checkOwner holds the
	// next rounds to it.
	gid := 0
	if v.cred != nil {
		gid = int(v.cred.Gid)
	}
	if err := s.fs.Chown(c.real, v.uid, gid, false); err != nil {
		return failf("%s: giving %s to %s: %v", v.label, c.real, v.user, err)
	}
	return nil
}

// checkOwner refuses to run the tool in a checkout another user owns:
// git refuses it too (safe.directory), and a tool run as root in a
// user's checkout would leave files the user cannot change.
func (v *vcsTool) checkOwner(c checkout) error {
	uid, _, ok := rootfs.Owner(c.fi)
	if !ok || uid == v.uid {
		return nil
	}
	owner := fmt.Sprint(uid)
	if users, err := v.s.sys.Users(); err == nil {
		for _, u := range users {
			if u.UID == uid {
				owner = u.Name
				break
			}
		}
	}
	return failf("%s: %s is owned by %s, and the state runs %s as %s: set user to %s, or give the checkout to %s (chown -R)", v.label, c.path, owner, v.tool, v.user, owner, v.user)
}

// removeFailedClone empties a checkout whose clone failed, so that the
// next round clones again instead of finding a broken repository.
func (v *vcsTool) removeFailedClone(c checkout) {
	_ = v.s.fs.WalkDir(c.real, func(q string, d fs.DirEntry, err error) error {
		if err != nil || q == c.real {
			return err
		}
		_ = v.s.fs.RemoveAll(q)
		if d.IsDir() {
			return fs.SkipDir
		}
		return nil
	})
}

// redactURL is a repository URL fit for a comment: no password.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	if _, ok := u.User.Password(); !ok {
		return raw
	}
	return u.Redacted()
}

// short abbreviates a commit id for comments.
func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// joinNotes joins non-empty notes with "; ".
func joinNotes(notes ...string) string {
	var out []string
	for _, n := range notes {
		if n != "" {
			out = append(out, n)
		}
	}
	return strings.Join(out, "; ")
}
