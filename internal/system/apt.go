package system

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/visualops/opsagent/internal/rootfs"
)

// Apt is the Debian family's package manager: dpkg's database read
// directly, apt-cache for candidates, apt-get to change things.
type Apt struct {
	h *Host

	mu     sync.Mutex
	status dpkgStatus // parsed /var/lib/dpkg/status, reused while the file is unchanged
}

// dpkgStatusFile is dpkg's database of installed packages.
const dpkgStatusFile = "/var/lib/dpkg/status"

// maxDpkgStatus bounds the status file read (a full desktop's is ~5 MiB).
const maxDpkgStatus = 256 << 20

func (h *Host) apt() *Apt {
	h.pkgOnce.Do(func() { h.aptMgr = &Apt{h: h} })
	return h.aptMgr
}

// Name is "apt".
func (a *Apt) Name() string { return "apt" }

// Family is the Debian family.
func (a *Apt) Family() Family { return FamilyDebian }

// dpkgStatus is the installed packages as of one version of the status
// file, identified by its size, mtime and inode (dpkg replaces the file
// on every change, so the inode alone would do; the rest is cheap).
type dpkgStatus struct {
	key stamp
	db  DpkgDB
}

// stamp identifies one version of a file: its size, modification time and
// inode. A database that its tool rewrites in place or replaces changes
// at least one of them on every write.
type stamp [3]int64

func fileStamp(fi fs.FileInfo) stamp {
	s := stamp{fi.Size(), fi.ModTime().UnixNano(), 0}
	if st, ok := fi.Sys().(*unix.Stat_t); ok {
		s[2] = int64(st.Ino)
	}
	return s
}

// DpkgDB is what dpkg's status file says of the packages.
type DpkgDB struct {
	// Installed maps each installed package (by name and by name:arch)
	// to its version.
	Installed map[string]string
	// Leftovers are removed packages whose configuration files remain
	// (Status "deinstall ok config-files"), by name and name:arch.
	Leftovers map[string]bool
	// Provided maps each virtual package an installed package provides
	// (its Provides field: awk, mail-transport-agent…) to that package.
	Provided map[string]string
}

// Installed reads dpkg's status file: no process runs, and a file that
// did not change since the last call is not read again, so a round that
// changes nothing costs a stat.
func (a *Apt) Installed(_ context.Context, names ...string) (map[string]string, error) {
	db, err := a.dpkgDB()
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, n := range names {
		if v, ok := db.Installed[n]; ok {
			out[n] = v
		} else if p, ok := db.Provided[n]; ok {
			// A virtual package is installed when a package providing it
			// is; it has the provider's version.
			out[n] = db.Installed[p]
		}
	}
	return out, nil
}

// Leftovers reads dpkg's status file for removed packages that still
// have configuration files.
func (a *Apt) Leftovers(_ context.Context, names ...string) (map[string]bool, error) {
	db, err := a.dpkgDB()
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, n := range names {
		if db.Leftovers[n] {
			out[n] = true
		}
	}
	return out, nil
}

func (a *Apt) dpkgDB() (DpkgDB, error) {
	fsys, err := rootfs.Open(a.h.opts.Root.Dir())
	if err != nil {
		return DpkgDB{}, err
	}
	defer fsys.Close()
	fi, err := fsys.Stat(dpkgStatusFile)
	if err != nil {
		return DpkgDB{}, fmt.Errorf("dpkg database: %w", err)
	}
	key := fileStamp(fi)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.status.db.Installed != nil && a.status.key == key {
		return a.status.db, nil
	}
	data, err := fsys.ReadFile(dpkgStatusFile, maxDpkgStatus)
	if err != nil {
		return DpkgDB{}, fmt.Errorf("dpkg database: %w", err)
	}
	db := ParseDpkgDB(data)
	a.status = dpkgStatus{key: key, db: db}
	return db, nil
}

// ParseDpkgStatus reads dpkg's status file and returns the installed
// packages (Status "… installed"), by name and by name:arch, with their
// versions. Paragraphs it cannot read are skipped.
func ParseDpkgStatus(data []byte) map[string]string { return ParseDpkgDB(data).Installed }

// ParseDpkgDB reads dpkg's status file: the installed packages and the
// removed ones whose configuration files remain.
func ParseDpkgDB(data []byte) DpkgDB {
	db := DpkgDB{Installed: map[string]string{}, Leftovers: map[string]bool{}, Provided: map[string]string{}}
	var pkg, ver, arch, status, provides string
	flush := func() {
		switch {
		case pkg == "":
		case ver != "" && strings.HasSuffix(status, " installed"):
			db.Installed[pkg] = ver
			if arch != "" {
				db.Installed[pkg+":"+arch] = ver
			}
			// "Provides: awk, x-www-browser (= 1.0)"
			for _, p := range strings.Split(provides, ",") {
				if name, _, _ := strings.Cut(strings.TrimSpace(p), " "); name != "" {
					db.Provided[name] = pkg
				}
			}
		case strings.HasSuffix(status, " config-files"):
			db.Leftovers[pkg] = true
			if arch != "" {
				db.Leftovers[pkg+":"+arch] = true
			}
		}
		pkg, ver, arch, status, provides = "", "", "", "", ""
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 {
			flush()
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue // continuation of a multi-line field
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		switch string(k) {
		case "Package":
			pkg = string(bytes.TrimSpace(v))
		case "Version":
			ver = string(bytes.TrimSpace(v))
		case "Architecture":
			arch = string(bytes.TrimSpace(v))
		case "Status":
			status = string(bytes.TrimSpace(v))
		case "Provides":
			provides = string(bytes.TrimSpace(v))
		}
	}
	flush()
	return db
}

// CompareVersions compares Debian versions as dpkg does.
func (a *Apt) CompareVersions(x, y string) int { return CompareDebVersions(x, y) }

// VersionMatches is DebVersionMatches.
func (a *Apt) VersionMatches(requested, installed string) bool {
	return DebVersionMatches(requested, installed)
}

// Candidates asks apt-cache which version of each name would be
// installed ("" when no repository offers it, or apt does not know it).
func (a *Apt) Candidates(ctx context.Context, names ...string) (map[string]string, error) {
	offers, err := a.Offers(ctx, PackageOptions{}, names...)
	if err != nil {
		return nil, err
	}
	cands := map[string]string{}
	for n, o := range offers {
		if o.Candidate != "" {
			cands[n] = o.Candidate
		}
	}
	return cands, nil
}

// Offers asks `apt-cache policy` (with -t for a target release) what the
// index holds of each name: the candidate and every version a repository
// offers (a version only dpkg's status knows, installed from a file or
// from a repository since removed, is not offered).
func (a *Apt) Offers(ctx context.Context, o PackageOptions, names ...string) (map[string]Offer, error) {
	if len(names) == 0 {
		return map[string]Offer{}, nil
	}
	var args []string
	if o.Repo != "" {
		args = append(args, "-t", o.Repo)
	}
	args = append(append(args, "policy", "--"), names...)
	res, err := a.h.Check(ctx, Cmd{Tool: "apt-cache", Args: args})
	if err != nil {
		return nil, packageError("apt-cache", "policy", err)
	}
	return parseAptPolicy(res.Output), nil
}

// parseAptPolicy reads `apt-cache policy` output: "name:" at column 0,
// then an indented "Candidate: version" ("(none)" when none), then the
// version table: each version at column 5 (" *** " marks the installed
// one) followed by its sources at column 8, a repository's index or
// /var/lib/dpkg/status.
func parseAptPolicy(out string) map[string]Offer {
	offers := map[string]Offer{}
	cur, ver := "", ""
	var o Offer
	flush := func() {
		if cur != "" {
			// Known to the index with no version of its own: a virtual
			// package, which apt-get installs through its provider.
			o.Virtual = o.Candidate == "" && len(o.Versions) == 0
			offers[cur] = o
		}
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		if line[0] != ' ' {
			flush()
			cur, ver, o = "", "", Offer{}
			if strings.HasSuffix(line, ":") {
				cur = strings.TrimSuffix(line, ":")
			}
			continue
		}
		if cur == "" {
			continue
		}
		indent := len(line) - len(strings.TrimLeft(line, " "))
		text := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, " *** ") || indent == 5:
			f := strings.Fields(strings.TrimPrefix(text, "*** "))
			ver = ""
			if len(f) > 0 {
				ver = f[0]
			}
		case indent >= 8:
			f := strings.Fields(text)
			if ver != "" && len(f) >= 2 && f[1] != dpkgStatusFile && !contains(o.Versions, ver) {
				o.Versions = append(o.Versions, ver)
			}
		default:
			if k, v, ok := strings.Cut(text, ":"); ok && k == "Candidate" {
				if v = strings.TrimSpace(v); v != "(none)" {
					o.Candidate = v
				}
			}
		}
	}
	flush()
	return offers
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// aptGetArgs are given to every apt-get run: no questions, keep changed
// configuration files, and wait for a lock held by another apt (a fresh
// cloud instance often runs unattended-upgrades at boot) instead of
// failing at once.
var aptGetArgs = []string{
	"-y", "-q",
	"-o", "Dpkg::Options::=--force-confdef",
	"-o", "Dpkg::Options::=--force-confold",
	"-o", "DPkg::Lock::Timeout=300",
}

// AptGet runs apt-get with the usual options and returns an error naming
// the command and the end of its output when it fails.
func (a *Apt) AptGet(ctx context.Context, args ...string) error {
	_, err := a.aptGet(ctx, args...)
	return err
}

func (a *Apt) aptGet(ctx context.Context, args ...string) (string, error) {
	full := append(append([]string{}, aptGetArgs...), args...)
	res, err := a.h.Check(ctx, Cmd{Tool: "apt-get", Args: full})
	return res.Output, packageError("apt-get", actionOf(args, "-o", "-t", "-c"), err)
}

// actionOf is the command word of a package manager's arguments (install,
// update…): the first that is not an option or the value of one of
// valued.
func actionOf(args []string, valued ...string) string {
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case contains(valued, a):
			i++
		case !strings.HasPrefix(a, "-"):
			return a
		}
	}
	return ""
}

// Refresh runs apt-get update.
func (a *Apt) Refresh(ctx context.Context) error { return a.RefreshIndex(ctx, PackageOptions{}) }

// updateStamp is touched after every successful apt-get update: Ubuntu's
// apt does it itself (APT::Update::Post-Invoke-Success), Debian's does
// not. It tells when the index was last fetched, which the index files
// cannot: apt gives each the repository's Last-Modified time, so a
// repository that has not changed in months looks older than a sources
// list written today, however often it is fetched.
const updateStamp = "/var/lib/apt/periodic/update-success-stamp"

// RefreshIndex runs apt-get update (allowing unsigned repositories when
// o.NoVerify) and records when it succeeded.
func (a *Apt) RefreshIndex(ctx context.Context, o PackageOptions) error {
	args := []string{"update"}
	if o.NoVerify {
		args = []string{"-o", "Acquire::AllowInsecureRepositories=true", "update"}
	}
	if err := a.AptGet(ctx, args...); err != nil {
		return err
	}
	fsys, err := rootfs.Open(a.h.opts.Root.Dir())
	if err != nil {
		return err
	}
	defer fsys.Close()
	if err := fsys.MkdirAll(path.Dir(updateStamp), 0o755, nil); err != nil {
		return fmt.Errorf("apt update stamp: %w", err)
	}
	if err := fsys.WriteFileAtomic(updateStamp, nil, 0o644, -1, -1); err != nil {
		return fmt.Errorf("apt update stamp: %w", err)
	}
	return nil
}

// IndexStale reports whether the package index is older than any of its
// sources (a repository was added or changed since the last apt-get
// update), or was never fetched. The index's age is that of its newest
// file or of the update stamp, whichever is newer.
func (a *Apt) IndexStale() (bool, error) {
	fsys, err := rootfs.Open(a.h.opts.Root.Dir())
	if err != nil {
		return false, err
	}
	defer fsys.Close()
	lists, err := newestIn(fsys, "/var/lib/apt/lists", func(name string) bool {
		return strings.HasSuffix(name, "_Packages") || strings.HasSuffix(name, "_Packages.lz4") ||
			strings.HasSuffix(name, "_InRelease") || strings.HasSuffix(name, "_Release")
	})
	if err != nil {
		return false, err
	}
	if lists.IsZero() {
		return true, nil
	}
	if fi, err := fsys.Stat(updateStamp); err == nil && fi.ModTime().After(lists) {
		lists = fi.ModTime()
	}
	var sources time.Time
	if fi, err := fsys.Stat("/etc/apt/sources.list"); err == nil {
		sources = fi.ModTime()
	}
	if t, err := newestIn(fsys, "/etc/apt/sources.list.d", func(name string) bool {
		return strings.HasSuffix(name, ".list") || strings.HasSuffix(name, ".sources")
	}); err == nil && t.After(sources) {
		sources = t
	}
	return sources.After(lists), nil
}

// newestIn is the newest modification time of the files of dir that
// match; zero when there are none (or no dir).
func newestIn(fsys *rootfs.FS, dir string, match func(string) bool) (time.Time, error) {
	var newest time.Time
	err := fsys.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fs.SkipAll
			}
			return err
		}
		if d.IsDir() {
			if p != dir {
				return fs.SkipDir
			}
			return nil
		}
		if !match(d.Name()) {
			return nil
		}
		fi, err := d.Info()
		if err == nil && fi.ModTime().After(newest) {
			newest = fi.ModTime()
		}
		return nil
	})
	return newest, err
}

// EnsureInstalled installs the names that are not installed.
func (a *Apt) EnsureInstalled(ctx context.Context, names ...string) ([]string, error) {
	have, err := a.Installed(ctx, names...)
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
	if err := a.ensureKnown(ctx, missing); err != nil {
		return nil, err
	}
	if err := a.AptGet(ctx, append([]string{"install", "--"}, missing...)...); err != nil {
		return nil, err
	}
	return missing, nil
}

// ensureKnown refreshes the index when it is stale or does not offer one
// of names, and fails naming the packages no repository offers.
func (a *Apt) ensureKnown(ctx context.Context, names []string) error {
	stale, err := a.IndexStale()
	if err != nil {
		return err
	}
	if !stale {
		cands, err := a.Candidates(ctx, names...)
		if err != nil {
			return err
		}
		if len(unknown(names, cands)) == 0 {
			return nil
		}
	}
	if err := a.RefreshIndex(ctx, PackageOptions{}); err != nil {
		return err
	}
	cands, err := a.Candidates(ctx, names...)
	if err != nil {
		return err
	}
	if u := unknown(names, cands); len(u) > 0 {
		return fmt.Errorf("no repository offers %s (apt-get update ran; add the repository first, e.g. with linux.apt.repo)", strings.Join(u, ", "))
	}
	return nil
}

func unknown(names []string, have map[string]string) []string {
	var out []string
	for _, n := range names {
		if have[n] == "" {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// Apply removes, purges and installs in one apt-get run each: loading
// the debconf answers first, then `apt-get remove`, `apt-get purge`, and
// one `apt-get install` of every repository package (name or
// name=version) and package file, with --allow-downgrades when a version
// goes down, -t for a target release, and --allow-unauthenticated when
// signatures are not to be verified.
func (a *Apt) Apply(ctx context.Context, c PackageChange) (string, error) {
	var out strings.Builder
	run := func(args ...string) error {
		o, err := a.aptGet(ctx, args...)
		out.WriteString(o)
		return err
	}
	if len(c.Remove) > 0 {
		if err := run(append([]string{"remove", "--"}, c.Remove...)...); err != nil {
			return out.String(), err
		}
	}
	if len(c.Purge) > 0 {
		if err := run(append([]string{"purge", "--"}, c.Purge...)...); err != nil {
			return out.String(), err
		}
	}
	if len(c.Install) == 0 {
		return out.String(), nil
	}
	if c.DebconfFile != "" {
		res, err := a.h.Check(ctx, Cmd{Tool: "debconf-set-selections", Args: []string{"--", c.DebconfFile}})
		out.WriteString(res.Output)
		if err != nil {
			return out.String(), packageError("debconf-set-selections", c.DebconfFile, err)
		}
	}
	var args, targets []string
	for _, t := range c.Install {
		switch {
		case t.File != "":
			targets = append(targets, t.File)
		case t.Version != "":
			targets = append(targets, t.Name+"="+t.Version)
		default:
			targets = append(targets, t.Name)
		}
		if t.Downgrade && !contains(args, "--allow-downgrades") {
			args = append(args, "--allow-downgrades")
		}
	}
	if c.NoVerify {
		args = append(args, "--allow-unauthenticated")
	}
	if c.Repo != "" {
		args = append(args, "-t", c.Repo)
	}
	args = append(append(args, "install", "--"), targets...)
	err := run(args...)
	return out.String(), err
}

// PackageFileName reads the Package field of a .deb (dpkg-deb, inside
// the root).
func (a *Apt) PackageFileName(ctx context.Context, path string) (string, error) {
	res, err := a.h.Check(ctx, Cmd{Tool: "dpkg-deb", Args: []string{"--field", path, "Package"}})
	if err != nil {
		return "", err
	}
	name := strings.TrimSpace(res.Output)
	if name == "" || strings.ContainsAny(name, " \n") {
		return "", fmt.Errorf("%s: not a Debian package (dpkg-deb found no Package field)", path)
	}
	return name, nil
}
