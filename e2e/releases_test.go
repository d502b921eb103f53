package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/dist"
)

// releaseKey is a signing key made for one test.
type releaseKey struct {
	pub  string
	priv minisign.PrivateKey
}

func newReleaseKey(t testing.TB) releaseKey {
	t.Helper()
	pub, priv, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return releaseKey{pub: pub.String(), priv: priv}
}

var sharedKeyOnce sync.Once
var sharedKeyValue releaseKey

// sharedKey is one release key for the whole run, so that the binaries
// built with it are built once.
func sharedKey(t testing.TB) releaseKey {
	sharedKeyOnce.Do(func() { sharedKeyValue = newReleaseKey(t) })
	return sharedKeyValue
}

var builtMu sync.Mutex
var built = map[string][]byte{} // version+key → binary, built once per run

// agentBinary builds opsagent for this machine at version, with key as its
// compiled-in release key, as `opsagent release build` does (one
// architecture only: the tests run here).
func agentBinary(t testing.TB, version, pub string) []byte {
	t.Helper()
	builtMu.Lock()
	defer builtMu.Unlock()
	if b, ok := built[version+pub]; ok {
		return b
	}
	out := filepath.Join(t.TempDir(), "opsagent")
	ldflags := fmt.Sprintf("-X github.com/visualops/opsagent/internal/version.Version=%s -X github.com/visualops/opsagent/internal/dist.releasePubKey=%s", version, pub)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", ldflags, "-o", out, "../cmd/opsagent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", version, err, b)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	built[version+pub] = data
	return data
}

// brokenBinary passes the updater's smoke test (`version --json`) but
// exits at once when run as the agent: a release that cannot start.
func brokenBinary(version string) []byte {
	return []byte(fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = version ]; then echo '{\"version\":\"%s\"}'; exit 0; fi\necho 'broken release: exiting' >&2\nexit 3\n", version))
}

// publish writes <dir>/<version>/opsagent.tgz (+ .sha256, + .minisig when
// signed) as the release bucket holds them, and returns the SHA-256.
func publish(t testing.TB, dir, version string, bin []byte, sign *releaseKey) string {
	t.Helper()
	tgz := tarball(t, version, bin)
	vdir := filepath.Join(dir, version)
	if err := os.MkdirAll(vdir, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(tgz)
	hexSum := hex.EncodeToString(sum[:])
	files := map[string][]byte{dist.TarballName: tgz, dist.ChecksumName: []byte(hexSum + "  " + dist.TarballName + "\n")}
	if sign != nil {
		files[dist.SignatureName] = dist.Sign(sign.priv, tgz, "version:"+version)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(vdir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return hexSum
}

var tarballsMu sync.Mutex
var tarballs = map[[sha256.Size]byte][]byte{} // version and binary → opsagent.tgz

// tarball packs bin at version as opsagent.tgz, once per run for each
// pair: compressing a 30 MB binary takes seconds (tens under -race) and
// every update test publishes the same two releases.
func tarball(t testing.TB, version string, bin []byte) []byte {
	t.Helper()
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00", version)
	h.Write(bin)
	var key [sha256.Size]byte
	h.Sum(key[:0])
	tarballsMu.Lock()
	defer tarballsMu.Unlock()
	if tgz, ok := tarballs[key]; ok {
		return tgz
	}
	var tgz bytes.Buffer
	entries := []archive.Entry{
		{Name: "VERSION", Mode: 0o644, Data: []byte(version + "\n")},
		{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: bin},
	}
	if err := archive.Create(context.Background(), &tgz, entries, time.Unix(1767225600, 0)); err != nil {
		t.Fatal(err)
	}
	tarballs[key] = tgz.Bytes()
	return tgz.Bytes()
}

// bucket serves a release directory over loopback HTTP like the S3
// bucket, and can refuse requests for a while, hold the tarball, or stall
// it in the middle; it records each request of the tarball.
type bucket struct {
	*httptest.Server
	dir      string
	failures atomic.Int64 // answer 503 to this many more requests
	hold     atomic.Pointer[chan struct{}]
	requests atomic.Int64
	// stall, when set, stops every tarball response at byte stall.at of
	// the file until stall.release is closed (and stall cleared).
	stall atomic.Pointer[stallPoint]
	// marker is a file whose existence each tarball request records.
	marker atomic.Pointer[string]

	mu       sync.Mutex
	tarballs []*tarballRequest
}

// stallPoint is where tarball responses stop sending.
type stallPoint struct {
	at      int64
	release chan struct{}
}

// tarballRequest is one request of the tarball as the bucket saw it.
type tarballRequest struct {
	rangeHdr string
	marker   bool         // bucket.marker existed when it came
	sent     atomic.Int64 // body bytes written
}

func newBucket(t testing.TB) *bucket {
	b := &bucket{dir: t.TempDir()}
	files := http.FileServer(http.Dir(b.dir))
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.requests.Add(1)
		if b.failures.Add(-1) >= 0 {
			http.Error(w, "try again", http.StatusServiceUnavailable)
			return
		}
		if strings.HasSuffix(r.URL.Path, dist.TarballName) {
			if h := b.hold.Load(); h != nil {
				select {
				case <-*h:
				case <-r.Context().Done():
					return
				}
			}
			tr := &tarballRequest{rangeHdr: r.Header.Get("Range")}
			if m := b.marker.Load(); m != nil {
				_, err := os.Stat(*m)
				tr.marker = err == nil
			}
			b.mu.Lock()
			b.tarballs = append(b.tarballs, tr)
			b.mu.Unlock()
			w = &stallWriter{ResponseWriter: w, b: b, req: tr, ctx: r.Context()}
		}
		files.ServeHTTP(w, r)
	}))
	t.Cleanup(b.Close)
	return b
}

// tarballRequests returns the tarball requests seen so far.
func (b *bucket) tarballRequests() []*tarballRequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*tarballRequest(nil), b.tarballs...)
}

// stallAt makes tarball responses stop at byte at; the returned function
// lets them go on.
func (b *bucket) stallAt(at int64) (release func()) {
	p := &stallPoint{at: at, release: make(chan struct{})}
	b.stall.Store(p)
	return func() { b.stall.Store(nil); close(p.release) }
}

// stallWriter writes a tarball response, stopping at the bucket's stall
// point (a byte offset of the file: a Range response starts further in).
type stallWriter struct {
	http.ResponseWriter
	b   *bucket
	req *tarballRequest
	ctx context.Context
	pos int64 // offset in the file of the next byte written
}

func (s *stallWriter) WriteHeader(code int) {
	if code == http.StatusPartialContent {
		var start, end, size int64
		if _, err := fmt.Sscanf(s.Header().Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &size); err == nil {
			s.pos = start
		}
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *stallWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		chunk := p
		if st := s.b.stall.Load(); st != nil {
			if s.pos >= st.at {
				_ = http.NewResponseController(s.ResponseWriter).Flush()
				select {
				case <-st.release:
				case <-s.ctx.Done():
					return written, s.ctx.Err()
				}
				continue
			}
			if s.pos+int64(len(chunk)) > st.at {
				chunk = chunk[:st.at-s.pos]
			}
		}
		n, err := s.ResponseWriter.Write(chunk)
		written += n
		s.pos += int64(n)
		s.req.sent.Add(int64(n))
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}
