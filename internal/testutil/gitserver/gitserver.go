// Package gitserver is a test helper: it serves git repositories over the
// smart HTTP protocol on loopback (git http-backend behind net/http/cgi), so
// that clone and fetch code is tested against a real server with no
// internet. Repositories are created and changed with the git command line.
package gitserver

import (
	"net"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/wait"
)

// Server serves the bare repositories under Dir at URL/<name>.git.
type Server struct {
	Dir string
	URL string
	t   testing.TB
}

// New starts a server for the life of the test.
func New(t testing.TB) *Server {
	t.Helper()
	out, err := exec.Command("git", "--exec-path").Output()
	if err != nil {
		t.Skipf("git is not installed: %v", err)
	}
	backend := filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	dir := t.TempDir()
	h := &cgi.Handler{
		Path: backend,
		Env:  []string{"GIT_PROJECT_ROOT=" + dir, "GIT_HTTP_EXPORT_ALL=1"},
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &Server{Dir: dir, URL: srv.URL, t: t}
}

// RepoURL is the clone URL of repository name.
func (s *Server) RepoURL(name string) string { return s.URL + "/" + name + ".git" }

// work is the scratch clone used to make commits to name.
func (s *Server) work(name string) string { return filepath.Join(s.Dir, ".work", name) }

// CreateRepo makes a repository with one commit holding files (path →
// content; a path ending in ".sh" is made executable) on branch master.
func (s *Server) CreateRepo(name string, files map[string]string) string {
	s.t.Helper()
	bare := filepath.Join(s.Dir, name+".git")
	s.git("", "init", "-q", "--bare", "-b", "master", bare)
	s.git("", "init", "-q", "-b", "master", s.work(name))
	s.git(s.work(name), "remote", "add", "origin", bare)
	s.Commit(name, files, "initial")
	return s.RepoURL(name)
}

// Commit writes files into the repository and pushes a commit to master.
// An empty content deletes the file.
func (s *Server) Commit(name string, files map[string]string, msg string) {
	s.t.Helper()
	w := s.work(name)
	for p, content := range files {
		full := filepath.Join(w, p)
		if content == "" {
			_ = os.Remove(full)
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			s.t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if strings.HasSuffix(p, ".sh") {
			mode = 0o755
		}
		if err := os.WriteFile(full, []byte(content), mode); err != nil {
			s.t.Fatal(err)
		}
	}
	s.git(w, "add", "-A")
	s.git(w, "commit", "-q", "--allow-empty", "-m", msg)
	s.git(w, "push", "-q", "origin", "HEAD:master")
}

// Tag tags the current master as tag and pushes it.
func (s *Server) Tag(name, tag string) {
	s.t.Helper()
	s.git(s.work(name), "tag", "-f", tag)
	s.git(s.work(name), "push", "-q", "-f", "origin", "refs/tags/"+tag)
}

// AnnotatedTag tags the current master with an annotated tag and pushes
// it.
func (s *Server) AnnotatedTag(name, tag, msg string) {
	s.t.Helper()
	s.git(s.work(name), "tag", "-f", "-a", "-m", msg, tag)
	s.git(s.work(name), "push", "-q", "-f", "origin", "refs/tags/"+tag)
}

// Daemon serves the same repositories over the git protocol (git daemon)
// on loopback for the life of the test, and returns the base URL:
// repository name is at base + "/" + name + ".git".
func (s *Server) Daemon() string {
	s.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	ln.Close()
	cmd := exec.Command("git", "daemon", "--export-all", "--reuseaddr", "--base-path="+s.Dir,
		"--listen=127.0.0.1", "--port="+strconv.Itoa(addr.Port), s.Dir)
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("git daemon: %v", err)
	}
	s.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	wait.Eventually(s.t, "git daemon listening on "+addr.String(), func() bool {
		c, err := net.Dial("tcp", addr.String())
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return "git://" + addr.String()
}

// Branch pushes the current master as another branch.
func (s *Server) Branch(name, branch string) {
	s.t.Helper()
	s.git(s.work(name), "push", "-q", "-f", "origin", "HEAD:refs/heads/"+branch)
}

// Head returns the commit of master.
func (s *Server) Head(name string) string {
	s.t.Helper()
	return strings.TrimSpace(s.git(s.work(name), "rev-parse", "HEAD"))
}

func (s *Server) git(dir string, args ...string) string {
	s.t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=test", "GIT_AUTHOR_EMAIL=test@example.com",
		"GIT_COMMITTER_NAME=test", "GIT_COMMITTER_EMAIL=test@example.com", "GIT_CONFIG_NOSYSTEM=1", "HOME="+s.Dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// FromBundle serves a git bundle (all its branches and tags) as
// repository name and returns its clone URL.
func (s *Server) FromBundle(name, bundle string) string {
	s.t.Helper()
	bare := filepath.Join(s.Dir, name+".git")
	s.git("", "clone", "-q", "--bare", bundle, bare)
	return s.RepoURL(name)
}
