package native

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/loopdev"
	"golang.org/x/sys/unix"
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

	// Check mode: nothing installed, nothing created.
	check := rig.apply(t, "linux.lvm.pv", `{"path": ["/dev/sdb1", "/dev/sdb2"]}`, true)
	if !check.OK || !check.Changed || check.Comment != "Physical volumes /dev/sdb1, /dev/sdb2 would be updated: created on /dev/sdb1, /dev/sdb2, lvm2 would be installed (prerequisite)" {
		t.Fatalf("check mode: %+v", check)
	}
	if rig.e.sys.HasTool("lvm") {
		t.Fatal("check mode installed lvm2")
	}
	mark := rig.runs.Mark()
	first := rig.converges(t, "linux.lvm.pv", `{"path": ["/dev/sdb1", "/dev/sdb2"]}`, lvmTools...)
	mustOK(t, first, "Physical volumes /dev/sdb1, /dev/sdb2 updated: created on /dev/sdb1, /dev/sdb2, lvm2 installed (prerequisite)")
	ranExactly(t, rig, mark, []string{"pvcreate /dev/sdb1 /dev/sdb2"}, "pvcreate", "vgcreate", "lvcreate")

	check = rig.apply(t, "linux.lvm.vg", `{"name": "vgtest", "path": ["/dev/sdb1", "/dev/sdb2"]}`, true)
	if !check.Changed || check.Comment != "Volume group vgtest would be updated: created with /dev/sdb1, /dev/sdb2" {
		t.Fatalf("check mode: %+v", check)
	}
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
	check = rig.apply(t, "linux.lvm.lv", `{"name": "lvtest", "vg-name": "vgtest", "lv-size": "20M"}`, true)
	if !check.Changed || check.Comment != "Logical volume vgtest/lvtest would be updated: created" {
		t.Fatalf("check mode: %+v", check)
	}
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

// Real output of LVM 2.03.16 (Debian 12), captured from the rig above.
const (
	samplePVs = `  {
      "report": [
          {
              "pv": [
                  {"pv_name":"/dev/loop0", "vg_name":"vgtest"},
                  {"pv_name":"/dev/loop1", "vg_name":""}
              ]
          }
      ]
  }
`
	sampleLVs = `  {
      "report": [
          {
              "lv": [
                  {"vg_name":"vgtest", "lv_name":"lvtest", "lv_size":"20971520", "vg_extent_size":"4194304"}
              ]
          }
      ]
  }
`
	sampleVGs = `  {
      "report": [
          {
              "vg": [
                  {"vg_name":"vgtest"}
              ]
          }
      ]
  }
`
	sampleLVMBlkid = "DEVNAME=/dev/loop2\nUUID=G5QV6A-9gpr-j1CA-KUP0-VdVJ-V0eZ-72PUU1\nVERSION=LVM2\\ 001\nTYPE=LVM2_member\nUSAGE=raid\n"
)

// TestLVMReports parses the JSON reports and blkid's view of a PV as the
// tools print them.
func TestLVMReports(t *testing.T) {
	rows, err := parseLVMReport([]byte(samplePVs), "pv")
	if err != nil || len(rows) != 2 || rows[0]["pv_name"] != "/dev/loop0" || rows[0]["vg_name"] != "vgtest" || rows[1]["vg_name"] != "" {
		t.Fatalf("%v %v", rows, err)
	}
	rows, err = parseLVMReport([]byte(sampleLVs), "lv")
	if err != nil || len(rows) != 1 || rows[0]["lv_size"] != "20971520" {
		t.Fatalf("%v %v", rows, err)
	}
	if _, err := parseLVMReport([]byte("  WARNING: no JSON"), "lv"); err == nil {
		t.Fatal("garbage parsed")
	}
	for in, want := range map[string]uint64{"500M": 500 << 20, "500": 500 << 20, "1.5g": 3 << 29, "8s": 4096, "256k": 256 << 10, "2T": 2 << 40} {
		if got, err := parseLVMSize(in); err != nil || got != want {
			t.Errorf("parseLVMSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := parseLVMSize("lots"); err == nil {
		t.Error("lots parsed")
	}
}

// TestLVMOptionsFromRealRecipes: the parameter spellings of the real
// recipes (testdata/recipes complex-linux.lvm.*) become LVM 2.03's
// options, and what LVM 2.03 no longer has fails naming the parameter.
// The tools are answered (scripted) so that only the command lines are
// under test.
func TestLVMOptionsFromRealRecipes(t *testing.T) {
	root := fakeRoot(t, []string{"blkid", "lvm", "pvcreate", "pvs", "vgs", "lvs", "vgcreate", "lvcreate"}, map[string]uint64{
		"dev/sdb1": unix.Mkdev(8, 17), "dev/loop0": unix.Mkdev(7, 0), "dev/loop1": unix.Mkdev(7, 1),
	})
	made := map[string]bool{}
	run := &scripted{fn: func(tool string, args []string) proc.Result {
		switch tool {
		case "blkid":
			if made[args[len(args)-1]] {
				return proc.Result{Output: sampleLVMBlkid}
			}
			return proc.Result{ExitCode: 2}
		case "pvcreate":
			made[args[len(args)-1]] = true
			return proc.Result{Output: "  Physical volume \"/dev/sdb1\" successfully created.\n"}
		case "pvs":
			return proc.Result{Output: samplePVs}
		case "vgs":
			return proc.Result{Output: sampleVGs}
		case "lvs":
			return proc.Result{Output: sampleLVs}
		case "lvcreate", "vgcreate":
			return proc.Result{}
		}
		return proc.Result{ExitCode: 127}
	}}
	e := fakeExec(t, root, run)
	last := func(prefix string) string {
		t.Helper()
		for _, c := range run.take() {
			if strings.HasPrefix(c, prefix) {
				return c
			}
		}
		t.Fatalf("no %s ran", prefix)
		return ""
	}

	r := e.Execute(context.Background(), req("linux.lvm.pv", `{"PV-size": "500M", "data-alignment": "256k", "data-alignment offset": "8k", "force": "y", "label-sector": 1, "metadata copies": "1", "metadata size": "8", "metadata-ignore": "n", "metadata-type": "lvm2", "path": ["/dev/sdb1"], "zero": "y"}`, false))
	mustOK(t, r, "created on /dev/sdb1")
	if got := last("pvcreate"); got != "pvcreate --force --yes --zero y --dataalignment 256k --dataalignmentoffset 8k --metadatasize 8 --pvmetadatacopies 1 --metadataignore n --labelsector 1 --setphysicalvolumesize 500M /dev/sdb1" {
		t.Fatalf("pvcreate %q", got)
	}

	// /dev/loop1 is a free PV (samplePVs): vgcreate takes it with the options.
	r = e.Execute(context.Background(), req("linux.lvm.vg", `{"PE size": "4M", "allocation policy": "contiguous", "autobackup": "y", "clustered": "n", "max-lv-number": "128", "max-pv-number": "128", "metadata type": "lvm2", "metadata-copies": "1", "name": "vgnew", "path": ["/dev/loop1"], "tag": "vgtag"}`, false))
	mustOK(t, r, "Volume group vgnew updated: created with /dev/loop1")
	if got := last("vgcreate"); got != "vgcreate vgnew --maxlogicalvolumes 128 --maxphysicalvolumes 128 --vgmetadatacopies 1 --physicalextentsize 4M --autobackup y --addtag vgtag --alloc contiguous /dev/loop1" {
		t.Fatalf("vgcreate %q", got)
	}
	mustFail(t, e.Execute(context.Background(), req("linux.lvm.vg", `{"name": "vgc", "path": ["/dev/loop1"], "clustered": true}`, false)), "parameter clustered: clustered volume groups (clvmd) no longer exist in LVM 2.03")
	mustFail(t, e.Execute(context.Background(), req("linux.lvm.pv", `{"path": ["/dev/sdb1"], "metadata-type": "lvm1"}`, false)), "parameter metadata-type: lvm1 metadata is no longer supported")

	r = e.Execute(context.Background(), req("linux.lvm.lv", `{"autobackup": "y", "available": "y", "contiguous": "n", "lv-size": "500M", "monitor": "y", "name": "lvnew", "path": ["/dev/sdb1"], "permission": "rw", "readahead": "auto", "tag": "lvtag", "vg-name": "vgtest", "zero": "y", "ignore-monitoring": true, "no-udev-sync": "n"}`, false))
	mustOK(t, r, "Logical volume vgtest/lvnew updated: created")
	if got := last("lvcreate"); got != "lvcreate --yes --name lvnew --size 500M --contiguous n --monitor y --ignoremonitoring --permission rw --readahead auto --zero y --activate y --autobackup y --addtag lvtag vgtest /dev/sdb1" {
		t.Fatalf("lvcreate %q", got)
	}
	// A snapshot: name is the new volume, snapshot its origin (the 2014
	// fork swapped them, found the origin present and created nothing).
	r = e.Execute(context.Background(), req("linux.lvm.lv", `{"le-size": "500M", "name": "sstest", "snapshot": "lvtest", "vg-name": "vgtest"}`, false))
	mustOK(t, r, "Logical volume vgtest/sstest updated: created as a snapshot of vgtest/lvtest")
	if got := last("lvcreate"); got != "lvcreate --yes --name sstest --size 500M --snapshot vgtest/lvtest" {
		t.Fatalf("lvcreate %q", got)
	}
	mustFail(t, e.Execute(context.Background(), req("linux.lvm.lv", `{"name": "x", "vg-name": "vgtest"}`, false)), "parameter le-size: is required to create the volume")
	mustFail(t, e.Execute(context.Background(), req("linux.lvm.lv", `{"name": "x", "vg-name": "vgtest", "le-size": "1G", "le-number": "10"}`, false)), "give le-size or le-number, not both")
}
