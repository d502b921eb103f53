package bridge

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/testutil/statesrepo"
)

func python(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	return p
}

type rig struct {
	b     *Bridge
	repo  string
	state string
}

func newRig(t testing.TB, extra map[string]string) *rig {
	t.Helper()
	dir := t.TempDir()
	repo := filepath.Join(dir, "salt")
	if err := statesrepo.Write(repo, extra); err != nil {
		t.Fatal(err)
	}
	r := &rig{repo: repo, state: filepath.Join(dir, "state")}
	r.b = New(Options{Python: python(t), Script: filepath.Join(r.state, "bridge.py"), WatchDir: filepath.Join(dir, "watch"), KillGrace: time.Second})
	os.MkdirAll(filepath.Join(dir, "watch"), 0o700)
	r.b.SetRepo(repo, false)
	t.Cleanup(r.b.Close)
	return r
}

func (r *rig) run(t testing.TB, ctx context.Context, id, module string, param any) state.Result {
	t.Helper()
	p, _ := json.Marshal(param)
	return r.b.Execute(ctx, state.Request{RecipeVersion: 1, StateID: id, Module: module, Parameter: p})
}

func TestRunsStatesThroughTheFixture(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	res := r.run(t, ctx, "s1", "linux.cmd", map[string]string{"cmd": "echo hello"})
	if !res.OK || res.Stdout != "hello\n" || !strings.Contains(res.Comment, `Command "echo hello" run`) {
		t.Fatalf("cmd: %+v", res)
	}
	res = r.run(t, ctx, "s2", "linux.cmd", map[string]string{"cmd": "echo oops >&2; exit 2"})
	if res.OK || !strings.Contains(res.Stdout, "oops") {
		t.Fatalf("failing cmd: %+v", res)
	}
	path := filepath.Join(t.TempDir(), "f.txt")
	res = r.run(t, ctx, "s3", "linux.file", map[string]string{"path": path, "content": "x\n"})
	if !res.OK || !strings.Contains(res.Comment, "updated") {
		t.Fatalf("file: %+v", res)
	}
	res = r.run(t, ctx, "s3", "linux.file", map[string]string{"path": path, "content": "x\n"})
	if !res.OK || !strings.Contains(res.Comment, "correct state") {
		t.Fatalf("file again: %+v", res)
	}
	// Two chunks: stop at the first failing one.
	res = r.run(t, ctx, "s4", "test.two", map[string]string{"first": "exit 1", "second": "touch " + path + ".second"})
	if res.OK {
		t.Fatalf("two chunks: %+v", res)
	}
	if _, err := os.Stat(path + ".second"); err == nil {
		t.Error("the chunk after a failure ran")
	}
	res = r.run(t, ctx, "s5", "test.nothing", map[string]string{})
	if !res.OK || res.Comment != "nothing to do" {
		t.Fatalf("nothing: %+v", res)
	}
	res = r.run(t, ctx, "s6", "linux.unknown", map[string]string{})
	if res.OK || !strings.Contains(res.Comment, "StateException: module linux.unknown is not supported") {
		t.Fatalf("adaptor exception: %+v", res)
	}
}

func Test2014AdaptorImports(t *testing.T) {
	r := newRig(t, map[string]string{
		"sources/adaptor.py": statesrepo.Files["sources/adaptor.py"] + "\nimport adaptor2014_imports\nassert adaptor2014_imports.OK\n",
	})
	if res := r.run(t, context.Background(), "s", "test.nothing", map[string]string{}); !res.OK {
		t.Fatalf("the 2014 imports do not resolve through the shim: %+v", res)
	}
}

func TestKillDuringLongState(t *testing.T) {
	r := newRig(t, nil)
	pidFile := filepath.Join(t.TempDir(), "pid")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan state.Result)
	go func() {
		done <- r.run(t, ctx, "long", "linux.cmd", map[string]string{"cmd": "sleep 300 & echo $! > " + pidFile + "; wait"})
	}()
	var pid int
	for deadline := time.Now().Add(20 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		data, _ := os.ReadFile(pidFile)
		pid, _ = strconv.Atoi(strings.TrimSpace(string(data)))
	}
	if pid == 0 {
		t.Fatal("the state never started")
	}
	cancel()
	select {
	case res := <-done:
		if res.OK {
			t.Errorf("stopped state reported OK: %+v", res)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Execute did not return after cancel")
	}
	data, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if len(data) > 0 && !strings.Contains(string(data), ") Z") {
		t.Fatalf("sleep %d survived", pid)
	}
	// The warm worker is still usable.
	if res := r.run(t, context.Background(), "after", "linux.cmd", map[string]string{"cmd": "echo ok"}); !res.OK {
		t.Fatalf("after kill: %+v", res)
	}
}

func TestWorkerCrashThenRecovers(t *testing.T) {
	r := newRig(t, nil)
	res := r.run(t, context.Background(), "boom", "test.crash", map[string]string{})
	if res.OK || !strings.Contains(res.Comment, "worker failed while running state boom") || !strings.Contains(res.Comment, "restarted") {
		t.Fatalf("crash: %+v", res)
	}
	if res := r.run(t, context.Background(), "next", "linux.cmd", map[string]string{"cmd": "echo back"}); !res.OK || res.Stdout != "back\n" {
		t.Fatalf("after crash: %+v", res)
	}
}

func TestMalformedWorkerOutput(t *testing.T) {
	r := newRig(t, nil)
	res := r.run(t, context.Background(), "g", "test.garbage", map[string]string{})
	if res.OK || !strings.Contains(res.Comment, "malformed output") {
		t.Fatalf("garbage: %+v", res)
	}
	if res := r.run(t, context.Background(), "next", "linux.cmd", map[string]string{"cmd": "true"}); !res.OK {
		t.Fatalf("after garbage: %+v", res)
	}
}

func TestWatchedFiles(t *testing.T) {
	r := newRig(t, nil)
	conf := filepath.Join(t.TempDir(), "app.conf")
	os.WriteFile(conf, []byte("v1"), 0o644)
	param := map[string]any{"name": "app", "config": []string{conf}}
	// tfirst: the first run restarts.
	if res := r.run(t, context.Background(), "svc", "test.service", param); !strings.HasPrefix(res.Comment, "watch=True") {
		t.Fatalf("first run: %+v", res)
	}
	if res := r.run(t, context.Background(), "svc", "test.service", param); !strings.HasPrefix(res.Comment, "watch=False") {
		t.Fatalf("unchanged: %+v", res)
	}
	os.WriteFile(conf, []byte("v2"), 0o644)
	if res := r.run(t, context.Background(), "svc", "test.service", param); !strings.HasPrefix(res.Comment, "watch=True") {
		t.Fatalf("changed: %+v", res)
	}
	want := filepath.Join(r.b.opts.WatchDir, "svc-"+strings.ReplaceAll(conf, "/", "-")+".cksum")
	if _, err := os.Stat(want); err != nil {
		t.Errorf("checksum file: %v", err)
	}
}

func TestScriptWrittenOnlyWhenChanged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "state", "bridge.py")
	if err := WriteScript(p); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	os.Chtimes(p, old, old)
	WriteScript(p)
	if st, _ := os.Stat(p); !st.ModTime().Equal(old) {
		t.Error("unchanged bridge.py rewritten")
	}
	os.WriteFile(p, []byte("stale"), 0o644)
	WriteScript(p)
	if data, _ := os.ReadFile(p); string(data) != string(script) {
		t.Error("stale bridge.py not replaced")
	}
}

func TestBadRepoAndNoRepo(t *testing.T) {
	b := New(Options{Python: python(t), Script: filepath.Join(t.TempDir(), "bridge.py")})
	defer b.Close()
	if res := b.Execute(context.Background(), state.Request{StateID: "s", Module: "linux.cmd"}); res.OK || !strings.Contains(res.Comment, "no states repository configured") {
		t.Fatalf("%+v", res)
	}
	b.SetRepo(t.TempDir(), false) // empty: no adaptor
	if res := b.Execute(context.Background(), state.Request{StateID: "s", Module: "linux.cmd"}); res.OK || !strings.Contains(res.Comment, "cannot load the states repository") {
		t.Fatalf("%+v", res)
	}
}

// TestOtherPythons loads the bridge with Python 2.7 and 3.6 when present
// (pyenv on the dev machine), since the 2014 fork is Python 2 only.
func TestOtherPythons(t *testing.T) {
	found := 0
	for _, v := range []string{"2.7.18", "3.6.15"} {
		py := filepath.Join(os.Getenv("HOME"), ".pyenv", "versions", v, "bin", "python")
		if _, err := os.Stat(py); err != nil {
			continue
		}
		found++
		t.Run(v, func(t *testing.T) {
			r := newRig(t, nil)
			r.b.opts.Python = py
			if res := r.run(t, context.Background(), "s", "linux.cmd", map[string]string{"cmd": "echo hi"}); !res.OK || res.Stdout != "hi\n" {
				t.Fatalf("python %s: %+v", v, res)
			}
		})
	}
	if found == 0 {
		t.Skip("no python 2.7 or 3.6 found")
	}
}
