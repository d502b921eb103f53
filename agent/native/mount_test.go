package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/testutil/loopdev"
	"golang.org/x/sys/unix"
)

// activeMount is the mount at a host path, from the agent's table.
func activeMount(t *testing.T, hostPath string) *system.Mount {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	ms, err := system.ParseMountInfo(data, "/")
	if err != nil {
		t.Fatal(err)
	}
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].Point == hostPath {
			return &ms[i]
		}
	}
	return nil
}

// TestMountMountsAndWritesFstabOnlyWhenAsked: the device is mounted (the
// mount point created), fstab untouched without fstab; with fstab the
// entry is added once, other lines kept; the next rounds run no mount.
func TestMountMountsAndWritesFstabOnlyWhenAsked(t *testing.T) {
	rig := newDebianRig(t)
	d := loopdev.New(t, rig.root, "xvdb", 64<<20)
	loopdev.Format(t, d, "ext4", "-q")
	fstab := filepath.Join(rig.root, "etc/fstab")
	orig := "# /etc/fstab: static file system information.\nproc /proc proc defaults 0 0\n"
	if err := os.WriteFile(fstab, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	param := `{"device": "/dev/xvdb", "filesystem": "ext4", "path": "/mnt/data/", "opts": ["noatime"]}`

	check := rig.apply(t, "linux.mount", param, true)
	if !check.OK || !check.Changed || !strings.Contains(check.Comment, "would be updated: mounted /dev/xvdb (ext4)") {
		t.Fatalf("check mode: %+v", check)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "mnt/data")); err == nil {
		t.Fatal("check mode created the mount point")
	}
	first := rig.converges(t, "linux.mount", param, "mount", "umount")
	mustOK(t, first, "Mount point /mnt/data updated: mounted /dev/xvdb (ext4)")
	m := activeMount(t, filepath.Join(rig.root, "mnt/data"))
	if m == nil || m.Major != unix.Major(d.Rdev) || m.Minor != unix.Minor(d.Rdev) || !hasOpt(m.Opts, "noatime") {
		t.Fatalf("mount %+v", m)
	}
	if got, _ := os.ReadFile(fstab); string(got) != orig {
		t.Fatalf("fstab changed without fstab: %q", got)
	}

	persist := `{"device": "/dev/xvdb", "filesystem": "ext4", "path": "/mnt/data", "opts": "noatime", "fstab": "True", "dump": "0", "pass": "2"}`
	first = rig.converges(t, "linux.mount", persist, "mount", "umount")
	mustOK(t, first, "Mount point /mnt/data updated: fstab entry added")
	want := orig + "/dev/xvdb\t/mnt/data\text4\tnoatime\t0\t2\n"
	if got, _ := os.ReadFile(fstab); string(got) != want {
		t.Fatalf("fstab %q, want %q", got, want)
	}
	// A changed pass updates that line only.
	r := rig.apply(t, "linux.mount", strings.Replace(persist, `"pass": "2"`, `"pass": "1"`, 1), false)
	mustOK(t, r, `fstab entry updated (was "/dev/xvdb\t/mnt/data\text4\tnoatime\t0\t2")`)
	if got, _ := os.ReadFile(fstab); string(got) != orig+"/dev/xvdb\t/mnt/data\text4\tnoatime\t0\t1\n" {
		t.Fatalf("fstab %q", got)
	}
}

// TestMountNeverUnmountsAnotherDevice: a path where another device is
// mounted fails naming it; both stay as they were.
func TestMountNeverUnmountsAnotherDevice(t *testing.T) {
	rig := newDebianRig(t)
	a := loopdev.New(t, rig.root, "xvdb", 64<<20)
	b := loopdev.New(t, rig.root, "xvdc", 64<<20)
	loopdev.Format(t, a, "ext4", "-q")
	loopdev.Format(t, b, "ext4", "-q")
	mustOK(t, rig.apply(t, "linux.mount", `{"device": "/dev/xvdb", "filesystem": "ext4", "path": "/srv"}`, false), "mounted /dev/xvdb")

	for _, test := range []bool{true, false} {
		mark := rig.runs.Mark()
		r := rig.apply(t, "linux.mount", `{"device": "/dev/xvdc", "filesystem": "ext4", "path": "/srv", "fstab": true}`, test)
		mustFail(t, r, "linux.mount: /srv has /dev/xvdb (ext4) mounted, not /dev/xvdc; refusing to unmount it")
		if ran := rig.runs.Ran(mark, "mount", "umount"); len(ran) > 0 {
			t.Fatalf("ran %v", ran)
		}
	}
	if got := loopdev.Mounts(t, a); len(got) != 1 || got[0] != filepath.Join(rig.root, "srv") {
		t.Fatalf("%s mounted at %v", a.Host, got)
	}
	if got := loopdev.Mounts(t, b); len(got) != 0 {
		t.Fatalf("%s mounted at %v", b.Host, got)
	}
	if data, _ := os.ReadFile(filepath.Join(rig.root, "etc/fstab")); strings.Contains(string(data), "xvdc") {
		t.Fatalf("fstab written on a refusal: %q", data)
	}
}

// TestMountRemountsChangedOptions: options a remount changes are applied
// to the mounted filesystem, once.
func TestMountRemountsChangedOptions(t *testing.T) {
	rig := newDebianRig(t)
	d := loopdev.New(t, rig.root, "xvdb", 64<<20)
	loopdev.Format(t, d, "ext4", "-q", "-L", "vol")
	mustOK(t, rig.apply(t, "linux.mount", `{"device": "/dev/xvdb", "filesystem": "ext4", "path": "/data"}`, false), "mounted")
	first := rig.converges(t, "linux.mount", `{"device": "LABEL=vol", "filesystem": "ext4", "path": "/data", "opts": "ro,nosuid,defaults"}`, "mount")
	mustOK(t, first, "Mount point /data updated: remounted with ro,nosuid")
	m := activeMount(t, filepath.Join(rig.root, "data"))
	if m == nil || !hasOpt(m.Opts, "ro") || !hasOpt(m.Opts, "nosuid") {
		t.Fatalf("mount %+v", m)
	}
	if n := len(loopdev.Mounts(t, d)); n != 1 {
		t.Fatalf("%d mounts of the device", n)
	}
}

// TestMountBind: a bind mount (filesystem none, opts bind) is matched by
// the directory it shows.
func TestMountBind(t *testing.T) {
	rig := newDebianRig(t)
	if err := os.MkdirAll(filepath.Join(rig.root, "tmp/volume"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(rig.root, "tmp/volume/foo"), []byte("foo"), 0o644)
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(rig.root, "tmp/dest"), unix.MNT_DETACH) })
	rig.converges(t, "linux.mount", `{"device": "/tmp/volume", "filesystem": "none", "opts": ["bind"], "path": "/tmp/dest"}`, "mount")
	if b, err := os.ReadFile(filepath.Join(rig.root, "tmp/dest/foo")); err != nil || string(b) != "foo" {
		t.Fatalf("bind mount shows %q, %v", b, err)
	}
	// Another directory bound there is someone else's mount.
	os.MkdirAll(filepath.Join(rig.root, "tmp/other"), 0o755)
	mustFail(t, rig.apply(t, "linux.mount", `{"device": "/tmp/other", "filesystem": "none", "opts": ["bind"], "path": "/tmp/dest"}`, false), "refusing to unmount it")
}

// TestMountOptionsToApply: what a remount applies and what it cannot.
func TestMountOptionsToApply(t *testing.T) {
	m := &system.Mount{Opts: []string{"rw", "relatime"}, SuperOpts: []string{"rw", "errors=remount-ro", "data=ordered"}}
	remount, conflict := optionsToApply([]string{"defaults", "noatime", "nodev", "exec", "rw", "errors=remount-ro", "data=journal", "discard", "x-systemd.automount", "nofail"}, m)
	if strings.Join(remount, ",") != "noatime,nodev" {
		t.Errorf("remount %v", remount)
	}
	if len(conflict) != 1 || conflict[0] != "data=journal (now data=ordered)" {
		t.Errorf("conflict %v", conflict)
	}
	if r, c := optionsToApply([]string{"ro", "noexec"}, &system.Mount{Opts: []string{"ro", "noexec", "relatime"}}); len(r)+len(c) != 0 {
		t.Errorf("in place: %v %v", r, c)
	}
}
