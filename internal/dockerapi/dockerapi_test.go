package dockerapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// fakeEngine answers on a unix socket as the engine does for the few
// routes a test sets, and records each request. The real engine is
// exercised by agent/native's tests; this pins what those cannot make an
// engine do (other API versions, broken streams).
type fakeEngine struct {
	mu      sync.Mutex
	version string
	reqs    []*http.Request
	routes  map[string]http.HandlerFunc // "GET /v1.41/images/x/json"
}

func startFake(t *testing.T, socket, version string) *fakeEngine {
	t.Helper()
	f := &fakeEngine{version: version, routes: map[string]http.HandlerFunc{}}
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.reqs = append(f.reqs, r)
		h := f.routes[r.Method+" "+r.URL.Path]
		f.mu.Unlock()
		if f.version != "" {
			w.Header().Set("Api-Version", f.version)
		}
		if r.URL.Path == "/_ping" {
			_, _ = w.Write([]byte("OK"))
			return
		}
		if h == nil {
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"message":"page not found"}`))
			return
		}
		h(w, r)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return f
}

func (f *fakeEngine) last() *http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs[len(f.reqs)-1]
}

func TestPingNegotiatesTheAPIVersion(t *testing.T) {
	for _, tc := range []struct{ engine, want, fails string }{
		{"1.41", "1.41", ""}, // Debian 12's docker.io 20.10
		{"1.44", "1.44", ""}, // the oldest Engine 29 accepts
		{"1.52", maxVersion, ""},
		{"", minVersion, ""},
		{"1.24", "", "at least 1.30"},
	} {
		t.Run(tc.engine, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "d.sock")
			f := startFake(t, sock, tc.engine)
			f.routes["GET /v"+tc.want+"/images/app:1/json"] = func(w http.ResponseWriter, r *http.Request) {
				_, _ = w.Write([]byte(`{"Id":"sha256:abc","RepoDigests":["r/app@sha256:d"]}`))
			}
			c := New(sock)
			defer c.Close()
			err := c.Ping(context.Background())
			if tc.fails != "" {
				if err == nil || !strings.Contains(err.Error(), tc.fails) {
					t.Fatalf("ping: %v, want %q", err, tc.fails)
				}
				return
			}
			if err != nil || c.Version() != tc.want {
				t.Fatalf("ping: %v, version %q, want %q", err, c.Version(), tc.want)
			}
			img, err := c.ImageInspect(context.Background(), "app:1")
			if err != nil || img.ID != "sha256:abc" {
				t.Fatalf("inspect: %+v %v", img, err)
			}
		})
	}
}

func TestLongSocketPathIsReachedThroughItsDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "docker.sock")
	// Listen through the same trick: the path itself is too long to bind.
	fd, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	startFake(t, "/proc/self/fd/"+strconv.Itoa(int(fd.Fd()))+"/docker.sock", "1.41")
	if len(sock) <= sunPathMax {
		t.Fatalf("the test path is short: %d", len(sock))
	}
	c := New(sock)
	defer c.Close()
	if err := c.Ping(context.Background()); err != nil {
		t.Fatalf("ping through a %d-byte path: %v", len(sock), err)
	}
}

func TestCredentialsTravelOnlyInTheHeader(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "d.sock")
	f := startFake(t, sock, "1.41")
	f.routes["POST /v1.41/images/create"] = func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"status":"Pulling from app"}` + "\n" + `{"status":"Status: Downloaded newer image"}` + "\n"))
	}
	c := New(sock)
	defer c.Close()
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	auth := &Auth{Username: "u", Password: "p@ss/word", Email: "e@x", ServerAddress: "reg:5000"}
	prog, err := c.Pull(context.Background(), "reg:5000/app", "1", auth)
	if err != nil || !strings.Contains(prog.Output, "Downloaded newer image") {
		t.Fatalf("pull: %+v %v", prog, err)
	}
	r := f.last()
	if strings.Contains(r.URL.String(), "p@ss") || strings.Contains(r.URL.String(), "word") {
		t.Fatalf("the password is in the URL %s", r.URL)
	}
	raw, err := base64.URLEncoding.DecodeString(r.Header.Get("X-Registry-Auth"))
	if err != nil {
		t.Fatal(err)
	}
	var got Auth
	if err := json.Unmarshal(raw, &got); err != nil || got != *auth {
		t.Fatalf("X-Registry-Auth carries %+v (%v)", got, err)
	}
	if q := r.URL.Query(); q.Get("fromImage") != "reg:5000/app" || q.Get("tag") != "1" {
		t.Fatalf("query %v", q)
	}
}

func TestStreamErrorsFailTheCall(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "d.sock")
	f := startFake(t, sock, "1.41")
	f.routes["POST /v1.41/build"] = func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"stream":"Step 1/2 : FROM scratch\n"}` + "\n" +
			`{"errorDetail":{"message":"COPY failed: file not found"},"error":"COPY failed: file not found"}` + "\n"))
	}
	f.routes["POST /v1.41/images/app/push"] = func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"status":"Pushed","id":"1"}` + "\n" + `{"status":"`)) // broken off
	}
	c := New(sock)
	defer c.Close()
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	prog, err := c.Build(context.Background(), strings.NewReader(""), BuildOptions{Tag: "app:1"})
	var apiErr *Error
	if !errors.As(err, &apiErr) || apiErr.Message != "COPY failed: file not found" || !strings.Contains(prog.Output, "Step 1/2") {
		t.Fatalf("build: %+v %v", prog, err)
	}
	if _, err := c.Push(context.Background(), "app", "1", nil); err == nil || !strings.Contains(err.Error(), "broke off") {
		t.Fatalf("push: %v", err)
	}
	if h := f.last().Header.Get("X-Registry-Auth"); h == "" {
		t.Fatal("a push without a login must still carry X-Registry-Auth (the engine requires it)")
	}
	if _, err := c.ImageInspect(context.Background(), "nothing"); !IsNotFound(err) {
		t.Fatalf("a missing image: %v", err)
	}
}

func TestDemuxStripsFrameHeaders(t *testing.T) {
	frame := func(stream byte, s string) []byte {
		n := len(s)
		return append([]byte{stream, 0, 0, 0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, s...)
	}
	data := append(frame(1, "out line\n"), frame(2, "err line\n")...)
	if got := demux(data); got != "out line\nerr line\n" {
		t.Fatalf("%q", got)
	}
	if got := demux([]byte("tty output\n")); got != "tty output\n" {
		t.Fatalf("tty: %q", got)
	}
}
