package native

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/visualops/opsagent/internal/crypt"
	"github.com/visualops/opsagent/internal/system"
)

// accountTools are the programs a no-change round of linux.user and
// linux.group must not run.
var accountTools = []string{"useradd", "usermod", "chpasswd", "groupadd", "groupmod", "gpasswd"}

func rootFile(t *testing.T, root, p string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, p))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// accountLine is name's line of an account file of the root ("" none).
func accountLine(t *testing.T, root, file, name string) string {
	t.Helper()
	for _, l := range strings.Split(rootFile(t, root, file), "\n") {
		if strings.HasPrefix(l, name+":") {
			return l
		}
	}
	return ""
}

func shadowHash(t *testing.T, root, name string) string {
	t.Helper()
	f := strings.Split(accountLine(t, root, "/etc/shadow", name), ":")
	if len(f) < 2 {
		t.Fatalf("%s has no shadow line", name)
	}
	return f[1]
}

// supplementary lists the groups of the root's /etc/group naming user
// as a member.
func supplementary(t *testing.T, root, user string) []string {
	t.Helper()
	var out []string
	for _, g := range system.ParseGroup([]byte(rootFile(t, root, "/etc/group"))) {
		if slices.Contains(g.Members, user) {
			out = append(out, g.Name)
		}
	}
	slices.Sort(out)
	return out
}

func owner(t *testing.T, p string) (int, int) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return int(st.Uid), int(st.Gid)
}

// noSecretInArgv fails when a recorded command line holds secret: a
// password must reach chpasswd on its standard input only.
func noSecretInArgv(t *testing.T, r *recordingRunner, secrets ...string) {
	t.Helper()
	for _, c := range r.Since(0) {
		for _, s := range secrets {
			if strings.Contains(strings.Join(c, " "), s) {
				t.Fatalf("a command line holds a password: %v", c)
			}
		}
	}
}

// TestUserEveryParameter creates a user with every parameter of
// module.json through the root's useradd and chpasswd, and the next round
// runs no account tool; check mode first reports and changes nothing.
func TestUserEveryParameter(t *testing.T) {
	rig := newDebianRig(t)
	rig.converges(t, "linux.group", `{"groupname": "Dev", "gid": "600", "system-group": true}`, accountTools...)
	rig.converges(t, "linux.group", `{"groupname": "ops"}`, accountTools...)
	hash := crypt.SHA512("instant", "0123456789abcdef", 0)
	param := `{"username": "InstantForge1", "password": "` + hash + `", "fullname": "visualops username",
		"uid": "600", "gid": "600", "groups": ["Dev", "ops"], "home": "/tmp/test/user/visualops1",
		"no-login": true, "system-account": true}`

	passwd := rootFile(t, rig.root, "/etc/passwd")
	mark := rig.runs.Mark()
	check := rig.apply(t, "linux.user", param, true)
	if !check.OK || !check.Changed || check.Comment != "User InstantForge1 would be updated: created, password" {
		t.Fatalf("check mode: %+v", check)
	}
	if ran := rig.runs.Ran(mark, accountTools...); len(ran) > 0 || rootFile(t, rig.root, "/etc/passwd") != passwd {
		t.Fatalf("check mode changed the accounts: %v", ran)
	}

	first := rig.converges(t, "linux.user", param, accountTools...)
	if first.Comment != "User InstantForge1 updated: created, password" {
		t.Fatalf("comment %q", first.Comment)
	}
	if got := accountLine(t, rig.root, "/etc/passwd", "InstantForge1"); got != "InstantForge1:x:600:600:visualops username:/tmp/test/user/visualops1:/usr/sbin/nologin" {
		t.Fatalf("passwd line %q", got)
	}
	if got := shadowHash(t, rig.root, "InstantForge1"); got != hash {
		t.Fatalf("shadow hash %q, want the hash given", got)
	}
	// Dev is the primary group: not a supplementary one.
	if got := supplementary(t, rig.root, "InstantForge1"); !slices.Equal(got, []string{"ops"}) {
		t.Fatalf("supplementary groups %v", got)
	}
	home := filepath.Join(rig.root, "tmp/test/user/visualops1")
	if u, g := owner(t, home); u != 600 || g != 600 {
		t.Fatalf("home owned by %d:%d", u, g)
	}
	if u, g := owner(t, filepath.Dir(home)); u != 0 || g != 0 {
		t.Fatalf("home's parent owned by %d:%d, want root", u, g)
	}
	noSecretInArgv(t, rig.runs, hash)
}

// TestUserPlaintextPassword: a password that is no crypt hash is hashed
// with SHA-512 once; the next round finds it matching and leaves
// /etc/shadow untouched (bytes and mtime), running nothing. A changed
// password, or a hash this agent cannot verify (yescrypt, Debian's
// default), is set again, and then stays.
func TestUserPlaintextPassword(t *testing.T) {
	rig := newDebianRig(t)
	param := `{"username": "alice", "password": "instant"}`
	rig.converges(t, "linux.user", param, accountTools...)
	hash := shadowHash(t, rig.root, "alice")
	if !strings.HasPrefix(hash, "$6$") {
		t.Fatalf("hash %q, want SHA-512 crypt", hash)
	}
	if ok, err := crypt.Verify(hash, "instant"); !ok || err != nil {
		t.Fatalf("the hash does not verify: %v", err)
	}
	shadow := filepath.Join(rig.root, "etc/shadow")
	before, _ := os.Stat(shadow)
	data := rootFile(t, rig.root, "/etc/shadow")
	mark := rig.runs.Mark()
	if res := rig.apply(t, "linux.user", param, false); !res.OK || res.Changed || res.Comment != "User alice is already in the correct state" {
		t.Fatalf("third round %+v", res)
	}
	if cmds := rig.runs.Since(mark); len(cmds) > 0 {
		t.Fatalf("a no-change round ran %v", cmds)
	}
	after, _ := os.Stat(shadow)
	if rootFile(t, rig.root, "/etc/shadow") != data || !after.ModTime().Equal(before.ModTime()) {
		t.Fatal("a no-change round touched /etc/shadow")
	}

	res := rig.apply(t, "linux.user", `{"username": "alice", "password": "changed"}`, false)
	if !res.Changed || res.Comment != "User alice updated: password" {
		t.Fatalf("new password: %+v", res)
	}
	if ok, _ := crypt.Verify(shadowHash(t, rig.root, "alice"), "changed"); !ok {
		t.Fatal("the new password does not verify")
	}

	// yescrypt, as passwd(1) writes it on Debian 12.
	yescrypt := "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7"
	if err := rig.e.sys.SetPasswordHash(context.Background(), "alice", yescrypt); err != nil {
		t.Fatal(err)
	}
	rig.converges(t, "linux.user", `{"username": "alice", "password": "changed"}`, accountTools...)
	if h := shadowHash(t, rig.root, "alice"); !strings.HasPrefix(h, "$6$") {
		t.Fatalf("hash %q", h)
	}
	noSecretInArgv(t, rig.runs, "instant", "changed")
}

// TestUserGroups: groups makes the supplementary groups exactly those
// listed; an empty list removes them all; omitted leaves them; a missing
// group fails naming it.
func TestUserGroups(t *testing.T) {
	rig := newDebianRig(t)
	for _, g := range []string{"a", "b", "c"} {
		rig.converges(t, "linux.group", `{"groupname": "`+g+`"}`, accountTools...)
	}
	rig.converges(t, "linux.user", `{"username": "bob", "groups": ["a", "b"]}`, accountTools...)
	if got := supplementary(t, rig.root, "bob"); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("groups %v", got)
	}
	res := rig.converges(t, "linux.user", `{"username": "bob", "groups": ["c", "b"]}`, accountTools...)
	if got := supplementary(t, rig.root, "bob"); !slices.Equal(got, []string{"b", "c"}) || res.Comment != "User bob updated: groups c,b" {
		t.Fatalf("groups %v, %q", got, res.Comment)
	}
	mark := rig.runs.Mark()
	if res := rig.apply(t, "linux.user", `{"username": "bob"}`, false); res.Changed || len(rig.runs.Since(mark)) > 0 {
		t.Fatalf("groups omitted: %+v", res)
	}
	res = rig.converges(t, "linux.user", `{"username": "bob", "groups": []}`, accountTools...)
	if got := supplementary(t, rig.root, "bob"); len(got) != 0 || res.Comment != "User bob updated: groups (none)" {
		t.Fatalf("groups %v, %q", got, res.Comment)
	}
	res = rig.apply(t, "linux.user", `{"username": "bob", "groups": ["a", "nosuch", "other"]}`, false)
	if res.OK || res.Comment != "User bob: group(s) nosuch, other do not exist: create them first (linux.group)" {
		t.Fatalf("missing group: %+v", res)
	}
	res = rig.apply(t, "linux.user", `{"username": "carol", "gid": "nosuch"}`, false)
	if res.OK || !strings.Contains(res.Comment, "gid nosuch: no such group") {
		t.Fatalf("missing gid: %+v", res)
	}
	if accountLine(t, rig.root, "/etc/passwd", "carol") != "" {
		t.Fatal("carol was created")
	}
}

// TestUserHome: an existing directory is given to the user; a missing
// one is created with its parents; a changed home is set and created.
func TestUserHome(t *testing.T) {
	rig := newDebianRig(t)
	existing := filepath.Join(rig.root, "srv/app")
	if err := os.MkdirAll(existing, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(existing, "data"), []byte("kept\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rig.converges(t, "linux.user", `{"username": "app", "home": "/srv/app", "uid": "1500"}`, accountTools...)
	if u, g := owner(t, existing); u != 1500 || g == 0 {
		t.Fatalf("existing home owned by %d:%d", u, g)
	}
	if rootFile(t, rig.root, "/srv/app/data") != "kept\n" {
		t.Fatal("the existing home's content changed")
	}
	// Someone gives the home away: the next round gives it back.
	if err := os.Chown(existing, 0, 0); err != nil {
		t.Fatal(err)
	}
	res := rig.apply(t, "linux.user", `{"username": "app", "home": "/srv/app", "uid": "1500"}`, false)
	if u, _ := owner(t, existing); !res.Changed || u != 1500 || !strings.Contains(res.Comment, "home owner") {
		t.Fatalf("home given back: %+v", res)
	}

	res = rig.converges(t, "linux.user", `{"username": "app", "home": "/data/homes/app", "uid": "1500"}`, accountTools...)
	if res.Comment != "User app updated: home /data/homes/app, home /data/homes/app created" {
		t.Fatalf("comment %q", res.Comment)
	}
	created := filepath.Join(rig.root, "data/homes/app")
	fi, err := os.Stat(created)
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o755 {
		t.Fatalf("created home: %v %v", fi, err)
	}
	if u, _ := owner(t, created); u != 1500 {
		t.Fatalf("created home owned by %d", u)
	}
	if !strings.Contains(accountLine(t, rig.root, "/etc/passwd", "app"), ":/data/homes/app:") {
		t.Fatal("passwd has the old home")
	}
	// A new user whose home exists: useradd keeps it, the module gives it
	// to the user.
	if err := os.MkdirAll(filepath.Join(rig.root, "home/dave"), 0o755); err != nil {
		t.Fatal(err)
	}
	rig.converges(t, "linux.user", `{"username": "dave"}`, accountTools...)
	if u, _ := owner(t, filepath.Join(rig.root, "home/dave")); u == 0 {
		t.Fatal("dave's existing home still belongs to root")
	}
}

// TestUserNoLogin: no-login sets the root's nologin shell; an explicit
// false gives a nologin account a login shell again (useradd's default).
func TestUserNoLogin(t *testing.T) {
	rig := newDebianRig(t)
	rig.converges(t, "linux.user", `{"username": "svc", "no-login": true}`, accountTools...)
	if !strings.HasSuffix(accountLine(t, rig.root, "/etc/passwd", "svc"), ":/usr/sbin/nologin") {
		t.Fatal(accountLine(t, rig.root, "/etc/passwd", "svc"))
	}
	res := rig.converges(t, "linux.user", `{"username": "svc", "no-login": false}`, accountTools...)
	if !strings.HasSuffix(accountLine(t, rig.root, "/etc/passwd", "svc"), ":/bin/sh") || res.Comment != "User svc updated: shell /bin/sh" {
		t.Fatalf("%q %q", accountLine(t, rig.root, "/etc/passwd", "svc"), res.Comment)
	}
	// A group named like the user exists: useradd would refuse to create
	// the user's own group; the user joins it.
	rig.converges(t, "linux.group", `{"groupname": "puppet"}`, accountTools...)
	rig.converges(t, "linux.user", `{"username": "puppet", "password": "", "no-login": true}`, accountTools...)
	u := strings.Split(accountLine(t, rig.root, "/etc/passwd", "puppet"), ":")
	g := strings.Split(accountLine(t, rig.root, "/etc/group", "puppet"), ":")
	if u[3] != g[2] {
		t.Fatalf("puppet's primary group %s, want the puppet group %s", u[3], g[2])
	}
}

// TestGroup: created with gid and as a system group, gid changed with
// groupmod, a gid taken by another group refused naming it.
func TestGroup(t *testing.T) {
	rig := newDebianRig(t)
	res := rig.converges(t, "linux.group", `{"groupname": "Dev", "gid": "600"}`, accountTools...)
	if res.Comment != "Group Dev updated: created" || accountLine(t, rig.root, "/etc/group", "Dev") != "Dev:x:600:" {
		t.Fatalf("%q %q", res.Comment, accountLine(t, rig.root, "/etc/group", "Dev"))
	}
	res = rig.converges(t, "linux.group", `{"groupname": "Dev", "gid": 601}`, accountTools...)
	if res.Comment != "Group Dev updated: gid 601" || accountLine(t, rig.root, "/etc/group", "Dev") != "Dev:x:601:" {
		t.Fatalf("%q %q", res.Comment, accountLine(t, rig.root, "/etc/group", "Dev"))
	}
	rig.converges(t, "linux.group", `{"groupname": "sysg", "system-group": true}`, accountTools...)
	if f := strings.Split(accountLine(t, rig.root, "/etc/group", "sysg"), ":"); len(f) < 3 || len(f[2]) > 3 {
		t.Fatalf("system group %v: want a gid below 1000", f)
	}
	res = rig.apply(t, "linux.group", `{"groupname": "Dev", "gid": "0"}`, false)
	if res.OK || res.Comment != "Group Dev: gid 0 already belongs to group root" {
		t.Fatalf("%+v", res)
	}
	for _, bad := range []string{`{"groupname": "a:b"}`, `{"groupname": "-x"}`, `{"groupname": "Dev", "gid": "x"}`, `{}`} {
		if res := rig.apply(t, "linux.group", bad, false); res.OK || !strings.HasPrefix(res.Comment, "linux.group: parameter ") {
			t.Errorf("%s: %+v", bad, res)
		}
	}
}

// TestUserExistingAccount: an account that exists keeps its home when
// the state names none (the default /home/NAME is for the user it
// creates): nobody's /nonexistent is not created, root stays in /root.
func TestUserExistingAccount(t *testing.T) {
	rig := newDebianRig(t)
	for _, name := range []string{"root", "nobody"} {
		before := accountLine(t, rig.root, "/etc/passwd", name)
		res := rig.converges(t, "linux.user", `{"username": "`+name+`", "password": "instant"}`, accountTools...)
		if res.Comment != "User "+name+" updated: password" || accountLine(t, rig.root, "/etc/passwd", name) != before {
			t.Fatalf("%s: %q, passwd %q (was %q)", name, res.Comment, accountLine(t, rig.root, "/etc/passwd", name), before)
		}
	}
	if _, err := os.Stat(filepath.Join(rig.root, "nonexistent")); err == nil {
		t.Fatal("nobody's home was created")
	}
	if _, err := os.Stat(filepath.Join(rig.root, "home/root")); err == nil {
		t.Fatal("/home/root was created")
	}
}

// TestUserBadParameters: one line naming the parameter and the fix;
// nothing runs.
func TestUserBadParameters(t *testing.T) {
	rig := newDebianRig(t)
	for param, want := range map[string]string{
		`{"password": "x"}`:                                                   "linux.user: parameter username: is required and missing or empty",
		`{"username": "a:b"}`:                                                 `linux.user: parameter username: account name "a:b" cannot contain ':'`,
		`{"username": "-o"}`:                                                  `linux.user: parameter username: account name "-o" cannot start with "-"`,
		`{"username": "bob", "home": "home/bob"}`:                             `linux.user: parameter home: must be an absolute path, got "home/bob"`,
		`{"username": "bob", "uid": "-5"}`:                                    `linux.user: parameter uid: must be a number from 0, got "-5"`,
		`{"username": "bob", "fullname": "Doe, John"}`:                        `linux.user: parameter fullname: "Doe, John" cannot contain ':', ',' or a line break (they separate the fields of /etc/passwd and of its GECOS field)`,
		`{"username": "bob", "no-login": "maybe"}`:                            `linux.user: parameter no-login: must be true or false, got "maybe"`,
		`{"username": "bob", "groups": [{"a": 1}]}`:                           "linux.user: parameter groups[0]: must be a string, got an object",
		`{"username": "bob", "password": "` + strings.Repeat("x", 513) + `"}`: "linux.user: parameter password: is 513 bytes long: a login reads at most 512 (PAM's limit), and hashing it would take long",
	} {
		if res := rig.apply(t, "linux.user", param, false); res.OK || res.Comment != want {
			t.Errorf("%.80s: %+v\n want %q", param, res, want)
		}
	}
	if cmds := rig.runs.Since(0); len(cmds) > 0 {
		t.Fatalf("ran %v", cmds)
	}
}
