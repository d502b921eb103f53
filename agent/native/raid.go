package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// raidLevels are mdadm's --level values (module.json's list).
var raidLevels = map[string]bool{
	"linear": true, "raid0": true, "0": true, "stripe": true, "raid1": true, "1": true, "mirror": true,
	"raid4": true, "4": true, "raid5": true, "5": true, "raid6": true, "6": true, "raid10": true, "10": true,
	"multipath": true, "mp": true, "faulty": true, "container": true,
}

// raid is linux.raid: the software RAID array device-name exists, made by
// mdadm from devices at level.
//
// An array that exists (mdadm --detail --scan lists it) is left alone,
// whatever its level or members: nothing is ever added, removed or
// rebuilt. A missing one is created only from devices that hold nothing:
// a device with a filesystem, an LVM physical volume, a partition table
// or the superblock of another array (assembled or not) is refused with
// one line naming it. The 2014 fork ran mdadm --create with --force and
// --run, which builds over whatever the devices hold; here --run only
// keeps mdadm from asking (it has no terminal), once the devices are
// known to be blank. After a creation the array is recorded in
// mdadm.conf, and on Debian the initramfs updated, as in 2014, so that it
// comes back under its name at boot.
func (e *Executor) raid(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.raid"
	p := s.p
	name, err := absPath(p, "device-name")
	if err != nil {
		return state.Result{}, err
	}
	level, err := p.required("level")
	if err != nil {
		return state.Result{}, err
	}
	level = strings.ToLower(strings.TrimSpace(level))
	if !raidLevels[level] {
		return state.Result{}, &badParam{"level", fmt.Sprintf("must be one of linear, raid0, raid1, raid4, raid5, raid6, raid10, multipath, faulty, container (or 0, 1, 4, 5, 6, 10, stripe, mirror, mp), got %q", level)}
	}
	members, err := devices(p, "devices")
	if err != nil {
		return state.Result{}, err
	}
	extra, err := p.options("arguments")
	if err != nil {
		return state.Result{}, err
	}
	what := "RAID array " + name
	var ch changes
	if _, err := s.need(ctx, preBlkid, &ch); err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	missing, err := s.need(ctx, preMdadm, &ch)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	if !missing {
		arrays, err := s.mdArrays(ctx)
		if err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
		if s.findArray(arrays, name) != nil {
			return unchanged(what + " is already in the correct state (an existing array is never changed)"), nil
		}
	}
	for _, dev := range members {
		sig, err := s.probe(ctx, module, dev)
		if err != nil {
			return state.Result{}, err
		}
		if sig.Empty() {
			continue
		}
		hint := "wipe it first if its data can go (wipefs -a " + dev + ")"
		if sig.Type == "linux_raid_member" {
			hint = "it belongs to another array: assemble that one (mdadm --assemble --scan), or wipe it first (mdadm --zero-superblock " + dev + ")"
		}
		return state.Result{}, s.refuseUnlessForced(module, dev, sig, false, "build "+name+" on it", hint)
	}
	ch = append(changes{fmt.Sprintf("created (%s on %s)", level, strings.Join(members, ", "))}, ch...)
	if s.test || missing {
		return s.result(what, ch), nil
	}
	args := []string{"--create", name, "--run", "--level=" + level, fmt.Sprintf("--raid-devices=%d", len(members))}
	args = append(args, longOptions(extra, "=")...)
	args = append(args, members...)
	res, err := s.sys.Check(ctx, system.Cmd{Tool: "mdadm", Args: args})
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	out := res.Output
	arrays, err := s.mdArrays(ctx)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	a := s.findArray(arrays, name)
	if a == nil {
		return state.Result{}, failf("%s: mdadm --create reported success but %s is not listed by mdadm --detail --scan", module, name)
	}
	conf, err := s.saveMdadmConf(a.line)
	if err != nil {
		return state.Result{}, failf("%s: %s was created, but recording it in %s failed: %v", module, name, conf, err)
	}
	if conf != "" {
		ch.add("recorded in %s", conf)
	}
	if d, _ := s.sys.Distro(); d.Family() == system.FamilyDebian && s.sys.HasTool("update-initramfs") {
		if r, err := s.sys.Check(ctx, system.Cmd{Tool: "update-initramfs", Args: []string{"-u"}}); err != nil {
			ch.add("the initramfs was not updated (%v)", err)
		} else {
			out += r.Output
			ch.add("initramfs updated")
		}
	}
	r := s.result(what, ch)
	r.Stdout = out
	return r, nil
}

// mdArray is one line of `mdadm --detail --scan`:
// ARRAY /dev/md0 metadata=1.2 name=host:0 UUID=3aaa0122:29827cfa:5331ad66:ca767371
type mdArray struct {
	dev   string
	attrs map[string]string
	line  string
}

func parseMdadmScan(out string) []mdArray {
	var arrays []mdArray
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "ARRAY" {
			continue
		}
		a := mdArray{dev: f[1], attrs: map[string]string{}, line: strings.TrimSpace(line)}
		for _, kv := range f[2:] {
			if k, v, ok := strings.Cut(kv, "="); ok {
				a.attrs[strings.ToLower(k)] = v
			}
		}
		arrays = append(arrays, a)
	}
	return arrays
}

// mdArrays lists the arrays the kernel runs.
func (s *stateRun) mdArrays(ctx context.Context) ([]mdArray, error) {
	res, err := s.sys.Check(ctx, system.Cmd{Tool: "mdadm", Args: []string{"--detail", "--scan"}})
	if err != nil {
		return nil, err
	}
	return parseMdadmScan(res.Output), nil
}

// findArray finds name among arrays: by its path, or by device number
// (/dev/md/data is a link to /dev/md127).
func (s *stateRun) findArray(arrays []mdArray, name string) *mdArray {
	want, _ := s.sys.BlockDevice(name)
	for i := range arrays {
		if arrays[i].dev == name {
			return &arrays[i]
		}
		if want != 0 {
			if got, err := s.sys.BlockDevice(arrays[i].dev); err == nil && got == want {
				return &arrays[i]
			}
		}
	}
	return nil
}

// saveMdadmConf appends the array's line to mdadm.conf (Debian's place
// or RHEL's) unless it is there; it returns the file ("" when nothing was
// written).
func (s *stateRun) saveMdadmConf(line string) (string, error) {
	conf := "/etc/mdadm.conf"
	if d, _ := s.sys.Distro(); d.Family() == system.FamilyDebian {
		conf = "/etc/mdadm/mdadm.conf"
	}
	data, err := s.fs.ReadFile(conf, 1<<20)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return conf, err
	}
	for _, l := range strings.Split(string(data), "\n") {
		if strings.TrimSpace(l) == line {
			return "", nil
		}
	}
	text := string(data)
	if text != "" && !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	text += line + "\n"
	if err := s.fs.MkdirAll(pathDir(conf), 0o755, nil); err != nil {
		return conf, err
	}
	return conf, s.fs.WriteFileAtomic(conf, []byte(text), 0o644, -1, -1)
}

func pathDir(p string) string {
	if i := strings.LastIndex(p, "/"); i > 0 {
		return p[:i]
	}
	return "/"
}
