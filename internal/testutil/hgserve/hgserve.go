// Package hgserve serves a Mercurial repository on loopback for tests:
// `hg serve` runs inside a test root that has Mercurial installed (a
// debroot), so nothing of the host is used, and it dies with the test.
// An optional front requires HTTP basic authentication, as a private
// repository's server would.
package hgserve

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// Server is one repository served by hg serve.
type Server struct {
	URL  string // http://127.0.0.1:PORT/
	Repo string // the repository, a path inside the root
	root string
	t    testing.TB
}

// Start makes an empty repository at /srv/hg/repo in root and serves it.
func Start(t testing.TB, root string) *Server {
	t.Helper()
	s := &Server{Repo: "/srv/hg/repo", root: root, t: t}
	s.hg("init", s.Repo)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	debroot.StartDaemon(t, root, env(), addr, "hg", "serve", "-R", s.Repo, "-a", "127.0.0.1", "-p", strconv.Itoa(port))
	s.URL = "http://" + addr + "/"
	return s
}

// Commit writes files (path → content) into the repository and commits
// them; it returns the new changeset's id.
func (s *Server) Commit(files map[string]string, msg string) string {
	s.t.Helper()
	for p, content := range files {
		full := filepath.Join(s.root, s.Repo, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			s.t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			s.t.Fatal(err)
		}
	}
	s.hg("-R", s.Repo, "commit", "-A", "-q", "-u", "test", "-m", msg)
	return s.Tip()
}

// Tag tags the tip (a commit of .hgtags) and returns the tagged id.
func (s *Server) Tag(tag string) string {
	s.t.Helper()
	tip := s.Tip()
	s.hg("-R", s.Repo, "tag", "-u", "test", "-r", tip, tag)
	return tip
}

// Tip is the id of the repository's tip.
func (s *Server) Tip() string {
	s.t.Helper()
	return strings.TrimSpace(s.hg("-R", s.Repo, "log", "-r", "tip", "-T", "{node}"))
}

// BasicAuth puts a front on the server that requires user and password
// (HTTP basic authentication) and returns its URL and a counter of the
// requests it refused.
func (s *Server) BasicAuth(user, password string) (string, *atomic.Int64) {
	s.t.Helper()
	target, _ := url.Parse(s.URL)
	proxy := httputil.NewSingleHostReverseProxy(target)
	var refused atomic.Int64
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if !ok || u != user || p != password {
			refused.Add(1)
			w.Header().Set("WWW-Authenticate", `Basic realm="opsagent-test"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	s.t.Cleanup(front.Close)
	return front.URL + "/", &refused
}

func (s *Server) hg(args ...string) string {
	s.t.Helper()
	cmd := exec.Command("chroot", append([]string{s.root, "hg"}, args...)...)
	cmd.Env = env()
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("hg %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func env() []string {
	return []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "HOME=/root", "HGPLAIN=1"}
}
