package system

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

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
	key       [3]int64
	installed map[string]string // package (and package:arch) → version
}

// Installed reads dpkg's status file: no process runs, and a file that
// did not change since the last call is not read again, so a round that
// changes nothing costs a stat.
func (a *Apt) Installed(_ context.Context, names ...string) (map[string]string, error) {
	all, err := a.installedAll()
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, n := range names {
		if v, ok := all[n]; ok {
			out[n] = v
		}
	}
	return out, nil
}

func (a *Apt) installedAll() (map[string]string, error) {
	fsys, err := rootfs.Open(a.h.opts.Root.Dir())
	if err != nil {
		return nil, err
	}
	defer fsys.Close()
	fi, err := fsys.Stat(dpkgStatusFile)
	if err != nil {
		return nil, fmt.Errorf("dpkg database: %w", err)
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	key := [3]int64{fi.Size(), fi.ModTime().UnixNano(), 0}
	if st != nil {
		key[2] = int64(st.Ino)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.status.installed != nil && a.status.key == key {
		return a.status.installed, nil
	}
	data, err := fsys.ReadFile(dpkgStatusFile, maxDpkgStatus)
	if err != nil {
		return nil, fmt.Errorf("dpkg database: %w", err)
	}
	installed := ParseDpkgStatus(data)
	a.status = dpkgStatus{key: key, installed: installed}
	return installed, nil
}

// ParseDpkgStatus reads dpkg's status file and returns the installed
// packages (Status "… installed"), by name and by name:arch, with their
// versions. Paragraphs it cannot read are skipped.
func ParseDpkgStatus(data []byte) map[string]string {
	out := map[string]string{}
	var pkg, ver, arch, status string
	flush := func() {
		if pkg != "" && ver != "" && strings.HasSuffix(status, " installed") {
			out[pkg] = ver
			if arch != "" {
				out[pkg+":"+arch] = ver
			}
		}
		pkg, ver, arch, status = "", "", "", ""
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
		}
	}
	flush()
	return out
}

// Candidates asks apt-cache which version of each name would be
// installed ("" when no repository offers it, or apt does not know it).
func (a *Apt) Candidates(ctx context.Context, names ...string) (map[string]string, error) {
	res, err := a.h.Check(ctx, Cmd{Tool: "apt-cache", Args: append([]string{"policy", "--"}, names...)})
	if err != nil {
		return nil, err
	}
	return parseAptPolicy(res.Output), nil
}

// parseAptPolicy reads `apt-cache policy` output: "name:" at column 0,
// then an indented "Candidate: version" ("(none)" when none).
func parseAptPolicy(out string) map[string]string {
	cands := map[string]string{}
	cur := ""
	for _, line := range strings.Split(out, "\n") {
		if line == "" {
			continue
		}
		if line[0] != ' ' && strings.HasSuffix(line, ":") {
			cur = strings.TrimSuffix(line, ":")
			continue
		}
		if cur == "" {
			continue
		}
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok && k == "Candidate" {
			if v = strings.TrimSpace(v); v != "(none)" {
				cands[cur] = v
			}
		}
	}
	return cands
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
	full := append(append([]string{}, aptGetArgs...), args...)
	_, err := a.h.Check(ctx, Cmd{Tool: "apt-get", Args: full})
	return err
}

// Refresh runs apt-get update.
func (a *Apt) Refresh(ctx context.Context) error { return a.AptGet(ctx, "update") }

// IndexStale reports whether the package index is older than any of its
// sources (a repository was added or changed since the last apt-get
// update), or was never fetched.
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
	if err := a.Refresh(ctx); err != nil {
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
