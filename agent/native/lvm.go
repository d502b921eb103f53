package native

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// The LVM modules create what is missing and never shrink or destroy:
// no pvremove, vgreduce, vgremove, lvremove, lvreduce or lvresize is ever
// run. A device that holds anything else (a filesystem, a RAID member, a
// partition table) is refused with one line naming what is on it; only
// linux.lvm.pv's force (a catalogue parameter) makes it a physical volume
// anyway. The tools are LVM's own (pvcreate, vgcreate, vgextend,
// lvcreate), their state read from their JSON reports (pvs, vgs, lvs
// --reportformat json) and from blkid; lvm2 is installed first when
// missing, as the 2014 adaptor did.

// lvmRow is one row of an LVM JSON report: every value is a string.
type lvmRow map[string]string

// parseLVMReport reads `pvs|vgs|lvs --reportformat json` output: {"report":
// [{"pv": [{...}, …]}]} with the rows under the kind's key.
func parseLVMReport(out []byte, kind string) ([]lvmRow, error) {
	var doc struct {
		Report []map[string][]lvmRow `json:"report"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("cannot read the %ss report: %w", kind, err)
	}
	var rows []lvmRow
	for _, r := range doc.Report {
		rows = append(rows, r[kind]...)
	}
	return rows, nil
}

// lvmReport runs an LVM reporting tool and parses its rows. The standard
// error (warnings about udev or device-mapper in a container) is kept
// apart so that it cannot spoil the JSON.
func (s *stateRun) lvmReport(ctx context.Context, tool, kind string, fields string, extra ...string) ([]lvmRow, error) {
	var stderr bytes.Buffer
	args := append([]string{"--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields}, extra...)
	res, err := s.sys.Run(ctx, system.Cmd{Tool: tool, Args: args, Stderr: &stderr})
	if err != nil {
		return nil, err
	}
	if res.ExitCode != 0 {
		return nil, &system.ToolError{Command: tool + " " + strings.Join(args, " "), ExitCode: res.ExitCode, Output: stderr.String() + res.Output}
	}
	return parseLVMReport([]byte(res.Output), kind)
}

// pvInfo is one physical volume LVM knows.
type pvInfo struct {
	name string
	vg   string
	rdev uint64
}

// physicalVolumes lists the PVs LVM sees, each with the device number of
// its node below the root, so that /dev/xvdf and the name LVM prints for
// it (/dev/sdf, /dev/disk/…) match.
func (s *stateRun) physicalVolumes(ctx context.Context) ([]pvInfo, error) {
	rows, err := s.lvmReport(ctx, "pvs", "pv", "pv_name,vg_name")
	if err != nil {
		return nil, err
	}
	out := make([]pvInfo, 0, len(rows))
	for _, r := range rows {
		pv := pvInfo{name: r["pv_name"], vg: r["vg_name"]}
		pv.rdev, _ = s.sys.BlockDevice(pv.name)
		out = append(out, pv)
	}
	return out, nil
}

func findPV(pvs []pvInfo, dev string, rdev uint64) *pvInfo {
	for i := range pvs {
		if pvs[i].name == dev || (rdev != 0 && pvs[i].rdev == rdev) {
			return &pvs[i]
		}
	}
	return nil
}

// lvmArgs builds option arguments from the (normalised) parameters.
type lvmArgs struct {
	p    params
	args []string
	err  error
}

func (a *lvmArgs) value(param, flag string) {
	if a.err != nil || !a.p.has(param) {
		return
	}
	v, err := a.p.str(param)
	if err != nil {
		a.err = err
		return
	}
	if v = strings.TrimSpace(v); v != "" {
		a.args = append(a.args, flag, v)
	}
}

func (a *lvmArgs) yn(param, flag string) {
	if a.err != nil {
		return
	}
	v, err := a.p.yn(param)
	if err != nil {
		a.err = err
		return
	}
	if v != "" {
		a.args = append(a.args, flag, v)
	}
}

// flag adds a switch without a value when the parameter is true.
func (a *lvmArgs) flag(param, flag string) {
	if a.err != nil {
		return
	}
	v, err := a.p.yn(param)
	if err != nil {
		a.err = err
		return
	}
	if v == "y" {
		a.args = append(a.args, flag)
	}
}

func (a *lvmArgs) metadataType() {
	if a.err != nil || !a.p.has("metadata-type") {
		return
	}
	v, _ := a.p.str("metadata-type")
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "", "lvm2", "2":
		// LVM 2.03 writes lvm2 metadata only: nothing to ask for.
	case "lvm1", "1":
		a.err = &badParam{"metadata-type", "lvm1 metadata is no longer supported by LVM (2.03 removed it): use lvm2"}
	default:
		a.err = &badParam{"metadata-type", fmt.Sprintf("must be lvm2, got %q", v)}
	}
}

// pv is linux.lvm.pv: each device of path is an LVM physical volume.
//
// A device whose blkid signature is LVM2_member is one already (the next
// round runs no LVM tool). A blank device is initialised with pvcreate.
// A device that holds anything else is refused, naming what, unless force
// is true: then pvcreate --force wipes it, as asked. A mounted device is
// refused even then.
func (e *Executor) lvmPV(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.lvm.pv"
	p := s.p.norm()
	devs, err := devices(p, "path")
	if err != nil {
		return state.Result{}, err
	}
	force, err := p.yn("force")
	if err != nil {
		return state.Result{}, err
	}
	a := &lvmArgs{p: p}
	if force == "y" {
		a.args = append(a.args, "--force", "--yes")
	}
	a.value("uuid", "--uuid")
	if p.has("uuid") {
		if p.has("restore-file") {
			a.value("restore-file", "--restorefile")
		} else if nr, _ := p.yn("no-restore-file"); nr != "n" {
			a.args = append(a.args, "--norestorefile")
		}
	}
	a.yn("zero", "--zero")
	a.value("data-alignment", "--dataalignment")
	a.value("data-alignment-offset", "--dataalignmentoffset")
	a.value("metadata-size", "--metadatasize")
	a.metadataType()
	a.value("metadata-copies", "--pvmetadatacopies")
	a.yn("metadata-ignore", "--metadataignore")
	if v, _ := p.str("label-sector"); strings.TrimSpace(v) != "" {
		if _, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
			a.value("label-sector", "--labelsector")
		}
	}
	a.value("pv-size", "--setphysicalvolumesize")
	if a.err != nil {
		return state.Result{}, a.err
	}

	var ch changes
	if _, err := s.need(ctx, preBlkid, &ch); err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	var create []string
	for _, dev := range devs {
		sig, err := s.probe(ctx, module, dev)
		if err != nil {
			return state.Result{}, err
		}
		if sig.Type == "LVM2_member" && !sig.Ambivalent {
			continue
		}
		if !sig.Empty() {
			if err := s.refuseUnlessForced(module, dev, sig, force == "y", "make it an LVM physical volume", "set force to true to make it one anyway (everything on it is lost)"); err != nil {
				return state.Result{}, err
			}
		}
		create = append(create, dev)
	}
	what := "Physical volume " + strings.Join(devs, ", ")
	if len(devs) > 1 {
		what = "Physical volumes " + strings.Join(devs, ", ")
	}
	if len(create) == 0 {
		return s.result(what, ch), nil
	}
	missing, err := s.need(ctx, preLVM, &ch)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	ch = append(changes{"created on " + strings.Join(create, ", ")}, ch...)
	if s.test || missing {
		return s.result(what, ch), nil
	}
	res, err := s.sys.Check(ctx, system.Cmd{Tool: "pvcreate", Args: append(append([]string(nil), a.args...), create...)})
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	for _, dev := range create {
		if sig, err := s.sys.ProbeDevice(ctx, dev); err != nil || sig.Type != "LVM2_member" {
			return state.Result{}, failf("%s: pvcreate reported success but %s is not a physical volume", module, dev)
		}
	}
	r := s.result(what, ch)
	r.Stdout = res.Output
	return r, nil
}

// refuseUnlessForced is the refusal of a device that holds sig: always
// when it is mounted, else unless force.
func (s *stateRun) refuseUnlessForced(module, dev string, sig system.Signature, force bool, doing, hint string) error {
	if rdev, err := s.sys.BlockDevice(dev); err == nil {
		if at, err := s.mountedAt(rdev); err == nil && len(at) > 0 {
			return failf("%s: %s holds %s and is mounted at %s; refusing to %s", module, dev, sig.Describe(), strings.Join(at, ", "), doing)
		}
	}
	if force {
		return nil
	}
	if hint != "" {
		hint = ": " + hint
	}
	return failf("%s: %s holds %s; refusing to %s%s", module, dev, sig.Describe(), doing, hint)
}

// vg is linux.lvm.vg: volume group name exists and holds every device of
// path. A missing group is created (vgcreate); an existing one gets the
// missing devices added (vgextend), and keeps the ones it has that path
// does not list: nothing is ever removed from it. A device that belongs
// to another group, or holds a filesystem or anything but a free
// physical volume or nothing, is refused naming what.
func (e *Executor) lvmVG(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.lvm.vg"
	p := s.p.norm()
	name, err := p.required("name")
	if err != nil {
		return state.Result{}, err
	}
	name = strings.TrimSpace(name)
	devs, err := devices(p, "path")
	if err != nil {
		return state.Result{}, err
	}
	a := &lvmArgs{p: p}
	if c, err := p.yn("clustered"); err != nil {
		return state.Result{}, err
	} else if c == "y" {
		return state.Result{}, &badParam{"clustered", "clustered volume groups (clvmd) no longer exist in LVM 2.03: set it to false (shared volume groups are made with lvmlockd)"}
	}
	a.value("max-lv-number", "--maxlogicalvolumes")
	a.value("max-pv-number", "--maxphysicalvolumes")
	a.metadataType()
	a.value("metadata-copies", "--vgmetadatacopies")
	a.value("pe-size", "--physicalextentsize")
	a.yn("autobackup", "--autobackup")
	a.value("tag", "--addtag")
	a.value("allocation-policy", "--alloc")
	if a.err != nil {
		return state.Result{}, a.err
	}
	what := "Volume group " + name
	var ch changes
	if _, err := s.need(ctx, preBlkid, &ch); err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	missing, err := s.need(ctx, preLVM, &ch)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	var pvs []pvInfo
	if !missing {
		if pvs, err = s.physicalVolumes(ctx); err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
	}
	exists := false
	for _, pv := range pvs {
		if pv.vg == name {
			exists = true
		}
	}
	var add []string
	for _, dev := range devs {
		rdev, err := s.sys.BlockDevice(dev)
		if err != nil {
			return state.Result{}, failf("%s: %v below the root: give the path of a block device", module, err)
		}
		if pv := findPV(pvs, dev, rdev); pv != nil {
			switch pv.vg {
			case name:
				continue
			case "":
				add = append(add, dev)
				continue
			default:
				return state.Result{}, failf("%s: %s is a physical volume of volume group %s; refusing to move it to %s", module, dev, pv.vg, name)
			}
		}
		sig, err := s.probe(ctx, module, dev)
		if err != nil {
			return state.Result{}, err
		}
		if !sig.Empty() {
			// An LVM label that pvs does not list (filtered, or another
			// system's) is data too.
			return state.Result{}, s.refuseUnlessForced(module, dev, sig, false, "add it to volume group "+name, "make it a physical volume first with linux.lvm.pv (force), or wipe it")
		}
		add = append(add, dev)
	}
	if len(add) == 0 {
		return s.result(what, ch), nil
	}
	tool, args := "vgcreate", append(append([]string{name}, a.args...), add...)
	if exists {
		tool = "vgextend"
		args = []string{name}
		if v, _ := p.yn("autobackup"); v != "" {
			args = append(args, "--autobackup", v)
		}
		args = append(args, add...)
		ch = append(changes{"extended with " + strings.Join(add, ", ")}, ch...)
	} else {
		ch = append(changes{"created with " + strings.Join(add, ", ")}, ch...)
	}
	if s.test || missing {
		return s.result(what, ch), nil
	}
	res, err := s.sys.Check(ctx, system.Cmd{Tool: tool, Args: args})
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	r := s.result(what, ch)
	r.Stdout = res.Output
	return r, nil
}

// lv is linux.lvm.lv: logical volume name exists in volume group vg-name.
// A missing one is created with lvcreate and the options given (a
// snapshot of the LV named by snapshot when it is set). An existing one is
// never resized: one larger than asked is in the correct state (it is
// never shrunk), one smaller fails saying so (the catalogue has no way to
// ask for an extension; lvextend -r does it). Sizes given in percent
// (%VG, %FREE…) are not compared once the volume exists.
func (e *Executor) lvmLV(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.lvm.lv"
	p := s.p.norm()
	name, err := p.required("name")
	if err != nil {
		return state.Result{}, err
	}
	vg, err := p.required("vg-name")
	if err != nil {
		return state.Result{}, err
	}
	name, vg = strings.TrimSpace(name), strings.TrimSpace(vg)
	// "lv-size" is what the IDE produced in real recipes for le-size.
	size, err := p.str("le-size")
	if err != nil {
		return state.Result{}, err
	}
	if strings.TrimSpace(size) == "" {
		if size, err = p.str("lv-size"); err != nil {
			return state.Result{}, err
		}
	}
	size = strings.TrimSpace(size)
	extents, err := p.str("le-number")
	if err != nil {
		return state.Result{}, err
	}
	extents = strings.TrimSpace(extents)
	origin, err := p.str("snapshot")
	if err != nil {
		return state.Result{}, err
	}
	origin = strings.TrimSpace(origin)
	virtual, _ := p.str("virtual-size")
	switch {
	case size != "" && extents != "":
		return state.Result{}, &badParam{"le-size", "give le-size or le-number, not both"}
	case size == "" && extents == "" && strings.TrimSpace(virtual) == "":
		return state.Result{}, &badParam{"le-size", "is required to create the volume: give le-size (500M, 10G) or le-number (extents, or 100%FREE)"}
	}
	var pvPaths []string
	if p.has("path") {
		if pvPaths, err = devices(p, "path"); err != nil {
			return state.Result{}, err
		}
	}
	a := &lvmArgs{p: p}
	a.value("chunk-size", "--chunksize")
	a.yn("contiguous", "--contiguous")
	a.value("discards", "--discards")
	a.value("stripe-number", "--stripes")
	a.value("stripe-size", "--stripesize")
	a.value("minor-number", "--minor")
	if p.has("minor-number") {
		a.yn("persistent", "--persistent")
	}
	a.value("mirror-number", "--mirrors")
	a.flag("no-udev-sync", "--noudevsync")
	a.yn("monitor", "--monitor")
	a.flag("ignore-monitoring", "--ignoremonitoring")
	a.value("permission", "--permission")
	a.value("pool-metadata-size", "--poolmetadatasize")
	a.value("region-size", "--regionsize")
	a.value("readahead", "--readahead")
	a.value("thinpool", "--thinpool")
	a.value("type", "--type")
	a.value("virtual-size", "--virtualsize")
	a.yn("zero", "--zero")
	a.value("available", "--activate")
	a.yn("autobackup", "--autobackup")
	a.value("tag", "--addtag")
	a.value("allocation-policy", "--alloc")
	if a.err != nil {
		return state.Result{}, a.err
	}

	what := "Logical volume " + vg + "/" + name
	var ch changes
	missing, err := s.need(ctx, preLVM, &ch)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	if !missing {
		lvs, err := s.lvmReport(ctx, "lvs", "lv", "vg_name,lv_name,lv_size,vg_extent_size")
		if err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
		for _, lv := range lvs {
			if lv["vg_name"] != vg || lv["lv_name"] != name {
				continue
			}
			return s.existingLV(module, what, lv, size, extents)
		}
		vgs, err := s.lvmReport(ctx, "vgs", "vg", "vg_name")
		if err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
		found := false
		for _, r := range vgs {
			found = found || r["vg_name"] == vg
		}
		if !found {
			return state.Result{}, failf("%s: volume group %s does not exist: create it first (linux.lvm.vg)", module, vg)
		}
	}
	args := []string{"--yes", "--name", name}
	switch {
	case size != "":
		args = append(args, "--size", size)
	case extents != "":
		args = append(args, "--extents", extents)
	}
	args = append(args, a.args...)
	if origin != "" {
		args = append(args, "--snapshot", vg+"/"+origin)
		ch = append(changes{"created as a snapshot of " + vg + "/" + origin}, ch...)
	} else {
		args = append(args, vg)
		ch = append(changes{"created"}, ch...)
	}
	args = append(args, pvPaths...)
	if s.test || missing {
		return s.result(what, ch), nil
	}
	res, err := s.sys.Check(ctx, system.Cmd{Tool: "lvcreate", Args: args})
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	r := s.result(what, ch)
	r.Stdout = res.Output
	return r, nil
}

// existingLV judges an existing volume against the size asked.
func (s *stateRun) existingLV(module, what string, lv lvmRow, size, extents string) (state.Result, error) {
	have, err1 := strconv.ParseUint(lv["lv_size"], 10, 64)
	ext, err2 := strconv.ParseUint(lv["vg_extent_size"], 10, 64)
	if err1 != nil || err2 != nil || ext == 0 {
		return unchanged(what + " is already in the correct state"), nil
	}
	var want uint64
	switch {
	case size != "":
		b, err := parseLVMSize(size)
		if err != nil {
			return state.Result{}, &badParam{"le-size", err.Error()}
		}
		want = (b + ext - 1) / ext * ext // LVM rounds up to whole extents
	case extents != "" && !strings.Contains(extents, "%"):
		n, err := strconv.ParseUint(extents, 10, 64)
		if err != nil {
			return state.Result{}, &badParam{"le-number", fmt.Sprintf("must be a number of extents or N%%VG, N%%FREE…, got %q", extents)}
		}
		want = n * ext
	default:
		return unchanged(what + " is already in the correct state"), nil
	}
	switch {
	case have < want:
		return state.Result{}, failf("%s: %s has %s, less than the %s asked; it is never resized by the agent: extend it with lvextend -r", module, strings.TrimPrefix(what, "Logical volume "), humanBytes(have), humanBytes(want))
	case have > want:
		return unchanged(fmt.Sprintf("%s is already in the correct state (%s, more than the %s asked: never shrunk)", what, humanBytes(have), humanBytes(want))), nil
	}
	return unchanged(what + " is already in the correct state"), nil
}

// parseLVMSize reads an LVM size: a number with an optional unit (b, s
// for 512-byte sectors, k, m, g, t, p, e; binary, either case), megabytes
// when none.
func parseLVMSize(v string) (uint64, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := float64(1 << 20)
	units := map[byte]float64{'b': 1, 's': 512, 'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30, 't': 1 << 40, 'p': 1 << 50, 'e': 1 << 60}
	last := v[len(v)-1] | 0x20
	if u, ok := units[last]; ok && (v[len(v)-1] < '0' || v[len(v)-1] > '9') {
		mult = u
		v = v[:len(v)-1]
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	if err != nil || n < 0 || math.IsInf(n, 0) || math.IsNaN(n) {
		return 0, fmt.Errorf("%q is not a size such as 500M or 10G", v)
	}
	return uint64(math.Ceil(n * mult)), nil
}

func humanBytes(b uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f := float64(b)
	i := 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if f == math.Trunc(f) {
		return fmt.Sprintf("%.0f %s", f, units[i])
	}
	return fmt.Sprintf("%.2f %s", f, units[i])
}
