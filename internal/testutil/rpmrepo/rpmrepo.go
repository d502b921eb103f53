// Package rpmrepo builds RPM packages and a dnf/yum repository for tests
// (rpmbuild and createrepo_c, as RPM distributions' own tooling does),
// serves it on loopback, and makes RHEL-like install roots for the host's
// rpm and dnf to act on (system.RPM's host-tool mode), so the agent's
// yum modules install real packages with no network and no RPM machine.
//
// rpmbuild, rpm, dnf and createrepo_c are Debian packages (CI installs
// them). Without them tests skip, unless OPSAGENT_REQUIRE_RIGS is set,
// where they fail.
package rpmrepo

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/fileserver"
	"github.com/visualops/opsagent/internal/testutil/testcache"
)

// Package is one .rpm to build (noarch).
type Package struct {
	Name    string
	Version string // e.g. "1.0"
	Release string // default "1"
	Epoch   int    // 0: none
	// Requires is the Requires: line, "" for none.
	Requires string
	// Files maps an absolute path in the package to its content; a path
	// under /etc/ is a %config(noreplace) file, one under /usr/bin/ is
	// executable.
	Files map[string]string
}

// FileName is the package's file name as rpmbuild writes it.
func (p Package) FileName() string {
	return fmt.Sprintf("%s-%s-%s.noarch.rpm", p.Name, p.Version, p.release())
}

// EVR is the package's [epoch:]version-release as rpm -q prints it.
func (p Package) EVR() string {
	evr := p.Version + "-" + p.release()
	if p.Epoch > 0 {
		evr = fmt.Sprintf("%d:%s", p.Epoch, evr)
	}
	return evr
}

func (p Package) release() string {
	if p.Release == "" {
		return "1"
	}
	return p.Release
}

// Need skips the test when the tools are missing (fails it when
// OPSAGENT_REQUIRE_RIGS is set), and when the test cannot act as root on
// an install root.
func Need(tb testing.TB) {
	tb.Helper()
	why := ""
	for _, tool := range []string{"rpmbuild", "rpm", "dnf", "createrepo_c"} {
		if _, err := exec.LookPath(tool); err != nil {
			why = tool + " is not installed (apt-get install rpm dnf createrepo-c)"
			break
		}
	}
	if why == "" && os.Geteuid() != 0 {
		why = "needs root (package installs into an install root)"
	}
	if why != "" {
		if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
			tb.Fatalf("rpmrepo: %s (OPSAGENT_REQUIRE_RIGS is set)", why)
		}
		tb.Skipf("rpmrepo: %s", why)
	}
}

// Repo is a repository (repodata by createrepo_c) in a directory.
type Repo struct {
	Dir string
	url string
	// Requests counts the HTTP requests served (metadata, packages).
	Requests atomic.Int64
}

// New returns an empty repository in a temporary directory.
func New(tb testing.TB) *Repo {
	tb.Helper()
	Need(tb)
	r := &Repo{Dir: tb.TempDir()}
	r.index(tb)
	return r
}

// Add builds the packages into the repository and re-indexes it.
func (r *Repo) Add(tb testing.TB, pkgs ...Package) {
	tb.Helper()
	for _, p := range pkgs {
		copyFile(tb, Build(tb, p), filepath.Join(r.Dir, p.FileName()))
	}
	r.index(tb)
}

// Remove takes a package version out of the repository and re-indexes it.
func (r *Repo) Remove(tb testing.TB, p Package) {
	tb.Helper()
	if err := os.Remove(filepath.Join(r.Dir, p.FileName())); err != nil {
		tb.Fatal(err)
	}
	r.index(tb)
}

func (r *Repo) index(tb testing.TB) {
	tb.Helper()
	if out, err := exec.Command("createrepo_c", "-q", "--update", r.Dir).CombinedOutput(); err != nil {
		tb.Fatalf("rpmrepo: createrepo_c: %v: %s", err, out)
	}
}

// Serve serves the repository on loopback until the test ends and
// returns its URL.
func (r *Repo) Serve(tb testing.TB) string {
	tb.Helper()
	if r.url != "" {
		return r.url
	}
	files := fileserver.Fresh(r.Dir)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.Requests.Add(1)
		files.ServeHTTP(w, req)
	}))
	tb.Cleanup(srv.Close)
	r.url = srv.URL
	return r.url
}

// RepoFile is the .repo file content that points dnf at the served
// repository under the id; gpgcheck on asks for signed packages.
func (r *Repo) RepoFile(tb testing.TB, id string, gpgcheck bool) string {
	tb.Helper()
	check := 0
	if gpgcheck {
		check = 1
	}
	// metadata_expire=0 is not set: the repository's metadata is cached
	// as on a real machine, and tests that need a fresh view ask for it
	// the way the agent does.
	return fmt.Sprintf("[%s]\nname=%s (opsagent tests)\nbaseurl=%s\ngpgcheck=%d\nenabled=1\n", id, id, r.Serve(tb), check)
}

// Use writes root's /etc/yum.repos.d/ID.repo for the served repository.
func (r *Repo) Use(tb testing.TB, root, id string, gpgcheck bool) {
	tb.Helper()
	writeFile(tb, filepath.Join(root, "etc/yum.repos.d", id+".repo"), r.RepoFile(tb, id, gpgcheck), 0o644)
}

// OSRelease is the os-release of the install roots: RHEL 9.
const OSRelease = `NAME="Red Hat Enterprise Linux"
VERSION="9.4 (Plow)"
ID="rhel"
ID_LIKE="fedora"
VERSION_ID="9.4"
PRETTY_NAME="Red Hat Enterprise Linux 9.4 (opsagent test root)"
`

// NewRoot returns an empty RHEL 9 install root: os-release, an empty
// rpm database (made by the host's rpm, which is what will act on it)
// and /etc/yum.repos.d. It holds no rpm or dnf of its own, so the
// agent's system layer drives the host's against it.
func NewRoot(tb testing.TB) string {
	tb.Helper()
	Need(tb)
	root := filepath.Join(tb.TempDir(), "root")
	writeFile(tb, filepath.Join(root, "etc/os-release"), OSRelease, 0o644)
	if err := os.MkdirAll(filepath.Join(root, "etc/yum.repos.d"), 0o755); err != nil {
		tb.Fatal(err)
	}
	if out, err := exec.Command("rpm", "--root", root, "--initdb").CombinedOutput(); err != nil {
		tb.Fatalf("rpmrepo: rpm --initdb: %v: %s", err, out)
	}
	return root
}

// Installed returns what rpm says is installed in root: name → EVR.
func Installed(tb testing.TB, root string) map[string]string {
	tb.Helper()
	out, err := exec.Command("rpm", "--root", root, "-qa", "--qf", `%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n`).Output()
	if err != nil {
		tb.Fatalf("rpmrepo: rpm -qa: %v", err)
	}
	got := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if name, evr, ok := strings.Cut(line, " "); ok {
			got[name] = evr
		}
	}
	return got
}

// Build builds the package (once: built packages are cached by their
// spec under the test cache directory) and returns the .rpm's path.
func Build(tb testing.TB, p Package) string {
	tb.Helper()
	Need(tb)
	spec := p.spec()
	sum := sha256.Sum256([]byte(spec))
	dir := filepath.Join(testcache.Dir(), "rpms", hex.EncodeToString(sum[:8]))
	out := filepath.Join(dir, p.FileName())
	if _, err := os.Stat(out); err == nil {
		return out
	}
	top := tb.TempDir()
	writeFile(tb, filepath.Join(top, "SPECS", p.Name+".spec"), spec, 0o644)
	cmd := exec.Command("rpmbuild", "--quiet",
		"--define", "_topdir "+top,
		// Nothing to strip, compress or link: building stays under a second.
		"--define", "__os_install_post %{nil}",
		"--define", "debug_package %{nil}",
		"--define", "_build_id_links none",
		"-bb", filepath.Join(top, "SPECS", p.Name+".spec"))
	if b, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("rpmrepo: rpmbuild %s: %v: %s", p.Name, err, b)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	// Renamed into place, so a concurrent test process never sees half.
	tmp := out + fmt.Sprintf(".%d", os.Getpid())
	copyFile(tb, filepath.Join(top, "RPMS", "noarch", p.FileName()), tmp)
	if err := os.Rename(tmp, out); err != nil {
		tb.Fatal(err)
	}
	return out
}

func (p Package) spec() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Name: %s\nVersion: %s\nRelease: %s\n", p.Name, p.Version, p.release())
	if p.Epoch > 0 {
		fmt.Fprintf(&b, "Epoch: %d\n", p.Epoch)
	}
	fmt.Fprintf(&b, "Summary: test package %s\nLicense: MIT\nBuildArch: noarch\n", p.Name)
	if p.Requires != "" {
		fmt.Fprintf(&b, "Requires: %s\n", p.Requires)
	}
	fmt.Fprintf(&b, "\n%%description\nopsagent test package %s %s\n\n%%install\n", p.Name, p.EVR())
	paths := make([]string, 0, len(p.Files))
	for path := range p.Files {
		paths = append(paths, path)
	}
	sort.Strings(paths)
	for _, path := range paths {
		// The content goes through a quoted here-document: no expansion.
		fmt.Fprintf(&b, "mkdir -p %%{buildroot}%s\ncat > %%{buildroot}%s <<'OPSAGENT_EOF'\n%s\nOPSAGENT_EOF\n", filepath.Dir(path), path, strings.TrimSuffix(p.Files[path], "\n"))
		if strings.HasPrefix(path, "/usr/bin/") {
			fmt.Fprintf(&b, "chmod 0755 %%{buildroot}%s\n", path)
		}
	}
	b.WriteString("\n%files\n")
	for _, path := range paths {
		if strings.HasPrefix(path, "/etc/") {
			fmt.Fprintf(&b, "%%config(noreplace) %s\n", path)
		} else {
			fmt.Fprintf(&b, "%s\n", path)
		}
	}
	return b.String()
}

func writeFile(tb testing.TB, path, content string, mode os.FileMode) {
	tb.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		tb.Fatal(err)
	}
}

func copyFile(tb testing.TB, from, to string) {
	tb.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		tb.Fatal(err)
	}
	writeFile(tb, to, string(data), 0o644)
}

// Key is an OpenPGP key pair made by the test with gpg.
type Key struct {
	// Public is the ASCII-armoured public key; PublicBinary the same
	// key unarmoured.
	Public, PublicBinary []byte
	// Fingerprint is gpg's (40 upper-case hex digits).
	Fingerprint string
}

// NewKey generates an RSA signing key with gpg in a temporary home (its
// agent is stopped when the test ends). It skips the test when gpg is
// not installed (fails it when OPSAGENT_REQUIRE_RIGS is set).
func NewKey(tb testing.TB, uid string) Key {
	tb.Helper()
	if _, err := exec.LookPath("gpg"); err != nil {
		if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
			tb.Fatal("rpmrepo: gpg is not installed (OPSAGENT_REQUIRE_RIGS is set)")
		}
		tb.Skip("rpmrepo: gpg is not installed (apt-get install gpg)")
	}
	home, err := os.MkdirTemp("", "opsagent-gpg-")
	if err != nil {
		tb.Fatal(err)
	}
	gpg := func(args ...string) []byte {
		tb.Helper()
		cmd := exec.Command("gpg", append([]string{"--batch", "--quiet", "--homedir", home}, args...)...)
		out, err := cmd.Output()
		if err != nil {
			tb.Fatalf("rpmrepo: gpg %s: %v", strings.Join(args, " "), err)
		}
		return out
	}
	tb.Cleanup(func() {
		_ = exec.Command("gpgconf", "--homedir", home, "--kill", "gpg-agent").Run()
		_ = os.RemoveAll(home)
	})
	gpg("--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key", uid, "rsa2048", "sign", "never")
	k := Key{Public: gpg("--armor", "--export"), PublicBinary: gpg("--export")}
	for _, line := range strings.Split(string(gpg("--with-colons", "--fingerprint")), "\n") {
		if f := strings.Split(line, ":"); len(f) > 9 && f[0] == "fpr" {
			k.Fingerprint = f[9]
			break
		}
	}
	if k.Fingerprint == "" {
		tb.Fatal("rpmrepo: gpg printed no fingerprint")
	}
	return k
}
