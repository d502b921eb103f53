package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"
	"sync"
	"syscall"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/system"
)

// This file is what common.pip.package, common.npm.package and
// common.gem.package share: the "name" list they read, and one
// convergence loop over a language package manager.
//
// Each module reads what is installed from the files the package manager
// writes (dist-info directories, node_modules/*/package.json, gem
// specifications): a round that changes nothing runs no pip, npm or gem.
// Where those files are depends on how the instance's tool is configured
// (site-packages of its Python, npm's global prefix, RubyGems' paths);
// the tool is asked once and the answer kept in the Executor for as long
// as the tool and its configuration files are unchanged (langCache). The
// 2014 fork ran `pip freeze`, `npm ls` or `gem list` on every round.

// Values of a language package in the name parameter besides a version
// (the OS package modules' richer set is wantKind, packages.go).
const (
	langAny     = ""        // installed, at any version
	langLatest  = "latest"  // the newest version the index offers
	langRemoved = "removed" // not installed
)

// pkgSpec is one package of a state's name parameter.
type pkgSpec struct {
	name string // as written (pip: may carry [extras])
	want string // langAny, langLatest, langRemoved, or an exact version
}

// pkgRules validate names and versions for one package manager.
type pkgRules struct {
	// name returns a problem with a package name, "" when it is fine.
	name func(string) string
	// version returns a problem with a version, "" when it is fine.
	version func(string) string
}

// pkgSpecs reads the name parameter (a dict, read by params.pairs: a
// list of {"key": package, "value": ""|version|latest|removed} as the IDE
// sends it, plain names, or an object). "installed" means any version;
// "absent" and "purged" mean removed. A package listed twice with
// different values is an error.
func pkgSpecs(p params, param string, rules pkgRules) ([]pkgSpec, error) {
	items, err := p.pairs(param)
	if err != nil {
		return nil, err
	}
	var specs []pkgSpec
	seen := map[string]string{}
	for _, it := range items {
		name := strings.TrimSpace(it.key)
		if name == "" {
			continue
		}
		if problem := rules.name(name); problem != "" {
			return nil, &badParam{param, fmt.Sprintf("%q is not a package name: %s", name, problem)}
		}
		want := strings.TrimSpace(it.value)
		switch strings.ToLower(want) {
		case "", "installed", "present":
			want = langAny
		case "latest":
			want = langLatest
		case "removed", "absent", "purged":
			want = langRemoved
		default:
			if problem := rules.version(want); problem != "" {
				return nil, &badParam{param, fmt.Sprintf("%s: version %q %s (use an exact version such as 1.2.3, latest or removed)", name, want, problem)}
			}
		}
		if prev, dup := seen[name]; dup {
			if prev != want {
				return nil, &badParam{param, fmt.Sprintf("%s is listed twice, with different values", name)}
			}
			continue
		}
		seen[name] = want
		specs = append(specs, pkgSpec{name: name, want: want})
	}
	if len(specs) == 0 {
		return nil, &badParam{param, "is required and missing or empty"}
	}
	return specs, nil
}

// installedPkg is one installed version of a package and where its
// metadata is (for messages, and to tell what the tool may remove).
type installedPkg struct {
	version string
	where   string
}

// langManager is one language package manager as the modules drive it,
// for one state.
type langManager interface {
	// noun names a package in comments: "pip package", "gem".
	noun() string
	// scope is added to the state's label ("in /srv/app"), or "".
	scope() string
	prerequisite() system.Prerequisite
	// key is how the manager identifies a package as written (pip drops
	// extras and normalises the name).
	key(name string) string
	// installed returns the installed versions of the packages (by key);
	// a package that is not installed is absent. It reads files, and runs
	// the tool at most once per change of the tool or its configuration.
	installed(ctx context.Context, keys []string) (map[string][]installedPkg, error)
	// latest returns the newest version the instance's index offers for
	// each name; it fails naming a package no index offers.
	latest(ctx context.Context, names []string) (map[string]string, error)
	// sameVersion compares versions the way the manager does.
	sameVersion(a, b string) bool
	// removable returns why an installed package cannot be removed with
	// this tool, "" when it can.
	removable(p installedPkg) string
	// install installs the packages, each at want (an exact version) or,
	// with want "", at the newest version. It returns the tool's output.
	install(ctx context.Context, pkgs []pkgSpec) (string, error)
	// remove uninstalls the packages (every version).
	remove(ctx context.Context, names []string) (string, error)
}

// convergePackages brings the packages of specs to what they want, with
// m: nothing runs when everything is in place. Otherwise the tool is
// installed first if missing (the 2014 adaptor's implicit requirement)
// and what is installed is read again (the tool's package may bring
// some of the packages), then removals and installs run, and what is
// installed afterwards is read back and checked against what was asked.
func convergePackages(ctx context.Context, s *stateRun, m langManager, specs []pkgSpec) (state.Result, error) {
	c := &pkgRun{s: s, m: m, specs: specs}
	names := make([]string, len(specs))
	c.keys = make([]string, len(specs))
	for i, sp := range specs {
		names[i], c.keys[i] = sp.name, m.key(sp.name)
	}
	c.noun = m.noun()
	if len(specs) > 1 {
		c.noun += "s"
	}
	c.label = c.noun + " " + strings.Join(names, ", ")
	if sc := m.scope(); sc != "" {
		c.label += " " + sc
	}
	pre := m.prerequisite()
	toolReady := s.sys.HasTool(pre.Tool)

	have, err := m.installed(ctx, c.keys)
	if err != nil {
		return c.fail(err)
	}
	if !toolReady && c.needsTool(have) {
		missing, err := s.need(ctx, pre, &c.ch)
		if err != nil {
			return c.fail(err)
		}
		if missing {
			return s.result(c.label, append(c.ch, c.plan(have, nil)...)), nil
		}
		if have, err = m.installed(ctx, c.keys); err != nil {
			return c.fail(err)
		}
	}

	// The newest versions, for the packages that want latest and have a
	// version to compare it with (a missing one is installed anyway).
	var ask []string
	for i, sp := range specs {
		if sp.want == langLatest && len(have[c.keys[i]]) > 0 {
			ask = append(ask, sp.name)
		}
	}
	newest := map[string]string{}
	if len(ask) > 0 {
		if newest, err = m.latest(ctx, ask); err != nil {
			return c.fail(err)
		}
	}
	planned := c.plan(have, newest)
	if c.err != nil {
		return c.fail(c.err)
	}
	if len(planned) == 0 || s.test {
		return s.result(c.label, append(c.ch, planned...)), nil
	}
	if len(c.removes) > 0 {
		o, err := m.remove(ctx, c.removes)
		c.out.WriteString(o)
		if err != nil {
			return c.fail(err)
		}
	}
	if len(c.installs) > 0 {
		o, err := m.install(ctx, c.installs)
		c.out.WriteString(o)
		if err != nil {
			return c.fail(err)
		}
	}

	// What the tool did, read back: a tool that says it succeeded but
	// left something else in place (another index, another prefix) fails
	// the state here rather than reinstalling on every round.
	after, err := m.installed(ctx, c.keys)
	if err != nil {
		return c.fail(err)
	}
	for i, sp := range specs {
		cur, was := after[c.keys[i]], have[c.keys[i]]
		switch {
		case sp.want == langRemoved:
			if len(cur) > 0 {
				return c.fail(fmt.Errorf("%s is still installed after removal: %s at %s", sp.name, versionsOf(cur), cur[0].where))
			}
			if len(was) > 0 {
				c.ch.add("%s removed (was %s)", sp.name, versionsOf(was))
			}
			continue
		case len(cur) == 0:
			return c.fail(fmt.Errorf("%s is not installed after the install succeeded (looked where the tool's configuration says it installs)", sp.name))
		case sp.want != langAny && sp.want != langLatest && !hasVersion(m, cur, sp.want):
			return c.fail(fmt.Errorf("%s is at %s after installing %s", sp.name, versionsOf(cur), sp.want))
		case sp.want == langLatest && newest[sp.name] != "" && !hasVersion(m, cur, newest[sp.name]):
			return c.fail(fmt.Errorf("%s is at %s after installing %s", sp.name, versionsOf(cur), newest[sp.name]))
		}
		if added := newVersions(m, was, cur); added != "" {
			if len(was) == 0 {
				c.ch.add("%s %s installed", sp.name, added)
			} else {
				c.ch.add("%s %s installed (was %s)", sp.name, added, versionsOf(was))
			}
		}
	}
	res := s.result(c.label, c.ch)
	res.Stdout = c.out.String()
	return res, nil
}

// pkgRun is one run of convergePackages.
type pkgRun struct {
	s           *stateRun
	m           langManager
	specs       []pkgSpec
	keys        []string
	noun, label string
	ch          changes // done so far (a prerequisite installed)
	out         strings.Builder
	installs    []pkgSpec
	removes     []string
	err         error // a package that cannot be brought to what it wants
}

// fail is the state's failure, saying what was done before it.
func (c *pkgRun) fail(err error) (state.Result, error) {
	msg := fmt.Sprintf("%s: %v", c.label, err)
	if len(c.ch) > 0 {
		msg += " (done before: " + strings.Join(c.ch, ", ") + ")"
	}
	return state.Result{Stdout: c.out.String()}, &stateError{msg}
}

// needsTool says whether bringing the packages to what they want needs
// the tool: something to install or remove, or a latest to ask for.
func (c *pkgRun) needsTool(have map[string][]installedPkg) bool {
	for i, sp := range c.specs {
		cur := have[c.keys[i]]
		switch sp.want {
		case langAny:
			if len(cur) == 0 {
				return true
			}
		case langRemoved:
			if len(cur) > 0 {
				return true
			}
		case langLatest:
			return true
		default:
			if !hasVersion(c.m, cur, sp.want) {
				return true
			}
		}
	}
	return false
}

// plan sets what to install and remove, and returns it for the comment.
// newest is nil when the index cannot be asked (check mode, with the tool
// not installed yet).
func (c *pkgRun) plan(have map[string][]installedPkg, newest map[string]string) changes {
	var planned changes
	c.installs, c.removes = nil, nil
	for i, sp := range c.specs {
		cur := have[c.keys[i]]
		switch sp.want {
		case langAny:
			if len(cur) == 0 {
				c.installs = append(c.installs, pkgSpec{name: sp.name})
				planned.add("%s installed", sp.name)
			}
		case langRemoved:
			if len(cur) == 0 {
				continue
			}
			for _, p := range cur {
				if why := c.m.removable(p); why != "" && c.err == nil {
					c.err = fmt.Errorf("%s %s cannot be removed: %s", sp.name, p.version, why)
				}
			}
			c.removes = append(c.removes, sp.name)
			planned.add("%s removed (was %s)", sp.name, versionsOf(cur))
		case langLatest:
			switch want, known := newest[sp.name]; {
			case len(cur) == 0:
				c.installs = append(c.installs, pkgSpec{name: sp.name})
				planned.add("%s installed", sp.name)
			case !known:
				planned.add("%s upgraded if the index has a newer version than %s", sp.name, versionsOf(cur))
			case !hasVersion(c.m, cur, want):
				c.installs = append(c.installs, pkgSpec{name: sp.name, want: want})
				planned.add("%s %s installed (was %s)", sp.name, want, versionsOf(cur))
			}
		default:
			if hasVersion(c.m, cur, sp.want) {
				continue
			}
			c.installs = append(c.installs, sp)
			if len(cur) == 0 {
				planned.add("%s %s installed", sp.name, sp.want)
			} else {
				planned.add("%s %s installed (was %s)", sp.name, sp.want, versionsOf(cur))
			}
		}
	}
	return planned
}

func hasVersion(m langManager, have []installedPkg, want string) bool {
	for _, p := range have {
		if m.sameVersion(p.version, want) {
			return true
		}
	}
	return false
}

// newVersions lists the versions in after that were not in before.
func newVersions(m langManager, before, after []installedPkg) string {
	var added []string
	for _, p := range after {
		if !hasVersion(m, before, p.version) {
			added = append(added, p.version)
		}
	}
	return strings.Join(added, ", ")
}

func versionsOf(ps []installedPkg) string {
	v := make([]string, len(ps))
	for i, p := range ps {
		v[i] = p.version
	}
	return strings.Join(v, ", ")
}

// trimZeros drops trailing ".0" release components, so that 1.0 and
// 1.0.0 compare equal, as pip and RubyGems compare them.
func trimZeros(v string) string {
	rel, rest := v, ""
	if i := strings.IndexFunc(v, func(r rune) bool { return r != '.' && (r < '0' || r > '9') }); i >= 0 {
		rel, rest = v[:i], v[i:]
	}
	for strings.HasSuffix(rel, ".0") && strings.Count(rel, ".") > 0 {
		rel = strings.TrimSuffix(rel, ".0")
	}
	return rel + rest
}

// langCache keeps what a language package manager answered about its
// own layout (Python's site-packages, npm's global prefix, RubyGems'
// paths) while the tool and its configuration files are unchanged, so
// that rounds read files only. The zero value is ready.
type langCache struct {
	mu sync.Mutex
	m  map[string]langFact
}

type langFact struct {
	key string
	val any
}

// get returns the value kept under name if it was computed for key, else
// computes and keeps it. Errors are not kept.
func (c *langCache) get(name, key string, compute func() (any, error)) (any, error) {
	c.mu.Lock()
	if f, ok := c.m[name]; ok && f.key == key {
		c.mu.Unlock()
		return f.val, nil
	}
	c.mu.Unlock()
	v, err := compute()
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]langFact{}
	}
	c.m[name] = langFact{key: key, val: v}
	c.mu.Unlock()
	return v, nil
}

// identity describes files inside the root by inode, size and mtime
// (following links; a missing file counts too), to key cached answers.
func identity(fsys *rootfs.FS, paths ...string) string {
	var b strings.Builder
	for _, p := range paths {
		fi, err := fsys.Stat(p)
		if err != nil {
			fmt.Fprintf(&b, "%s:-;", p)
			continue
		}
		var ino uint64
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			ino = st.Ino
		}
		fmt.Fprintf(&b, "%s:%d:%d:%d;", p, ino, fi.Size(), fi.ModTime().UnixNano())
	}
	return b.String()
}

// toolIdentity is the tool's path in the root, followed to the file it
// runs, with that file's identity; "" when the tool is not installed.
func toolIdentity(s *stateRun, tool string) (real, id string) {
	p, err := s.sys.LookTool(tool)
	if err != nil {
		return "", ""
	}
	if r, err := s.fs.ResolveLinks(p); err == nil {
		p = r
	}
	return p, identity(s.fs, p)
}

// homeDir is the home of the user the tools run as (the agent's): its
// per-user configuration (~/.npmrc, ~/.gemrc) is read from there inside
// the root. HOME when set, else the home the root's passwd gives the
// agent's uid, else /root.
func homeDir(s *stateRun) string {
	if h := os.Getenv("HOME"); strings.HasPrefix(h, "/") {
		return h
	}
	if u, err := s.sys.LookupUser(fmt.Sprint(os.Getuid())); err == nil && strings.HasPrefix(u.Home, "/") {
		return u.Home
	}
	return "/root"
}

// dirNames lists the names in directory dir of the root (following a
// link at dir itself); a missing directory has none.
func dirNames(fsys *rootfs.FS, dir string) ([]string, error) {
	real, err := fsys.ResolveLinks(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil, nil
		}
		return nil, err
	}
	var names []string
	err = fsys.WalkDir(real, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == real && errors.Is(err, fs.ErrNotExist) {
				return fs.SkipAll
			}
			return err
		}
		if p == real {
			if !d.IsDir() {
				return fs.SkipAll
			}
			return nil
		}
		names = append(names, path.Base(p))
		if d.IsDir() {
			return fs.SkipDir
		}
		return nil
	})
	return names, err
}

// toolFailed words a tool failure for a state's comment: the tool's own
// message (its output's end), and where to look.
func toolFailed(err error, hint string) error {
	var missing *system.ToolMissingError
	if errors.As(err, &missing) {
		return err
	}
	return fmt.Errorf("%w (%s)", err, hint)
}
