package e2e

import (
	"crypto/sha256"
	"encoding/hex"
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

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/gemsource"
	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/hgserve"
	"github.com/visualops/opsagent/internal/testutil/npmreg"
	"github.com/visualops/opsagent/internal/testutil/pyindex"
	"github.com/visualops/opsagent/internal/testutil/svnserve"
)

// TestFreshDebianRootSourcesAndLanguages is "Native catalogue II"'s story:
// a fresh Debian 12 root with no Python 2, the real binary with no config
// (the default engine), and a recipe of every source and language module
// against servers on loopback: a git checkout whose requirements file a
// virtualenv installs, an hg clone, an svn checkout behind a password, an
// archive with its checksum, and a pip, an npm and a gem package. Their
// tools (git, mercurial, subversion, pip, venv, npm, ruby) are installed
// by the modules as prerequisites. The next round changes nothing, asks
// no package manager for anything, downloads nothing, and asks the
// servers only what a pinned state needs (nothing) or a branch (one
// read each).
func TestFreshDebianRootSourcesAndLanguages(t *testing.T) {
	root := debroot.New(t)
	if _, err := os.Stat(filepath.Join(root, "usr/bin/python2.7")); err == nil {
		t.Fatal("the Debian root has a Python 2")
	}
	apt := debroot.UseExtras(t, root)

	git := gitserver.New(t)
	git.CreateRepo("app", map[string]string{"requirements.txt": "opsdemo==1.0\n", "README": "app\n"})
	hg := hgserve.Start(t, debroot.NewWith(t, "mercurial"))
	hg.Commit(map[string]string{"README": "hg\n"}, "one")
	svn := svnserve.Start(t, debroot.NewWith(t, "subversion"), "deploy", "s3cret-svn-pw")
	svn.Mkdir("trunk")
	svn.Put(map[string]string{"trunk/README": "svn\n"}, "one")

	// The archive is made by tar, as a user's release would be.
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "site"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "site/index.html"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("tar", "-czf", filepath.Join(dir, "site.tar.gz"), "-C", dir, "site").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	site, err := os.ReadFile(filepath.Join(dir, "site.tar.gz"))
	if err != nil {
		t.Fatal(err)
	}
	var archiveHits atomic.Int64
	files := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		archiveHits.Add(1)
		if r.URL.Path != "/site.tar.gz" {
			http.NotFound(w, r)
			return
		}
		w.Write(site)
	}))
	t.Cleanup(files.Close)
	sum := sha256.Sum256(site)

	pip := pyindex.New(t, pyindex.Dist{Name: "opsdemo", Version: "1.0", Script: "opsdemo"})
	pip.Use(t, root)
	npm := npmreg.New(t, npmreg.Package{Name: "opsnpm", Version: "1.0.0", Bin: "opsnpm"})
	npm.Use(t, root)
	gems := gemsource.New(t, debroot.NewWith(t, "ruby"), gemsource.Gem{Name: "opsgem", Version: "1.0.0", Executable: "opsgem"})
	gems.Use(t, root)

	param := func(kv ...string) string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		data, _ := json.Marshal(m)
		return string(data)
	}
	recipe := `{"state":[
 {"id":"git","module":"common.git","parameter":` + param("path", "/srv/app", "repo", git.RepoURL("app"), "revision", "master") + `},
 {"id":"hg","module":"common.hg","parameter":` + param("path", "/srv/hg", "repo", hg.URL) + `},
 {"id":"svn","module":"common.svn","parameter":` + param("path", "/srv/svn", "repo", svn.URL+"/trunk", "username", "deploy", "password", "s3cret-svn-pw") + `},
 {"id":"archive","module":"common.archive","parameter":` + param("source", files.URL+"/site.tar.gz", "path", "/srv/www", "checksum", "sha256:"+hex.EncodeToString(sum[:])) + `},
 {"id":"venv","module":"common.virtualenv","parameter":` + param("path", "/srv/venv", "requirements-file", "/srv/app/requirements.txt") + `},
 {"id":"pip","module":"common.pip.package","parameter":{"name":[{"key":"opsdemo","value":"1.0"}]}},
 {"id":"npm","module":"common.npm.package","parameter":{"name":[{"key":"opsnpm","value":"1.0.0"}]}},
 {"id":"gem","module":"common.gem.package","parameter":{"name":[{"key":"opsgem","value":"1.0.0"}]}}
]}`
	file := filepath.Join(t.TempDir(), "recipe.json")
	if err := os.WriteFile(file, []byte(recipe), 0o600); err != nil {
		t.Fatal(err)
	}
	type result struct {
		ID      string `json:"id"`
		Result  bool   `json:"result"`
		Changed bool   `json:"changed"`
		Comment string `json:"comment"`
	}
	apply := func(round string) []result {
		t.Helper()
		// No agent config: the defaults (engine auto), as a newcomer has.
		out, err := exec.Command(binary, "apply", "--json", "--root", root, file).Output()
		var rep struct {
			States []result `json:"states"`
		}
		if jerr := json.Unmarshal(out, &rep); jerr != nil || len(rep.States) != 8 {
			t.Fatalf("%s: opsagent apply: %v %v\n%s", round, err, jerr, out)
		}
		for _, s := range rep.States {
			if !s.Result {
				t.Fatalf("%s: state %s failed: %s", round, s.ID, s.Comment)
			}
			if strings.Contains(strings.ToLower(s.Comment), "salt") || strings.Contains(s.Comment, "python2") {
				t.Errorf("%s: state %s went to the Salt path: %s", round, s.ID, s.Comment)
			}
		}
		if err != nil {
			t.Fatalf("%s: opsagent apply: %v\n%s", round, err, out)
		}
		return rep.States
	}

	start := time.Now()
	first := apply("first round")
	t.Logf("first round: %v (the tools installed as prerequisites included)", time.Since(start).Round(time.Millisecond))
	for _, s := range first {
		if !s.Changed {
			t.Errorf("first round: state %s changed nothing: %s", s.ID, s.Comment)
		}
	}
	for _, want := range []struct{ path, content string }{
		{"srv/app/README", "app\n"}, {"srv/hg/README", "hg\n"}, {"srv/svn/README", "svn\n"}, {"srv/www/site/index.html", "hello\n"},
	} {
		if data, err := os.ReadFile(filepath.Join(root, want.path)); err != nil || string(data) != want.content {
			t.Errorf("after the first round, %s: %q %v", want.path, data, err)
		}
	}
	for _, p := range []string{"srv/venv/bin/opsdemo", "usr/local/bin/opsdemo", "usr/local/bin/opsnpm", "usr/local/bin/opsgem"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("after the first round: %v", err)
		}
	}

	aptBefore, archiveBefore := apt.Load(), archiveHits.Load()
	pipBefore, npmBefore, gemBefore := pip.Requests.Load(), npm.Requests.Load(), gems.Requests.Load()
	start = time.Now()
	second := apply("second round")
	t.Logf("second round: %v", time.Since(start).Round(time.Millisecond))
	for _, s := range second {
		if s.Changed {
			t.Errorf("second round: state %s changed: %s", s.ID, s.Comment)
		}
	}
	if n := apt.Load() - aptBefore; n != 0 {
		t.Errorf("second round: %d requests to the apt repository (a package manager ran)", n)
	}
	if n := archiveHits.Load() - archiveBefore; n != 0 {
		t.Errorf("second round: the archive was asked for %d times", n)
	}
	if p, n, g := pip.Requests.Load()-pipBefore, npm.Requests.Load()-npmBefore, gems.Requests.Load()-gemBefore; p+n+g != 0 {
		t.Errorf("second round: pinned packages asked their index: pip %d, npm %d, gem %d requests", p, n, g)
	}
}
