// Package gemsource serves a RubyGems source on loopback for tests of
// gem: gems made with `gem build` from specifications the test writes,
// indexed with `gem generate_index` (specs.4.8.gz, quick/Marshal.4.8,
// gems/), both run with the ruby of a test root, chrooted. The index
// RubyGems reads is Ruby's Marshal format, which only ruby writes
// faithfully; nothing here reaches the network.
package gemsource

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/fileserver"
)

// Gem is one version of a gem. Its lib/NAME.rb defines the version;
// Executable, when set, is a command that prints it.
type Gem struct {
	Name       string
	Version    string
	Executable string
}

// Source is a gem source served on loopback until the test ends.
type Source struct {
	// URL is the source URL gem is given (with a trailing slash).
	URL string
	// Requests counts the requests served.
	Requests atomic.Int64

	root string // the root whose gem builds and indexes
	dir  string // the work directory, inside root
}

// New builds gems with the gem of builder (a test root with ruby
// installed) and serves them.
func New(tb testing.TB, builder string, gems ...Gem) *Source {
	tb.Helper()
	if _, err := os.Stat(filepath.Join(builder, "usr/bin/gem")); err != nil {
		tb.Fatalf("gemsource: %s has no gem to build with: install ruby in it first", builder)
	}
	dir, err := os.MkdirTemp(filepath.Join(builder, "tmp"), "gemsource-")
	if err != nil {
		tb.Fatal(err)
	}
	s := &Source{root: builder, dir: dir}
	if err := os.MkdirAll(filepath.Join(dir, "index", "gems"), 0o755); err != nil {
		tb.Fatal(err)
	}
	files := fileserver.Fresh(filepath.Join(dir, "index"))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.Requests.Add(1)
		// No compact index here: a 404 at the root sends gem straight to
		// specs.4.8.gz, as a plain `gem generate_index` server does.
		if r.URL.Path == "/" || strings.HasPrefix(r.URL.Path, "/info/") || r.URL.Path == "/versions" {
			http.NotFound(w, r)
			return
		}
		files.ServeHTTP(w, r)
	}))
	tb.Cleanup(srv.Close)
	s.URL = srv.URL + "/"
	s.Add(tb, gems...)
	return s
}

// Add builds more gems and indexes the source again.
func (s *Source) Add(tb testing.TB, gems ...Gem) {
	tb.Helper()
	for _, g := range gems {
		src := filepath.Join(s.dir, "src", g.Name+"-"+g.Version)
		if err := os.MkdirAll(filepath.Join(src, "lib"), 0o755); err != nil {
			tb.Fatal(err)
		}
		files := []string{"lib/" + g.Name + ".rb"}
		exe := ""
		if g.Executable != "" {
			if err := os.MkdirAll(filepath.Join(src, "bin"), 0o755); err != nil {
				tb.Fatal(err)
			}
			script := fmt.Sprintf("#!/usr/bin/env ruby\nputs %q\n", g.Version)
			if err := os.WriteFile(filepath.Join(src, "bin", g.Executable), []byte(script), 0o755); err != nil {
				tb.Fatal(err)
			}
			files = append(files, "bin/"+g.Executable)
			exe = fmt.Sprintf("  s.bindir = \"bin\"\n  s.executables = [%q]\n", g.Executable)
		}
		spec := fmt.Sprintf(`Gem::Specification.new do |s|
  s.name = %q
  s.version = %q
  s.summary = "opsagent test gem"
  s.authors = ["opsagent"]
  s.license = "MIT"
  s.files = %s
%send
`, g.Name, g.Version, rubyList(files), exe)
		if err := os.WriteFile(filepath.Join(src, g.Name+".gemspec"), []byte(spec), 0o644); err != nil {
			tb.Fatal(err)
		}
		lib := fmt.Sprintf("module Opsagent\n  %s_VERSION = %q\nend\n", strings.ToUpper(strings.NewReplacer("-", "_", ".", "_").Replace(g.Name)), g.Version)
		if err := os.WriteFile(filepath.Join(src, "lib", g.Name+".rb"), []byte(lib), 0o644); err != nil {
			tb.Fatal(err)
		}
		file := g.Name + "-" + g.Version + ".gem"
		s.chroot(tb, fmt.Sprintf("cd %s && gem build %s.gemspec && mv %s %s", s.inRoot(src), g.Name, file, s.inRoot(filepath.Join(s.dir, "index", "gems"))))
	}
	s.chroot(tb, "gem generate_index --directory "+s.inRoot(filepath.Join(s.dir, "index")))
}

// Use points the gem of the root at the source, alone: the system-wide
// /etc/gemrc, as an instance's administrator would write it.
func (s *Source) Use(tb testing.TB, root string) {
	tb.Helper()
	conf := fmt.Sprintf("---\n:sources:\n- %s\n", s.URL)
	if err := os.WriteFile(filepath.Join(root, "etc/gemrc"), []byte(conf), 0o644); err != nil {
		tb.Fatal(err)
	}
}

func (s *Source) inRoot(p string) string {
	rel, err := filepath.Rel(s.root, p)
	if err != nil || strings.HasPrefix(rel, "..") {
		panic("gemsource: " + p + " is not inside " + s.root)
	}
	return "/" + rel
}

func (s *Source) chroot(tb testing.TB, script string) {
	tb.Helper()
	cmd := exec.Command("chroot", s.root, "/bin/sh", "-ec", script)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8"}
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("gemsource: %s: %v\n%s", script, err, out)
	}
}

func rubyList(items []string) string {
	q := make([]string, len(items))
	for i, it := range items {
		q[i] = fmt.Sprintf("%q", it)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
