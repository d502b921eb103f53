// Package svnserve serves a Subversion repository on loopback for tests,
// with a password: svnserve runs inside a test root that has Subversion
// installed (a debroot), so nothing of the host is used, and it dies with
// the test. Changes are committed with svnmucc through file:// inside the
// root.
package svnserve

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// Server is one repository served by svnserve.
type Server struct {
	URL  string // svn://127.0.0.1:PORT/repo
	Repo string // the repository, a path inside the root
	root string
	t    testing.TB
	n    int
}

// Start makes an empty repository at /srv/svn/repo in root, readable and
// writable only by user with password, and serves it.
func Start(t testing.TB, root, user, password string) *Server {
	t.Helper()
	s := &Server{Repo: "/srv/svn/repo", root: root, t: t}
	s.run("mkdir", "-p", "/srv/svn")
	s.run("svnadmin", "create", s.Repo)
	conf := "[general]\nanon-access = none\nauth-access = write\npassword-db = passwd\nrealm = opsagent-test\n"
	s.write(s.Repo+"/conf/svnserve.conf", conf)
	s.write(s.Repo+"/conf/passwd", fmt.Sprintf("[users]\n%s = %s\n", user, password))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	debroot.StartDaemon(t, root, env(), addr, "svnserve", "-d", "--foreground", "-r", "/srv/svn", "--listen-host", "127.0.0.1", "--listen-port", strconv.Itoa(port))
	s.URL = "svn://" + addr + "/repo"
	return s
}

// Mkdir makes directories in the repository (one commit).
func (s *Server) Mkdir(dirs ...string) int {
	s.t.Helper()
	args := []string{"-m", "mkdir", "-U", "file://" + s.Repo}
	for _, d := range dirs {
		args = append(args, "mkdir", d)
	}
	s.run("svnmucc", args...)
	return s.Youngest()
}

// Put commits files (repository path → content), whose directories must
// exist, and returns the new revision.
func (s *Server) Put(files map[string]string, msg string) int {
	s.t.Helper()
	args := []string{"-m", msg, "-U", "file://" + s.Repo}
	for p, content := range files {
		s.n++
		local := fmt.Sprintf("/tmp/svnserve-put-%d", s.n)
		s.write(local, content)
		args = append(args, "put", local, p)
	}
	s.run("svnmucc", args...)
	return s.Youngest()
}

// Youngest is the repository's newest revision.
func (s *Server) Youngest() int {
	s.t.Helper()
	n, err := strconv.Atoi(strings.TrimSpace(s.run("svnlook", "youngest", s.Repo)))
	if err != nil {
		s.t.Fatal(err)
	}
	return n
}

func (s *Server) write(p, content string) {
	s.t.Helper()
	if err := os.MkdirAll(filepath.Dir(filepath.Join(s.root, p)), 0o755); err != nil {
		s.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.root, p), []byte(content), 0o644); err != nil {
		s.t.Fatal(err)
	}
}

func (s *Server) run(tool string, args ...string) string {
	s.t.Helper()
	cmd := exec.Command("chroot", append([]string{s.root, tool}, args...)...)
	cmd.Env = env()
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func env() []string {
	return []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "HOME=/root"}
}
