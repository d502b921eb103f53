// Package pyindex serves a Python package index on loopback for tests
// of pip: PEP 503's "simple" API over wheels the test builds. A wheel
// here is pure Python, written in Go (a zip of the module, METADATA,
// WHEEL, entry_points.txt and RECORD, as PEP 427 lays it out), so no
// build tool, compiler or network is needed, and the real pip installs
// it as it would any wheel from PyPI.
package pyindex

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"html"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// Dist is one version of a distribution. Its module, named like the
// distribution with '-' as '_', has VERSION and a main() that prints it;
// Script, when set, is a console script that runs main.
type Dist struct {
	Name    string
	Version string
	Script  string
}

// Module is the import name of the distribution's module.
func (d Dist) Module() string { return strings.ReplaceAll(Normalize(d.Name), "-", "_") }

// Filename is the wheel's file name.
func (d Dist) Filename() string { return fmt.Sprintf("%s-%s-py3-none-any.whl", d.Module(), d.Version) }

var normRE = regexp.MustCompile(`[-_.]+`)

// Normalize is a project name as the simple API spells it (PEP 503).
func Normalize(name string) string { return strings.ToLower(normRE.ReplaceAllString(name, "-")) }

// Wheel builds the wheel of d.
func Wheel(d Dist) ([]byte, error) {
	info := d.Module() + "-" + d.Version + ".dist-info"
	files := []struct{ name, body string }{
		{d.Module() + "/__init__.py", fmt.Sprintf("VERSION = %q\n\n\ndef main():\n    print(VERSION)\n", d.Version)},
		{info + "/METADATA", fmt.Sprintf("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: opsagent test distribution\n", d.Name, d.Version)},
		{info + "/WHEEL", "Wheel-Version: 1.0\nGenerator: opsagent-pyindex\nRoot-Is-Purelib: true\nTag: py3-none-any\n"},
	}
	if d.Script != "" {
		files = append(files, struct{ name, body string }{info + "/entry_points.txt", fmt.Sprintf("[console_scripts]\n%s = %s:main\n", d.Script, d.Module())})
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	var record strings.Builder
	for _, f := range files {
		w, err := zw.Create(f.name)
		if err != nil {
			return nil, err
		}
		if _, err := w.Write([]byte(f.body)); err != nil {
			return nil, err
		}
		sum := sha256.Sum256([]byte(f.body))
		fmt.Fprintf(&record, "%s,sha256=%s,%d\n", f.name, base64.RawURLEncoding.EncodeToString(sum[:]), len(f.body))
	}
	fmt.Fprintf(&record, "%s/RECORD,,\n", info)
	w, err := zw.Create(info + "/RECORD")
	if err != nil {
		return nil, err
	}
	if _, err := w.Write([]byte(record.String())); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteWheel writes d's wheel into dir (a --find-links directory) and
// returns its path.
func WriteWheel(tb testing.TB, dir string, d Dist) string {
	tb.Helper()
	data, err := Wheel(d)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	p := filepath.Join(dir, d.Filename())
	if err := os.WriteFile(p, data, 0o644); err != nil {
		tb.Fatal(err)
	}
	return p
}

// Index is a simple index served on loopback until the test ends.
type Index struct {
	// URL is the index URL pip is given (…/simple/).
	URL string
	// Requests counts the requests served.
	Requests atomic.Int64

	mu     sync.Mutex
	wheels map[string][]byte   // file name → wheel
	byName map[string][]string // normalized project → file names
}

// New serves an index of dists.
func New(tb testing.TB, dists ...Dist) *Index {
	tb.Helper()
	ix := &Index{wheels: map[string][]byte{}, byName: map[string][]string{}}
	srv := httptest.NewServer(http.HandlerFunc(ix.serve))
	tb.Cleanup(srv.Close)
	ix.URL = srv.URL + "/simple/"
	for _, d := range dists {
		ix.Add(tb, d)
	}
	return ix
}

// Add publishes a distribution version.
func (ix *Index) Add(tb testing.TB, d Dist) {
	tb.Helper()
	data, err := Wheel(d)
	if err != nil {
		tb.Fatal(err)
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	name := Normalize(d.Name)
	if _, ok := ix.wheels[d.Filename()]; !ok {
		ix.byName[name] = append(ix.byName[name], d.Filename())
	}
	ix.wheels[d.Filename()] = data
}

// Use points the pip of the root at the index: /etc/pip.conf, as an
// instance's administrator would write it.
func (ix *Index) Use(tb testing.TB, root string) {
	tb.Helper()
	conf := fmt.Sprintf("[global]\nindex-url = %s\ntimeout = 10\nretries = 0\n", ix.URL)
	if err := os.WriteFile(filepath.Join(root, "etc/pip.conf"), []byte(conf), 0o644); err != nil {
		tb.Fatal(err)
	}
}

func (ix *Index) serve(w http.ResponseWriter, r *http.Request) {
	ix.Requests.Add(1)
	ix.mu.Lock()
	defer ix.mu.Unlock()
	p := r.URL.Path
	switch {
	case p == "/simple/":
		names := make([]string, 0, len(ix.byName))
		for n := range ix.byName {
			names = append(names, n)
		}
		sort.Strings(names)
		var b strings.Builder
		b.WriteString("<!DOCTYPE html>\n<html><body>\n")
		for _, n := range names {
			fmt.Fprintf(&b, "<a href=\"%s/\">%s</a>\n", html.EscapeString(n), html.EscapeString(n))
		}
		b.WriteString("</body></html>\n")
		w.Header().Set("Content-Type", "text/html")
		_, _ = w.Write([]byte(b.String()))
	case strings.HasPrefix(p, "/simple/"):
		name := Normalize(strings.Trim(strings.TrimPrefix(p, "/simple/"), "/"))
		files, ok := ix.byName[name]
		if !ok {
			http.NotFound(w, r)
			return
		}
		var b strings.Builder
		b.WriteString("<!DOCTYPE html>\n<html><body>\n")
		for _, f := range files {
			sum := sha256.Sum256(ix.wheels[f])
			fmt.Fprintf(&b, "<a href=\"../../files/%s#sha256=%s\">%s</a>\n", html.EscapeString(f), hex.EncodeToString(sum[:]), html.EscapeString(f))
		}
		b.WriteString("</body></html>\n")
		w.Header().Set("Content-Type", "text/html")
		_, _ = w.Write([]byte(b.String()))
	case strings.HasPrefix(p, "/files/"):
		data, ok := ix.wheels[strings.TrimPrefix(p, "/files/")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(data)
	default:
		http.NotFound(w, r)
	}
}
