package native

import (
	"context"
	"fmt"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// mkfs is linux.mkfs: a filesystem of fstype (ext2, ext3, ext4, xfs) on
// a device.
//
// It formats only a device that holds nothing: blkid's low-level probe
// (blkid -p) reads the device first. The 2014 fork reformatted any device
// whose type differed from fstype, destroying what was on it; here a
// device that holds anything else — another filesystem, an LVM physical
// volume, a RAID member, a partition table — is refused with one line
// naming what was found, unless the state sets force to true (a
// parameter the catalogue does not list: asking for the destruction is
// explicit). A mounted device is never formatted, force or not. A device
// that already holds fstype is in the correct state; a different label
// is set on it (e2label, xfs_admin -L), which loses nothing.
//
// Prerequisites as in 2014: xfsprogs for xfs (e2fsprogs for ext*).
func (e *Executor) mkfs(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.mkfs"
	p := s.p
	dev, err := devicePath(p, "device")
	if err != nil {
		return state.Result{}, err
	}
	fstype, err := p.required("fstype")
	if err != nil {
		return state.Result{}, err
	}
	fstype = strings.ToLower(strings.TrimSpace(fstype))
	pre := preMke2fs
	switch fstype {
	case "ext2", "ext3", "ext4":
	case "xfs":
		pre = preMkxfs
	default:
		return state.Result{}, &badParam{"fstype", fmt.Sprintf("must be ext2, ext3, ext4 or xfs, got %q", fstype)}
	}
	label, err := p.str("label")
	if err != nil {
		return state.Result{}, err
	}
	force, err := p.boolean("force", false)
	if err != nil {
		return state.Result{}, err
	}
	what := "Device " + dev
	var ch changes
	if _, err := s.need(ctx, preBlkid, &ch); err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	sig, err := s.probe(ctx, module, dev)
	if err != nil {
		return state.Result{}, err
	}
	rdev, err := s.sys.BlockDevice(dev)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}

	if sig.Type == fstype && !sig.Ambivalent {
		if label == "" || sig.Label == label {
			return unchanged(fmt.Sprintf("%s is already in the correct state (%s)", what, sig.Describe())), nil
		}
		return s.relabel(ctx, module, dev, fstype, sig, label, pre)
	}
	if !sig.Empty() {
		if at, err := s.mountedAt(rdev); err == nil && len(at) > 0 {
			return state.Result{}, failf("%s: %s holds %s and is mounted at %s; refusing to format it as %s", module, dev, sig.Describe(), strings.Join(at, ", "), fstype)
		}
		if !force {
			return state.Result{}, failf("%s: %s holds %s; refusing to format it as %s: set force to true to format it anyway (everything on it is lost), or wipe it first (wipefs -a %s)", module, dev, sig.Describe(), fstype, dev)
		}
	}

	missing, err := s.need(ctx, pre, &ch)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	did := fmt.Sprintf("formatted as %s", fstype)
	if label != "" {
		did += " (label " + label + ")"
	}
	if !sig.Empty() {
		did += ", destroying " + sig.Describe() + " (force)"
	}
	if s.test || missing {
		ch = append(changes{did}, ch...)
		return s.result(what, ch), nil
	}
	if _, err := s.sys.Check(ctx, system.Cmd{Tool: pre.Tool, Args: mkfsArgs(fstype, label, force && !sig.Empty(), dev)}); err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	after, err := s.probe(ctx, module, dev)
	if err != nil {
		return state.Result{}, err
	}
	if after.Type != fstype {
		return state.Result{}, failf("%s: %s was formatted as %s but blkid now finds %s", module, dev, fstype, after.Describe())
	}
	ch = append(changes{did}, ch...)
	return s.result(what, ch), nil
}

// mkfsArgs is the command line of the format. Without force the tool's
// own check stays on as a second guard: mke2fs asks before it overwrites
// a filesystem (and gets no answer: it has no terminal), mkfs.xfs
// refuses without -f.
func mkfsArgs(fstype, label string, force bool, dev string) []string {
	var args []string
	if fstype == "xfs" {
		if label != "" {
			args = append(args, "-L", label)
		}
		if force {
			args = append(args, "-f")
		}
		return append(args, dev)
	}
	args = append(args, "-t", fstype)
	if label != "" {
		args = append(args, "-L", label)
	}
	if force {
		args = append(args, "-F")
	}
	return append(args, dev)
}

// relabel sets the label of the filesystem already there.
func (s *stateRun) relabel(ctx context.Context, module, dev, fstype string, sig system.Signature, label string, pre system.Prerequisite) (state.Result, error) {
	var ch changes
	ch.add("label %s (was %q)", label, sig.Label)
	tool, args := "e2label", []string{dev, label}
	if fstype == "xfs" {
		tool, args = "xfs_admin", []string{"-L", label, dev}
	}
	missing, err := s.need(ctx, pre, &ch)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	if s.test || missing {
		return s.result("Device "+dev, ch), nil
	}
	if _, err := s.sys.Check(ctx, system.Cmd{Tool: tool, Args: args}); err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	return s.result("Device "+dev, ch), nil
}
