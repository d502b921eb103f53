// Package loopdev gives tests real block devices: file-backed loop
// devices whose node is made inside a test root (mknod with the loop's
// device number), so that the storage modules format, probe and mount a
// real device there and nothing of the host's. Every loop device is
// detached, and everything mounted from it unmounted, when the test ends,
// failed or not.
package loopdev

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Dev is one loop device.
type Dev struct {
	Host    string // the host's node, /dev/loopN
	Path    string // its node inside the root, /dev/<name>
	Backing string // the backing file
	Rdev    uint64
}

// Need skips the test when loop devices cannot be made here (not root,
// no losetup), or fails it when OPSAGENT_REQUIRE_RIGS is set.
func Need(tb testing.TB) {
	tb.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root (losetup, mknod, mount)"
	} else if _, err := exec.LookPath("losetup"); err != nil {
		why = "losetup is not installed (util-linux)"
	} else if _, err := os.Stat("/dev/loop-control"); err != nil {
		why = "the kernel offers no loop devices (/dev/loop-control)"
	}
	if why == "" {
		return
	}
	if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
		tb.Fatalf("loopdev: %s (OPSAGENT_REQUIRE_RIGS is set)", why)
	}
	tb.Skipf("loopdev: %s", why)
}

// New makes a loop device of size bytes (zeros: no signature) backed by a
// file in the test's temporary directory, and its node at /dev/<name>
// (and /dev/loopN) inside root.
func New(tb testing.TB, root, name string, size int64) Dev {
	tb.Helper()
	Need(tb)
	sysfs(tb, root)
	backing := filepath.Join(tb.TempDir(), name+".img")
	f, err := os.Create(backing)
	if err != nil {
		tb.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		tb.Fatal(err)
	}
	f.Close()
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		tb.Fatalf("losetup --find --show %s: %v: %s", backing, err, out)
	}
	host := strings.TrimSpace(string(out))
	var st unix.Stat_t
	if err := unix.Stat(host, &st); err != nil {
		detach(host)
		tb.Fatal(err)
	}
	d := Dev{Host: host, Path: "/dev/" + name, Backing: backing, Rdev: st.Rdev}
	tb.Cleanup(func() {
		UnmountAll(tb, d)
		if err := detach(host); err != nil {
			tb.Errorf("loopdev: detach %s: %v", host, err)
		}
	})
	// The node under the test's name, and under the kernel's (which is
	// the one blkid finds when it scans for LABEL= or UUID=), as a
	// machine has both /dev/xvdf and what it is.
	for _, n := range []string{name, filepath.Base(host)} {
		node := filepath.Join(root, "dev", n)
		_ = os.Remove(node)
		if err := unix.Mknod(node, unix.S_IFBLK|0o660, int(st.Rdev)); err != nil {
			tb.Fatalf("loopdev: mknod %s: %v", node, err)
		}
	}
	return d
}

func detach(host string) error {
	out, err := exec.Command("losetup", "-d", host).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Mounts lists the host mount points of d (from the agent's mount table).
func Mounts(tb testing.TB, d Dev) []string {
	tb.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		tb.Fatal(err)
	}
	want := fmt.Sprintf("%d:%d", unix.Major(d.Rdev), unix.Minor(d.Rdev))
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[2] == want {
			out = append(out, strings.ReplaceAll(f[4], `\040`, " "))
		}
	}
	return out
}

// UnmountAll unmounts every mount of d, the last first.
func UnmountAll(tb testing.TB, d Dev) {
	ms := Mounts(tb, d)
	for i := len(ms) - 1; i >= 0; i-- {
		if err := unix.Unmount(ms[i], 0); err != nil {
			_ = unix.Unmount(ms[i], unix.MNT_DETACH)
		}
	}
}

// WithMounted mounts d (its filesystem detected by the kernel) on a
// temporary host directory, runs fn with that directory, and unmounts it.
func WithMounted(tb testing.TB, d Dev, fstype string, fn func(dir string)) {
	tb.Helper()
	dir := tb.TempDir()
	if err := unix.Mount(d.Host, dir, fstype, 0, ""); err != nil {
		tb.Fatalf("loopdev: mount %s (%s) on %s: %v", d.Host, fstype, dir, err)
	}
	defer func() {
		if err := unix.Unmount(dir, 0); err != nil {
			tb.Errorf("loopdev: unmount %s: %v", dir, err)
		}
	}()
	fn(dir)
}

// WriteMarker formats nothing: it writes a marker file into d's existing
// filesystem, to find it again after a state that must not destroy it.
func WriteMarker(tb testing.TB, d Dev, fstype, content string) {
	tb.Helper()
	WithMounted(tb, d, fstype, func(dir string) {
		if err := os.WriteFile(filepath.Join(dir, "marker"), []byte(content), 0o644); err != nil {
			tb.Fatal(err)
		}
	})
}

// ReadMarker mounts d again and returns the marker's content ("" with an
// error reported when it is gone).
func ReadMarker(tb testing.TB, d Dev, fstype string) string {
	tb.Helper()
	var got string
	WithMounted(tb, d, fstype, func(dir string) {
		b, err := os.ReadFile(filepath.Join(dir, "marker"))
		if err != nil {
			tb.Errorf("loopdev: the marker on %s is gone: %v", d.Host, err)
			return
		}
		got = string(b)
	})
	return got
}

// Format makes a filesystem on d with the host's mkfs (test setup only).
func Format(tb testing.TB, d Dev, fstype string, args ...string) {
	tb.Helper()
	out, err := exec.Command("mkfs."+fstype, append(args, d.Host)...).CombinedOutput()
	if err != nil {
		tb.Fatalf("loopdev: mkfs.%s %s: %v: %s", fstype, d.Host, err, out)
	}
}

// sysfs mounts /sys in root (once) until the test ends: blkid finds a
// loop device by LABEL= or UUID= only when it can read the device's
// entry there, as it can on a running system.
func sysfs(tb testing.TB, root string) {
	tb.Helper()
	dir := filepath.Join(root, "sys")
	var st, parent unix.Stat_t
	if unix.Stat(dir, &st) != nil || unix.Stat(root, &parent) != nil {
		return
	}
	if st.Dev != parent.Dev {
		return // already a mount point
	}
	if err := unix.Mount("sysfs", dir, "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		tb.Logf("loopdev: mount sysfs in %s: %v (LABEL= and UUID= lookups will fail there)", root, err)
		return
	}
	tb.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
}
