package native

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/loopdev"
)

// newLVMRig is a Debian rig whose LVM writes metadata only: this kernel
// (and many CI kernels) has no device-mapper, so logical volumes cannot
// be activated. activation = 0 in the test root's lvmlocal.conf makes
// pvcreate, vgcreate, vgextend and lvcreate do all their on-disk work for
// real and skip the activation. lvm2 itself is installed by the first
// state, as a prerequisite, from Debian's package.
func newLVMRig(t *testing.T) *debianRig {
	t.Helper()
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	if err := os.MkdirAll(filepath.Join(rig.root, "etc/lvm"), 0o755); err != nil {
		t.Fatal(err)
	}
	conf := "# test root: no device-mapper in this kernel\nglobal {\n\tactivation = 0\n}\n"
	if err := os.WriteFile(filepath.Join(rig.root, "etc/lvm/lvmlocal.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return rig
}

// lvmTool runs an LVM tool in the rig's root, for the test's own checks.
func lvmTool(t *testing.T, rig *debianRig, args ...string) string {
	t.Helper()
	out, err := exec.Command("chroot", append([]string{rig.root}, args...)...).Output()
	if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return string(out)
}

// ranExactly checks the commands run since mark that are one of tools.
func ranExactly(t *testing.T, rig *debianRig, mark int, want []string, tools ...string) {
	t.Helper()
	got := rig.runs.Ran(mark, tools...)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("ran\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

var lvmTools = []string{"pvcreate", "vgcreate", "vgextend", "lvcreate", "pvremove", "vgreduce", "vgremove", "lvremove", "lvreduce", "lvresize", "lvextend", "apt-get"}

// TestLVMCreatesWhatIsMissing: PVs, a VG, its extension and an LV are
// created for real on loop devices with the exact commands below; every
// next round changes nothing and runs no LVM tool that changes anything;
// nothing is ever removed from the VG and the LV is never resized.
func TestLVMCreatesWhatIsMissing(t *testing.T) {
	rig := newLVMRig(t)
	for _, n := range []string{"sdb1", "sdb2", "sdb3"} {
		loopdev.New(t, rig.root, n, 64<<20)
	}

	mark := rig.runs.Mark()
	first := rig.converges(t, "linux.lvm.pv", `{"path": ["/dev/sdb1", "/dev/sdb2"]}`, lvmTools...)
	mustOK(t, first, "Physical volumes /dev/sdb1, /dev/sdb2 updated: created on /dev/sdb1, /dev/sdb2, installed package lvm2 (prerequisite: lvm)")
	ranExactly(t, rig, mark, []string{"pvcreate /dev/sdb1 /dev/sdb2"}, "pvcreate", "vgcreate", "lvcreate")

	mark = rig.runs.Mark()
	first = rig.converges(t, "linux.lvm.vg", `{"name": "vgtest", "path": ["/dev/sdb1", "/dev/sdb2"]}`, lvmTools...)
	mustOK(t, first, "Volume group vgtest updated: created with /dev/sdb1, /dev/sdb2")
	ranExactly(t, rig, mark, []string{"vgcreate vgtest /dev/sdb1 /dev/sdb2"}, lvmTools...)

	// A device more: added (it is blank, vgextend makes it a PV); the
	// recipe's "PE size" spelling is read as pe-size but only vgcreate
	// takes it.
	mark = rig.runs.Mark()
	first = rig.converges(t, "linux.lvm.vg", `{"name": "vgtest", "path": ["/dev/sdb1", "/dev/sdb2", "/dev/sdb3"], "PE size": "4M"}`, lvmTools...)
	mustOK(t, first, "Volume group vgtest updated: extended with /dev/sdb3")
	ranExactly(t, rig, mark, []string{"vgextend vgtest /dev/sdb3"}, lvmTools...)

	// Fewer devices listed: nothing is removed.
	mark = rig.runs.Mark()
	mustOK(t, rig.apply(t, "linux.lvm.vg", `{"name": "vgtest", "path": ["/dev/sdb1"]}`, false), "Volume group vgtest is already in the correct state")
	ranExactly(t, rig, mark, nil, lvmTools...)
	if out := lvmTool(t, rig, "pvs", "--noheadings", "-o", "vg_name"); strings.Count(out, "vgtest") != 3 {
		t.Fatalf("pvs: %q", out)
	}

	// The LV, with the IDE's "lv-size" spelling.
	mark = rig.runs.Mark()
	first = rig.converges(t, "linux.lvm.lv", `{"name": "lvtest", "vg-name": "vgtest", "lv-size": "20M", "path": ["/dev/sdb1", "/dev/sdb2"]}`, lvmTools...)
	mustOK(t, first, "Logical volume vgtest/lvtest updated: created")
	ranExactly(t, rig, mark, []string{"lvcreate --yes --name lvtest --size 20M vgtest /dev/sdb1 /dev/sdb2"}, lvmTools...)

	// Asked smaller: never shrunk. Asked bigger: never extended, and says so.
	mark = rig.runs.Mark()
	r := rig.apply(t, "linux.lvm.lv", `{"name": "lvtest", "vg-name": "vgtest", "le-size": "8M"}`, false)
	mustOK(t, r, "Logical volume vgtest/lvtest is already in the correct state (20 MiB, more than the 8 MiB asked: never shrunk)")
	r = rig.apply(t, "linux.lvm.lv", `{"name": "lvtest", "vg-name": "vgtest", "le-size": "40M"}`, false)
	mustFail(t, r, "linux.lvm.lv: vgtest/lvtest has 20 MiB, less than the 40 MiB asked; it is never resized by the agent: extend it with lvextend -r")
	r = rig.apply(t, "linux.lvm.lv", `{"name": "lvtest", "vg-name": "vgtest", "le-number": "5"}`, false)
	mustOK(t, r, "already in the correct state")
	r = rig.apply(t, "linux.lvm.lv", `{"name": "lvtest", "vg-name": "vgtest", "le-number": "100%FREE"}`, false)
	mustOK(t, r, "already in the correct state")
	ranExactly(t, rig, mark, nil, lvmTools...)
	if out := lvmTool(t, rig, "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", "vgtest/lvtest"); strings.TrimSpace(out) != "20971520" {
		t.Fatalf("lv size %q", out)
	}

	// A VG that does not exist.
	mustFail(t, rig.apply(t, "linux.lvm.lv", `{"name": "x", "vg-name": "novg", "le-size": "8M"}`, false), "linux.lvm.lv: volume group novg does not exist: create it first (linux.lvm.vg)")
}

// TestLVMRefusesDevicesThatHoldData: a device with a filesystem is
// neither made a PV nor put in a VG, a PV of one VG is not moved to
// another, and a mounted device is refused even with force; the marker
// on the filesystem is still there at the end.
func TestLVMRefusesDevicesThatHoldData(t *testing.T) {
	rig := newLVMRig(t)
	data := loopdev.New(t, rig.root, "xvdf", 64<<20)
	blank := loopdev.New(t, rig.root, "xvdg", 64<<20)
	loopdev.Format(t, data, "ext4", "-q", "-L", "data")
	loopdev.WriteMarker(t, data, "ext4", "precious")

	for _, test := range []bool{true, false} {
		mark := rig.runs.Mark()
		r := rig.apply(t, "linux.lvm.pv", `{"path": ["/dev/xvdg", "/dev/xvdf"]}`, test)
		mustFail(t, r, "linux.lvm.pv: /dev/xvdf holds an ext4 filesystem (label data, UUID ")
		mustFail(t, r, "refusing to make it an LVM physical volume: set force to true to make it one anyway (everything on it is lost)")
		r = rig.apply(t, "linux.lvm.vg", `{"name": "vgdata", "path": ["/dev/xvdf"]}`, test)
		mustFail(t, r, "linux.lvm.vg: /dev/xvdf holds an ext4 filesystem (label data")
		mustFail(t, r, "refusing to add it to volume group vgdata")
		ranExactly(t, rig, mark, nil, lvmTools[:len(lvmTools)-1]...)
	}
	// Nothing was created on the blank device either: the state is
	// checked whole before anything is done.
	if typ, _ := blkidType(t, blank); typ != "" {
		t.Fatalf("the blank device of a refused state holds %q", typ)
	}

	mustOK(t, rig.apply(t, "linux.lvm.vg", `{"name": "vga", "path": ["/dev/xvdg"]}`, false), "created with /dev/xvdg")
	mustFail(t, rig.apply(t, "linux.lvm.vg", `{"name": "vgb", "path": ["/dev/xvdg"]}`, false), "linux.lvm.vg: /dev/xvdg is a physical volume of volume group vga; refusing to move it to vgb")

	mustOK(t, rig.apply(t, "linux.mount", `{"device": "/dev/xvdf", "filesystem": "ext4", "path": "/mnt/data"}`, false), "mounted")
	mustFail(t, rig.apply(t, "linux.lvm.pv", `{"path": ["/dev/xvdf"], "force": "y"}`, false), "linux.lvm.pv: /dev/xvdf holds an ext4 filesystem (label data, UUID ")
	mustFail(t, rig.apply(t, "linux.lvm.pv", `{"path": ["/dev/xvdf"], "force": "y"}`, false), "is mounted at /mnt/data; refusing to make it an LVM physical volume")
	loopdev.UnmountAll(t, data)
	if got := loopdev.ReadMarker(t, data, "ext4"); got != "precious" {
		t.Fatalf("marker %q", got)
	}

	// force, unmounted: made a PV, as asked.
	mustOK(t, rig.apply(t, "linux.lvm.pv", `{"path": ["/dev/xvdf"], "force": true}`, false), "created on /dev/xvdf")
	if typ, _ := blkidType(t, data); typ != "LVM2_member" {
		t.Fatalf("after force: %q", typ)
	}
}
