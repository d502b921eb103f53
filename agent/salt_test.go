package agent

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/statesrepo"
	"github.com/visualops/opsagent/protocol"
)

func TestSaltExecutorReportsAndClearsProblems(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed")
	}
	dir := t.TempDir()
	root, _ := fsutil.NewRoot(dir)
	os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
	conf := filepath.Join(dir, "etc/opsagent.conf")
	os.WriteFile(conf, []byte("[userdata]\nws_uri = ws://x/agent/\napp_id = a\n"), 0o640)
	cfg, err := config.Load(conf)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	problem := "unset"
	s := newSaltExecutor(config.NewLayout(root, conf, cfg), cfg, slog.New(slog.DiscardHandler), func(m string) { mu.Lock(); problem = m; mu.Unlock() }, nil)
	defer s.Close()
	req := state.Request{RecipeVersion: 1, StateID: "s", Module: "linux.cmd", Parameter: json.RawMessage(`{"cmd":"echo ok"}`)}

	s.BeginRound(nil)
	res := s.Execute(context.Background(), req)
	if res.OK || !strings.HasPrefix(res.Comment, "no states repository configured") {
		t.Fatalf("no repo: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(dir, "opt/visualops/env")); err == nil {
		t.Error("a virtualenv was built with no repository to use it")
	}
	mu.Lock()
	if !strings.HasPrefix(problem, "no states repository") {
		t.Errorf("init error %q", problem)
	}
	mu.Unlock()

	gs := gitserver.New(t)
	url := gs.CreateRepo("states", statesrepo.With(nil))
	s.BeginRound(&protocol.ModuleSource{Repo: url, Tag: "master"})
	if res := s.Execute(context.Background(), req); !res.OK || res.Stdout != "ok\n" {
		t.Fatalf("with a repository: %+v", res)
	}
	mu.Lock()
	if problem != "" {
		t.Errorf("the problem was not cleared: %q", problem)
	}
	mu.Unlock()
}

// Where no Python 2 exists, a states repository that needs it fails its
// first Salt state with one line that says so and what to do, and with
// engine = auto the native states keep running.
func TestNoPython2ForAPython2Repository(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed")
	}
	dir := t.TempDir()
	root, _ := fsutil.NewRoot(dir)
	os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
	conf := filepath.Join(dir, "etc/opsagent.conf")
	os.WriteFile(conf, []byte("[userdata]\nws_uri = ws://x/agent/\napp_id = a\n[module]\nbootstrap =\n"), 0o640)
	cfg, err := config.Load(conf)
	if err != nil {
		t.Fatal(err)
	}
	gs := gitserver.New(t)
	url := gs.CreateRepo("old-salt", statesrepo.With(map[string]string{"sources/salt/version.py": "__version_info__ = (2014, 1, 0)\n"}))
	empty := t.TempDir()
	t.Setenv("PATH", empty) // no python2.7 on PATH …
	t.Setenv("PYENV_ROOT", empty)
	t.Setenv("HOME", empty) // … nor in pyenv
	if _, err := os.Stat("/usr/bin/python2.7"); err == nil {
		t.Skip("this machine has /usr/bin/python2.7")
	}
	salt := newSaltExecutor(config.NewLayout(root, conf, cfg), cfg, slog.New(slog.DiscardHandler), func(string) {}, nil)
	defer salt.Close()
	router := &rounds.Router{Engine: rounds.EngineAuto, Salt: salt, Native: native.New(native.Options{Root: root})}
	router.BeginRound(&protocol.ModuleSource{Repo: url, Tag: "master"})
	// A module with no native implementation (linux.apt.package, the
	// example here before, is native now).
	res := router.Execute(context.Background(), state.Request{StateID: "mesos", Module: "linux.mesos.master", Parameter: json.RawMessage(`{"cluster":"c"}`)})
	want := "the states repository needs Python 2.7 (Salt 2014.1.0), which is not installed on this instance: install python2.7, or set [agent] engine = native"
	if res.OK || !strings.HasPrefix(res.Comment, want) || strings.Contains(res.Comment, "\n") {
		t.Fatalf("Salt state: %+v", res)
	}
	res = router.Execute(context.Background(), state.Request{StateID: "dir", Module: "linux.dir", Parameter: json.RawMessage(`{"path":["/srv/native"]}`)})
	if !res.OK {
		t.Fatalf("the native state did not run: %+v", res)
	}
}
