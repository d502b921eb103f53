package native

import (
	"fmt"
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
	"github.com/visualops/opsagent/internal/testutil/rpmrepo"
)

// launchpad serves Launchpad's API and a keyserver on loopback: the PPA
// ~user/+archive/ubuntu/archive is signed by fpr, and the keyserver
// serves key for any fingerprint asked.
type launchpad struct {
	srv      *httptest.Server
	requests atomic.Int64
}

func newLaunchpad(t testing.TB, fpr string, key []byte) *launchpad {
	t.Helper()
	lp := &launchpad{}
	lp.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lp.requests.Add(1)
		switch {
		case r.URL.Path == "/api/~team/+archive/ubuntu/tools":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"name": "tools", "private": false, "signing_key_fingerprint": %q}`, fpr)
		case r.URL.Path == "/pks/lookup" && r.URL.Query().Get("op") == "get" && strings.HasPrefix(r.URL.Query().Get("search"), "0x"):
			w.Header().Set("Content-Type", "application/pgp-keys")
			_, _ = w.Write(key)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(lp.srv.Close)
	return lp
}

// newUbuntuRig is a Debian root that says it is Ubuntu 24.04 (noble),
// with linux.apt.ppa pointed at the loopback Launchpad.
func newUbuntuRig(t *testing.T, lp *launchpad) *debianRig {
	t.Helper()
	rig := newDebianRig(t)
	osr := "PRETTY_NAME=\"Ubuntu 24.04 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\nUBUNTU_CODENAME=noble\n"
	if err := os.Remove(filepath.Join(rig.root, "etc/os-release")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rig.root, "etc/os-release"), []byte(osr), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := fsutil.NewRoot(rig.root)
	if err != nil {
		t.Fatal(err)
	}
	rig.e = New(Options{Root: r, Runner: rig.runs, KillGrace: time.Second,
		PPA: PPAEndpoints{LaunchpadAPI: lp.srv.URL + "/api", Keyserver: lp.srv.URL}})
	return rig
}

// TestAptPPA writes what add-apt-repository would, with no gpg: the
// signing key (checked against Launchpad's fingerprint) as an .asc
// keyring, a sources list signed by it; apt reads the list. The next
// round fetches nothing.
func TestAptPPA(t *testing.T) {
	key := rpmrepo.NewKey(t, "Launchpad PPA for team <ppa@example.invalid>")
	lp := newLaunchpad(t, key.Fingerprint, key.Public)
	rig := newUbuntuRig(t, lp)
	keyring := filepath.Join(rig.root, "etc/apt/keyrings/team-ubuntu-tools.asc")
	list := filepath.Join(rig.root, "etc/apt/sources.list.d/team-ubuntu-tools-noble.list")

	check := rig.apply(t, "linux.apt.ppa", `{"name": "team/tools"}`, true)
	if !check.Changed || lp.requests.Load() != 0 {
		t.Fatalf("check mode: %+v, %d requests", check, lp.requests.Load())
	}
	if _, err := os.Stat(keyring); !os.IsNotExist(err) {
		t.Fatal("check mode wrote the keyring")
	}
	res := rig.converges(t, "linux.apt.ppa", `{"name": "team/tools"}`)
	t.Log(res.Comment)
	if !strings.Contains(res.Comment, key.Fingerprint) {
		t.Fatalf("comment %q does not name the key", res.Comment)
	}
	if got, _ := os.ReadFile(keyring); string(got) != string(key.Public) {
		t.Fatal("keyring is not the key")
	}
	want := "deb [signed-by=/etc/apt/keyrings/team-ubuntu-tools.asc] https://ppa.launchpadcontent.net/team/tools/ubuntu noble main\n"
	if got, _ := os.ReadFile(list); string(got) != want {
		t.Fatalf("list %q", got)
	}
	n := lp.requests.Load()
	rig.apply(t, "linux.apt.ppa", `{"name": "team/tools"}`, false)
	if lp.requests.Load() != n || n != 2 {
		t.Fatalf("%d requests in all, %d after the first round (want 2, then none)", lp.requests.Load(), n)
	}
	// apt reads the list (a malformed entry would be an error here):
	// --print-uris lists what update would fetch and fetches nothing, in
	// a network namespace that has only loopback anyway.
	out, err := exec.Command("unshare", "-n", "chroot", rig.root, "apt-get", "--print-uris", "update").CombinedOutput()
	if err != nil || strings.Contains(string(out), "E:") || !strings.Contains(string(out), "https://ppa.launchpadcontent.net/team/tools/ubuntu/dists/noble/InRelease") {
		t.Fatalf("apt-get --print-uris update: %v: %s", err, out)
	}
}

// TestAptPPAPrivate: the credentials go to an auth.conf.d file of mode
// 0600 and nowhere else: not in the sources list, the comment or the
// output.
func TestAptPPAPrivate(t *testing.T) {
	key := rpmrepo.NewKey(t, "Launchpad PPA for team <ppa@example.invalid>")
	lp := newLaunchpad(t, key.Fingerprint, key.Public)
	rig := newUbuntuRig(t, lp)
	param := `{"name": "team/tools", "username": "alice", "password": "s3cret-Pass"}`
	res := rig.converges(t, "linux.apt.ppa", param)
	auth := filepath.Join(rig.root, "etc/apt/auth.conf.d/team-ubuntu-tools.conf")
	fi, err := os.Stat(auth)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("auth file: %v %v", fi, err)
	}
	if got, _ := os.ReadFile(auth); string(got) != "machine private-ppa.launchpadcontent.net/team/tools/ubuntu\nlogin alice\npassword s3cret-Pass\n" {
		t.Fatalf("auth file %q", got)
	}
	list, _ := os.ReadFile(filepath.Join(rig.root, "etc/apt/sources.list.d/team-ubuntu-tools-noble.list"))
	if !strings.Contains(string(list), "https://private-ppa.launchpadcontent.net/team/tools/ubuntu noble main") || strings.Contains(string(list), "alice") {
		t.Fatalf("list %q", list)
	}
	// A new password: the file is rewritten, and still not shown.
	res2 := rig.apply(t, "linux.apt.ppa", `{"name": "team/tools", "username": "alice", "password": "n3w-Pass"}`, false)
	for _, r := range []string{res.Comment, res.Stdout, res2.Comment, res2.Stdout} {
		if strings.Contains(r, "s3cret") || strings.Contains(r, "n3w-Pass") {
			t.Fatalf("a password in %q", r)
		}
	}
	if !res2.Changed || !strings.Contains(res2.Comment, "credentials /etc/apt/auth.conf.d/team-ubuntu-tools.conf content") {
		t.Fatalf("new password: %+v", res2)
	}
	if fi, _ := os.Stat(auth); fi.Mode().Perm() != 0o600 {
		t.Fatalf("rewritten auth file mode %v", fi.Mode())
	}
}

// TestAptPPARefusals: a key that is not the PPA's is refused and nothing
// is written; Debian gets one line saying PPAs are for Ubuntu; names are
// checked.
func TestAptPPARefusals(t *testing.T) {
	key := rpmrepo.NewKey(t, "Launchpad PPA for team <ppa@example.invalid>")
	other := rpmrepo.NewKey(t, "someone else <x@example.invalid>")
	lp := newLaunchpad(t, key.Fingerprint, other.Public)
	rig := newUbuntuRig(t, lp)
	res := rig.apply(t, "linux.apt.ppa", `{"name": "team/tools"}`, false)
	if res.OK || !strings.Contains(res.Comment, "not the PPA's signing key "+key.Fingerprint+": not trusted") {
		t.Fatalf("wrong key: %+v", res)
	}
	if entries, _ := os.ReadDir(filepath.Join(rig.root, "etc/apt/sources.list.d")); len(entries) != 0 {
		t.Fatalf("files written: %v", entries)
	}
	if res := rig.apply(t, "linux.apt.ppa", `{"name": "team/nosuch"}`, false); res.OK || !strings.Contains(res.Comment, "HTTP 404") {
		t.Fatalf("unknown PPA: %+v", res)
	}
	for _, bad := range []string{`"team"`, `"Team/tools"`, `"team/tools/x"`, `"-o/x"`} {
		if res := rig.apply(t, "linux.apt.ppa", `{"name": `+bad+`}`, false); res.OK || !strings.Contains(res.Comment, "is not a PPA name") {
			t.Fatalf("%s: %+v", bad, res)
		}
	}
	if res := rig.apply(t, "linux.apt.ppa", `{"name": "team/tools", "username": "alice"}`, false); res.OK || !strings.Contains(res.Comment, "needs both username and password") {
		t.Fatalf("half credentials: %+v", res)
	}

	debian := newDebianRig(t)
	res = debian.apply(t, "linux.apt.ppa", `{"name": "team/tools"}`, false)
	if res.OK || res.Comment != "linux.apt.ppa: PPAs are built for Ubuntu, and this is Debian GNU/Linux 12 (bookworm): add the repository with linux.apt.repo instead" {
		t.Fatalf("debian: %+v", res)
	}
}
