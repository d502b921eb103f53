package native

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/gitserver"
	"github.com/visualops/opsagent/internal/testutil/hgserve"
	"github.com/visualops/opsagent/internal/testutil/svnserve"
)

// BenchmarkNoChangeRoundSources is a round of one source state with
// everything already in place, per module and kind of revision: ms/state
// is the time of one such state. A branch (git, hg) or svn's HEAD costs
// the documented network read (git ls-remote, hg identify, svn info of
// the URL) against a loopback server; a pinned revision and an archive
// cost no process at all.
func BenchmarkNoChangeRoundSources(b *testing.B) {
	bench := func(b *testing.B, r *debianRig, module, param string) {
		b.Helper()
		mustApply(b, r, module, param)
		b.ResetTimer()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			if res := mustApply(b, r, module, param); res.Changed {
				b.Fatalf("%s changed: %s", module, res.Comment)
			}
		}
		b.ReportMetric(float64(time.Since(start).Microseconds())/float64(b.N)/1000, "ms/state")
	}
	// The network read itself, run by hand, for comparison.
	bare := func(b *testing.B, root string, args ...string) {
		b.StopTimer()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			inRoot(b, root, args...)
		}
		b.ReportMetric(float64(time.Since(start).Microseconds())/float64(b.N)/1000, "by-hand-ms")
	}
	b.Run("git-branch-ls-remote-http", func(b *testing.B) {
		r := newGitRig(b)
		srv := gitserver.New(b)
		url := srv.CreateRepo("app", map[string]string{"f": "1\n"})
		bench(b, r, "common.git", gitParam("path", "/srv/app", "repo", url))
		bare(b, r.root, "git", "ls-remote", url, "refs/heads/master")
	})
	b.Run("git-branch-ls-remote-daemon", func(b *testing.B) {
		r := newGitRig(b)
		srv := gitserver.New(b)
		srv.CreateRepo("app", map[string]string{"f": "1\n"})
		url := srv.Daemon() + "/app.git"
		bench(b, r, "common.git", gitParam("path", "/srv/app", "repo", url))
		bare(b, r.root, "git", "ls-remote", url, "refs/heads/master")
	})
	b.Run("git-tag", func(b *testing.B) {
		r := newGitRig(b)
		srv := gitserver.New(b)
		url := srv.CreateRepo("app", map[string]string{"f": "1\n"})
		srv.AnnotatedTag("app", "v1", "one")
		bench(b, r, "common.git", gitParam("path", "/srv/app", "repo", url, "revision", "v1"))
	})
	b.Run("hg-branch-identify", func(b *testing.B) {
		r := newDebianRigWith(b, "mercurial")
		srv := hgserve.Start(b, r.root)
		srv.Commit(map[string]string{"f": "1\n"}, "one")
		bench(b, r, "common.hg", gitParam("path", "/srv/app", "repo", srv.URL))
		bare(b, r.root, "hg", "identify", "-r", "default", srv.URL)
	})
	b.Run("hg-changeset", func(b *testing.B) {
		r := newDebianRigWith(b, "mercurial")
		srv := hgserve.Start(b, r.root)
		node := srv.Commit(map[string]string{"f": "1\n"}, "one")
		bench(b, r, "common.hg", gitParam("path", "/srv/app", "repo", srv.URL, "revision", node))
	})
	b.Run("svn-HEAD-info", func(b *testing.B) {
		r := newDebianRigWith(b, "subversion")
		srv := svnserve.Start(b, r.root, "u", "p")
		srv.Mkdir("trunk")
		srv.Put(map[string]string{"trunk/f": "1\n"}, "one")
		bench(b, r, "common.svn", gitParam("path", "/srv/app", "repo", srv.URL+"/trunk", "username", "u", "password", "p"))
	})
	b.Run("svn-number", func(b *testing.B) {
		r := newDebianRigWith(b, "subversion")
		srv := svnserve.Start(b, r.root, "u", "p")
		srv.Mkdir("trunk")
		rev := srv.Put(map[string]string{"trunk/f": "1\n"}, "one")
		bench(b, r, "common.svn", gitParam("path", "/srv/app", "repo", srv.URL+"/trunk", "username", "u", "password", "p", "revision", fmt.Sprint(rev)))
	})
	b.Run("archive", func(b *testing.B) {
		r := newRigOn(b, debroot.New(b))
		srv := serveFiles(b)
		files := map[string]string{}
		for i := 0; i < 200; i++ {
			files[fmt.Sprintf("app/dir%d/file%d", i%10, i)] = strings.Repeat("x", i)
		}
		tgz := tgzOf(b, files)
		url := srv.put("/app.tar.gz", tgz)
		bench(b, r, "common.archive", archiveParam("source", url, "path", "/opt", "checksum", "md5:"+md5Of(tgz)))
	})
}
