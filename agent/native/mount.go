package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
	"golang.org/x/sys/unix"
)

// fstabPath is the fstab the mount module keeps (inside the root).
const fstabPath = "/etc/fstab"

// mount is linux.mount: device mounted at path with filesystem and opts,
// and, only when fstab is true, an /etc/fstab entry for it (dump and pass
// as given).
//
// What is mounted is read from the agent's mount table
// (/proc/self/mountinfo, the root's view of it): the next round with
// everything in place runs no tool. The device is matched by its device
// number (so /dev/xvdf, a link to it or UUID=… all match), a bind mount
// by the directory it shows.
//
// It never unmounts: a different device mounted at path fails the state,
// naming it (Salt 2014 unmounted it, "forced unmount because devices
// don't match"). Options that differ are applied with a remount when they
// are the kind a remount changes (ro/rw, noatime, nosuid, nodev, noexec,
// sync…); a filesystem option the kernel shows with another value
// (data=, errors=…) cannot be changed that way and fails the state,
// saying so. Filesystem options the kernel does not show are taken as in
// place. The mount point is created when missing (Salt 2014 failed).
func (e *Executor) mount(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.mount"
	p := s.p
	mp, err := absPath(p, "path")
	if err != nil {
		return state.Result{}, err
	}
	device, err := p.required("device")
	if err != nil {
		return state.Result{}, err
	}
	device = strings.TrimSpace(device)
	fstype, err := p.required("filesystem")
	if err != nil {
		return state.Result{}, err
	}
	fstype = strings.TrimSpace(fstype)
	optList, err := p.list("opts")
	if err != nil {
		return state.Result{}, err
	}
	var opts []string
	for _, o := range optList {
		for _, f := range strings.Split(o, ",") {
			if f = strings.TrimSpace(f); f != "" {
				opts = append(opts, f)
			}
		}
	}
	persist, err := p.boolean("fstab", false)
	if err != nil {
		return state.Result{}, err
	}
	dump, err := p.integer("dump", 0)
	if err != nil {
		return state.Result{}, err
	}
	pass, err := p.integer("pass", 0)
	if err != nil {
		return state.Result{}, err
	}
	bind := hasOpt(opts, "bind") || hasOpt(opts, "rbind")
	what := "Mount point " + mp
	var ch changes

	// What the device is: a block device (by number), or a directory for
	// a bind mount. UUID=/LABEL= are looked up with blkid.
	dev := device
	if !bind {
		if strings.HasPrefix(device, "UUID=") || strings.HasPrefix(device, "LABEL=") {
			if dev, err = s.findDevice(ctx, module, device); err != nil {
				return state.Result{}, err
			}
		} else if !strings.HasPrefix(device, "/") {
			return state.Result{}, &badParam{"device", fmt.Sprintf("must be a device path, UUID=… or LABEL=…, got %q", device)}
		}
	} else if !strings.HasPrefix(device, "/") {
		return state.Result{}, &badParam{"device", fmt.Sprintf("must be an absolute directory for a bind mount, got %q", device)}
	}
	want, err := s.mountSource(dev, bind)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}

	// The mount point, with its links resolved inside the root.
	real, err := s.fs.ResolveLinks(mp)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			return state.Result{}, failf("%s: %s: %v", module, mp, err)
		}
		real = mp // a parent is missing: nothing is mounted there
	}
	active, err := s.sys.MountAt(real)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	if active != nil && !want.matches(active) {
		return state.Result{}, failf("%s: %s has %s (%s) mounted, not %s; refusing to unmount it: unmount it first if it should go", module, mp, active.Source, active.FSType, device)
	}
	if active != nil && !bind && !sameFSType(active.FSType, fstype) {
		return state.Result{}, failf("%s: %s has %s mounted as %s, not %s: fix the filesystem parameter", module, mp, device, active.FSType, fstype)
	}

	if active == nil {
		if _, err := s.need(ctx, preMount, &ch); err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
		ch.add("mounted %s (%s)", device, fstype)
		if !s.test {
			if err := s.fs.MkdirAll(mp, 0o755, nil); err != nil {
				return state.Result{}, failf("%s: cannot create the mount point %s: %v", module, mp, err)
			}
			if real, err = s.fs.ResolveLinks(mp); err != nil {
				return state.Result{}, failf("%s: %s: %v", module, mp, err)
			}
			args := []string{}
			if !bind && fstype != "" && fstype != "none" {
				args = append(args, "-t", fstype)
			}
			if len(opts) > 0 {
				args = append(args, "-o", strings.Join(opts, ","))
			}
			args = append(args, dev, real)
			if _, err := s.sys.Check(ctx, system.Cmd{Tool: "mount", Args: args}); err != nil {
				return state.Result{}, failf("%s: %v", module, err)
			}
			if m, err := s.sys.MountAt(real); err != nil || m == nil || !want.matches(m) {
				return state.Result{}, failf("%s: mount reported success but %s is not mounted at %s", module, device, mp)
			}
		}
	} else {
		remount, conflict := optionsToApply(opts, active)
		if len(conflict) > 0 {
			return state.Result{}, failf("%s: %s is mounted with %s; %s cannot be changed by a remount: unmount it to apply %s", module, mp, strings.Join(active.Options(), ","), strings.Join(conflict, ", "), plural(len(conflict), "it", "them"))
		}
		if len(remount) > 0 {
			ch.add("remounted with %s", strings.Join(remount, ","))
			if !s.test {
				ro := append([]string{"remount"}, remount...)
				if bind {
					ro = append([]string{"remount", "bind"}, remount...)
				}
				if _, err := s.sys.Check(ctx, system.Cmd{Tool: "mount", Args: []string{"-o", strings.Join(ro, ","), real}}); err != nil {
					return state.Result{}, failf("%s: %v", module, err)
				}
			}
		}
	}

	if persist {
		entry := system.FstabEntry{Device: device, Path: mp, FSType: fstype, Opts: strings.Join(opts, ","), Dump: int(dump), Pass: int(pass)}
		if err := s.setFstab(entry, &ch); err != nil {
			return state.Result{}, failf("%s: %s: %v", module, fstabPath, err)
		}
	}
	return s.result(what, ch), nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// setFstab writes the entry for e.Path into the root's fstab when it is
// missing or differs, keeping every other line.
func (s *stateRun) setFstab(e system.FstabEntry, ch *changes) error {
	data, err := s.fs.ReadFile(fstabPath, 1<<20)
	perm, uid, gid := fs.FileMode(0o644), -1, -1
	switch {
	case errors.Is(err, fs.ErrNotExist):
		data = nil
	case err != nil:
		return err
	default:
		if fi, err := s.fs.Stat(fstabPath); err == nil {
			perm = fi.Mode().Perm()
			if st, ok := fi.Sys().(*unix.Stat_t); ok {
				uid, gid = int(st.Uid), int(st.Gid)
			}
		}
	}
	out, old, changed := system.SetFstabEntry(data, e)
	if !changed {
		return nil
	}
	if old == nil {
		ch.add("fstab entry added")
	} else {
		ch.add("fstab entry updated (was %q)", old.String())
	}
	if s.test {
		return nil
	}
	real, err := s.fs.ResolveLinks(fstabPath)
	if err != nil {
		return err
	}
	return s.fs.WriteFileAtomic(real, out, perm, uid, gid)
}

// findDevice resolves UUID=… or LABEL=… to a device path with blkid.
func (s *stateRun) findDevice(ctx context.Context, module, spec string) (string, error) {
	var ch changes
	if _, err := s.need(ctx, preBlkid, &ch); err != nil {
		return "", failf("%s: %v", module, err)
	}
	res, err := s.sys.Run(ctx, system.Cmd{Tool: "blkid", Args: []string{"-l", "-o", "device", "-t", spec}})
	if err != nil {
		return "", failf("%s: %v", module, err)
	}
	dev := strings.TrimSpace(res.Output)
	if res.ExitCode != 0 || dev == "" {
		return "", failf("%s: no device below the root has %s (blkid -t %s found none)", module, spec, spec)
	}
	return dev, nil
}

// mountID is what identifies a mounted source.
type mountID struct {
	major, minor uint32
	root         string // the directory shown, for a bind mount
	bind         bool
	source       string
}

func (w mountID) matches(m *system.Mount) bool {
	if m.Major == w.major && m.Minor == w.minor {
		return !w.bind || m.Root == w.root
	}
	// Filesystems such as btrfs show an anonymous device number: the
	// source named the same way still matches.
	return !w.bind && m.Source == w.source
}

// mountSource identifies dev: a block device by its number, a bind
// mount's directory by the filesystem it is on and its path in it.
func (s *stateRun) mountSource(dev string, bind bool) (mountID, error) {
	if !bind {
		rdev, err := s.sys.BlockDevice(dev)
		if err != nil {
			return mountID{}, err
		}
		return mountID{major: unix.Major(rdev), minor: unix.Minor(rdev), source: dev}, nil
	}
	real, err := s.fs.ResolveLinks(dev)
	if err != nil {
		return mountID{}, err
	}
	fi, err := s.fs.Stat(real)
	if err != nil {
		return mountID{}, err
	}
	if !fi.IsDir() {
		return mountID{}, fmt.Errorf("%s is not a directory to bind-mount", dev)
	}
	st, ok := fi.Sys().(*unix.Stat_t)
	if !ok {
		return mountID{}, fmt.Errorf("%s: no device number", dev)
	}
	ms, err := s.sys.Mounts()
	if err != nil {
		return mountID{}, err
	}
	// The mount the directory is on: the last (topmost) one whose point
	// is the longest prefix of it.
	var on *system.Mount
	for i := range ms {
		m := &ms[i]
		if (m.Point == "/" || real == m.Point || strings.HasPrefix(real, m.Point+"/")) && (on == nil || len(m.Point) >= len(on.Point)) {
			on = m
		}
	}
	id := mountID{major: unix.Major(st.Dev), minor: unix.Minor(st.Dev), bind: true, root: real}
	if on != nil {
		id.root = path.Join(on.Root, strings.TrimPrefix(real, on.Point))
	}
	return id, nil
}

func hasOpt(opts []string, o string) bool {
	for _, x := range opts {
		if x == o {
			return true
		}
	}
	return false
}

func sameFSType(active, want string) bool {
	want = strings.ToLower(want)
	if active == want || want == "" || want == "auto" || want == "none" {
		return true
	}
	ext := func(t string) bool { return t == "ext2" || t == "ext3" || t == "ext4" }
	// The ext4 driver mounts ext2 and ext3 filesystems too.
	return ext(active) && ext(want)
}

// vfsFlags are the per-mount options a remount changes, each with the
// flag whose presence (or, for the negative forms, absence) in the mount
// table means it is in place.
var vfsFlags = map[string]struct {
	flag    string
	present bool
}{
	"ro": {"ro", true}, "rw": {"rw", true},
	"noatime": {"noatime", true}, "atime": {"noatime", false},
	"nodiratime": {"nodiratime", true}, "diratime": {"nodiratime", false},
	"relatime": {"relatime", true}, "norelatime": {"relatime", false},
	"strictatime": {"noatime", false},
	"nosuid":      {"nosuid", true}, "suid": {"nosuid", false},
	"nodev": {"nodev", true}, "dev": {"nodev", false},
	"noexec": {"noexec", true}, "exec": {"noexec", false},
	"sync": {"sync", true}, "async": {"sync", false},
	"dirsync":  {"dirsync", true},
	"lazytime": {"lazytime", true}, "nolazytime": {"lazytime", false},
}

// fstabOnly are options that mean something to mount(8) or fstab, not
// to the mounted filesystem.
func fstabOnly(o string) bool {
	switch o {
	case "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev", "bind", "rbind", "remount", "loop", "sw", "x-mount.mkdir":
		return true
	}
	return strings.HasPrefix(o, "x-") || strings.HasPrefix(o, "comment=") || strings.HasPrefix(o, "loop=")
}

// optionsToApply compares the wanted options with a mount: the ones a
// remount would apply, and the filesystem options shown with another
// value, which a remount cannot change.
func optionsToApply(want []string, m *system.Mount) (remount, conflict []string) {
	have := map[string]bool{}
	values := map[string]string{}
	for _, o := range m.Options() {
		have[o] = true
		if k, v, ok := strings.Cut(o, "="); ok {
			values[k] = v
		}
	}
	for _, o := range want {
		if fstabOnly(o) {
			continue
		}
		if f, ok := vfsFlags[o]; ok {
			if have[f.flag] != f.present {
				remount = append(remount, o)
			}
			continue
		}
		if k, v, ok := strings.Cut(o, "="); ok {
			if cur, shown := values[k]; shown && cur != v {
				conflict = append(conflict, fmt.Sprintf("%s (now %s=%s)", o, k, cur))
			}
		}
	}
	return remount, conflict
}
