package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/system"
)

const (
	zoneinfoDir = "/usr/share/zoneinfo"
	localtime   = "/etc/localtime"
	etcTimezone = "/etc/timezone" // Debian family: the zone's name
	sysconfigTZ = "/etc/sysconfig/clock"
	adjtime     = "/etc/adjtime" // third line: UTC or LOCAL (hwclock(8))
	maxTZFile   = 1 << 20
)

// zoneName is what a time zone name may look like: tzdata's names
// (Area/Location, Etc/GMT+8, UTC, posix/…), never a path out of the
// zoneinfo directory.
var zoneName = regexp.MustCompile(`^[A-Za-z0-9_+-]+(/[A-Za-z0-9_.+-]+)*$`)

// timezone is common.timezone: /etc/localtime is a symlink to the zone's
// file under /usr/share/zoneinfo (as systemd and Debian make it; the
// zone must exist there), the Debian family's /etc/timezone names it, and
// /etc/adjtime says whether the hardware clock keeps UTC or local time.
// Every file is written only when it differs, through the root; no tool
// runs unless tzdata itself is missing and gets installed.
func (e *Executor) timezone(ctx context.Context, s *stateRun) (state.Result, error) {
	name, err := s.p.required("name")
	if err != nil {
		return state.Result{}, err
	}
	name = strings.TrimSpace(name)
	if !zoneName.MatchString(name) || strings.Contains("/"+name+"/", "/../") {
		return state.Result{}, &badParam{"name", fmt.Sprintf("%q is not a time zone name such as Europe/Paris or UTC", name)}
	}
	utc, err := s.p.boolean("use-utc", true)
	if err != nil {
		return state.Result{}, err
	}
	what := "Timezone " + name
	zone := zoneinfoDir + "/" + name

	var notes []string
	if _, err := s.fs.Stat(zoneinfoDir); errors.Is(err, fs.ErrNotExist) {
		if s.test {
			notes = append(notes, "tzdata would be installed (common.timezone needs "+zoneinfoDir+")")
		} else {
			if err := ensureTzdata(ctx, s.sys); err != nil {
				return state.Result{}, failf("%s: %s is missing and %v", what, zoneinfoDir, err)
			}
			notes = append(notes, "tzdata installed (common.timezone needs "+zoneinfoDir+")")
		}
	}
	if len(notes) == 0 || !s.test {
		fi, err := s.fs.Stat(zone)
		if err != nil || !fi.Mode().IsRegular() {
			return state.Result{}, failf("%s: no such time zone: %s does not exist (see the names under %s)", what, zone, zoneinfoDir)
		}
	}

	var ch changes
	if err := s.zoneLink(zone, &ch); err != nil {
		return state.Result{}, failf("%s: %s: %v", what, localtime, err)
	}
	d, _ := s.sys.Distro()
	if err := s.zoneFiles(name, d.Family(), &ch); err != nil {
		return state.Result{}, failf("%s: %v", what, err)
	}
	if err := s.hardwareClock(utc, &ch); err != nil {
		return state.Result{}, failf("%s: %s: %v", what, adjtime, err)
	}
	res := s.result(what, ch)
	if len(notes) > 0 {
		res.Comment = strings.Join(notes, "; ") + "; " + res.Comment
		res.Changed = true
	}
	return res, nil
}

func ensureTzdata(ctx context.Context, sys *system.Host) error {
	m, err := sys.Packages()
	if err != nil {
		return fmt.Errorf("tzdata cannot be installed: %w", err)
	}
	installed, err := m.EnsureInstalled(ctx, "tzdata")
	if err != nil {
		return fmt.Errorf("installing tzdata failed: %w", err)
	}
	if len(installed) == 0 {
		return errors.New("tzdata is installed: reinstall it")
	}
	return nil
}

// zoneLink makes /etc/localtime a symlink to zone. A link that names
// the zone already, relative or absolute, is left as it is; a copy of a
// zone file (older RHEL) is replaced by the link, so the zone's name is
// there to read.
func (s *stateRun) zoneLink(zone string, ch *changes) error {
	fi, err := s.fs.Lstat(localtime)
	switch {
	case err == nil && fi.Mode()&fs.ModeSymlink != 0:
		target, err := s.fs.Readlink(localtime)
		if err != nil {
			return err
		}
		if !path.IsAbs(target) {
			target = path.Join(path.Dir(localtime), target)
		}
		if rootfs.Clean(target) == zone {
			return nil
		}
	case err == nil && fi.IsDir():
		return errors.New("is a directory")
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return err
	}
	ch.add("%s -> %s", localtime, zone)
	if s.test {
		return nil
	}
	// A new link renamed over the old name: /etc/localtime is never
	// missing, even for a moment.
	tmp := localtime + ".opsagent-new"
	if err := s.fs.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := s.fs.Symlink(zone, tmp); err != nil {
		return err
	}
	return s.fs.Rename(tmp, localtime)
}

// zoneFiles keeps the files that name the zone: /etc/timezone on the
// Debian family (or wherever it exists), and ZONE= of
// /etc/sysconfig/clock where that file has one (RHEL before 7).
func (s *stateRun) zoneFiles(name string, family system.Family, ch *changes) error {
	data, err := s.fs.ReadFile(etcTimezone, maxTZFile)
	switch {
	case err == nil:
		if strings.TrimSpace(string(data)) == name {
			break // Salt 2014 wrote it without the newline: the same
		}
		fallthrough
	case errors.Is(err, fs.ErrNotExist) && family == system.FamilyDebian:
		ch.add(etcTimezone)
		if !s.test {
			if err := s.writeKeeping(etcTimezone, []byte(name+"\n")); err != nil {
				return err
			}
		}
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return err
	}

	data, err = s.fs.ReadFile(sysconfigTZ, maxTZFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	lines := strings.Split(string(data), "\n")
	want := fmt.Sprintf("ZONE=%q", name)
	changed := false
	for i, l := range lines {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "ZONE="); ok && strings.Trim(v, `"'`) != name {
			lines[i], changed = want, true
		}
	}
	if !changed {
		return nil
	}
	ch.add(sysconfigTZ)
	if s.test {
		return nil
	}
	return s.writeKeeping(sysconfigTZ, []byte(strings.Join(lines, "\n")))
}

// hardwareClock makes the third line of /etc/adjtime say UTC or LOCAL.
// hwclock reads a missing file as UTC, so the file is created only for
// LOCAL.
func (s *stateRun) hardwareClock(utc bool, ch *changes) error {
	want := "UTC"
	if !utc {
		want = "LOCAL"
	}
	data, err := s.fs.ReadFile(adjtime, maxTZFile)
	if errors.Is(err, fs.ErrNotExist) {
		if utc {
			return nil
		}
		data, err = nil, nil
	}
	if err != nil {
		return err
	}
	var lines []string
	if len(data) > 0 {
		lines = strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	}
	have := "UTC"
	if len(lines) >= 3 {
		have = strings.TrimSpace(lines[2])
	}
	if have == want {
		return nil
	}
	ch.add("hardware clock %s", want)
	if s.test {
		return nil
	}
	// The first two lines are hwclock's drift data; a new file gets its
	// neutral values.
	defaults := []string{"0.0 0 0.0", "0"}
	for len(lines) < 2 {
		lines = append(lines, defaults[len(lines)])
	}
	if len(lines) < 3 {
		lines = append(lines, want)
	} else {
		lines[2] = want
	}
	return s.writeKeeping(adjtime, []byte(strings.Join(lines, "\n")+"\n"))
}

// writeKeeping replaces a small system file atomically, keeping its mode
// and owner (a new one is 0644, root's).
func (s *stateRun) writeKeeping(p string, data []byte) error {
	mode, uid, gid := fs.FileMode(defaultFileMode), 0, 0
	if fi, err := s.fs.Stat(p); err == nil {
		mode = fi.Mode().Perm()
		if u, g, ok := rootfs.Owner(fi); ok {
			uid, gid = u, g
		}
	}
	return s.fs.WriteFileAtomic(p, data, mode, uid, gid)
}
