package native

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/testutil/aptrepo"
)

// hellod is the test package: two versions in the repository (a
// conffile, so that purge has something remove leaves), and a plugin that
// depends on it.
var (
	hellod1 = aptrepo.Package{Name: "hellod", Version: "1.0-1", Files: map[string]string{"/etc/hellod.conf": "v1\n", "/usr/share/hellod/version": "1.0\n"}}
	hellod2 = aptrepo.Package{Name: "hellod", Version: "2.0-1", Files: map[string]string{"/etc/hellod.conf": "v2\n", "/usr/share/hellod/version": "2.0\n"}}
	plugin  = aptrepo.Package{Name: "hellod-plugin", Version: "1.0-1", Depends: "hellod (>= 2.0)", Files: map[string]string{"/usr/share/hellod/plugin": "p\n"}}
)

// aptQuiet are the programs a round that changes nothing must not run:
// the package manager, dpkg, and debconf. apt-cache is a query (latest
// needs it every round) and is checked separately where it must not run.
var aptQuiet = []string{"apt-get", "dpkg", "debconf-set-selections", "dpkg-deb"}

// newAptRig is a Debian root whose apt uses a loopback repository with
// hellod 1.0-1 and 2.0-1 and hellod-plugin.
func newAptRig(t *testing.T) (*debianRig, *aptrepo.Repo) {
	t.Helper()
	rig := newDebianRig(t)
	repo := aptrepo.New(t)
	repo.Add(t, hellod1, hellod2, plugin)
	repo.Use(t, rig.root)
	return rig, repo
}

// dpkgStatus is the root's dpkg database, to prove check mode wrote
// nothing.
func dpkgStatus(t *testing.T, root string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, "var/lib/dpkg/status"))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// installedIn reads the root's dpkg database.
func installedIn(t *testing.T, root string) system.DpkgDB {
	t.Helper()
	return system.ParseDpkgDB(dpkgStatus(t, root))
}

// checkFirst runs the state in check mode, which must report a change
// and leave dpkg's database as it was.
func (r *debianRig) checkFirst(t *testing.T, module, param string) {
	t.Helper()
	before := dpkgStatus(t, r.root)
	res := r.apply(t, module, param, true)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "would be updated") {
		t.Fatalf("check mode of %s: %+v", param, res)
	}
	if !bytes.Equal(before, dpkgStatus(t, r.root)) {
		t.Fatalf("check mode of %s changed dpkg's database", param)
	}
}

// TestAptPackageLifecycle drives one package through every state with
// real apt-get and dpkg in a Debian root: installed (the candidate), a
// pinned older version (any revision of it), latest, a pinned exact
// version (a downgrade), removed (its conffile stays), purged (gone).
// Each converges: the second round changes nothing and runs no apt-get or
// dpkg, and the repository sees no request (no index refresh).
func TestAptPackageLifecycle(t *testing.T) {
	rig, repo := newAptRig(t)
	step := func(param, wantVersion string) {
		t.Helper()
		rig.checkFirst(t, "linux.apt.package", param)
		first := rig.converges(t, "linux.apt.package", param, aptQuiet...)
		t.Logf("%s: %s", param, first.Comment)
		db := installedIn(t, rig.root)
		if got := db.Installed["hellod"]; got != wantVersion {
			t.Fatalf("%s: hellod is %q, want %q", param, got, wantVersion)
		}
		// One more round, counting the repository's requests.
		before := repo.Requests.Load()
		if res := rig.apply(t, "linux.apt.package", param, false); !res.OK || res.Changed {
			t.Fatalf("%s: another round %+v", param, res)
		}
		if n := repo.Requests.Load() - before; n != 0 {
			t.Fatalf("%s: a round that changes nothing made %d repository requests", param, n)
		}
	}

	step(`{"name": [{"key": "hellod"}]}`, "2.0-1")
	step(`{"name": [{"key": "hellod", "value": "1.0"}]}`, "1.0-1")
	// latest queries the index each round (apt-cache), installs nothing.
	mark := rig.runs.Mark()
	step(`{"name": [{"key": "hellod", "value": "latest"}]}`, "2.0-1")
	if ran := rig.runs.Ran(mark, "apt-cache"); len(ran) == 0 {
		t.Fatal("latest never asked apt-cache for the candidate")
	}
	step(`{"name": [{"key": "hellod", "value": "1.0-1"}, {"key": "hellod-plugin", "value": "removed"}]}`, "1.0-1")
	// The plugin needs hellod >= 2.0: installing both in one run works.
	step(`{"name": [{"key": "hellod", "value": "latest"}, {"key": "hellod-plugin"}]}`, "2.0-1")
	if db := installedIn(t, rig.root); db.Installed["hellod-plugin"] != "1.0-1" {
		t.Fatalf("plugin: %v", db.Installed)
	}
	step(`{"name": [{"key": "hellod-plugin", "value": "removed"}, {"key": "hellod", "value": "removed"}]}`, "")
	db := installedIn(t, rig.root)
	if !db.Leftovers["hellod"] {
		t.Fatal("removed hellod left no configuration behind (config-files)")
	}
	if _, err := os.Stat(filepath.Join(rig.root, "etc/hellod.conf")); err != nil {
		t.Fatalf("remove took the conffile: %v", err)
	}
	step(`{"name": [{"key": "hellod", "value": "purged"}]}`, "")
	if _, err := os.Stat(filepath.Join(rig.root, "etc/hellod.conf")); !os.IsNotExist(err) {
		t.Fatalf("purge left the conffile: %v", err)
	}
	if db := installedIn(t, rig.root); db.Leftovers["hellod"] {
		t.Fatal("purged hellod is still in config-files state")
	}
}

// TestAptPackageUnknown: a version or package no repository offers fails
// naming it (and what is offered), after one index refresh; nothing is
// installed.
func TestAptPackageUnknown(t *testing.T) {
	rig, _ := newAptRig(t)
	res := rig.apply(t, "linux.apt.package", `{"name": [{"key": "hellod", "value": "9.9"}, {"key": "nosuch"}]}`, false)
	if res.OK || !strings.Contains(res.Comment, "no repository offers hellod=9.9 (offered: 2.0-1, 1.0-1), nosuch") || !strings.Contains(res.Comment, "apt-get update ran") {
		t.Fatalf("unknown: %+v", res)
	}
	if strings.Contains(res.Comment, "\n") {
		t.Fatalf("not one line: %q", res.Comment)
	}
	if db := installedIn(t, rig.root); db.Installed["hellod"] != "" {
		t.Fatal("something was installed")
	}
	// Check mode says the same would need a refresh, and refreshes nothing.
	mark := rig.runs.Mark()
	res = rig.apply(t, "linux.apt.package", `{"name": [{"key": "hellod", "value": "9.9"}]}`, true)
	if !res.OK || !strings.Contains(res.Comment, "the package index would be refreshed first") {
		t.Fatalf("check mode: %+v", res)
	}
	if ran := rig.runs.Ran(mark, "apt-get"); len(ran) > 0 {
		t.Fatalf("check mode ran %v", ran)
	}
}

// TestAptPackageFiles installs a .deb from a path in the root and from an
// http URL; the next rounds find the package installed and download
// nothing. A file holding another package than its entry names fails.
func TestAptPackageFiles(t *testing.T) {
	rig, _ := newAptRig(t)
	files := aptrepo.New(t)
	local := aptrepo.Package{Name: "localpkg", Version: "0.1", Files: map[string]string{"/usr/share/localpkg/x": "x\n"}}
	remote := aptrepo.Package{Name: "remotepkg", Version: "0.2", Files: map[string]string{"/usr/share/remotepkg/x": "x\n"}}
	files.Add(t, local, remote)
	data, err := os.ReadFile(filepath.Join(files.Dir, "localpkg_0.1_all.deb"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rig.root, "tmp/localpkg.deb"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	var downloads atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		http.ServeFile(w, r, filepath.Join(files.Dir, filepath.Base(r.URL.Path)))
	}))
	t.Cleanup(srv.Close)

	rig.checkFirst(t, "linux.apt.package", `{"name": [{"key": "localpkg", "value": "/tmp/localpkg.deb"}]}`)
	rig.converges(t, "linux.apt.package", `{"name": [{"key": "localpkg", "value": "/tmp/localpkg.deb"}]}`, aptQuiet...)
	param := `{"name": [{"key": "remotepkg", "value": "` + srv.URL + `/remotepkg_0.2_all.deb"}]}`
	rig.checkFirst(t, "linux.apt.package", param)
	if downloads.Load() != 0 {
		t.Fatal("check mode downloaded the package")
	}
	rig.converges(t, "linux.apt.package", param, aptQuiet...)
	if n := downloads.Load(); n != 1 {
		t.Fatalf("%d downloads, want 1 (the first round only)", n)
	}
	db := installedIn(t, rig.root)
	if db.Installed["localpkg"] != "0.1" || db.Installed["remotepkg"] != "0.2" {
		t.Fatalf("installed %v", db.Installed)
	}
	if left, _ := filepath.Glob(filepath.Join(rig.root, pkgCacheDir, "*")); len(left) > 0 {
		t.Fatalf("downloads left behind: %v", left)
	}
	res := rig.apply(t, "linux.apt.package", `{"name": [{"key": "otherpkg", "value": "/tmp/localpkg.deb"}]}`, false)
	if res.OK || !strings.Contains(res.Comment, "holds package localpkg, not otherpkg: name it localpkg") {
		t.Fatalf("misnamed file: %+v", res)
	}
	res = rig.apply(t, "linux.apt.package", `{"name": [{"key": "gone", "value": "/tmp/gone.deb"}]}`, false)
	if res.OK || !strings.Contains(res.Comment, "package file /tmp/gone.deb does not exist") {
		t.Fatalf("missing file: %+v", res)
	}
}

// TestAptPackageDebconf: deb-conf-file's answers are loaded before the
// install, so the package's maintainer script sees them; a round that
// installs nothing loads nothing.
func TestAptPackageDebconf(t *testing.T) {
	rig, repo := newAptRig(t)
	asker := aptrepo.Package{Name: "asker", Version: "1.0", Scripts: map[string]string{
		"templates": "Template: asker/greeting\nType: string\nDefault: hello\nDescription: greeting\n",
		"postinst":  "#!/bin/sh\nset -e\n. /usr/share/debconf/confmodule\ndb_get asker/greeting\necho \"$RET\" > /etc/asker-greeting\n",
	}}
	repo.Add(t, asker)
	if err := os.WriteFile(filepath.Join(rig.root, "tmp/answers"), []byte("asker asker/greeting string bonjour\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	param := `{"name": [{"key": "asker"}], "deb-conf-file": "/tmp/answers"}`
	rig.checkFirst(t, "linux.apt.package", param)
	rig.converges(t, "linux.apt.package", param, aptQuiet...)
	got, err := os.ReadFile(filepath.Join(rig.root, "etc/asker-greeting"))
	if err != nil || string(got) != "bonjour\n" {
		t.Fatalf("the package saw %q (%v), want the preseeded answer", got, err)
	}
	res := rig.apply(t, "linux.apt.package", `{"name": [{"key": "hellod"}], "deb-conf-file": "/tmp/nothere"}`, false)
	if res.OK || !strings.Contains(res.Comment, "deb-conf-file /tmp/nothere does not exist") {
		t.Fatalf("missing deb-conf-file: %+v", res)
	}
}

// TestAptVirtualPackage: a virtual package (one that others provide) is
// installed through its provider, and is installed once the provider is.
func TestAptVirtualPackage(t *testing.T) {
	rig, repo := newAptRig(t)
	repo.Add(t, aptrepo.Package{Name: "hello-provider", Version: "1.0", Provides: "hello-virtual"})
	res := rig.converges(t, "linux.apt.package", `{"name": [{"key": "hello-virtual"}]}`, aptQuiet...)
	if db := installedIn(t, rig.root); db.Installed["hello-provider"] != "1.0" {
		t.Fatalf("%+v: installed %v", res, db.Installed)
	}
}

// TestAptRepoThenPackage: linux.apt.repo writes the list file (rewritten
// only when its content differs), which makes the index stale, so the
// package state after it refreshes once; then nothing is fetched again.
func TestAptRepoThenPackage(t *testing.T) {
	rig := newDebianRig(t)
	repo := aptrepo.New(t)
	repo.Add(t, hellod1, hellod2)
	// The repository's index is months old, as a third-party one often
	// is: apt dates the files it fetches with it.
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(filepath.Join(repo.Dir, "Packages"), old, old); err != nil {
		t.Fatal(err)
	}
	content := "deb [trusted=yes] " + repo.Serve(t) + " ./\n"
	list := filepath.Join(rig.root, "etc/apt/sources.list.d/hello.list")
	param := `{"name": "hello", "content": "` + strings.TrimSpace(content) + `\n"}`
	res := rig.converges(t, "linux.apt.repo", param)
	if !strings.Contains(res.Comment, "/etc/apt/sources.list.d/hello.list updated: created") {
		t.Fatalf("repo: %+v", res)
	}
	if got, _ := os.ReadFile(list); string(got) != content {
		t.Fatalf("list file %q", got)
	}
	fi1, _ := os.Stat(list)
	rig.apply(t, "linux.apt.repo", param, false)
	if fi2, _ := os.Stat(list); !fi2.ModTime().Equal(fi1.ModTime()) {
		t.Fatal("an unchanged list file was rewritten")
	}
	// ".list" is appended unless there; the check mode of a change says so.
	if res := rig.apply(t, "linux.apt.repo", `{"name": "hello.list", "content": "deb [trusted=yes] `+repo.Serve(t)+` ./ \n"}`, true); !res.Changed || !strings.Contains(res.Comment, "hello.list would be updated: content") {
		t.Fatalf("check mode: %+v", res)
	}

	rig.converges(t, "linux.apt.package", `{"name": [{"key": "hellod", "value": "1.0"}]}`, aptQuiet...)
	before := repo.Requests.Load()
	rig.converges(t, "linux.apt.package", `{"name": [{"key": "hellod", "value": "latest"}]}`, aptQuiet...)
	// latest found 2.0-1 in the index fetched by the first state: no
	// refresh, however old the repository's files are.
	if n := repo.Requests.Load() - before; n != 1 { // the .deb
		t.Fatalf("latest made %d requests, want 1 (the package download, no index)", n)
	}
	// A changed list file makes the index stale again.
	apt, _ := rig.e.sys.Packages()
	if stale, _ := apt.IndexStale(); stale {
		t.Fatal("index stale after the refresh")
	}
	if res := rig.apply(t, "linux.apt.repo", `{"name": "hello", "content": "# moved\n`+strings.TrimSpace(content)+`\n"}`, false); !res.Changed {
		t.Fatalf("rewrite: %+v", res)
	}
	if stale, _ := apt.IndexStale(); !stale {
		t.Fatal("index not stale after its sources changed")
	}
}

// TestAptRepoTargetRelease: repo is apt's target release (-t): the
// candidate comes from that repository even when another offers a newer
// version.
func TestAptRepoTargetRelease(t *testing.T) {
	rig := newDebianRig(t)
	main := &aptrepo.Repo{Dir: t.TempDir(), Suite: "main-suite"}
	older := &aptrepo.Repo{Dir: t.TempDir(), Suite: "older"}
	main.Add(t, hellod2)
	older.Add(t, hellod1)
	list := "deb [trusted=yes] " + main.Serve(t) + " ./\ndeb [trusted=yes] " + older.Serve(t) + " ./\n"
	if err := os.WriteFile(filepath.Join(rig.root, "etc/apt/sources.list.d/two.list"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	rig.converges(t, "linux.apt.package", `{"name": [{"key": "hellod"}], "repo": "older"}`, aptQuiet...)
	if got := installedIn(t, rig.root).Installed["hellod"]; got != "1.0-1" {
		t.Fatalf("hellod %s, want 1.0-1 from the target release", got)
	}
	rig.converges(t, "linux.apt.package", `{"name": [{"key": "hellod", "value": "latest"}]}`, aptQuiet...)
	if got := installedIn(t, rig.root).Installed["hellod"]; got != "2.0-1" {
		t.Fatalf("hellod %s, want 2.0-1", got)
	}
	res := rig.apply(t, "linux.apt.package", `{"name": [{"key": "hellod", "value": "latest"}], "repo": "nosuch"}`, false)
	if res.OK || res.Comment != "linux.apt.package: apt-cache policy failed: The value 'nosuch' is invalid for APT::Default-Release as such a release is not available in the sources" {
		t.Fatalf("unknown release: %+v", res)
	}
}

// TestAptVerifyGPG: an unsigned repository is refused by default; with
// verify-gpg false its packages install.
func TestAptVerifyGPG(t *testing.T) {
	rig := newDebianRig(t)
	repo := aptrepo.New(t)
	repo.Add(t, hellod1)
	if err := os.WriteFile(filepath.Join(rig.root, "etc/apt/sources.list.d/unsigned.list"), []byte("deb "+repo.Serve(t)+" ./\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res := rig.apply(t, "linux.apt.package", `{"name": [{"key": "hellod"}]}`, false)
	if res.OK || strings.Contains(res.Comment, "\n") || !strings.Contains(res.Comment, "apt-get update failed: The repository") ||
		!strings.Contains(res.Comment, "verify-gpg false would accept it") || !strings.Contains(res.Stdout, "404") {
		t.Fatalf("an unsigned repository: %+v", res)
	}
	rig.converges(t, "linux.apt.package", `{"name": [{"key": "hellod"}], "verify-gpg": false}`, aptQuiet...)
}

// TestPackageModulesWrongFamily: a yum module on Debian (and the reverse,
// in the RPM tests) fails with one line saying which modules to use.
func TestPackageModulesWrongFamily(t *testing.T) {
	rig := newDebianRig(t)
	for module, param := range map[string]string{
		"linux.yum.package": `{"name": [{"key": "hellod"}]}`,
		"linux.yum.repo":    `{"name": "x", "content": "[x]\n"}`,
		"linux.rpm.key":     `{"path": "/tmp/key"}`,
	} {
		res := rig.apply(t, module, param, false)
		want := module + " cannot run on Debian GNU/Linux 12 (bookworm), which uses apt: use linux.apt.* modules here"
		if res.OK || res.Comment != want {
			t.Errorf("%s: %+v, want %q", module, res, want)
		}
	}
}

// TestPackageParams: bad entries are refused naming the parameter.
func TestPackageParams(t *testing.T) {
	for _, c := range []struct{ param, want string }{
		{`{"name": []}`, "parameter name: is required and lists no package"},
		{`{"name": [{"key": "-rf"}]}`, `"-rf" is not a package name`},
		{`{"name": [{"key": "a"}, {"key": "a", "value": "1"}]}`, "package a is listed twice"},
		{`{"name": [{"key": "a", "value": ">=1.0"}]}`, "version comparisons such as >=1.0 are not supported"},
		{`{"name": [{"key": "a", "value": "ftp://x/a.deb"}]}`, "is not an http, https or file URL"},
		{`{"name": [{"key": "a", "value": "a.deb"}]}`, "must be an absolute path or an http(s) URL"},
		{`{"name": [{"key": "a"}], "deb-conf-file": "x"}`, "parameter deb-conf-file: must be an absolute path"},
	} {
		e, _ := newExec(t)
		res := run(t, e, "linux.apt.package", c.param)
		if res.OK || !strings.Contains(res.Comment, c.want) {
			t.Errorf("%s: %+v, want %q", c.param, res, c.want)
		}
	}
}
