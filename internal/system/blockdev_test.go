package system

import (
	"strings"
	"testing"
)

// TestParseMountInfo keeps the mounts below the root, their points made
// relative to it, with escapes undone and both option lists.
func TestParseMountInfo(t *testing.T) {
	data := `22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw,discard,errors=remount-ro
36 22 7:3 / /tmp/t/root/mnt/my\040data rw,noatime shared:2 - ext4 /dev/loop3 rw
37 22 0:45 /tmp/t/root/tmp/volume /tmp/t/root/tmp/dest ro,nosuid master:3 - overlay overlay rw,lowerdir=/a
38 22 7:4 / /tmp/t/rootx rw - ext4 /dev/loop4 rw
`
	ms, err := ParseMountInfo([]byte(data), "/tmp/t/root/")
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 {
		t.Fatalf("%+v", ms)
	}
	if m := ms[0]; m.Point != "/mnt/my data" || m.Major != 7 || m.Minor != 3 || m.FSType != "ext4" || m.Source != "/dev/loop3" || strings.Join(m.Opts, ",") != "rw,noatime" {
		t.Errorf("%+v", m)
	}
	if m := ms[1]; m.Root != "/tmp/t/root/tmp/volume" || m.Point != "/tmp/dest" || strings.Join(m.Options(), ",") != "ro,nosuid,rw,lowerdir=/a" {
		t.Errorf("%+v", m)
	}
	all, _ := ParseMountInfo([]byte(data), "/")
	if len(all) != 4 || all[0].Point != "/" || strings.Join(all[0].SuperOpts, ",") != "rw,discard,errors=remount-ro" {
		t.Errorf("%+v", all)
	}
	if _, err := ParseMountInfo([]byte("garbage line\n"), "/"); err == nil {
		t.Error("garbage parsed")
	}
}

// TestSetFstabEntry adds an entry once, updates the one for the same
// mount point in place, and keeps every other line as it was.
func TestSetFstabEntry(t *testing.T) {
	orig := "# static file system information\nUUID=abc / ext4 errors=remount-ro 0 1\n\n/dev/xvdb /mnt/data ext3 defaults 0 0\n/swapfile none swap sw 0 0"
	e := FstabEntry{Device: "/dev/xvdb", Path: "/mnt/data", FSType: "ext3"}
	if out, old, changed := SetFstabEntry([]byte(orig), e); changed || old == nil || string(out) != orig {
		t.Fatalf("same entry: changed=%v old=%v", changed, old)
	}
	e.Opts, e.Pass = "noatime", 2
	out, old, changed := SetFstabEntry([]byte(orig), e)
	want := strings.Replace(orig, "/dev/xvdb /mnt/data ext3 defaults 0 0", "/dev/xvdb\t/mnt/data\text3\tnoatime\t0\t2", 1)
	if !changed || old.Opts != "defaults" || string(out) != want {
		t.Fatalf("update: %q", out)
	}
	out, old, changed = SetFstabEntry([]byte(orig), FstabEntry{Device: "LABEL=my data", Path: "/srv/my data", FSType: "xfs"})
	if !changed || old != nil || string(out) != orig+"\nLABEL=my\\040data\t/srv/my\\040data\txfs\tdefaults\t0\t0\n" {
		t.Fatalf("add: %q", out)
	}
	if e, ok := ParseFstabLine("LABEL=my\\040data\t/srv/my\\040data\txfs\tdefaults\t0\t0"); !ok || e.Device != "LABEL=my data" || e.Path != "/srv/my data" {
		t.Fatalf("parse: %+v", e)
	}
}

// TestSignatureDescribe names what a device holds, for a refusal.
func TestSignatureDescribe(t *testing.T) {
	for out, want := range map[string]string{
		"DEVNAME=/dev/sdb\nUUID=0f3e\nLABEL=data\nTYPE=xfs\nUSAGE=filesystem\n": "an xfs filesystem (label data, UUID 0f3e)",
		"UUID=G5QV6A\nVERSION=LVM2\\ 001\nTYPE=LVM2_member\nUSAGE=raid\n":       "an LVM physical volume (UUID G5QV6A)",
		"PTUUID=7a3c\nPTTYPE=gpt\n":                                              "a gpt partition table",
		"UUID=1\nTYPE=swap\nUSAGE=other\n":                                       "a swap area (UUID 1)",
		"UUID=2\nTYPE=crypto_LUKS\nUSAGE=crypto\n":                               "a LUKS encrypted volume (UUID 2)",
		"UUID=3\nLABEL=web1:0\nTYPE=linux_raid_member\nUSAGE=raid\nPTTYPE=dos\n": "a RAID member (mdadm) (label web1:0, UUID 3, and a dos partition table)",
		"UUID=4\nTYPE=btrfs\n":                                                   "a btrfs filesystem (UUID 4)",
	} {
		if got := ParseBlkidExport(out).Describe(); got != want {
			t.Errorf("%q: %q, want %q", out, got, want)
		}
	}
	if !ParseBlkidExport("").Empty() || (Signature{Ambivalent: true}).Empty() {
		t.Error("Empty")
	}
}
