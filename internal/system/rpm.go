package system

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/rootfs"
)

// RPM is the RHEL family's package manager: rpm to query, dnf (or yum
// where there is no dnf) to change things.
//
// An install root being built holds no rpm or dnf of its own yet; below
// such a root (never below "/") the host's tools act on it through their
// root options, `rpm --root` and `dnf --installroot`, which is what they
// are for. Below "/" the system's own tools run as they are.
type RPM struct {
	h       *Host
	manager string // "dnf" or "yum"
	// hostTools: the root has no rpm tools; the host's act on it.
	hostTools bool

	mu     sync.Mutex
	dbPath string // rpm's %{_dbpath} in the root; "" until asked, "-" when it cannot be watched
	db     rpmdb  // the database's content, reused while its files are unchanged
}

// rpmdb is what rpm's database holds, as of one state of its files.
type rpmdb struct {
	stamps    []stamp
	installed map[string]string // name and name.arch → [epoch:]version-release
	keys      map[string]bool   // versions of the gpg-pubkey pseudo-packages
}

// rpmdbFiles are the files of rpm's database whose change marks a change
// of what it holds, whichever backend this rpm uses: sqlite (rpm 4.16 and
// later: RHEL 9, Amazon Linux 2023, Debian's rpm) with its write-ahead
// log (not empty only when a writer died before folding it in), ndb and
// Berkeley DB. The log's inode and size stay, and its ctime moves on
// every read, which is why a stamp holds no ctime.
var rpmdbFiles = []string{"rpmdb.sqlite", "rpmdb.sqlite-wal", "Packages.db", "Packages"}

func (h *Host) rpmManager() *RPM {
	h.rpmOnce.Do(func() {
		for _, name := range []string{"dnf", "yum"} {
			if h.HasTool(name) && h.HasTool("rpm") {
				h.rpmMgr = &RPM{h: h, manager: name}
				return
			}
		}
		if !h.Chrooted() {
			return
		}
		for _, name := range []string{"dnf", "yum"} {
			_, err1 := exec.LookPath(name)
			_, err2 := exec.LookPath("rpm")
			if err1 == nil && err2 == nil {
				h.rpmMgr = &RPM{h: h, manager: name, hostTools: true}
				return
			}
		}
	})
	return h.rpmMgr
}

// Name is "dnf" or "yum".
func (r *RPM) Name() string { return r.manager }

// Family is the RHEL family.
func (r *RPM) Family() Family { return FamilyRHEL }

// Rpm runs rpm against the root.
func (r *RPM) Rpm(ctx context.Context, args ...string) (string, int, error) {
	c := Cmd{Tool: "rpm", Args: args}
	if r.hostTools {
		c.Args = append([]string{"--root", r.h.opts.Root.Dir()}, args...)
		res, err := r.h.runHostTool(ctx, c)
		return res.Output, res.ExitCode, err
	}
	res, err := r.h.Run(ctx, c)
	return res.Output, res.ExitCode, err
}

// Manager runs dnf or yum against the root, non-interactively, and
// returns an error naming the command when it fails.
func (r *RPM) Manager(ctx context.Context, args ...string) (string, error) {
	full := append([]string{"-y", "-q"}, args...)
	c := Cmd{Tool: r.manager, Args: full}
	if r.hostTools {
		d, _ := r.h.Distro()
		pre := []string{"--installroot", r.h.opts.Root.Dir()}
		if d.VersionID != "" {
			// An install root has no system-release package to tell
			// $releasever; os-release does.
			pre = append(pre, "--releasever", majorVersion(d.VersionID))
		}
		c.Args = append(pre, full...)
		res, err := r.h.runHostTool(ctx, c)
		if err == nil && res.ExitCode != 0 {
			err = &ToolError{Command: commandLine(r.manager, full), ExitCode: res.ExitCode, Output: res.Output}
		}
		return res.Output, packageError(r.manager, actionOf(args), err)
	}
	res, err := r.h.Check(ctx, c)
	return res.Output, packageError(r.manager, actionOf(args), err)
}

func majorVersion(v string) string {
	major, _, _ := strings.Cut(v, ".")
	return major
}

// rpmQueryFormat prints one line per installed package: name, arch, then
// [epoch:]version-release.
const rpmQueryFormat = `%{NAME}\t%{ARCH}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n`

// Installed queries the rpm database. A name may carry an architecture
// ("glibc.i686"), as rpm and dnf read it. While the database's files are
// unchanged the answer comes from the last full listing, so a round that
// changes nothing runs no rpm.
func (r *RPM) Installed(ctx context.Context, names ...string) (map[string]string, error) {
	out := map[string]string{}
	if len(names) == 0 {
		return out, nil
	}
	if db, ok := r.cached(ctx); ok {
		for _, n := range names {
			if v, ok := db.installed[n]; ok {
				out[n] = v
			}
		}
		return out, nil
	}
	text, code, err := r.Rpm(ctx, append([]string{"-q", "--qf", rpmQueryFormat, "--"}, names...)...)
	if err != nil {
		return nil, err
	}
	// rpm exits with the number of packages not installed; those print
	// "package x is not installed" and are simply absent here.
	all := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Split(line, "\t")
		if len(f) == 3 && f[0] != "" && f[2] != "" {
			all[f[0]] = f[2]
			all[f[0]+"."+f[1]] = f[2]
		}
	}
	for _, n := range names {
		if v, ok := all[n]; ok {
			out[n] = v
		}
	}
	if code != 0 && len(all) == 0 && !strings.Contains(text, "is not installed") {
		return nil, &ToolError{Command: "rpm -q", ExitCode: code, Output: text}
	}
	return out, nil
}

// EnsureInstalled installs the names that are not installed. dnf and yum
// refresh expired metadata themselves.
func (r *RPM) EnsureInstalled(ctx context.Context, names ...string) ([]string, error) {
	have, err := r.Installed(ctx, names...)
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, n := range names {
		if _, ok := have[n]; !ok {
			missing = append(missing, n)
		}
	}
	if len(missing) == 0 {
		return nil, nil
	}
	if _, err := r.Manager(ctx, append([]string{"install", "--"}, missing...)...); err != nil {
		return nil, err
	}
	return missing, nil
}

// CompareVersions compares EVRs as rpm does.
func (r *RPM) CompareVersions(a, b string) int { return CompareRPMVersions(a, b) }

// VersionMatches is RPMVersionMatches.
func (r *RPM) VersionMatches(requested, installed string) bool {
	return RPMVersionMatches(requested, installed)
}

// Leftovers: rpm removes a package's configuration with it (changed
// files are kept as .rpmsave, which rpm no longer tracks), so there is
// never anything left to purge.
func (r *RPM) Leftovers(context.Context, ...string) (map[string]bool, error) {
	return map[string]bool{}, nil
}

// IndexStale is always false: dnf and yum judge their metadata
// themselves (a new or changed repository has no cache yet and is
// fetched; others expire after metadata_expire).
func (r *RPM) IndexStale() (bool, error) { return false, nil }

// repoArgs restricts a run to one repository, as Salt's yumpkg did with
// fromrepo.
func repoArgs(o PackageOptions) []string {
	var args []string
	if o.Repo != "" {
		args = append(args, "--disablerepo=*", "--enablerepo="+o.Repo)
	}
	if o.NoVerify {
		args = append(args, "--nogpgcheck")
	}
	return args
}

// dnfQueryFormat prints each offered version as name, tab, EVR (dnf4
// ends each package with a newline itself, dnf5 needs the \n).
const dnfQueryFormat = `%{name}\t%{arch}\t%{epoch}:%{version}-%{release}\n`

// Offers asks dnf repoquery (yum: yum list) for every version of names
// the enabled repositories offer, from the cached metadata unless it
// expired. The candidate is the newest.
func (r *RPM) Offers(ctx context.Context, o PackageOptions, names ...string) (map[string]Offer, error) {
	if len(names) == 0 {
		return map[string]Offer{}, nil
	}
	var versions map[string][]string
	if r.manager == "dnf" {
		args := append(repoArgs(o), "repoquery", "--showduplicates", "--qf", dnfQueryFormat, "--")
		out, err := r.Manager(ctx, append(args, names...)...)
		if err != nil {
			return nil, err
		}
		versions = parseRepoquery(out)
	} else {
		args := append(repoArgs(o), "list", "--showduplicates", "--")
		out, err := r.Manager(ctx, append(args, names...)...)
		var pe *PackageError
		if err != nil && !(errors.As(err, &pe) && strings.Contains(out, "No matching Packages")) {
			return nil, err
		}
		versions = parseYumList(out)
	}
	offers := map[string]Offer{}
	for _, n := range names {
		vs := versions[n]
		if len(vs) == 0 {
			continue
		}
		o := Offer{Versions: vs}
		for _, v := range vs {
			if o.Candidate == "" || CompareRPMVersions(v, o.Candidate) > 0 {
				o.Candidate = v
			}
		}
		offers[n] = o
	}
	return offers, nil
}

// trimZeroEpoch writes an EVR as rpm -q does: no "0:".
func trimZeroEpoch(evr string) string { return strings.TrimPrefix(evr, "0:") }

// parseRepoquery reads name<TAB>arch<TAB>epoch:version-release lines;
// each version is offered under the name and under name.arch.
func parseRepoquery(out string) map[string][]string {
	vs := map[string][]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(strings.TrimSpace(line), "\t")
		if len(f) != 3 || f[0] == "" || f[2] == "" {
			continue
		}
		addOffer(vs, f[0], f[1], trimZeroEpoch(f[2]))
	}
	return vs
}

func addOffer(vs map[string][]string, name, arch, evr string) {
	for _, key := range []string{name, name + "." + arch} {
		if !contains(vs[key], evr) {
			vs[key] = append(vs[key], evr)
		}
	}
}

// parseYumList reads `yum list --showduplicates`: "name.arch  evr  repo"
// rows (a long name.arch alone on its line, the rest on the next), under
// "Installed Packages" and "Available Packages" headings. Installed rows
// (repository "@…" or "installed") are not offers.
func parseYumList(out string) map[string][]string {
	vs := map[string][]string{}
	pending := ""
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 1 && strings.Contains(f[0], ".") && !strings.HasSuffix(line, "Packages") {
			pending = f[0]
			continue
		}
		if len(f) == 2 && pending != "" {
			f = append([]string{pending}, f...)
		}
		pending = ""
		if len(f) != 3 || strings.HasPrefix(f[2], "@") || f[2] == "installed" {
			continue
		}
		dot := strings.LastIndexByte(f[0], '.')
		if dot <= 0 {
			continue
		}
		addOffer(vs, f[0][:dot], f[0][dot+1:], trimZeroEpoch(f[1]))
	}
	return vs
}

// RefreshIndex makes dnf fetch the repositories' metadata again (yum:
// expires its cache, so that the next run fetches it).
func (r *RPM) RefreshIndex(ctx context.Context, o PackageOptions) error {
	args := append(repoArgs(o), "makecache", "--refresh")
	if r.manager != "dnf" {
		args = append(repoArgs(o), "clean", "expire-cache")
	}
	_, err := r.Manager(ctx, args...)
	return err
}

// Apply removes (purging is removing with rpm) in one run, then installs
// every repository package (name or name-version) and package file in
// one `dnf install`, which also downgrades; yum, which does not, gets
// the downgrades in a `yum downgrade` run of their own.
func (r *RPM) Apply(ctx context.Context, c PackageChange) (string, error) {
	var out strings.Builder
	run := func(args ...string) error {
		o, err := r.Manager(ctx, args...)
		out.WriteString(o)
		return err
	}
	if rm := append(append([]string{}, c.Remove...), c.Purge...); len(rm) > 0 {
		if err := run(append([]string{"remove", "--"}, rm...)...); err != nil {
			return out.String(), err
		}
	}
	var install, downgrade []string
	for _, t := range c.Install {
		target := t.Name
		switch {
		case t.File != "":
			target = r.toolPath(t.File)
		case t.Version != "":
			target = t.Name + "-" + trimZeroEpoch(t.Version)
		}
		if t.Downgrade && r.manager != "dnf" {
			downgrade = append(downgrade, target)
		} else {
			install = append(install, target)
		}
	}
	if len(downgrade) > 0 {
		if err := run(append(append(repoArgs(c.PackageOptions), "downgrade", "--"), downgrade...)...); err != nil {
			return out.String(), err
		}
	}
	if len(install) > 0 {
		if err := run(append(append(repoArgs(c.PackageOptions), "install", "--"), install...)...); err != nil {
			return out.String(), err
		}
	}
	return out.String(), nil
}

// toolPath is where rpm or dnf finds a file of the root: the path itself
// when they run inside the root, the host's path to it when the host's
// tools act on the root from outside.
func (r *RPM) toolPath(p string) string {
	if r.hostTools {
		return filepath.Join(r.h.opts.Root.Dir(), filepath.Clean("/"+p))
	}
	return p
}

// PackageFileName reads the name of the package an .rpm file holds.
func (r *RPM) PackageFileName(ctx context.Context, p string) (string, error) {
	out, code, err := r.Rpm(ctx, "-qp", "--qf", "%{NAME}", "--", r.toolPath(p))
	if err != nil {
		return "", err
	}
	name := strings.TrimSpace(out)
	if code != 0 || name == "" || strings.ContainsAny(name, " \n") {
		return "", fmt.Errorf("%s: not an RPM package (rpm -qp: %s)", p, trimOutput(out))
	}
	return name, nil
}

// runHostTool runs one of the host's own tools (found in the agent's
// PATH), never chrooted: only for tools that act on the root through an
// option of their own, and only below a root other than "/".
func (h *Host) runHostTool(ctx context.Context, c Cmd) (proc.Result, error) {
	if !h.Chrooted() {
		return proc.Result{ExitCode: -1}, errors.New("system: host tools act on a root other than / only")
	}
	p, err := exec.LookPath(c.Tool)
	if err != nil {
		return proc.Result{ExitCode: -1}, fmt.Errorf("%s: %w", c.Tool, err)
	}
	pc := h.procCmd(p, c)
	pc.Chroot = ""
	return h.opts.Runner.Run(ctx, pc)
}

// InstallFiles installs package files with `rpm -U --replacepkgs` (the
// repository-definition packages of linux.yum.repo: rpm alone, so that no
// repository has to be reachable to add one).
func (r *RPM) InstallFiles(ctx context.Context, paths ...string) (string, error) {
	args := []string{"-U", "--replacepkgs", "--"}
	for _, p := range paths {
		args = append(args, r.toolPath(p))
	}
	out, code, err := r.Rpm(ctx, args...)
	if err == nil && code != 0 {
		err = &ToolError{Command: commandLine("rpm", args), ExitCode: code, Output: out}
	}
	return out, err
}

// ImportedKeys returns the ids of the OpenPGP keys rpm trusts: the
// versions of its gpg-pubkey pseudo-packages, the low 32 bits of each
// key's id in lower-case hex.
func (r *RPM) ImportedKeys(ctx context.Context) (map[string]bool, error) {
	if db, ok := r.cached(ctx); ok {
		return maps.Clone(db.keys), nil
	}
	out, code, err := r.Rpm(ctx, "-q", "--qf", `%{VERSION}\n`, "gpg-pubkey")
	if err != nil {
		return nil, err
	}
	keys := map[string]bool{}
	if code != 0 {
		if strings.Contains(out, "is not installed") {
			return keys, nil
		}
		return nil, &ToolError{Command: "rpm -q gpg-pubkey", ExitCode: code, Output: out}
	}
	for _, line := range strings.Split(out, "\n") {
		if id := strings.ToLower(strings.TrimSpace(line)); id != "" {
			keys[id] = true
		}
	}
	return keys, nil
}

// ImportKey imports an OpenPGP public key file (a path inside the root)
// into rpm's keyring.
func (r *RPM) ImportKey(ctx context.Context, path string) (string, error) {
	args := []string{"--import", "--", r.toolPath(path)}
	out, code, err := r.Rpm(ctx, args...)
	if err == nil && code != 0 {
		err = &ToolError{Command: commandLine("rpm", args), ExitCode: code, Output: out}
	}
	return out, err
}

// cached is the database's content while its files are as they were at
// the last full listing, listing it again (one `rpm -qa`) when they
// changed. ok is false when the database cannot be watched (its path
// unknown, no file of it found): the caller asks rpm itself.
func (r *RPM) cached(ctx context.Context) (rpmdb, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dbPath == "" {
		out, code, err := r.Rpm(ctx, "--eval", "%{_dbpath}")
		if err != nil {
			return rpmdb{}, false // rpm did not run: asked again next time
		}
		r.dbPath = "-"
		if p := strings.TrimSpace(out); code == 0 && path.IsAbs(p) && !strings.ContainsAny(p, "\n%") {
			r.dbPath = p
		}
	}
	if r.dbPath == "-" {
		return rpmdb{}, false
	}
	stamps, ok := r.dbStamps()
	if !ok {
		return rpmdb{}, false
	}
	if r.db.installed != nil && slices.Equal(r.db.stamps, stamps) {
		return r.db, true
	}
	text, code, err := r.Rpm(ctx, "-qa", "--qf", rpmQueryFormat)
	if err != nil || code != 0 {
		return rpmdb{}, false
	}
	db := rpmdb{stamps: stamps, installed: map[string]string{}, keys: map[string]bool{}}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 3 || f[0] == "" || f[2] == "" {
			continue
		}
		if f[0] == "gpg-pubkey" {
			// Its EVR is the key id's low 32 bits, a dash, its creation time.
			id, _, _ := strings.Cut(f[2], "-")
			db.keys[strings.ToLower(id)] = true
			continue
		}
		db.installed[f[0]] = f[2]
		db.installed[f[0]+"."+f[1]] = f[2]
	}
	r.db = db
	return db, true
}

// dbStamps stamps each of rpmdbFiles in the database directory (a zero
// stamp for one that does not exist); ok is false when none exists.
func (r *RPM) dbStamps() ([]stamp, bool) {
	fsys, err := rootfs.Open(r.h.opts.Root.Dir())
	if err != nil {
		return nil, false
	}
	defer fsys.Close()
	var stamps []stamp
	found := false
	for _, name := range rpmdbFiles {
		fi, err := fsys.Stat(path.Join(r.dbPath, name))
		switch {
		case err == nil:
			stamps, found = append(stamps, fileStamp(fi)), true
		case errors.Is(err, fs.ErrNotExist):
			stamps = append(stamps, stamp{})
		default:
			return nil, false
		}
	}
	return stamps, found
}
