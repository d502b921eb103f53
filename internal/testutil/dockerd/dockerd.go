// Package dockerd starts a real Docker engine (Debian's docker.io) for one
// test, isolated from the machine's own: its data root, exec root, pid
// file, key and socket live in a temporary directory, it uses the vfs
// storage driver, no bridge, no iptables and no ip forwarding, so it
// changes nothing of the host's network or /var/lib/docker. It is stopped
// (containers, containerd and shims with it) when the test ends.
//
// Serve puts a counting proxy of the engine's API at a test root's
// /var/run/docker.sock, so tests point the agent at the engine through
// its --root and count the API calls a round makes, by endpoint.
// StartRegistry runs Debian's docker-registry on loopback behind a proxy
// that can require a login and counts pushes and pulls.
package dockerd

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/dockerapi"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"golang.org/x/sys/unix"
)

// Engine is a Docker engine started for one test.
type Engine struct {
	Dir    string // its state (short: a unix socket path is limited)
	Socket string
	// Client talks to the engine for the test's own setup.
	Client *dockerapi.Client
}

// Need skips the test when no engine can run here (not root, no dockerd),
// or fails it when OPSAGENT_REQUIRE_RIGS is set.
func Need(tb testing.TB) {
	tb.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root"
	} else {
		for _, tool := range []string{"dockerd", "containerd", "runc"} {
			if _, err := exec.LookPath(tool); err != nil {
				why = tool + " is not installed (apt-get install docker.io)"
				break
			}
		}
	}
	if why == "" {
		return
	}
	if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
		tb.Fatalf("dockerd: %s (OPSAGENT_REQUIRE_RIGS is set)", why)
	}
	tb.Skipf("dockerd: %s", why)
}

// ShortTempDir is a temporary directory with a short path (a unix
// socket's path holds at most 107 bytes), removed when the test ends.
func ShortTempDir(tb testing.TB, prefix string) string {
	tb.Helper()
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		unmountBelow(dir)
		_ = os.RemoveAll(dir)
	})
	return dir
}

// Start starts an engine and waits until it answers.
func Start(tb testing.TB) *Engine {
	tb.Helper()
	Need(tb)
	dir := ShortTempDir(tb, "dke")
	e := &Engine{Dir: dir, Socket: filepath.Join(dir, "docker.sock")}
	// The key the engine would otherwise create in /etc/docker.
	conf, _ := json.Marshal(map[string]any{"deprecated-key-path": filepath.Join(dir, "key.json")})
	if err := os.WriteFile(filepath.Join(dir, "daemon.json"), conf, 0o600); err != nil {
		tb.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "dockerd.log"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command("dockerd",
		"--config-file", filepath.Join(dir, "daemon.json"),
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"-H", "unix://"+e.Socket,
		"--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
		"--bridge=none", "--storage-driver=vfs")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		tb.Fatalf("dockerd: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	tb.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		killMentioning(dir) // containerd and shims left by a killed engine
		unmountBelow(dir)
	})
	e.Client = dockerapi.New(e.Socket)
	tb.Cleanup(e.Client.Close)
	exited := func() bool {
		select {
		case <-done:
			return true
		default:
			return false
		}
	}
	wait.Eventually(tb, "the test's Docker engine to answer", func() bool {
		if exited() {
			log, _ := os.ReadFile(filepath.Join(dir, "dockerd.log"))
			tb.Fatalf("dockerd exited: %s", tail(string(log)))
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return e.Client.Ping(ctx) == nil
	})
	return e
}

func tail(s string) string {
	if len(s) > 4000 {
		return s[len(s)-4000:]
	}
	return s
}

// killMentioning kills the processes whose command line names dir.
func killMentioning(dir string) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmdline), dir) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountBelow detaches every mount at or below dir (the engine mounts
// its data root on itself, and a killed engine leaves it).
func unmountBelow(dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			points = append(points, f[4])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		_ = unix.Unmount(points[i], unix.MNT_DETACH)
	}
}

// Calls counts the API calls that went through a proxy, by endpoint
// ("GET /containers/json", the API version and names left out as
// patterns: "POST /containers/{id}/start").
type Calls struct {
	mu    sync.Mutex
	calls []string
}

func (c *Calls) add(s string) {
	c.mu.Lock()
	c.calls = append(c.calls, s)
	c.mu.Unlock()
}

// Mark is the number of calls so far.
func (c *Calls) Mark() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.calls)
}

// Since lists the calls from mark on.
func (c *Calls) Since(mark int) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.calls[mark:]...)
}

// Count is how many calls since mark were endpoint.
func (c *Calls) Count(mark int, endpoint string) int {
	n := 0
	for _, s := range c.Since(mark) {
		if s == endpoint {
			n++
		}
	}
	return n
}

var versionPrefix = regexp.MustCompile(`^/v[0-9.]+`)

// endpoint names a request by its route.
func endpoint(method, p string) string {
	p = versionPrefix.ReplaceAllString(p, "")
	switch {
	case strings.HasPrefix(p, "/containers/") && p != "/containers/json" && p != "/containers/create":
		rest := strings.TrimPrefix(p, "/containers/")
		if i := strings.LastIndex(rest, "/"); i >= 0 {
			p = "/containers/{id}" + rest[i:]
		} else {
			p = "/containers/{id}"
		}
	case strings.HasPrefix(p, "/images/") && p != "/images/create" && p != "/images/json":
		for _, op := range []string{"/json", "/push", "/tag"} {
			if strings.HasSuffix(p, op) {
				return method + " /images/{name}" + op
			}
		}
		p = "/images/{name}"
	case strings.HasPrefix(p, "/distribution/"):
		p = "/distribution/{name}/json"
	}
	return method + " " + p
}

// Serve listens at socket (a host path, e.g. a test root's
// var/run/docker.sock) and forwards every request to the engine,
// counting them.
func (e *Engine) Serve(tb testing.TB, socket string) *Calls {
	tb.Helper()
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		tb.Fatal(err)
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		tb.Fatalf("dockerd: listen on %s: %v", socket, err)
	}
	calls := &Calls{}
	target, _ := url.Parse("http://docker")
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1
	proxy.Transport = &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", e.Socket)
	}}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.add(endpoint(r.Method, r.URL.Path))
		proxy.ServeHTTP(w, r)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	tb.Cleanup(func() { _ = srv.Close() })
	return calls
}
