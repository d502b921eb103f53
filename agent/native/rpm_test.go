package native

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/rpmrepo"
)

var (
	rhello1 = rpmrepo.Package{Name: "hellod", Version: "1.0", Files: map[string]string{"/etc/hellod.conf": "v1\n", "/usr/share/hellod/version": "1.0\n"}}
	rhello2 = rpmrepo.Package{Name: "hellod", Version: "2.0", Files: map[string]string{"/etc/hellod.conf": "v2\n", "/usr/share/hellod/version": "2.0\n"}}
	rplugin = rpmrepo.Package{Name: "hellod-plugin", Version: "1.0", Requires: "hellod >= 2.0", Files: map[string]string{"/usr/share/hellod/plugin": "p\n"}}
)

// newRPMRig is an Executor on an empty RHEL 9 install root, which the
// host's rpm and dnf act on (system.RPM's host-tool mode), recording the
// commands it runs.
func newRPMRig(t *testing.T) *debianRig {
	t.Helper()
	root := rpmrepo.NewRoot(t)
	r, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	runs := &recordingRunner{Runner: proc.New()}
	return &debianRig{root: root, runs: runs, e: New(Options{Root: r, Runner: runs, KillGrace: time.Second})}
}

// changingRPM lists the commands since mark that change an RPM system or
// its metadata cache: any dnf run other than a repoquery, and rpm other
// than a query.
func (r *debianRig) changingRPM(mark int) []string {
	var out []string
	for _, c := range r.runs.Since(mark) {
		line := strings.Join(c, " ")
		switch c[0] {
		case "dnf", "yum":
			if !strings.Contains(line, " repoquery ") {
				out = append(out, line)
			}
		case "rpm":
			if !strings.Contains(line, " -q ") && !strings.Contains(line, " -qa ") && !strings.Contains(line, " --eval ") {
				out = append(out, line)
			}
		}
	}
	return out
}

// TestYumPackageLifecycle drives a package through its states with the
// real dnf and rpm on a RHEL 9 install root and a loopback repository:
// installed, pinned older (any release of it: a downgrade), latest, a
// dependent package, removed; purged is removed on RPM. Every state
// converges: the second round changes nothing and runs no dnf but a
// repoquery (only latest needs one) and no rpm at all (what is installed
// is read again only when rpm's database files changed). A package
// installed behind the agent's back is seen at the next round.
func TestYumPackageLifecycle(t *testing.T) {
	rig := newRPMRig(t)
	repo := rpmrepo.New(t)
	repo.Add(t, rhello1, rhello2, rplugin)
	repo.Use(t, rig.root, "test", false)
	step := func(param, want string) {
		t.Helper()
		rig.checkFirstRPM(t, param)
		first := rig.converges(t, "linux.yum.package", param)
		t.Logf("%s: %s", param, first.Comment)
		mark := rig.runs.Mark()
		before := repo.Requests.Load()
		if res := rig.apply(t, "linux.yum.package", param, false); !res.OK || res.Changed {
			t.Fatalf("%s: another round %+v", param, res)
		}
		if ch := rig.changingRPM(mark); len(ch) > 0 {
			t.Fatalf("%s: a round that changes nothing ran %v", param, ch)
		}
		for _, c := range rig.runs.Since(mark) {
			if c[0] == "rpm" {
				t.Fatalf("%s: a round that changes nothing ran %v", param, c)
			}
		}
		if n := repo.Requests.Load() - before; n != 0 {
			t.Fatalf("%s: a round that changes nothing made %d repository requests", param, n)
		}
		if got := rpmrepo.Installed(t, rig.root)["hellod"]; got != want {
			t.Fatalf("%s: hellod %q, want %q", param, got, want)
		}
	}
	step(`{"name": [{"key": "hellod"}]}`, "2.0-1")
	step(`{"name": [{"key": "hellod", "value": "1.0"}]}`, "1.0-1")
	step(`{"name": [{"key": "hellod", "value": "latest"}]}`, "2.0-1")
	step(`{"name": [{"key": "hellod", "value": "1.0-1"}]}`, "1.0-1")
	step(`{"name": [{"key": "hellod", "value": "latest"}, {"key": "hellod-plugin"}]}`, "2.0-1")
	if got := rpmrepo.Installed(t, rig.root)["hellod-plugin"]; got != "1.0-1" {
		t.Fatalf("plugin %q", got)
	}
	step(`{"name": [{"key": "hellod-plugin", "value": "purged"}, {"key": "hellod", "value": "removed"}]}`, "")

	// Installed by hand, with rpm, after the agent last looked.
	if out, err := exec.Command("rpm", "--root", rig.root, "-i", rpmrepo.Build(t, rhello1)).CombinedOutput(); err != nil {
		t.Fatalf("rpm -i: %v: %s", err, out)
	}
	if res := rig.apply(t, "linux.yum.package", `{"name": [{"key": "hellod", "value": "removed"}]}`, false); !res.OK || !res.Changed {
		t.Fatalf("hellod installed by hand, then removed: %+v", res)
	}
	if got := rpmrepo.Installed(t, rig.root)["hellod"]; got != "" {
		t.Fatalf("hellod installed by hand is still there: %q", got)
	}

	// A version no repository offers fails naming it, after refreshing
	// the metadata once.
	res := rig.apply(t, "linux.yum.package", `{"name": [{"key": "hellod", "value": "9.9"}]}`, false)
	if res.OK || !strings.Contains(res.Comment, "no repository offers hellod=9.9 (offered: ") || !strings.Contains(res.Comment, "dnf makecache --refresh ran") {
		t.Fatalf("unknown version: %+v", res)
	}
}

// TestYumPackageNewVersion: a version published after dnf cached the
// metadata is found by refreshing it, since it is unknown to the cache.
func TestYumPackageNewVersion(t *testing.T) {
	rig := newRPMRig(t)
	repo := rpmrepo.New(t)
	repo.Add(t, rhello1)
	repo.Use(t, rig.root, "test", false)
	rig.converges(t, "linux.yum.package", `{"name": [{"key": "hellod"}]}`)
	repo.Add(t, rhello2)
	rig.converges(t, "linux.yum.package", `{"name": [{"key": "hellod", "value": "2.0"}]}`)
	if got := rpmrepo.Installed(t, rig.root)["hellod"]; got != "2.0-1" {
		t.Fatalf("hellod %q", got)
	}
}

// checkFirstRPM runs the state in check mode, which must report a change
// and leave the rpm database as it was.
func (r *debianRig) checkFirstRPM(t *testing.T, param string) {
	t.Helper()
	before := rpmrepo.Installed(t, r.root)
	mark := r.runs.Mark()
	res := r.apply(t, "linux.yum.package", param, true)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "would be updated") {
		t.Fatalf("check mode of %s: %+v", param, res)
	}
	if ch := r.changingRPM(mark); len(ch) > 0 {
		t.Fatalf("check mode ran %v", ch)
	}
	after := rpmrepo.Installed(t, r.root)
	if len(before) != len(after) || before["hellod"] != after["hellod"] {
		t.Fatalf("check mode changed the rpm database: %v → %v", before, after)
	}
}

// TestYumPackageRepoAndVerify: repo restricts dnf to one repository (the
// older version there is what installs), and a repository that demands
// signatures refuses an unsigned package unless verify-gpg is false.
func TestYumPackageRepoAndVerify(t *testing.T) {
	rig := newRPMRig(t)
	newer, older := rpmrepo.New(t), rpmrepo.New(t)
	newer.Add(t, rhello2)
	older.Add(t, rhello1)
	newer.Use(t, rig.root, "newer", false)
	older.Use(t, rig.root, "older", false)
	rig.converges(t, "linux.yum.package", `{"name": [{"key": "hellod"}], "repo": "older"}`)
	if got := rpmrepo.Installed(t, rig.root)["hellod"]; got != "1.0-1" {
		t.Fatalf("hellod %q, want 1.0-1 from repository older", got)
	}

	signed := rpmrepo.New(t)
	signed.Add(t, rplugin, rhello2)
	signed.Use(t, rig.root, "signed", true)
	res := rig.apply(t, "linux.yum.package", `{"name": [{"key": "hellod-plugin"}], "repo": "signed"}`, false)
	if res.OK || strings.Contains(res.Comment, "\n") || !strings.Contains(res.Comment, "verify-gpg false would accept it") {
		t.Fatalf("an unsigned package from a gpgcheck repository: %+v", res)
	}
	rig.converges(t, "linux.yum.package", `{"name": [{"key": "hellod-plugin"}], "repo": "signed", "verify-gpg": "false"}`)
}

// TestYumPackageFiles installs an .rpm from a path in the root and from
// an http URL; the next round downloads nothing.
func TestYumPackageFiles(t *testing.T) {
	rig := newRPMRig(t)
	local := rpmrepo.Package{Name: "localpkg", Version: "0.1", Files: map[string]string{"/usr/share/localpkg/x": "x\n"}}
	remote := rpmrepo.Package{Name: "remotepkg", Version: "0.2", Files: map[string]string{"/usr/share/remotepkg/x": "x\n"}}
	data, err := os.ReadFile(rpmrepo.Build(t, local))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(rig.root, "tmp"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rig.root, "tmp/localpkg.rpm"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	remoteFile := rpmrepo.Build(t, remote)
	var downloads atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		http.ServeFile(w, r, remoteFile)
	}))
	t.Cleanup(srv.Close)
	rig.converges(t, "linux.yum.package", `{"name": [{"key": "localpkg", "value": "/tmp/localpkg.rpm"}, {"key": "remotepkg", "value": "`+srv.URL+`/remotepkg-0.2-1.noarch.rpm"}]}`)
	if n := downloads.Load(); n != 1 {
		t.Fatalf("%d downloads, want 1", n)
	}
	got := rpmrepo.Installed(t, rig.root)
	if got["localpkg"] != "0.1-1" || got["remotepkg"] != "0.2-1" {
		t.Fatalf("installed %v", got)
	}
}

// TestYumRepo: content is written to /etc/yum.repos.d/NAME.repo (and
// rewritten only when it differs); rpm-url installs the repository
// package only while NAME.repo is absent, so the next rounds download
// nothing (Salt 2014 ran rpm -U --force URL every round).
func TestYumRepo(t *testing.T) {
	rig := newRPMRig(t)
	repo := rpmrepo.New(t)
	repo.Add(t, rhello2)
	content := repo.RepoFile(t, "extra", false)
	res := rig.converges(t, "linux.yum.repo", `{"name": "extra", "content": `+quoteJSON(content)+`}`)
	if !strings.Contains(res.Comment, "Repository file /etc/yum.repos.d/extra.repo updated: created") {
		t.Fatalf("%+v", res)
	}
	if got, _ := os.ReadFile(filepath.Join(rig.root, "etc/yum.repos.d/extra.repo")); string(got) != content {
		t.Fatalf("repo file %q", got)
	}
	rig.converges(t, "linux.yum.package", `{"name": [{"key": "hellod"}]}`)

	// A repository package, as epel-release is: it provides the .repo.
	release := rpmrepo.Package{Name: "opsagent-release", Version: "1", Files: map[string]string{"/etc/yum.repos.d/opsagent.repo": "[opsagent]\nname=opsagent\nbaseurl=file:///nonexistent\nenabled=0\n"}}
	file := rpmrepo.Build(t, release)
	var downloads atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		http.ServeFile(w, r, file)
	}))
	t.Cleanup(srv.Close)
	param := `{"name": "opsagent", "rpm-url": "` + srv.URL + `/opsagent-release-1-1.noarch.rpm"}`
	if res := rig.apply(t, "linux.yum.repo", param, true); !res.Changed || downloads.Load() != 0 {
		t.Fatalf("check mode: %+v, %d downloads", res, downloads.Load())
	}
	rig.converges(t, "linux.yum.repo", param, "rpm", "dnf")
	if n := downloads.Load(); n != 1 {
		t.Fatalf("%d downloads, want 1", n)
	}
	if got := rpmrepo.Installed(t, rig.root)["opsagent-release"]; got != "1-1" {
		t.Fatalf("release package %q", got)
	}
	// A state named after no .repo the package provides would download
	// every round: it fails, naming the right name.
	res = rig.apply(t, "linux.yum.repo", `{"name": "wrong", "rpm-url": "`+srv.URL+`/opsagent-release-1-1.noarch.rpm"}`, false)
	if res.OK || !strings.Contains(res.Comment, "provides no /etc/yum.repos.d/wrong.repo: name the state opsagent") {
		t.Fatalf("misnamed: %+v", res)
	}
	res = rig.apply(t, "linux.yum.repo", `{"name": "x"}`, false)
	if res.OK || !strings.Contains(res.Comment, "parameter content: is required when rpm-url is not given") {
		t.Fatalf("neither: %+v", res)
	}
}

// TestRPMKey imports a key the test generated, once: the next round
// reads the key's id from the file and finds it among rpm's gpg-pubkey
// entries (from the cached listing of rpm's database: no rpm, no import).
func TestRPMKey(t *testing.T) {
	rig := newRPMRig(t)
	key := rpmrepo.NewKey(t, "opsagent test key <key@example.invalid>")
	if err := os.MkdirAll(filepath.Join(rig.root, "tmp"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rig.root, "tmp/rpm.key"), key.Public, 0o644); err != nil {
		t.Fatal(err)
	}
	param := `{"path": "/tmp/rpm.key"}`
	check := rig.apply(t, "linux.rpm.key", param, true)
	if !check.Changed || !strings.Contains(check.Comment, "would be imported") {
		t.Fatalf("check mode: %+v", check)
	}
	mark := rig.runs.Mark()
	res := rig.converges(t, "linux.rpm.key", param)
	if !strings.Contains(res.Comment, key.Fingerprint[24:]+") imported") {
		t.Fatalf("%+v", res)
	}
	imports := 0
	for _, c := range rig.runs.Since(mark) {
		if strings.Contains(strings.Join(c, " "), "--import") {
			imports++
		}
	}
	if imports != 1 {
		t.Fatalf("%d imports, want 1", imports)
	}
	out, err := rpmQuery(rig.root, "gpg-pubkey")
	if err != nil || !strings.Contains(out, strings.ToLower(key.Fingerprint[32:])) {
		t.Fatalf("rpm has %q (%v)", out, err)
	}
	if res := rig.apply(t, "linux.rpm.key", `{"path": "/tmp/none.key"}`, false); res.OK || !strings.Contains(res.Comment, "key file /tmp/none.key does not exist") {
		t.Fatalf("missing key: %+v", res)
	}
}

// TestAptModulesOnRPM: apt modules on the RHEL root fail with one line.
func TestAptModulesOnRPM(t *testing.T) {
	rig := newRPMRig(t)
	for module, param := range map[string]string{
		"linux.apt.package": `{"name": [{"key": "hellod"}]}`,
		"linux.apt.repo":    `{"name": "x", "content": "deb http://x ./"}`,
		"linux.apt.ppa":     `{"name": "a/b"}`,
	} {
		res := rig.apply(t, module, param, false)
		want := module + " cannot run on Red Hat Enterprise Linux 9.4 (opsagent test root), which uses dnf: use linux.yum.* modules here"
		if res.OK || res.Comment != want {
			t.Errorf("%s: %+v, want %q", module, res, want)
		}
	}
}

func quoteJSON(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// rpmQuery asks the host's rpm about the root's database (the way the
// rig's install roots are read).
func rpmQuery(root string, names ...string) (string, error) {
	out, err := exec.Command("rpm", append([]string{"--root", root, "-q"}, names...)...).CombinedOutput()
	return string(out), err
}
