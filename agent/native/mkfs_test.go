package native

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/loopdev"
)

// blkidType is what the host's blkid reads on a device now.
func blkidType(t *testing.T, d loopdev.Dev) (typ, label string) {
	t.Helper()
	out, _ := exec.Command("blkid", "-p", "-o", "export", d.Host).Output()
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "TYPE="); ok {
			typ = v
		}
		if v, ok := strings.CutPrefix(l, "LABEL="); ok {
			label = v
		}
	}
	return typ, label
}

// TestMkfsFormatsAnEmptyDevice: an empty loop device is formatted ext4
// with its label (check mode first changes nothing); the next round runs
// no mke2fs and finds it in the correct state.
func TestMkfsFormatsAnEmptyDevice(t *testing.T) {
	rig := newDebianRig(t)
	d := loopdev.New(t, rig.root, "xvdf", 64<<20)
	param := `{"device": "/dev/xvdf", "fstype": "ext4", "label": "data"}`

	check := rig.apply(t, "linux.mkfs", param, true)
	if !check.OK || !check.Changed || !strings.Contains(check.Comment, "would be updated: formatted as ext4 (label data)") {
		t.Fatalf("check mode: %+v", check)
	}
	if typ, _ := blkidType(t, d); typ != "" {
		t.Fatalf("check mode formatted the device: %s", typ)
	}
	first := rig.converges(t, "linux.mkfs", param, "mke2fs", "mkfs.ext4", "e2label")
	if !strings.Contains(first.Comment, "Device /dev/xvdf updated: formatted as ext4 (label data)") {
		t.Errorf("first round: %q", first.Comment)
	}
	if typ, label := blkidType(t, d); typ != "ext4" || label != "data" {
		t.Fatalf("device holds %q label %q", typ, label)
	}
	again := rig.apply(t, "linux.mkfs", param, false)
	if !strings.Contains(again.Comment, "already in the correct state (an ext4 filesystem (label data") {
		t.Errorf("second round: %q", again.Comment)
	}
}

// TestMkfsRefusesADeviceThatHoldsData: a device holding another
// filesystem, or a partition table, is refused with one line naming the
// device and what is on it; the marker written before is still there
// afterwards, and no mkfs ran — in check mode too.
func TestMkfsRefusesADeviceThatHoldsData(t *testing.T) {
	rig := newDebianRig(t)
	d := loopdev.New(t, rig.root, "xvdf", 64<<20)
	loopdev.Format(t, d, "ext4", "-q", "-L", "precious")
	loopdev.WriteMarker(t, d, "ext4", "keep me")

	for _, tc := range []struct{ param string }{
		{`{"device": "/dev/xvdf", "fstype": "xfs"}`},
		{`{"device": "/dev/xvdf", "fstype": "ext3", "label": "precious"}`},
		{`{"device": "/dev/xvdf", "fstype": "ext2", "force": false}`},
	} {
		for _, test := range []bool{true, false} {
			mark := rig.runs.Mark()
			r := rig.apply(t, "linux.mkfs", tc.param, test)
			if r.OK || r.Changed {
				t.Fatalf("%s (check %v): %+v, want a refusal", tc.param, test, r)
			}
			for _, want := range []string{"linux.mkfs: /dev/xvdf holds an ext4 filesystem (label precious, UUID ", "refusing to format it as", "set force to true"} {
				if !strings.Contains(r.Comment, want) {
					t.Errorf("%s: comment %q lacks %q", tc.param, r.Comment, want)
				}
			}
			if strings.Contains(r.Comment, "\n") {
				t.Errorf("comment is not one line: %q", r.Comment)
			}
			if ran := rig.runs.Ran(mark, "mke2fs", "mkfs.xfs", "mkfs.ext4", "apt-get", "dpkg"); len(ran) > 0 {
				t.Errorf("%s: a refusal ran %v", tc.param, ran)
			}
		}
	}
	if got := loopdev.ReadMarker(t, d, "ext4"); got != "keep me" {
		t.Fatalf("marker %q after the refusals", got)
	}

	// A partition table is data too.
	p := loopdev.New(t, rig.root, "xvdg", 64<<20)
	sfdisk := exec.Command("sfdisk", "-q", p.Host)
	sfdisk.Stdin = strings.NewReader("label: dos\n,,83\n")
	if out, err := sfdisk.CombinedOutput(); err != nil {
		t.Skipf("sfdisk: %v: %s", err, out)
	}
	r := rig.apply(t, "linux.mkfs", `{"device": "/dev/xvdg", "fstype": "ext4"}`, false)
	if r.OK || !strings.Contains(r.Comment, "/dev/xvdg holds a dos partition table; refusing") {
		t.Fatalf("partition table: %+v", r)
	}
}

// TestMkfsForceAndMounted: force formats over a filesystem (the marker is
// gone, as asked), but never a mounted device.
func TestMkfsForceAndMounted(t *testing.T) {
	rig := newDebianRig(t)
	d := loopdev.New(t, rig.root, "xvdf", 64<<20)
	loopdev.Format(t, d, "ext4", "-q")
	loopdev.WriteMarker(t, d, "ext4", "old")

	// Mounted: refused even with force.
	var r = rig.apply(t, "linux.mount", `{"device": "/dev/xvdf", "filesystem": "ext4", "path": "/mnt/data"}`, false)
	mustOK(t, r, "mounted /dev/xvdf")
	r = rig.apply(t, "linux.mkfs", `{"device": "/dev/xvdf", "fstype": "ext2", "force": true}`, false)
	mustFail(t, r, "linux.mkfs: /dev/xvdf holds an ext4 filesystem")
	mustFail(t, r, "is mounted at /mnt/data; refusing to format it as ext2")
	loopdev.UnmountAll(t, d)
	if got := loopdev.ReadMarker(t, d, "ext4"); got != "old" {
		t.Fatalf("marker %q", got)
	}

	r = rig.apply(t, "linux.mkfs", `{"device": "/dev/xvdf", "fstype": "ext2", "force": "true"}`, false)
	mustOK(t, r, "formatted as ext2, destroying an ext4 filesystem")
	if typ, _ := blkidType(t, d); typ != "ext2" {
		t.Fatalf("device holds %q", typ)
	}
}

// TestMkfsRelabels: the right filesystem with another label gets the
// label; its content stays.
func TestMkfsRelabels(t *testing.T) {
	rig := newDebianRig(t)
	d := loopdev.New(t, rig.root, "xvdf", 64<<20)
	loopdev.Format(t, d, "ext4", "-q", "-L", "old")
	loopdev.WriteMarker(t, d, "ext4", "kept")
	first := rig.converges(t, "linux.mkfs", `{"device": "/dev/xvdf", "fstype": "ext4", "label": "new"}`, "mke2fs", "e2label")
	if !strings.Contains(first.Comment, `label new (was "old")`) {
		t.Errorf("comment %q", first.Comment)
	}
	if _, label := blkidType(t, d); label != "new" {
		t.Fatalf("label %q", label)
	}
	if got := loopdev.ReadMarker(t, d, "ext4"); got != "kept" {
		t.Fatalf("marker %q", got)
	}
}

// TestMkfsXfsInstallsXfsprogs: xfs on an empty device installs xfsprogs
// first (the 2014 adaptor's prerequisite), from Debian's package.
func TestMkfsXfsInstallsXfsprogs(t *testing.T) {
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	d := loopdev.New(t, rig.root, "xvdh", 320<<20) // mkfs.xfs wants 300 MiB
	first := rig.converges(t, "linux.mkfs", `{"device": "/dev/xvdh", "fstype": "xfs", "label": "logs"}`, "mkfs.xfs", "apt-get", "dpkg", "xfs_admin")
	mustOK(t, first, "formatted as xfs (label logs), xfsprogs installed (prerequisite)")
	if typ, label := blkidType(t, d); typ != "xfs" || label != "logs" {
		t.Fatalf("device holds %q label %q", typ, label)
	}
	// A device that is not there, or not a block device, is named.
	r := rig.apply(t, "linux.mkfs", `{"device": "/dev/nothere", "fstype": "xfs"}`, false)
	mustFail(t, r, "linux.mkfs: /dev/nothere does not exist below the root")
	r = rig.apply(t, "linux.mkfs", `{"device": "/etc/hostname", "fstype": "xfs"}`, false)
	mustFail(t, r, "/etc/hostname is not a block device")
	r = rig.apply(t, "linux.mkfs", `{"device": "/dev/xvdh", "fstype": "vfat"}`, false)
	mustFail(t, r, "parameter fstype: must be ext2, ext3, ext4 or xfs")
}
