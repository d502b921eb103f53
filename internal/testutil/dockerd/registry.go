package dockerd

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/wait"
)

// Registry is Debian's docker-registry (the distribution registry v2)
// on loopback, behind a proxy that counts requests and, with a login,
// asks for it as a registry with htpasswd authentication does (HTTP
// Basic). Docker engines talk plain HTTP to registries on 127.0.0.0/8.
type Registry struct {
	Host string // 127.0.0.1:port, the image name prefix
	mu   sync.Mutex
	reqs []string // "PUT /v2/app/manifests/v1"
	// Unauthorized counts requests refused for a missing or wrong login.
	unauthorized int
}

// StartRegistry starts a registry for the test; user "" accepts anyone.
func StartRegistry(tb testing.TB, user, password string) *Registry {
	tb.Helper()
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
			tb.Fatalf("docker-registry is not installed (OPSAGENT_REQUIRE_RIGS is set)")
		}
		tb.Skip("docker-registry is not installed (apt-get install docker-registry)")
	}
	dir := tb.TempDir()
	// The registry listens on a port picked by the kernel, then released;
	// the proxy in front keeps its own listener.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	backend := l.Addr().String()
	l.Close()
	conf := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), backend)
	if err := os.WriteFile(filepath.Join(dir, "config.yml"), []byte(conf), 0o600); err != nil {
		tb.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", filepath.Join(dir, "config.yml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("docker-registry: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	tb.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	})
	wait.Eventually(tb, "docker-registry to answer", func() bool {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			tb.Fatalf("docker-registry exited: %s", tail(string(log)))
		default:
		}
		resp, err := http.Get("http://" + backend + "/v2/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	r := &Registry{}
	target, _ := url.Parse("http://" + backend)
	proxy := httputil.NewSingleHostReverseProxy(target)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if user != "" {
			u, p, ok := req.BasicAuth()
			if !ok || u != user || p != password {
				r.mu.Lock()
				r.unauthorized++
				r.mu.Unlock()
				w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
				w.Header().Set("WWW-Authenticate", `Basic realm="opsagent-test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
				return
			}
		}
		r.mu.Lock()
		r.reqs = append(r.reqs, req.Method+" "+req.URL.Path)
		r.mu.Unlock()
		proxy.ServeHTTP(w, req)
	}))
	tb.Cleanup(srv.Close)
	r.Host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// Mark is the number of requests served so far.
func (r *Registry) Mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.reqs)
}

// Since lists the requests served from mark on.
func (r *Registry) Since(mark int) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.reqs[mark:]...)
}

// Pushes counts the manifests uploaded since mark (one per image pushed).
func (r *Registry) Pushes(mark int) int {
	n := 0
	for _, s := range r.Since(mark) {
		if strings.HasPrefix(s, "PUT ") && strings.Contains(s, "/manifests/") {
			n++
		}
	}
	return n
}

// BlobDownloads counts the blobs downloaded since mark other than the
// image's configuration (whose digest is the image id: the engine reads
// it to answer a distribution inspect): the layers.
func (r *Registry) BlobDownloads(mark int, imageID string) int {
	n := 0
	for _, s := range r.Since(mark) {
		if strings.HasPrefix(s, "GET ") && strings.Contains(s, "/blobs/") && !strings.HasSuffix(s, "/blobs/"+imageID) {
			n++
		}
	}
	return n
}

// Unauthorized counts the requests refused for a missing or wrong login.
func (r *Registry) Unauthorized() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.unauthorized
}
