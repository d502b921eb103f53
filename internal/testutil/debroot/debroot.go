// Package debroot gives tests a real Debian 12 root to run the agent's
// system tools in: apt-get, dpkg, useradd, crontab and init scripts run
// chrooted into it, never on the machine running the test.
//
// The base root is made once with debootstrap (minbase, bookworm) and
// cached under the user's cache directory; each test gets its own copy as
// an overlay mount on that base (a plain copy where overlayfs is not
// available), with /proc mounted as on a running system. Packages a test
// may need as prerequisites (cron, …) are downloaded into the cache when
// it is built, and served to the root from a local repository by the
// test: once built, nothing here reaches the network, and the root's own
// sources list is removed so that nothing in it can either.
//
// Building needs root, debootstrap and Debian's mirror
// (OPSAGENT_DEBIAN_MIRROR, default http://deb.debian.org/debian). Without
// them tests skip, unless OPSAGENT_REQUIRE_RIGS is set (CI), where they
// fail.
package debroot

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/testcache"
	"github.com/visualops/opsagent/internal/testutil/wait"
)

// Suite is the Debian release of the base root.
const Suite = "bookworm"

// Extras are the packages downloaded (not installed) with the base, for
// tests that install them as a module's prerequisite from a local
// repository: the tools the catalogue's modules need that a minimal
// Debian lacks. Changing the list rebuilds the cache.
var Extras = []string{
	"cron",                           // linux.cronjob
	"git", "mercurial", "subversion", // common.git, common.hg, common.svn
	"python3-pip", "python3-venv", "ruby", "npm", // common.pip.package, common.virtualenv, common.gem.package, common.npm.package
	"supervisor",                       // linux.supervisord
	"openssh-client", "openssh-server", // common.git over ssh: the client git runs, and a test's server
	"xfsprogs", "lvm2", "mdadm", // linux.mkfs (xfs), linux.lvm.*, linux.raid
	"puppet", // linux.puppet.*
}

// Base is the cached base root: its directory (never modify it) and the
// directory of the extra packages' .deb files, indexed (see UseExtras).
type Base struct {
	Root string
	Debs string
}

// Need skips the test when the rig cannot run here (not root, no
// debootstrap), or fails it when OPSAGENT_REQUIRE_RIGS is set.
func Need(tb testing.TB) {
	tb.Helper()
	if why := unavailable(); why != "" {
		if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
			tb.Fatalf("debroot: %s (OPSAGENT_REQUIRE_RIGS is set)", why)
		}
		tb.Skipf("debroot: %s", why)
	}
}

func unavailable() string {
	if os.Geteuid() != 0 {
		return "needs root (chroot, mounts)"
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		if _, err := os.Stat(testcache.Dir()); err != nil {
			return "debootstrap is not installed (apt-get install debootstrap)"
		}
	}
	return ""
}

// key names a cache entry by what it was built from.
func key() string {
	sum := sha256.Sum256([]byte(Suite + "\n" + strings.Join(Extras, ",") + "\nv3"))
	return "debian-" + Suite + "-" + hex.EncodeToString(sum[:6])
}

// Cached returns the base root, building it first if needed (minutes: a
// debootstrap). Concurrent test processes build it once, under a lock.
func Cached(tb testing.TB) Base {
	tb.Helper()
	Need(tb)
	dir := filepath.Join(testcache.Dir(), key())
	b := Base{Root: filepath.Join(dir, "root"), Debs: filepath.Join(dir, "debs")}
	if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
		return b
	}
	if err := os.MkdirAll(testcache.Dir(), 0o755); err != nil {
		tb.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(testcache.Dir(), key()+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		tb.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
		return b // another process built it while we waited
	}
	start := time.Now()
	if err := build(dir); err != nil {
		tb.Fatalf("debroot: building the Debian %s root: %v", Suite, err)
	}
	tb.Logf("debroot: built the Debian %s base root in %v (cached in %s)", Suite, time.Since(start).Round(time.Second), dir)
	return b
}

func build(dir string) error {
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return errors.New("debootstrap is not installed (apt-get install debootstrap)")
	}
	_ = os.RemoveAll(dir)
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	mirror := os.Getenv("OPSAGENT_DEBIAN_MIRROR")
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	if out, err := exec.Command("debootstrap", "--variant=minbase", Suite, root, mirror).CombinedOutput(); err != nil {
		return fmt.Errorf("debootstrap: %v: %s", err, tail(out))
	}
	// Download the extras with the root's own apt (its sources list still
	// names the mirror), then take them out of the root.
	if len(Extras) > 0 {
		if err := chrootRun(root, "apt-get", "-q", "update"); err != nil {
			return err
		}
		args := append([]string{"-q", "-y", "--download-only", "--no-install-recommends", "install"}, Extras...)
		if err := chrootRun(root, "apt-get", args...); err != nil {
			return err
		}
		debs := filepath.Join(tmp, "debs")
		if err := os.MkdirAll(debs, 0o755); err != nil {
			return err
		}
		found, _ := filepath.Glob(filepath.Join(root, "var/cache/apt/archives/*.deb"))
		if len(found) == 0 {
			return errors.New("apt-get downloaded no extra packages")
		}
		for _, f := range found {
			if err := os.Rename(f, filepath.Join(debs, filepath.Base(f))); err != nil {
				return err
			}
		}
		// Indexed once here, so a test serves them as they are.
		index := exec.Command("dpkg-scanpackages", "-m", ".", "/dev/null")
		index.Dir = debs
		out, err := index.Output()
		if err != nil {
			return fmt.Errorf("dpkg-scanpackages (apt-get install dpkg-dev): %v", err)
		}
		if err := os.WriteFile(filepath.Join(debs, "Packages"), out, 0o644); err != nil {
			return err
		}
	}
	// Offline from now on: no sources, no lists. Package installs never
	// start daemons (policy-rc.d, as Debian's own chroots do); services
	// are started by the tests through the module under test.
	for _, p := range []string{"etc/apt/sources.list", "var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"} {
		_ = os.Remove(filepath.Join(root, p))
	}
	lists, _ := filepath.Glob(filepath.Join(root, "var/lib/apt/lists/*"))
	for _, l := range lists {
		if filepath.Base(l) != "partial" && filepath.Base(l) != "lock" {
			_ = os.RemoveAll(l)
		}
	}
	// dpkg does not fsync what it unpacks: a test root is thrown away,
	// and installs take half the time (as in Debian's own build chroots).
	if err := os.WriteFile(filepath.Join(root, "etc/dpkg/dpkg.cfg.d/opsagent-test-unsafe-io"), []byte("force-unsafe-io\n"), 0o644); err != nil {
		return err
	}
	policy := "#!/bin/sh\n# debroot: package installs do not start services in test roots\nexit 101\n"
	if err := os.WriteFile(filepath.Join(root, "usr/sbin/policy-rc.d"), []byte(policy), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "ready"), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

func chrootRun(root, tool string, args ...string) error {
	cmd := exec.Command("chroot", append([]string{root, tool}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C"}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", tool, strings.Join(args, " "), err, tail(out))
	}
	return nil
}

func tail(out []byte) string {
	out = bytes.TrimSpace(out)
	if len(out) > 2000 {
		out = out[len(out)-2000:]
	}
	return string(out)
}

// UseExtras serves the cached extra packages (Extras, with their
// dependencies) on loopback until the test ends and adds them to root's
// apt sources, so that a module's prerequisite installs from them. It
// returns a counter of the requests served.
func UseExtras(tb testing.TB, root string) *atomic.Int64 {
	tb.Helper()
	b := Cached(tb)
	var requests atomic.Int64
	files := http.FileServer(http.Dir(b.Debs))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		files.ServeHTTP(w, r)
	}))
	tb.Cleanup(srv.Close)
	list := filepath.Join(root, "etc/apt/sources.list.d/opsagent-extras.list")
	if err := os.WriteFile(list, []byte("deb [trusted=yes] "+srv.URL+" ./\n"), 0o644); err != nil {
		tb.Fatal(err)
	}
	return &requests
}

// New returns a fresh Debian root for the test (a host path): an overlay
// on the cached base with /proc mounted. Everything the test started in
// it is killed and everything it wrote is removed when the test ends.
func New(tb testing.TB) string {
	tb.Helper()
	base := Cached(tb).Root
	return newOn(tb, base, base)
}

// newOn mounts a fresh root on the lower layers (overlayfs's lowerdir
// list, top first); copyFrom is the directory to copy instead where
// overlayfs is not available ("" to fail then).
func newOn(tb testing.TB, lowers, copyFrom string) string {
	tb.Helper()
	// Daemons the test starts in the root must trap SIGHUP (their
	// reload) even when the test runs under nohup, as the agent does.
	proc.PassSIGHUPToChildren()
	work := tb.TempDir()
	root := filepath.Join(work, "root")
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.MkdirAll(filepath.Join(work, d), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lowers, filepath.Join(work, "upper"), filepath.Join(work, "work"))
	overlay := unix.Mount("overlay", root, "overlay", 0, opts) == nil
	if !overlay {
		if copyFrom == "" {
			tb.Fatalf("debroot: overlayfs is not available to mount %s", lowers)
		}
		if out, err := exec.Command("cp", "-a", copyFrom+"/.", root).CombinedOutput(); err != nil {
			tb.Fatalf("debroot: copy the base root: %v: %s", err, out)
		}
	}
	procMounted := unix.Mount("proc", filepath.Join(root, "proc"), "proc", 0, "") == nil
	tb.Cleanup(func() {
		KillInside(root)
		if procMounted {
			_ = unix.Unmount(filepath.Join(root, "proc"), unix.MNT_DETACH)
		}
		if overlay {
			_ = unix.Unmount(root, unix.MNT_DETACH)
		}
	})
	return root
}

// NewWith returns a fresh root, as New does, with pkgs (of Extras, or
// their dependencies) already installed: for tests whose subject is not
// the install, such as a server the test runs in the root or a tool the
// module under test needs. The installed packages are a layer cached
// once per package list on top of the base (an overlay's upper
// directory), so that each test pays for a mount, not an install. Where
// overlayfs is not available the packages are installed in each root.
func NewWith(tb testing.TB, pkgs ...string) string {
	tb.Helper()
	base := Cached(tb)
	sorted := append([]string(nil), pkgs...)
	sort.Strings(sorted)
	sum := sha256.Sum256([]byte(strings.Join(sorted, ",")))
	dir := filepath.Join(testcache.Dir(), key()+"-with-"+hex.EncodeToString(sum[:6]))
	layer := filepath.Join(dir, "upper")
	if _, err := os.Stat(filepath.Join(dir, "ready")); err != nil {
		if err := buildLayer(tb, base, dir, sorted); err != nil {
			if !errors.Is(err, errNoOverlay) {
				tb.Fatalf("debroot: installing %v in a layer: %v", sorted, err)
			}
			root := New(tb)
			installExtras(tb, root, sorted)
			return root
		}
	}
	return newOn(tb, layer+":"+base.Root, "")
}

var errNoOverlay = errors.New("overlayfs is not available")

// buildLayer installs pkgs from the extras into an overlay on the base
// and keeps its upper directory as dir/upper, under a lock shared with
// other test processes.
func buildLayer(tb testing.TB, base Base, dir string, pkgs []string) error {
	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
		return nil
	}
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.MkdirAll(filepath.Join(tmp, d), 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", base.Root, filepath.Join(tmp, "upper"), filepath.Join(tmp, "work"))
	if err := unix.Mount("overlay", root, "overlay", 0, opts); err != nil {
		return errNoOverlay
	}
	mounted := true
	defer func() {
		if mounted {
			KillInside(root)
			_ = unix.Unmount(filepath.Join(root, "proc"), unix.MNT_DETACH)
			_ = unix.Unmount(root, unix.MNT_DETACH)
		}
	}()
	if err := unix.Mount("proc", filepath.Join(root, "proc"), "proc", 0, ""); err != nil {
		return err
	}
	start := time.Now()
	installExtras(tb, root, pkgs)
	// Offline again: no list naming the test's server, no fetched index.
	_ = os.Remove(filepath.Join(root, "etc/apt/sources.list.d/opsagent-extras.list"))
	lists, _ := filepath.Glob(filepath.Join(root, "var/lib/apt/lists/*"))
	for _, l := range lists {
		if filepath.Base(l) != "partial" && filepath.Base(l) != "lock" {
			_ = os.RemoveAll(l)
		}
	}
	for _, p := range []string{"var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"} {
		_ = os.Remove(filepath.Join(root, p))
	}
	KillInside(root)
	_ = unix.Unmount(filepath.Join(root, "proc"), unix.MNT_DETACH)
	if err := unix.Unmount(root, 0); err != nil {
		return err
	}
	mounted = false
	_ = os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(tmp, "upper"), filepath.Join(dir, "upper")); err != nil {
		return err
	}
	_ = os.RemoveAll(tmp)
	tb.Logf("debroot: installed %v in a cached layer in %v (%s)", pkgs, time.Since(start).Round(time.Second), dir)
	return os.WriteFile(filepath.Join(dir, "ready"), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644)
}

// installExtras installs pkgs into root from the cached extras.
func installExtras(tb testing.TB, root string, pkgs []string) {
	tb.Helper()
	UseExtras(tb, root)
	if err := chrootRun(root, "apt-get", "-q", "update"); err != nil {
		tb.Fatal(err)
	}
	if err := chrootRun(root, "apt-get", append([]string{"-q", "-y", "install", "--"}, pkgs...)...); err != nil {
		tb.Fatal(err)
	}
}

// KillInside kills every process whose root directory is root or below
// it: the daemons a test started through init scripts in its root.
func KillInside(root string) {
	for range 3 {
		pids := Inside(root)
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Inside lists the processes whose root directory is root or below it.
func Inside(root string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		r, err := os.Readlink(filepath.Join("/proc", e.Name(), "root"))
		if err != nil {
			continue
		}
		if r == root || strings.HasPrefix(r, root+"/") {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// StartDaemon runs argv chrooted into root (a server a test needs inside
// the instance's system: sshd, svnserve, hg serve) with env, stops it when
// the test ends (showing its output if the test failed), and returns once
// it accepts connections on addr.
func StartDaemon(tb testing.TB, root string, env []string, addr string, argv ...string) {
	tb.Helper()
	var out bytes.Buffer
	cmd := exec.Command("chroot", append([]string{root}, argv...)...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		tb.Fatalf("%s: %v", argv[0], err)
	}
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if tb.Failed() {
			tb.Logf("%s output:\n%s", argv[0], out.String())
		}
	})
	wait.Eventually(tb, argv[0]+" listening on "+addr, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}
