// Package npmreg serves an npm registry on loopback for tests of npm:
// the two requests an install makes, a package's document ("packument",
// GET /NAME) and its tarballs, for packages the test builds. A tarball is
// written in Go as `npm pack` writes it (a gzipped tar of package/…), so
// no npm or network is needed to make one, and the real npm installs it
// as it would one from registry.npmjs.org.
package npmreg

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha1"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Package is one version of a package. Its index.js exports the version;
// Bin, when set, is a command that prints it.
type Package struct {
	Name    string
	Version string
	Bin     string
}

func (p Package) manifest() map[string]any {
	m := map[string]any{"name": p.Name, "version": p.Version, "main": "index.js", "license": "MIT", "description": "opsagent test package"}
	if p.Bin != "" {
		m["bin"] = map[string]string{p.Bin: "cli.js"}
	}
	return m
}

// Tarball builds p's tarball.
func Tarball(p Package) ([]byte, error) {
	manifest, err := json.MarshalIndent(p.manifest(), "", "  ")
	if err != nil {
		return nil, err
	}
	files := []struct {
		name string
		mode int64
		body string
	}{
		{"package/package.json", 0o644, string(manifest) + "\n"},
		{"package/index.js", 0o644, fmt.Sprintf("module.exports = { version: %q };\n", p.Version)},
	}
	if p.Bin != "" {
		files = append(files, struct {
			name string
			mode int64
			body string
		}{"package/cli.js", 0o755, fmt.Sprintf("#!/usr/bin/env node\nconsole.log(%q);\n", p.Version)})
	}
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	mtime := time.Date(1985, 10, 26, 8, 15, 0, 0, time.UTC) // what npm pack uses
	for _, f := range files {
		hdr := &tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.body)), ModTime: mtime, Typeflag: tar.TypeReg, Format: tar.FormatUSTAR}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write([]byte(f.body)); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Registry is a registry served on loopback until the test ends.
type Registry struct {
	// URL is the registry URL npm is given (with a trailing slash).
	URL string
	// Requests counts the requests served.
	Requests atomic.Int64

	mu       sync.Mutex
	versions map[string]map[string]map[string]any // name → version → manifest with dist
	latest   map[string]string                    // name → the latest dist-tag
	tarballs map[string][]byte                    // URL path → tarball
}

// New serves a registry of pkgs; each package's latest dist-tag is the
// version added last, as `npm publish` sets it.
func New(tb testing.TB, pkgs ...Package) *Registry {
	tb.Helper()
	r := &Registry{versions: map[string]map[string]map[string]any{}, latest: map[string]string{}, tarballs: map[string][]byte{}}
	srv := httptest.NewServer(http.HandlerFunc(r.serve))
	tb.Cleanup(srv.Close)
	r.URL = srv.URL + "/"
	for _, p := range pkgs {
		r.Add(tb, p)
	}
	return r
}

// Add publishes a package version and makes it the latest.
func (r *Registry) Add(tb testing.TB, p Package) {
	tb.Helper()
	data, err := Tarball(p)
	if err != nil {
		tb.Fatal(err)
	}
	base := p.Name
	if i := strings.LastIndexByte(base, '/'); i >= 0 {
		base = base[i+1:]
	}
	tarPath := fmt.Sprintf("/%s/-/%s-%s.tgz", p.Name, base, p.Version)
	sha1sum := sha1.Sum(data)
	sha512sum := sha512.Sum512(data)
	m := p.manifest()
	m["_id"] = p.Name + "@" + p.Version
	m["dist"] = map[string]string{
		"tarball":   strings.TrimSuffix(r.URL, "/") + tarPath,
		"shasum":    hex.EncodeToString(sha1sum[:]),
		"integrity": "sha512-" + base64.StdEncoding.EncodeToString(sha512sum[:]),
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.versions[p.Name] == nil {
		r.versions[p.Name] = map[string]map[string]any{}
	}
	r.versions[p.Name][p.Version] = m
	r.latest[p.Name] = p.Version
	r.tarballs[tarPath] = data
}

// Use points the npm of the root at the registry: its global npmrc
// (/etc/npmrc, the globalconfig of Debian's npm), as an instance's
// administrator would.
func (r *Registry) Use(tb testing.TB, root string) {
	tb.Helper()
	conf := fmt.Sprintf("registry=%s\nfetch-retries=0\nfetch-timeout=10000\n", r.URL)
	if err := os.WriteFile(filepath.Join(root, "etc/npmrc"), []byte(conf), 0o644); err != nil {
		tb.Fatal(err)
	}
}

func (r *Registry) serve(w http.ResponseWriter, req *http.Request) {
	r.Requests.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if data, ok := r.tarballs[req.URL.Path]; ok {
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(data)
		return
	}
	// A packument: /NAME, /@scope/NAME or /@scope%2fNAME.
	name, err := url.PathUnescape(strings.TrimPrefix(req.URL.EscapedPath(), "/"))
	if err != nil || req.Method != http.MethodGet {
		http.NotFound(w, req)
		return
	}
	versions, ok := r.versions[name]
	if !ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error":"Not found"}`))
		return
	}
	doc := map[string]any{"_id": name, "name": name, "dist-tags": map[string]string{"latest": r.latest[name]}, "versions": versions}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(doc)
}
