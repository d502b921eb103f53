package native

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/system/systemtest"
)

func newExec(t *testing.T) (*Executor, string) {
	t.Helper()
	dir := t.TempDir()
	systemtest.SeedAccounts(t, dir)
	root, err := fsutil.NewRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	return New(Options{Root: root, KillGrace: time.Second}), dir
}

func run(t *testing.T, e *Executor, module, param string) state.Result {
	t.Helper()
	if !json.Valid([]byte(param)) {
		t.Fatalf("bad test parameter %s", param)
	}
	return e.Execute(context.Background(), state.Request{RecipeVersion: 1, StateID: "s", Module: module, Parameter: json.RawMessage(param)})
}

func mustOK(t *testing.T, r state.Result, comment string) {
	t.Helper()
	if !r.OK || !strings.Contains(r.Comment, comment) {
		t.Fatalf("result %+v, want OK with %q", r, comment)
	}
}

func mustFail(t *testing.T, r state.Result, comment string) {
	t.Helper()
	if r.OK || !strings.Contains(r.Comment, comment) {
		t.Fatalf("result %+v, want failure with %q", r, comment)
	}
}

func TestSupports(t *testing.T) {
	e, _ := newExec(t)
	for _, m := range []string{"linux.cmd", "linux.file", "linux.dir", "linux.symlink",
		"linux.apt.package", "linux.yum.package", "linux.apt.repo", "linux.apt.ppa", "linux.yum.repo", "linux.rpm.key"} {
		if !e.Supports(m) {
			t.Errorf("%s not supported", m)
		}
	}
	if e.Supports("linux.no.such") {
		t.Error("an unknown module claimed")
	}
	mustFail(t, run(t, e, "linux.no.such", `{}`), "not implemented natively")
}

func TestCmd(t *testing.T) {
	e, root := newExec(t)
	if err := os.MkdirAll(filepath.Join(root, "present"), 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, param string
		ok          bool
		comment     string
		stdout      string
	}{
		{"success", `{"cmd":"echo hello"}`, true, `Command "echo hello" run`, "hello\n"},
		{"exit code", `{"cmd":"echo oops >&2; exit 4"}`, false, "failed with exit code 4", "oops\n"},
		{"default cwd", `{"cmd":"pwd"}`, true, "run", filepath.Join(root, "opt/visualops/tmp") + "\n"},
		{"cwd created", `{"cmd":"pwd","cwd":"/work/here"}`, true, "run", filepath.Join(root, "work/here") + "\n"},
		{"env string", `{"cmd":"echo $WORLD","env":"WORLD=world"}`, true, "run", "world\n"},
		{"env object", `{"cmd":"echo $A-$B","env":{"A":"1","B":2}}`, true, "run", "1-2\n"},
		{"env pairs", `{"cmd":"echo $A","env":[{"key":"A","value":"x y"}]}`, true, "run", "x y\n"},
		{"shell", `{"cmd":"echo $0","shell":"/bin/bash"}`, true, "run", "/bin/bash\n"},
		{"timeout string", `{"cmd":"sleep 5","timeout":"1"}`, false, "timed out after 1s", ""},
		{"if-path-present met", `{"cmd":"echo ran","if-path-present":"/present"}`, true, "run", "ran\n"},
		{"if-path-present unmet", `{"cmd":"echo ran","if-path-present":["/present","/missing"]}`, true, "skipped: /missing does not exist", ""},
		{"if-path-absent met", `{"cmd":"echo ran","if-path-absent":["/missing"]}`, true, "run", "ran\n"},
		{"if-path-absent unmet", `{"cmd":"echo ran","if-path-absent":"/present"}`, true, "skipped: /present exists", ""},
		{"cmd as list", `{"cmd":["echo listed"]}`, true, "run", "listed\n"},
		{"missing cmd", `{}`, false, "parameter cmd: is required", ""},
		{"empty cmd", `{"cmd":""}`, false, "parameter cmd: is required", ""},
		{"cmd object", `{"cmd":{"a":1}}`, false, "parameter cmd: must be a string, got an object", ""},
		{"bad timeout", `{"cmd":"true","timeout":"soon"}`, false, "parameter timeout: must be a whole number", ""},
		{"bad env", `{"cmd":"true","env":"novalue"}`, false, "parameter env", ""},
		{"bad if-path", `{"cmd":"true","if-path-present":[1]}`, false, "parameter if-path-present[0]", ""},
		{"unknown user", `{"cmd":"true","user":"no-such-user-xyz"}`, false, "parameter user: user \"no-such-user-xyz\" does not exist", ""},
		{"bad shell", `{"cmd":"true","shell":"/no/shell"}`, false, "could not run", ""},
		{"not an object", `[1]`, false, "must be a JSON object", ""},
		// Over Linux's 128 KiB per argument: the reason must survive the
		// StateLog's size cap, so the quoted command is abbreviated.
		{"huge cmd", `{"cmd":"true ` + strings.Repeat("x", 200<<10) + `"}`, false, "… (204805 bytes)\" could not run: start /bin/sh: fork/exec /bin/sh: argument list too long", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, e, "linux.cmd", tc.param)
			if r.OK != tc.ok || !strings.Contains(r.Comment, tc.comment) {
				t.Fatalf("result %+v; want ok=%v comment containing %q", r, tc.ok, tc.comment)
			}
			if tc.stdout != "" && r.Stdout != tc.stdout {
				t.Errorf("stdout %q, want %q", r.Stdout, tc.stdout)
			}
		})
	}
}

func TestCmdCancelKillsProcessGroup(t *testing.T) {
	e, root := newExec(t)
	pidFile := filepath.Join(root, "pid")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan state.Result)
	go func() {
		done <- e.Execute(ctx, state.Request{Module: "linux.cmd", Parameter: json.RawMessage(`{"cmd":"sleep 300 & echo $! > ` + pidFile + `; wait"}`)})
	}()
	var pid int
	for deadline := time.Now().Add(10 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		data, _ := os.ReadFile(pidFile)
		pid, _ = strconv.Atoi(strings.TrimSpace(string(data)))
	}
	if pid == 0 {
		t.Fatal("no pid")
	}
	cancel()
	r := <-done
	if r.OK {
		t.Errorf("cancelled state reported OK: %+v", r)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		data, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if !strings.Contains(string(data), ") Z") {
			t.Fatalf("sleep %d still alive after the state was stopped", pid)
		}
	}
}

func TestFile(t *testing.T) {
	e, root := newExec(t)
	real := filepath.Join(root, "etc/app/app.conf")
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","content":"a=1\n","mode":"0600"}`), "File /etc/app/app.conf updated: created")
	data, _ := os.ReadFile(real)
	st, _ := os.Stat(real)
	if string(data) != "a=1\n" || st.Mode().Perm() != 0o600 {
		t.Fatalf("content %q mode %v", data, st.Mode())
	}
	if pst, _ := os.Stat(filepath.Dir(real)); pst.Mode().Perm() != 0o755 {
		t.Errorf("parent mode %v", pst.Mode())
	}
	// Idempotent: a second run changes nothing and says so.
	before, _ := os.Stat(real)
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","content":"a=1\n","mode":"0600"}`), "already in the correct state")
	after, _ := os.Stat(real)
	if !os.SameFile(before, after) {
		t.Error("an unchanged file was rewritten")
	}
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","content":"a=2\n"}`), "updated: content")
	if st, _ := os.Stat(real); st.Mode().Perm() != 0o600 {
		t.Errorf("rewrite lost the mode: %v", st.Mode())
	}
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","mode":"0640"}`), "updated: mode 0640")
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","mode":640}`), "already in the correct state")
	// No content: an existing file is left alone, a missing one is created empty.
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf"}`), "already in the correct state")
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/empty"}`), "created")
	if st, _ := os.Stat(filepath.Join(root, "etc/empty")); st.Size() != 0 || st.Mode().Perm() != 0o644 {
		t.Errorf("empty file %v %d", st.Mode(), st.Size())
	}
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","absent":true,"content":"ignored"}`), "File /etc/app/app.conf removed")
	mustOK(t, run(t, e, "linux.file", `{"path":"/etc/app/app.conf","absent":"true"}`), "already absent")
	if _, err := os.Stat(real); !os.IsNotExist(err) {
		t.Error("file not removed")
	}
	for _, bad := range []struct{ param, want string }{
		{`{}`, "parameter path: is required"},
		{`{"path":"relative/x"}`, "parameter path: must be an absolute path"},
		{`{"path":"/x","mode":"rwx"}`, "parameter mode: must be an octal mode"},
		{`{"path":"/x","absent":"maybe"}`, "parameter absent: must be true or false"},
		{`{"path":"/x","content":["a","b"]}`, "parameter content: must be a string"},
		{`{"path":"/x","remote_uri":"ftp://host/x"}`, "parameter remote_uri: must be an http or https URL"},
		{`{"path":"/etc"}`, "a directory is in the way"},
	} {
		mustFail(t, run(t, e, "linux.file", bad.param), bad.want)
	}
}

func TestFileRemoteURI(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/key.txt" {
			w.Write([]byte("REMOTE KEY\n"))
			return
		}
		http.NotFound(w, r)
	}))
	defer srv.Close()
	e, root := newExec(t)
	mustOK(t, run(t, e, "linux.file", `{"path":"/tmp/fd.key","remote_uri":"`+srv.URL+`/key.txt","content":"ignored"}`), "created")
	if data, _ := os.ReadFile(filepath.Join(root, "tmp/fd.key")); string(data) != "REMOTE KEY\n" {
		t.Errorf("content %q", data)
	}
	mustOK(t, run(t, e, "linux.file", `{"path":"/tmp/fd.key","remote_uri":"`+srv.URL+`/key.txt"}`), "already in the correct state")
	mustFail(t, run(t, e, "linux.file", `{"path":"/tmp/other","remote_uri":"`+srv.URL+`/missing"}`), "404")
}

func TestDir(t *testing.T) {
	e, root := newExec(t)
	mustOK(t, run(t, e, "linux.dir", `{"path":["/srv/www/html","/srv/logs"],"mode":"0750"}`), "Directory /srv/www/html updated: created")
	for _, d := range []string{"srv", "srv/www", "srv/www/html", "srv/logs"} {
		if st, err := os.Stat(filepath.Join(root, d)); err != nil || st.Mode().Perm() != 0o750 {
			t.Errorf("%s: %v %v (missing parents take the directory's attributes)", d, st, err)
		}
	}
	r := run(t, e, "linux.dir", `{"path":["/srv/www/html","/srv/logs"],"mode":"0750"}`)
	if !r.OK || strings.Count(r.Comment, "already in the correct state") != 2 {
		t.Fatalf("second run %+v", r)
	}
	// Recursive mode change reaches sub-directories, not files.
	os.MkdirAll(filepath.Join(root, "srv/www/html/a/b"), 0o700)
	os.WriteFile(filepath.Join(root, "srv/www/html/a/f"), nil, 0o600)
	mustOK(t, run(t, e, "linux.dir", `{"path":"/srv/www","mode":"0755"}`), "mode 0755")
	if st, _ := os.Stat(filepath.Join(root, "srv/www/html/a/b")); st.Mode().Perm() != 0o755 {
		t.Errorf("sub-directory mode %v", st.Mode())
	}
	if st, _ := os.Stat(filepath.Join(root, "srv/www/html/a/f")); st.Mode().Perm() != 0o600 {
		t.Errorf("file mode changed to %v", st.Mode())
	}
	mustOK(t, run(t, e, "linux.dir", `{"path":["/srv/logs"],"mode":"0700","recursive":false}`), "mode 0700")
	mustOK(t, run(t, e, "linux.dir", `{"path":[{"key":"/srv/logs"}],"absent":true}`), "Directory /srv/logs removed")
	mustOK(t, run(t, e, "linux.dir", `{"path":["/srv/logs"],"absent":true}`), "already absent")
	for _, bad := range []struct{ param, want string }{
		{`{}`, "parameter path: is required"},
		{`{"path":[]}`, "parameter path: is required"},
		{`{"path":["ok/relative"]}`, "parameter path[0]: must be an absolute path"},
		{`{"path":{"a":1}}`, "parameter path: must be a list"},
		{`{"path":["/x"],"recursive":"sometimes"}`, "parameter recursive"},
		{`{"path":["/x"],"mode":"999"}`, "parameter mode"},
		{`{"path":["/x"],"group":"no-such-group-xyz"}`, "parameter group"},
	} {
		mustFail(t, run(t, e, "linux.dir", bad.param), bad.want)
	}
	os.WriteFile(filepath.Join(root, "afile"), nil, 0o644)
	mustFail(t, run(t, e, "linux.dir", `{"path":["/afile"]}`), "a file is in the way")
}

func TestSymlink(t *testing.T) {
	e, root := newExec(t)
	os.MkdirAll(filepath.Join(root, "mnt/data"), 0o755)
	os.MkdirAll(filepath.Join(root, "links"), 0o755)
	mustOK(t, run(t, e, "linux.symlink", `{"source":"/mnt/data","target":"/links/data"}`), "Symlink /links/data updated: created -> /mnt/data")
	if got, _ := os.Readlink(filepath.Join(root, "links/data")); got != "/mnt/data" {
		t.Errorf("link -> %q", got)
	}
	mustOK(t, run(t, e, "linux.symlink", `{"source":"/mnt/data","target":"/links/data"}`), "already in the correct state")
	mustOK(t, run(t, e, "linux.symlink", `{"source":"/mnt/other","target":"/links/data"}`), "now -> /mnt/other (was -> /mnt/data)")
	mustFail(t, run(t, e, "linux.symlink", `{"source":"/mnt/data","target":"/nowhere/data"}`), "parent directory /nowhere does not exist")
	mustFail(t, run(t, e, "linux.symlink", `{"source":"/x","target":"/mnt/data"}`), "in the way")
	mustFail(t, run(t, e, "linux.symlink", `{"target":"/links/x"}`), "parameter source: is required")
	mustFail(t, run(t, e, "linux.symlink", `{"source":"/x"}`), "parameter target: is required")
	mustOK(t, run(t, e, "linux.symlink", `{"target":"/links/data","absent":true}`), "Symlink /links/data removed")
	mustOK(t, run(t, e, "linux.symlink", `{"target":"/links/data","absent":true}`), "already absent")
}

func TestOwnership(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody")
	}
	grp, err := user.LookupGroupId(nobody.Gid)
	if err != nil {
		t.Skip("no group for nobody")
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	e, root := newExec(t)
	owned := func(rel string) bool {
		st, err := os.Lstat(filepath.Join(root, rel))
		if err != nil {
			return false
		}
		s := st.Sys().(*syscall.Stat_t)
		return int(s.Uid) == uid && int(s.Gid) == gid
	}
	p := `"user":"nobody","group":"` + grp.Name + `"`
	mustOK(t, run(t, e, "linux.file", `{"path":"/o/f","content":"x",`+p+`}`), "created")
	if !owned("o/f") || !owned("o") {
		t.Error("file or its new parent not owned by nobody")
	}
	mustOK(t, run(t, e, "linux.file", `{"path":"/o/f","content":"y"}`), "content")
	if !owned("o/f") {
		t.Error("rewriting content lost the owner")
	}
	mustOK(t, run(t, e, "linux.file", `{"path":"/o/f","content":"y",`+p+`}`), "already in the correct state")
	mustOK(t, run(t, e, "linux.dir", `{"path":["/d/sub"],`+p+`}`), "created")
	os.MkdirAll(filepath.Join(root, "d/sub/deeper"), 0o755)
	mustOK(t, run(t, e, "linux.dir", `{"path":["/d"],`+p+`}`), "owner")
	if !owned("d/sub/deeper") {
		t.Error("recursive owner not applied")
	}
	mustOK(t, run(t, e, "linux.symlink", `{"source":"/o/f","target":"/o/l",`+p+`}`), "created")
	if !owned("o/l") {
		t.Error("symlink not owned by nobody")
	}
	// nobody must be able to reach the cwd through the test's temp dirs.
	os.Chmod(root, 0o755)
	os.Chmod(filepath.Dir(root), 0o755)
	r := run(t, e, "linux.cmd", `{"cmd":"id -u; pwd","user":"nobody","cwd":"/run-as"}`)
	if !r.OK || !strings.HasPrefix(r.Stdout, nobody.Uid+"\n") {
		t.Fatalf("run as nobody: %+v", r)
	}
}

func TestSharedRecipeParametersParse(t *testing.T) {
	// Every linux.cmd/file/dir/symlink parameter of the real recipes must
	// parse (no "parameter …" failure) — they are run here only as far as
	// parameter decoding, with user/group removed since those users don't
	// exist on the test machine.
	paths, _ := filepath.Glob(filepath.Join("..", "..", "testdata", "recipes", "*.json"))
	if len(paths) == 0 {
		t.Fatal("no recipes in testdata/recipes")
	}
	n := 0
	for _, path := range paths {
		data, _ := os.ReadFile(path)
		var rec struct {
			State []struct {
				Module    string          `json:"module"`
				Parameter json.RawMessage `json:"parameter"`
			} `json:"state"`
		}
		if json.Unmarshal(data, &rec) != nil {
			continue
		}
		for _, st := range rec.State {
			if st.Module != "linux.cmd" && st.Module != "linux.file" && st.Module != "linux.dir" && st.Module != "linux.symlink" {
				continue
			}
			p, err := parseParams(st.Parameter)
			if err != nil {
				t.Errorf("%s: %v", filepath.Base(path), err)
				continue
			}
			for _, name := range []string{"cmd", "shell", "cwd", "path", "content", "source", "target", "remote_uri"} {
				if p.has(name) {
					if _, err := p.str(name); err != nil && name != "path" {
						t.Errorf("%s %s: %v", filepath.Base(path), st.Module, err)
					}
				}
			}
			if _, err := p.env("env"); err != nil {
				t.Errorf("%s: %v", filepath.Base(path), err)
			}
			if _, err := p.integer("timeout", 600); err != nil {
				t.Errorf("%s: %v", filepath.Base(path), err)
			}
			for _, name := range []string{"if-path-present", "if-path-absent", "path"} {
				if _, err := p.list(name); err != nil {
					t.Errorf("%s: %v", filepath.Base(path), err)
				}
			}
			for _, name := range []string{"absent", "recursive"} {
				if _, err := p.boolean(name, false); err != nil {
					t.Errorf("%s: %v", filepath.Base(path), err)
				}
			}
			if _, _, err := p.mode("mode"); err != nil {
				t.Errorf("%s: %v", filepath.Base(path), err)
			}
			n++
		}
	}
	if n < 20 {
		t.Errorf("only %d native states found in the shared recipes", n)
	}
}
