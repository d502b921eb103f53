package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visualops/opsagent/backend"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/testutil/wait"
)

// inprocAPIToken is the in-process backend's API token (every call needs one).
const inprocAPIToken = "agent-test-api-token-0123456789"

// inprocBackend runs the real backend in this process on loopback.
type inprocBackend struct {
	addr string
	stop func()
}

func startInprocBackend(t *testing.T) *inprocBackend {
	t.Helper()
	srv, err := backend.New(backend.Options{DataDir: t.TempDir(), APIToken: inprocAPIToken, OpenEnrollment: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addrC := make(chan net.Addr, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ListenAndServe(ctx, "127.0.0.1:0", func(a net.Addr) { addrC <- a })
	}()
	b := &inprocBackend{addr: (<-addrC).String(), stop: func() { cancel(); <-done }} // ListenAndServe closes the server
	t.Cleanup(b.stop)
	return b
}

func (b *inprocBackend) put(t *testing.T, app, body string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, "http://"+b.addr+"/api/apps/"+app+"/recipe", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+inprocAPIToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(resp.Body)
		t.Fatalf("PUT recipe: %d %s", resp.StatusCode, data)
	}
}

func (b *inprocBackend) instances(app string) []map[string]any {
	req, _ := http.NewRequest(http.MethodGet, "http://"+b.addr+"/api/apps/"+app+"/instances", nil)
	req.Header.Set("Authorization", "Bearer "+inprocAPIToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var out struct {
		Instances []map[string]any `json:"instances"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return out.Instances
}

// userdataServer is a metadata service whose userdata the test changes.
type userdataServer struct {
	srv      *httptest.Server
	mu       sync.Mutex
	userdata string
	reads    atomic.Int64
}

func newUserdataServer(t *testing.T, userdata string) *userdataServer {
	u := &userdataServer{userdata: userdata}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/latest/api/token":
			_, _ = w.Write([]byte("tok"))
		case "/latest/meta-data/instance-id":
			_, _ = w.Write([]byte("i-0inproc"))
		case "/latest/user-data":
			u.reads.Add(1)
			u.mu.Lock()
			defer u.mu.Unlock()
			_, _ = w.Write([]byte(u.userdata))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *userdataServer) set(s string) {
	u.mu.Lock()
	u.userdata = s
	u.mu.Unlock()
}

func writeConfig(t *testing.T, conf string) fsutil.Root {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/opsagent.conf"), []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	root, _ := fsutil.NewRoot(dir)
	return root
}

func runAgent(t *testing.T, root fsutil.Root) (cancel func()) {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := Run(ctx, Options{Root: root, Version: "2.1.0", StatusInterval: time.Millisecond})
		done <- err
	}()
	stopped := false
	cancel = func() {
		if stopped {
			return
		}
		stopped = true
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return")
		}
	}
	t.Cleanup(cancel)
	return cancel
}

// The identity refresher (on the connection's goroutine, after every
// AppNotReady) writes userdata values back while the status writer reads
// the config every millisecond. With one config owner this is race-free;
// run under -race, the old shared *config.Config failed here.
func TestUserdataRefreshRacesNothing(t *testing.T) {
	b := startInprocBackend(t) // app unknown: AppNotReady, again and again
	ud := newUserdataServer(t, fmt.Sprintf("WS_URI=ws://%s/agent/\nAPP_ID=app-race\nVERSION=1.0.0\n", b.addr))
	root := writeConfig(t, fmt.Sprintf("[userdata]\nws_uri=ws://%s/agent/\napp_id=app-race\n[network]\nmetadata=%s\n[agent]\napp_not_ready_delay=1ms\n", b.addr, ud.srv.URL))
	stop := runAgent(t, root)
	for i := 1; i <= 20; i++ {
		ud.set(fmt.Sprintf("WS_URI=ws://%s/agent/\nAPP_ID=app-race\nVERSION=1.0.%d\n", b.addr, i))
		n := ud.reads.Load()
		wait.Eventually(t, "the agent to read the userdata again", func() bool { return ud.reads.Load() > n+1 })
	}
	stop()
	data, _ := os.ReadFile(root.Path("/etc/opsagent.conf"))
	if !strings.Contains(string(data), "version=1.0.20") {
		t.Errorf("the last userdata version was not written back:\n%s", data)
	}
}

// A ws_uri changed in the userdata reaches the connection without a
// SIGHUP: backend A does not know the app (AppNotReady makes the agent
// re-read its userdata), the userdata now names backend B, and the agent
// moves there and runs B's recipe.
func TestChangedBackendURLReachesTheConnection(t *testing.T) {
	a, b := startInprocBackend(t), startInprocBackend(t)
	b.put(t, "app-move", `{"state":[{"id":"c","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	ud := newUserdataServer(t, "")
	root := writeConfig(t, fmt.Sprintf("[userdata]\nws_uri=ws://%s/agent/\napp_id=app-move\n[network]\nmetadata=%s\n[agent]\napp_not_ready_delay=20ms\n", a.addr, ud.srv.URL))
	runAgent(t, root)
	n := ud.reads.Load()
	wait.Eventually(t, "the agent asking A and re-reading its userdata", func() bool { return ud.reads.Load() > n+1 })
	ud.set(fmt.Sprintf("WS_URI=ws://%s/agent/\n", b.addr))
	wait.Eventually(t, "the agent connected to B", func() bool {
		for _, in := range b.instances("app-move") {
			if in["connected"] == true {
				return true
			}
		}
		return false
	})
}

// A link planted at the state directory or at agent.log is refused with
// its name when the agent starts, never followed: the lock, the outbox,
// the recipe and the log would otherwise be written wherever it points.
func TestRunRefusesLinksAtItsPaths(t *testing.T) {
	const conf = "[userdata]\nws_uri = ws://127.0.0.1:1/agent/\napp_id = app\n[network]\ninstance_id = i-links\nmetadata = http://127.0.0.1:1\n"
	for _, tc := range []struct {
		name, path string
		dir        bool // the link points to a directory (else a file)
	}{
		{"state directory", "var/lib/visualops/opsagent", true},
		{"agent.log", "var/log/visualops/agent.log", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := writeConfig(t, conf)
			elsewhere := t.TempDir()
			target := filepath.Join(elsewhere, "target")
			if tc.dir {
				if err := os.Mkdir(target, 0o755); err != nil {
					t.Fatal(err)
				}
			} else if err := os.WriteFile(target, []byte("someone else's\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			p := root.Path("/" + tc.path)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := Run(ctx, Options{Root: root, Version: "2.1.0"})
			if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "symbolic link") {
				t.Errorf("Run: %v; want a refusal naming the link %s", err, p)
			}
			if tc.dir {
				if entries, _ := os.ReadDir(target); len(entries) != 0 {
					t.Errorf("the agent wrote %s (and more) through the link", entries[0].Name())
				}
			} else if data, _ := os.ReadFile(target); string(data) != "someone else's\n" {
				t.Errorf("the agent wrote its log through the link: %q", data)
			}
		})
	}
}
