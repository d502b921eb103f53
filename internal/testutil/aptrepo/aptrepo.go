// Package aptrepo builds Debian packages and an apt repository for tests
// (dpkg-deb and dpkg-scanpackages, as Debian's own tooling does) and
// serves it on loopback, so the agent's apt modules install real packages
// into a test root with no network.
package aptrepo

import (
	"crypto/sha256"
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
	"time"

	"github.com/visualops/opsagent/internal/testutil/fileserver"
)

// Package is one .deb to build.
type Package struct {
	Name    string
	Version string // Debian version, e.g. "1.0-1"
	Depends string // the Depends field, "" for none
	// Provides is the Provides field (virtual packages), "" for none.
	Provides string
	// Files maps an absolute path in the package to its content; a path
	// under /etc/init.d/ or /usr/bin/, /usr/sbin/ is made executable.
	Files map[string]string
	// Scripts maps a maintainer script name (postinst, prerm, …) to its
	// body (a shell script).
	Scripts map[string]string
}

// Repo is a flat apt repository ("deb URL ./") in a directory.
type Repo struct {
	Dir string
	// Suite, when set before the first Add, gives the repository a
	// Release file naming it (Suite and Codename), so that apt can
	// target it by name (apt-get -t SUITE).
	Suite string
	url   string
	// Requests counts the HTTP requests served (index fetches, downloads).
	Requests atomic.Int64
}

// New returns an empty repository in a temporary directory.
func New(tb testing.TB) *Repo {
	tb.Helper()
	for _, tool := range []string{"dpkg-deb", "dpkg-scanpackages"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
				tb.Fatalf("aptrepo: %s is not installed (apt-get install dpkg-dev; OPSAGENT_REQUIRE_RIGS is set)", tool)
			}
			tb.Skipf("aptrepo: %s is not installed (apt-get install dpkg-dev)", tool)
		}
	}
	return &Repo{Dir: tb.TempDir()}
}

// Add builds the packages into the repository and re-indexes it.
func (r *Repo) Add(tb testing.TB, pkgs ...Package) {
	tb.Helper()
	for _, p := range pkgs {
		r.build(tb, p)
	}
	r.Index(tb)
}

// Remove deletes a built package version from the repository and
// re-indexes it.
func (r *Repo) Remove(tb testing.TB, name, version string) {
	tb.Helper()
	if err := os.Remove(filepath.Join(r.Dir, debName(name, version))); err != nil {
		tb.Fatal(err)
	}
	r.Index(tb)
}

func debName(name, version string) string {
	return fmt.Sprintf("%s_%s_all.deb", name, strings.ReplaceAll(version, ":", "%3a"))
}

func (r *Repo) build(tb testing.TB, p Package) {
	tb.Helper()
	tree := tb.TempDir()
	control := fmt.Sprintf("Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: opsagent tests <tests@example.invalid>\nDescription: test package %s\n", p.Name, p.Version, p.Name)
	if p.Depends != "" {
		control += "Depends: " + p.Depends + "\n"
	}
	if p.Provides != "" {
		control += "Provides: " + p.Provides + "\n"
	}
	write := func(rel, content string, mode os.FileMode) {
		full := filepath.Join(tree, rel)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), mode); err != nil {
			tb.Fatal(err)
		}
	}
	write("DEBIAN/control", control, 0o644)
	var conffiles []string
	for path, content := range p.Files {
		mode := os.FileMode(0o644)
		if strings.HasPrefix(path, "/etc/init.d/") || strings.HasPrefix(path, "/usr/bin/") || strings.HasPrefix(path, "/usr/sbin/") {
			mode = 0o755
		}
		if strings.HasPrefix(path, "/etc/") {
			conffiles = append(conffiles, path)
		}
		write(strings.TrimPrefix(path, "/"), content, mode)
	}
	if len(conffiles) > 0 {
		sort.Strings(conffiles)
		write("DEBIAN/conffiles", strings.Join(conffiles, "\n")+"\n", 0o644)
	}
	for name, body := range p.Scripts {
		write("DEBIAN/"+name, body, 0o755)
	}
	out := filepath.Join(r.Dir, debName(p.Name, p.Version))
	if b, err := exec.Command("dpkg-deb", "--root-owner-group", "-Zgzip", "-b", tree, out).CombinedOutput(); err != nil {
		tb.Fatalf("aptrepo: dpkg-deb %s: %v: %s", p.Name, err, b)
	}
}

// Index writes the Packages file. -m keeps every version of a package
// (without it only the newest is indexed, and a pinned older version has
// no candidate).
func (r *Repo) Index(tb testing.TB) {
	tb.Helper()
	cmd := exec.Command("dpkg-scanpackages", "-m", ".", "/dev/null")
	cmd.Dir = r.Dir
	out, err := cmd.Output()
	if err != nil {
		tb.Fatalf("aptrepo: dpkg-scanpackages: %v", err)
	}
	if err := os.WriteFile(filepath.Join(r.Dir, "Packages"), out, 0o644); err != nil {
		tb.Fatal(err)
	}
	if r.Suite != "" {
		// Unsigned, which the sources line's trusted=yes accepts; apt
		// needs the index's hash in it.
		sum := sha256.Sum256(out)
		release := fmt.Sprintf("Suite: %s\nCodename: %s\nDate: %s\nSHA256:\n %x %d Packages\n",
			r.Suite, r.Suite, time.Now().UTC().Format(time.RFC1123), sum, len(out))
		if err := os.WriteFile(filepath.Join(r.Dir, "Release"), []byte(release), 0o644); err != nil {
			tb.Fatal(err)
		}
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

// Use points root's apt at the served repository (and at nothing else:
// the root's sources list is replaced), trusted without a signature.
func (r *Repo) Use(tb testing.TB, root string) {
	tb.Helper()
	url := r.Serve(tb)
	list := filepath.Join(root, "etc/apt/sources.list.d/opsagent-test.list")
	if err := os.MkdirAll(filepath.Dir(list), 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(list, []byte("deb [trusted=yes] "+url+" ./\n"), 0o644); err != nil {
		tb.Fatal(err)
	}
}
