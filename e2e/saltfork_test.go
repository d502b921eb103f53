package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/saltfork"
	"github.com/visualops/opsagent/virtualenv/venvtest"
)

// copyDir copies a directory tree (regular files and directories).
func copyDir(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// forkAgent starts an agent whose states go through the real 2014 fork:
// the bundle served over git smart HTTP, engine = salt, Salt's libraries
// offline from the fixture wheelhouse, bootstrap.sh not run (it downloads
// from the internet; TestForkBootstrapScript runs it without a network).
func forkAgent(t *testing.T, b *backendProc, app string) (url string) {
	t.Helper()
	venvtest.Python2(t)
	gs := gitserver.New(t)
	url = gs.FromBundle("salt", filepath.Join(saltfork.Root(t), "testdata", "fixtures", "salt-fork.bundle"))
	root := agentRoot(t, b.addr, app, "i-"+app, "[agent]\nengine = salt\nretry_delay = 1s\n[salt]\ndelay = 1s\nwheelhouse = /wheelhouse\n[module]\nbootstrap =\n")
	copyDir(t, saltfork.Libs(t), filepath.Join(root, "wheelhouse"))
	startAgent(t, root)
	return url
}

// TestRealSaltForkEndToEnd applies a recipe in the shapes of the shared
// recipes through the real adaptor and the real Salt 2014.1 on Python 2.7:
// StateLogs carry Salt's own comments, the next round reports nothing to
// change, and a failing command fails with Salt's words.
func TestRealSaltForkEndToEnd(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	url := forkAgent(t, b, "fork")
	work := t.TempDir()
	www, index, current := filepath.Join(work, "www"), filepath.Join(work, "www", "index.html"), filepath.Join(work, "current")
	b.api(t, "PUT", "/api/apps/fork/recipe", fmt.Sprintf(`{"module":{"repo":%q,"tag":%q},"state":[
	  {"id":"about","module":"meta.comment","parameter":{"comment":"the real fork"}},
	  {"id":"webroot","module":"linux.dir","parameter":{"path":[%q],"mode":"0755"}},
	  {"id":"index","module":"linux.file","parameter":{"path":%q,"content":"<h1>hello from Salt</h1>\n","mode":"0640"}},
	  {"id":"current","module":"linux.symlink","parameter":{"source":%q,"target":%q}},
	  {"id":"check","module":"linux.cmd","parameter":{"cmd":"cat index.html","cwd":%q}}]}`,
		url, saltfork.Tag, www, index, www, current, www))

	// Two full rounds: ten StateLogs.
	eventually(t, "two rounds of StateLogs", func() bool { return len(b.logs(t, "fork")) >= 10 })
	logs := b.logs(t, "fork")
	first, second := map[string]logEntry{}, map[string]logEntry{}
	for i, l := range logs[:10] {
		if i < 5 {
			first[l.StateID] = l
		} else {
			second[l.StateID] = l
		}
	}
	for id, want := range map[string]string{
		"webroot": "Directory " + www + " updated",
		"index":   "File " + index + " updated",
		"current": "Created new symlink " + current + " -> " + www,
		"check":   `Command "cat index.html" run`,
	} {
		if l := first[id]; !l.Result || !strings.Contains(comment(l), want) {
			t.Errorf("round 1 %s: result %v comment %q, want it to contain %q", id, l.Result, comment(l), want)
		}
	}
	if l := first["check"]; l.Stdout == nil || !strings.Contains(*l.Stdout, "hello from Salt") {
		t.Errorf("the command's output is not in its StateLog: %+v", l)
	}
	for id, want := range map[string]string{
		"webroot": "Directory " + www + " is in the correct state",
		"index":   "File " + index + " is in the correct state",
		"current": "Symlink " + current + " is present",
	} {
		if l := second[id]; !l.Result || !strings.Contains(comment(l), want) {
			t.Errorf("round 2 %s: %q, want it to say %q", id, comment(l), want)
		}
	}
	if st, err := os.Stat(index); err != nil || st.Mode().Perm() != 0o640 {
		t.Errorf("index.html: %v %v", st, err)
	}
	if target, err := os.Readlink(current); err != nil || target != www {
		t.Errorf("symlink: %q %v", target, err)
	}

	// A failing command fails with Salt's comment.
	n := len(b.logs(t, "fork"))
	b.api(t, "PUT", "/api/apps/fork/recipe", fmt.Sprintf(`{"module":{"repo":%q,"tag":%q},"state":[
	  {"id":"bad","module":"linux.cmd","parameter":{"cmd":"echo broken >&2; exit 3","cwd":%q}}]}`, url, saltfork.Tag, work))
	eventually(t, "the failing command's StateLog", func() bool {
		for _, l := range b.logs(t, "fork")[n:] {
			if l.StateID == "bad" {
				return true
			}
		}
		return false
	})
	for _, l := range b.logs(t, "fork")[n:] {
		if l.StateID != "bad" {
			continue
		}
		if l.Result || !strings.Contains(comment(l), `Command "echo broken >&2; exit 3" run`) || l.Stdout == nil || !strings.Contains(*l.Stdout, "broken") {
			t.Errorf("failing command: result %v comment %q stdout %v", l.Result, comment(l), l.Stdout)
		}
		break
	}
}
