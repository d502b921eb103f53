package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/saltfork"
	"github.com/visualops/opsagent/internal/testutil/statesrepo"
	"github.com/visualops/opsagent/virtualenv/venvtest"
)

// TestSaltPathEndToEnd: a recipe pushed by the backend names a states
// repository served over git smart HTTP; the agent builds its virtualenv,
// clones the repository, and runs the states through the Python bridge.
func TestSaltPathEndToEnd(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed")
	}
	gs := gitserver.New(t)
	url := gs.CreateRepo("states", statesrepo.With(nil))
	gs.Tag("states", "v1")

	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	root := agentRoot(t, b.addr, "salty", "i-salt", "[agent]\nengine = salt\n[salt]\ndelay = 1h\n")
	startAgent(t, root)
	target := filepath.Join(t.TempDir(), "from-salt.txt")
	b.api(t, "PUT", "/api/apps/salty/recipe", `{"module":{"repo":"`+url+`","tag":"v1"},"state":[
	  {"id":"note","module":"meta.comment","parameter":{}},
	  {"id":"hello","module":"linux.cmd","parameter":{"cmd":"echo from salt"}},
	  {"id":"file","module":"linux.file","parameter":{"path":"`+target+`","content":"managed\n"}}]}`)
	eventually(t, "three StateLogs", func() bool { return len(b.logs(t, "salty")) >= 3 })
	logs := b.logs(t, "salty")
	if !logs[1].Result || !strings.Contains(comment(logs[1]), `Command "echo from salt" run`) || logs[1].Stdout == nil || *logs[1].Stdout != "from salt\n" {
		t.Fatalf("salt cmd: %+v %q", logs[1], comment(logs[1]))
	}
	if !logs[2].Result || !strings.Contains(comment(logs[2]), "updated") {
		t.Fatalf("salt file: %q", comment(logs[2]))
	}
	if data, _ := os.ReadFile(target); string(data) != "managed\n" {
		t.Errorf("file content %q", data)
	}
	for _, p := range []string{"opt/visualops/env/bin/python", "opt/visualops/bootstrap/salt/sources/adaptor.py", "var/lib/visualops/opsagent/bridge.py"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("layout: %v", err)
		}
	}
	conf, _ := os.ReadFile(filepath.Join(root, "etc/opsagent.conf"))
	if !strings.Contains(string(conf), url) {
		t.Errorf("the recipe's repository was not written back to the config:\n%s", conf)
	}

	// A tag that does not exist: the first Salt state says so, the comment
	// state before it still succeeds.
	b.api(t, "PUT", "/api/apps/salty/recipe", `{"module":{"repo":"`+url+`","tag":"nope"},"state":[
	  {"id":"note","module":"meta.comment","parameter":{}},
	  {"id":"hello","module":"linux.cmd","parameter":{"cmd":"echo from salt"}}]}`)
	eventually(t, "the failure", func() bool {
		for _, l := range b.logs(t, "salty") {
			if l.StateID == "hello" && !l.Result && strings.Contains(comment(l), "Can't checkout required states tag nope") {
				return true
			}
		}
		return false
	})
}

// BenchmarkAgentStartToFirstSaltState: with a warm virtualenv and an
// existing clone, the time from starting `opsagent run` to the backend
// holding the first StateLog of a Salt state (the persisted recipe is
// resumed at once): with the test fixture on python3, and with the real
// 2014 fork (Salt 2014.1 on Python 2.7).
func BenchmarkAgentStartToFirstSaltState(b *testing.B) {
	b.Run("fixture", func(b *testing.B) {
		if _, err := exec.LookPath("python3"); err != nil {
			b.Skip("python3 not installed")
		}
		gs := gitserver.New(b)
		url := gs.CreateRepo("states", statesrepo.With(nil))
		gs.Tag("states", "v1")
		benchStartToFirstState(b, url, "v1", "")
	})
	b.Run("real-fork", func(b *testing.B) {
		venvtest.Python2(b)
		gs := gitserver.New(b)
		url := gs.FromBundle("salt", filepath.Join(saltfork.Root(b), "testdata", "fixtures", "salt-fork.bundle"))
		benchStartToFirstState(b, url, saltfork.Tag, saltfork.Libs(b))
	})
}

func benchStartToFirstState(b *testing.B, url, tag, wheelhouse string) {
	be := startBackend(b, b.TempDir(), "127.0.0.1:0")
	extra := "[agent]\nengine = salt\n[salt]\ndelay = 1h\n[module]\nbootstrap =\n"
	if wheelhouse != "" {
		extra += "[salt]\nwheelhouse = /wheelhouse\n"
	}
	root := agentRoot(b, be.addr, "start", "i-start", extra)
	if wheelhouse != "" {
		copyDir(b, wheelhouse, filepath.Join(root, "wheelhouse"))
	}
	be.api(b, "PUT", "/api/apps/start/recipe", `{"module":{"repo":"`+url+`","tag":"`+tag+`"},"state":[
	  {"id":"hello","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	first := start(b, "--root", root, "run")
	eventually(b, "first run prepared the venv and clone", func() bool { return len(be.logs(nil, "start")) >= 1 })
	if l := be.logs(nil, "start")[0]; !l.Result {
		b.Fatalf("first state failed: %s", comment(l))
	}
	first.stop(nil, syscall.SIGTERM)
	for i := 0; i < b.N; i++ {
		n := len(be.logs(nil, "start"))
		begin := time.Now()
		agent := start(b, "--root", root, "run")
		eventually(b, "a StateLog after restart", func() bool { return len(be.logs(nil, "start")) > n })
		b.ReportMetric(float64(time.Since(begin).Milliseconds()), "start-to-first-state-ms")
		agent.stop(nil, syscall.SIGTERM)
	}
}
