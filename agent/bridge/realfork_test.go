package bridge

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/saltfork"
	"github.com/visualops/opsagent/internal/testutil/statesrepo"
	"github.com/visualops/opsagent/virtualenv"
	"github.com/visualops/opsagent/virtualenv/venvtest"
)

// These tests drive bridge.py over its JSON-lines protocol directly (not
// through Bridge), so that they test the Python side against the real
// states repository whatever the Go side's options look like.

// answerGuard only keeps a broken worker from hanging the test run; no
// assertion depends on how long anything takes.
const answerGuard = 5 * time.Minute

type pyReply struct {
	Seq     int64  `json:"seq"`
	Event   string `json:"event"`
	Result  bool   `json:"result"`
	Comment string `json:"comment"`
	Stdout  string `json:"stdout"`
}

type pyWorker struct {
	t      *testing.T
	in     io.WriteCloser
	lines  chan string
	stderr string // file with the worker's stderr (Salt's and the adaptor's logs)
	seq    int64
}

// startWorker runs bridge.py (this package's source) as bridge.go does.
func startWorker(t *testing.T, python string) *pyWorker {
	t.Helper()
	script, err := filepath.Abs("bridge.py")
	if err != nil {
		t.Fatal(err)
	}
	stderr := filepath.Join(t.TempDir(), "stderr.log")
	errFile, err := os.Create(stderr)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, "-u", script)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = errFile
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := &pyWorker{t: t, in: in, lines: make(chan string, 16), stderr: stderr}
	go func() {
		defer close(w.lines)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
		for sc.Scan() {
			w.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		_ = in.Close()
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
		errFile.Close()
		if t.Failed() {
			data, _ := os.ReadFile(stderr)
			if len(data) > 8000 {
				data = data[len(data)-8000:]
			}
			t.Logf("bridge stderr (tail):\n%s", data)
		}
	})
	return w
}

// call sends one request and returns its final answer.
func (w *pyWorker) call(req map[string]any) pyReply {
	w.t.Helper()
	w.seq++
	req["seq"] = w.seq
	line, err := json.Marshal(req)
	if err != nil {
		w.t.Fatal(err)
	}
	if _, err := w.in.Write(append(line, '\n')); err != nil {
		w.t.Fatalf("writing to the worker: %v", err)
	}
	guard := time.NewTimer(answerGuard)
	defer guard.Stop()
	for {
		select {
		case l, ok := <-w.lines:
			if !ok {
				w.t.Fatalf("the worker exited during %s", line)
			}
			var r pyReply
			if err := json.Unmarshal([]byte(l), &r); err != nil {
				w.t.Fatalf("malformed line from the worker: %q", l)
			}
			if r.Seq != w.seq {
				w.t.Fatalf("answer to %d while waiting for %d: %s", r.Seq, w.seq, l)
			}
			if r.Event == "started" {
				continue
			}
			return r
		case <-guard.C:
			w.t.Fatalf("no answer to %s", line)
		}
	}
}

func (w *pyWorker) run(id, module string, param map[string]any) pyReply {
	w.t.Helper()
	return w.call(map[string]any{"op": "run", "state_id": id, "module": module, "parameter": param, "recipe_version": 1})
}

// expect checks a state's result and that Salt's comment holds each part.
func expect(t *testing.T, what string, r pyReply, ok bool, parts ...string) {
	t.Helper()
	if r.Result != ok {
		t.Errorf("%s: result %v, want %v: comment %q, stdout %q", what, r.Result, ok, r.Comment, r.Stdout)
		return
	}
	for _, p := range parts {
		if !strings.Contains(r.Comment, p) {
			t.Errorf("%s: comment %q lacks %q", what, r.Comment, p)
		}
	}
}

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

// TestRealFork runs linux.cmd, linux.file, linux.dir and linux.symlink
// through the fork's own adaptor and Salt 2014.1.0 on Python 2.7, in an
// environment built by package virtualenv with the fixture's libraries.
// Every path is inside the test's temporary directory: the adaptor and
// Salt act on absolute host paths.
func TestRealFork(t *testing.T) {
	py2 := venvtest.Python2(t)
	repo := saltfork.Clone(t)
	ctx := context.Background()
	tmp := t.TempDir()
	env, err := virtualenv.Ensure(ctx, virtualenv.Options{Dir: filepath.Join(tmp, "env"), Python: py2})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.InstallFromWheelhouse(ctx, saltfork.Libs(t)); err != nil {
		t.Fatal(err)
	}
	// The adaptor supports a few distributions only; say Debian whatever
	// this machine is.
	osRoot := filepath.Join(tmp, "osroot")
	os.MkdirAll(filepath.Join(osRoot, "etc"), 0o755)
	os.WriteFile(filepath.Join(osRoot, "etc", "os-release"), []byte("ID=debian\nVERSION_ID=\"12\"\n"), 0o644)
	work := filepath.Join(tmp, "work")
	os.MkdirAll(work, 0o755)
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	grp, err := user.LookupGroupId(me.Gid)
	if err != nil {
		t.Fatal(err)
	}
	_, statErr := os.Stat("/opt/visualops/tmp")
	optTmpBefore := statErr == nil

	w := startWorker(t, env.Python)
	if r := w.call(map[string]any{"op": "ping"}); !r.Result {
		t.Fatalf("ping: %+v", r)
	}
	// Real Salt needs its directories; the agent must send them.
	r := w.call(map[string]any{"op": "load", "repo_dir": repo, "config": map[string]any{"site_packages": env.SitePackages, "os_root": osRoot}})
	expect(t, "load without directories", r, false, "config lacks salt.cachedir, salt.extension_modules, salt.srv_root")
	saltDir := filepath.Join(tmp, "salt")
	r = w.call(map[string]any{"op": "load", "repo_dir": repo, "config": map[string]any{
		"site_packages": env.SitePackages,
		"os_root":       osRoot,
		"watch_dir":     filepath.Join(tmp, "watch"),
		"global":        map[string]any{"conf_path": filepath.Join(tmp, "conf"), "watch": filepath.Join(tmp, "watch")},
		"salt": map[string]any{
			"srv_root":          filepath.Join(saltDir, "srv"),
			"extension_modules": filepath.Join(saltDir, "extmods"),
			"cachedir":          filepath.Join(saltDir, "cache"),
		},
	}})
	if !r.Result {
		t.Fatalf("load: %+v", r)
	}
	for _, d := range []string{"srv", "extmods", "cache"} {
		if _, err := os.Stat(filepath.Join(saltDir, d)); err != nil {
			t.Errorf("Salt directory %s not created: %v", d, err)
		}
	}

	// linux.cmd: Salt's comment, the command's output (stdout and stderr
	// together, as the fork reports them), in the cwd given.
	cmd := "echo hello; echo oops >&2; pwd"
	r = w.run("cmd", "linux.cmd", map[string]any{"cmd": cmd, "cwd": work})
	expect(t, "linux.cmd", r, true, fmt.Sprintf("Command %q run", cmd))
	for _, want := range []string{"hello\n", "oops\n", work + "\n"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("linux.cmd stdout %q lacks %q", r.Stdout, want)
		}
	}
	failing := "echo failing; exit 3"
	r = w.run("fail", "linux.cmd", map[string]any{"cmd": failing, "cwd": work})
	expect(t, "failing linux.cmd", r, false, fmt.Sprintf("Command %q run", failing))
	if !strings.Contains(r.Stdout, "failing") {
		t.Errorf("failing linux.cmd stdout %q", r.Stdout)
	}
	// Non-ASCII in the command, its output and Salt's comment (byte
	// strings on Python 2).
	accented := "echo 'héllo wörld'"
	r = w.run("utf8", "linux.cmd", map[string]any{"cmd": accented, "cwd": work})
	expect(t, "non-ASCII linux.cmd", r, true, fmt.Sprintf("Command \"%s\" run", accented))
	if r.Stdout != "héllo wörld\n" {
		t.Errorf("non-ASCII stdout %q", r.Stdout)
	}
	nowhere := filepath.Join(tmp, "no-such-dir")
	r = w.run("nowhere", "linux.cmd", map[string]any{"cmd": "true", "cwd": nowhere})
	expect(t, "linux.cmd in a missing cwd", r, false, fmt.Sprintf("Desired working directory %q is not available", nowhere))

	// linux.file: content and mode; the second run changes nothing.
	conf := filepath.Join(work, "app.conf")
	fileParam := map[string]any{"path": conf, "content": "key=value\n", "mode": "600", "user": me.Username, "group": grp.Name}
	expect(t, "linux.file", w.run("file", "linux.file", fileParam), true, "File "+conf+" updated")
	if data, err := os.ReadFile(conf); err != nil || string(data) != "key=value\n" {
		t.Errorf("file content %q %v", data, err)
	}
	if m := mode(t, conf); m != 0o600 {
		t.Errorf("file mode %o, want 600", m)
	}
	expect(t, "linux.file again", w.run("file", "linux.file", fileParam), true, "File "+conf+" is in the correct state")
	os.WriteFile(conf, []byte("edited by hand\n"), 0o644)
	expect(t, "linux.file after an edit", w.run("file", "linux.file", fileParam), true, "File "+conf+" updated")
	if data, _ := os.ReadFile(conf); string(data) != "key=value\n" || mode(t, conf) != 0o600 {
		t.Errorf("file not restored: %q %o", data, mode(t, conf))
	}

	// linux.dir: several paths, parents made, mode set.
	deep, flat := filepath.Join(work, "d", "a", "b"), filepath.Join(work, "d", "c")
	dirParam := map[string]any{"path": []string{deep, flat}, "mode": "750", "user": me.Username, "group": grp.Name}
	expect(t, "linux.dir", w.run("dir", "linux.dir", dirParam), true, "Directory "+deep+" updated", "Directory "+flat+" updated")
	for _, d := range []string{deep, flat} {
		if m := mode(t, d); m != 0o750 {
			t.Errorf("%s mode %o, want 750", d, m)
		}
	}
	expect(t, "linux.dir again", w.run("dir", "linux.dir", dirParam), true,
		"Directory "+deep+" is in the correct state", "Directory "+flat+" is in the correct state")

	// linux.symlink: target is the link, source what it points to.
	link := filepath.Join(work, "app-link.conf")
	linkParam := map[string]any{"source": conf, "target": link, "user": me.Username, "group": grp.Name}
	expect(t, "linux.symlink", w.run("link", "linux.symlink", linkParam), true, "Created new symlink "+link+" -> "+conf)
	if to, err := os.Readlink(link); err != nil || to != conf {
		t.Errorf("symlink points to %q (%v), want %s", to, err, conf)
	}
	expect(t, "linux.symlink again", w.run("link", "linux.symlink", linkParam), true,
		fmt.Sprintf("Symlink %s is present and owned by %s:%s", link, me.Username, grp.Name))

	// The adaptor's own errors: raised (unknown module), or logged and
	// swallowed by convert() (it then returns None) — a failure either way.
	expect(t, "unknown module", w.run("x", "linux.nosuch", map[string]any{}), false, "StateException: Unsupported module linux.nosuch")
	expect(t, "bad parameter", w.run("pkg", "linux.apt.package", map[string]any{"name": "not-a-list"}), false,
		"Build up module state failed: linux.apt.package")

	// The worker is still warm and well.
	expect(t, "after errors", w.run("cmd", "linux.cmd", map[string]any{"cmd": "true", "cwd": work}), true, `Command "true" run`)
	// Loading again (the checkout was updated) re-imports the adaptor and
	// Salt, here with Salt's options given whole.
	opts := map[string]any{
		"file_client": "local", "renderer": "yaml_jinja", "failhard": false, "state_top": "salt://top.sls",
		"nodegroups": map[string]any{}, "file_roots": map[string]any{"base": []string{filepath.Join(saltDir, "srv")}},
		"state_auto_order": false, "extension_modules": filepath.Join(saltDir, "extmods"), "id": "", "pillar_roots": "",
		"cachedir": filepath.Join(saltDir, "cache"), "test": true, "environment": nil,
	}
	r = w.call(map[string]any{"op": "load", "repo_dir": repo, "config": map[string]any{"site_packages": env.SitePackages, "os_root": osRoot, "salt_opts": opts}})
	if !r.Result {
		t.Fatalf("reload with salt_opts: %+v", r)
	}
	// test: true is Salt's dry run: result None, which is not a success.
	r = w.run("dry", "linux.cmd", map[string]any{"cmd": "touch " + filepath.Join(work, "dry"), "cwd": work})
	expect(t, "dry run", r, false, "would have been executed")
	if _, err := os.Stat(filepath.Join(work, "dry")); err == nil {
		t.Error("a dry run ran the command")
	}
	if _, err := os.Stat("/opt/visualops/tmp"); err == nil && !optTmpBefore {
		t.Error("the adaptor created /opt/visualops/tmp on the host")
	}
}

// watchAdaptor has the 2014 adaptor's watch map forms (file_key, dir_key
// with file, rerun) over the fixture's Salt stand-in.
const watchAdaptor = `# TEST FIXTURE adaptor: the 2014 watch map forms.
import os
from opsagent.exception import StateException


class StateAdaptor(object):
    watch = {
        "test.service": {"file_key": "watch", "tfirst": True},
        "test.built": {"file": "Dockerfile", "dir_key": "path", "tfirst": False},
        "test.deploy": {"file_key": "files", "tfirst": False, "rerun": True,
                        "action": lambda config, parameter: [f["key"] for f in parameter["files"]]},
    }

    def __init__(self, runner):
        self.config = runner.config

    def convert(self, step, module, parameter):
        watch = "watch=%r" % (parameter.get("watch"),)
        if module == "test.deploy":
            if parameter.get("watch") is True:
                return [{step: {"test": ["echo", {"text": "restarted"}]}}]
            f = parameter["files"][0]
            return [{step: {"file": ["managed", {"name": f["key"], "contents": f["value"]}]}}]
        if module in ("test.service", "test.built"):
            return [{step: {"test": ["echo", {"text": watch}]}}]
        raise StateException("module %s is not supported by this fixture" % module)
`

// TestWatchMap2014 checks the watch map forms of the real adaptor: the list
// of watched files never reaches the adaptor as "watch" (it would read it as
// "restart" on every run), dir_key+file, tfirst, and rerun.
func TestWatchMap2014(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	tmp := t.TempDir()
	repo := filepath.Join(tmp, "salt")
	if err := statesrepo.Write(repo, map[string]string{"sources/adaptor.py": watchAdaptor}); err != nil {
		t.Fatal(err)
	}
	watchDir := filepath.Join(tmp, "watch")
	os.MkdirAll(watchDir, 0o755)
	w := startWorker(t, py)
	if r := w.call(map[string]any{"op": "load", "repo_dir": repo, "config": map[string]any{"watch_dir": watchDir}}); !r.Result {
		t.Fatalf("load: %+v", r)
	}

	conf := filepath.Join(tmp, "svc.conf")
	os.WriteFile(conf, []byte("v1"), 0o644)
	svc := map[string]any{"name": "svc", "watch": []string{conf}}
	expect(t, "service, first run (tfirst)", w.run("svc", "test.service", svc), true, "watch=True")
	expect(t, "service, unchanged", w.run("svc", "test.service", svc), true, "watch=None")
	os.WriteFile(conf, []byte("v2"), 0o644)
	expect(t, "service, changed", w.run("svc", "test.service", svc), true, "watch=True")

	build := filepath.Join(tmp, "build")
	os.MkdirAll(build, 0o755)
	os.WriteFile(filepath.Join(build, "Dockerfile"), []byte("FROM a"), 0o644)
	expect(t, "built, first run (no tfirst)", w.run("img", "test.built", map[string]any{"path": build}), true, "watch=None")
	os.WriteFile(filepath.Join(build, "Dockerfile"), []byte("FROM b"), 0o644)
	expect(t, "built, Dockerfile changed", w.run("img", "test.built", map[string]any{"path": build}), true, "watch=True")
	cksum := filepath.Join(watchDir, "img-"+strings.ReplaceAll(filepath.Join(build, "Dockerfile"), "/", "-")+".cksum")
	if _, err := os.Stat(cksum); err != nil {
		t.Errorf("checksum of the Dockerfile: %v", err)
	}

	// rerun: the state writes the watched file; a change it made restarts.
	deployed := filepath.Join(tmp, "deployed.conf")
	deploy := func(content string) pyReply {
		return w.run("dep", "test.deploy", map[string]any{"files": []map[string]string{{"key": deployed, "value": content}}})
	}
	if r := deploy("a"); !r.Result || strings.Contains(r.Comment, "restarted") {
		t.Errorf("deploy, first run: %+v", r)
	}
	if r := deploy("a"); !r.Result || strings.Contains(r.Comment, "restarted") {
		t.Errorf("deploy, unchanged: %+v", r)
	}
	expect(t, "deploy, changed", deploy("b"), true, "File "+deployed+" updated", "restarted")
}
