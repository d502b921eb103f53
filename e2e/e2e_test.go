// Package e2e runs the real opsagent binary: the embedded backend and agents
// as separate processes on loopback, in temporary roots.
package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/internal/testutil/wait"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "opsagent-e2e-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "opsagent")
	// -trimpath as release builds and agentBinary use: on a cold build
	// cache the packages are compiled once for all three.
	build := exec.Command("go", "build", "-trimpath", "-o", binary, "-ldflags", "-X github.com/visualops/opsagent/internal/version.Version=2.1.0", "../cmd/opsagent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building opsagent: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a started opsagent process.
type proc struct {
	cmd    *exec.Cmd
	out    *syncbuf.Buffer
	exited chan struct{}
}

func start(t testing.TB, args ...string) *proc {
	t.Helper()
	return startEnv(t, nil, args...)
}

// startEnv is start with extra environment variables.
func startEnv(t testing.TB, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(binary, args...), out: &syncbuf.Buffer{}, exited: make(chan struct{})}
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("opsagent %s output:\n%s", strings.Join(args, " "), p.out.String())
		}
	})
	return p
}

// stop sends sig and waits for the exit; it returns the exit code and how
// long the process took.
func (p *proc) stop(t testing.TB, sig syscall.Signal) (int, time.Duration) {
	begin := time.Now()
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		panic(fmt.Sprintf("process did not exit after %v", sig))
	}
	return p.cmd.ProcessState.ExitCode(), time.Since(begin)
}

type backendProc struct {
	*proc
	addr, data string
	token      string // the API token, as a client reads it from <data>/api-token
}

func startBackend(t testing.TB, data, listen string, extra ...string) *backendProc {
	t.Helper()
	addrFile := filepath.Join(t.TempDir(), "addr")
	// Open enrollment: these tests start agents before their app exists;
	// TestEnrollment covers the secret.
	// An empty OPSAGENT_API_TOKEN (whatever the caller's environment
	// holds): the backend makes its own token, which the tests read back.
	p := startEnv(t, []string{"OPSAGENT_API_TOKEN="}, append([]string{"backend", "--listen", listen, "--data", data, "--addr-file", addrFile, "--open-enrollment"}, extra...)...)
	var addr string
	eventually(t, "backend listening", func() bool {
		b, err := os.ReadFile(addrFile)
		addr = strings.TrimSpace(string(b))
		return err == nil && addr != ""
	})
	return &backendProc{proc: p, addr: addr, data: data, token: readAPIToken(t, data)}
}

// readAPIToken reads the API token the backend made in its data directory
// on first start, as `export OPSAGENT_API_TOKEN=$(cat <data>/api-token)`.
func readAPIToken(t testing.TB, data string) string {
	t.Helper()
	tok, err := os.ReadFile(filepath.Join(data, "api-token"))
	if err != nil {
		t.Fatalf("the backend's API token: %v", err)
	}
	return strings.TrimSpace(string(tok))
}

// api calls the backend's API; failures panic (t may be nil in benchmarks).
func (b *backendProc) api(_ testing.TB, method, path, body string) map[string]any {
	req, _ := http.NewRequest(method, "http://"+b.addr+path, strings.NewReader(body))
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+b.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		panic(fmt.Sprintf("%s %s: %v", method, path, err))
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		panic(fmt.Sprintf("%s %s: %d %s", method, path, resp.StatusCode, data))
	}
	var out map[string]any
	_ = json.Unmarshal(data, &out)
	return out
}

type logEntry struct {
	Seq        int64   `json:"seq"`
	InstanceID string  `json:"instance_id"`
	StateID    string  `json:"state_id"`
	Result     bool    `json:"result"`
	Comment    *string `json:"comment"`
	Stdout     *string `json:"stdout"`
}

func (b *backendProc) logs(_ testing.TB, app string) []logEntry {
	req, _ := http.NewRequest("GET", "http://"+b.addr+"/api/apps/"+app+"/logs?limit=10000", nil)
	req.Header.Set("Authorization", "Bearer "+b.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var out struct {
		Logs []logEntry `json:"logs"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return out.Logs
}

// agentRoot writes a config into a fresh root.
func agentRoot(t testing.TB, addr, app, instance string, extra string) string {
	t.Helper()
	root := t.TempDir()
	conf := fmt.Sprintf("[userdata]\nws_uri = ws://%s/agent/\napp_id = %s\n[network]\ninstance_id = %s\n%s", addr, app, instance, extra)
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/opsagent.conf"), []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	return root
}

func startAgent(t *testing.T, root string) *proc {
	t.Helper()
	return start(t, "--root", root, "run")
}

func status(t *testing.T, root string) (int, map[string]any) {
	t.Helper()
	cmd := exec.Command(binary, "--root", root, "status", "--json")
	out, _ := cmd.Output()
	var rep map[string]any
	_ = json.Unmarshal(out, &rep)
	return cmd.ProcessState.ExitCode(), rep
}

// watchdogTimeout bounds a wait that spans several passes of the
// watchdog (cron.sh): a POSIX sh script whose every pass forks a few
// dozen processes, each of which waits for a core on a loaded machine.
const watchdogTimeout = 2 * time.Minute

func eventually(t testing.TB, what string, f func() bool) {
	t.Helper()
	wait.Eventually(t, what, f)
}

func comment(e logEntry) string {
	if e.Comment == nil {
		return ""
	}
	return *e.Comment
}

const storyRecipe = `{"state":[
 {"id":"note","module":"meta.comment","parameter":{"comment":"a demo recipe"}},
 {"id":"dir","module":"linux.dir","parameter":{"path":["/srv/demo"]}},
 {"id":"file","module":"linux.file","parameter":{"path":"/srv/demo/index.html","content":"<h1>hello</h1>\n"}},
 {"id":"cmd","module":"linux.cmd","parameter":{"cmd":"cat index.html","cwd":"/srv/demo"}},
 {"id":"wait","module":"meta.wait","parameter":{"state":["@{other.state.1}"]}}
]}`

func TestAgentBackendStory(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	root := agentRoot(t, b.addr, "demo", "i-demo", "[salt]\ndelay = 1s\n[agent]\napp_not_ready_delay = 200ms\n")
	agent := startAgent(t, root)
	// The app does not exist yet: AppNotReady, and the agent retries.
	time.Sleep(300 * time.Millisecond)
	b.api(t, "PUT", "/api/apps/demo/recipe", storyRecipe)

	eventually(t, "four StateLogs before the wait", func() bool { return len(b.logs(t, "demo")) >= 4 })
	eventually(t, "status saying the agent waits", func() bool {
		code, rep := status(t, root)
		st, _ := rep["status"].(map[string]any)
		eng, _ := st["engine"].(map[string]any)
		return code == 0 && eng["waiting_on"] == "wait"
	})
	time.Sleep(200 * time.Millisecond)
	if n := len(b.logs(t, "demo")); n != 4 {
		t.Fatalf("%d StateLogs while blocked on the wait, want 4", n)
	}
	b.api(t, "POST", "/api/apps/demo/waits", `{"instance_id":"i-demo","state_id":"wait"}`)
	eventually(t, "two full rounds", func() bool { return len(b.logs(t, "demo")) >= 10 })

	logs := b.logs(t, "demo")
	want := []struct{ id, comment string }{
		{"note", "skipped: comment"},
		{"dir", "Directory /srv/demo updated: created"},
		{"file", "File /srv/demo/index.html updated: created"},
		{"cmd", `Command "cat index.html" run`},
		{"wait", ""},
		{"note", "skipped: comment"},
		{"dir", "Directory /srv/demo is already in the correct state"},
		{"file", "File /srv/demo/index.html is already in the correct state"},
		{"cmd", "run"},
		{"wait", ""},
	}
	for i, w := range want {
		e := logs[i]
		if e.StateID != w.id || !e.Result || !strings.Contains(comment(e), w.comment) || e.InstanceID != "i-demo" {
			t.Errorf("log %d = %s %v %q; want %s %q", i, e.StateID, e.Result, comment(e), w.id, w.comment)
		}
	}
	if logs[3].Stdout == nil || *logs[3].Stdout != "<h1>hello</h1>\n" {
		t.Errorf("cmd stdout %v", logs[3].Stdout)
	}
	if data, err := os.ReadFile(filepath.Join(root, "srv/demo/index.html")); err != nil || string(data) != "<h1>hello</h1>\n" {
		t.Errorf("file in the root: %q %v", data, err)
	}
	// The token file was created (0400) and the backend knows the instance.
	if st, err := os.Stat(filepath.Join(root, "etc/opsagent.token")); err != nil || st.Mode().Perm() != 0o400 {
		t.Errorf("token file: %v %v", st, err)
	}
	inst := b.api(t, "GET", "/api/apps/demo/instances", "")["instances"].([]any)[0].(map[string]any)
	if inst["agent_version"] != "2.1.0" || inst["connected"] != true {
		t.Errorf("instance %v", inst)
	}
	code, took := agent.stop(t, syscall.SIGTERM)
	if code != 0 || took > 5*time.Second {
		t.Errorf("SIGTERM: exit %d after %v, want 0 within 5s", code, took)
	}
	if code, _ := status(t, root); code != 3 {
		t.Errorf("status after stop: exit %d, want 3", code)
	}
	if strings.Contains(agent.out.String(), "token") {
		data, _ := os.ReadFile(filepath.Join(root, "etc/opsagent.token"))
		if tok := strings.TrimSpace(string(data)); tok != "" && strings.Contains(agent.out.String(), tok) {
			t.Error("the token appears in the agent's output")
		}
	}
	logText, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/agent.log"))
	tok, _ := os.ReadFile(filepath.Join(root, "etc/opsagent.token"))
	if len(logText) == 0 || bytes.Contains(logText, bytes.TrimSpace(tok)) {
		t.Errorf("agent.log empty (%d bytes) or holds the token", len(logText))
	}
}

func TestReconnectAfterBackendRestartLosesNoStateLog(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/app/recipe", `{"state":[
	  {"id":"s1","module":"linux.cmd","parameter":{"cmd":"echo 1"}},
	  {"id":"s2","module":"linux.cmd","parameter":{"cmd":"echo 2"}},
	  {"id":"s3","module":"linux.cmd","parameter":{"cmd":"echo 3"}}]}`)
	root := agentRoot(t, b.addr, "app", "i-1", "[salt]\ndelay = 700ms\n")
	startAgent(t, root)
	eventually(t, "one round logged", func() bool { return len(b.logs(t, "app")) >= 3 })
	// Kill the backend between rounds, so no StateLog is in flight.
	b.stop(t, syscall.SIGKILL)
	eventually(t, "StateLogs queued while the backend is down", func() bool {
		_, rep := status(t, root)
		st, _ := rep["status"].(map[string]any)
		conn, _ := st["connection"].(map[string]any)
		depth, _ := conn["outbox_depth"].(float64)
		return conn["connected"] == false && depth >= 6
	})
	b2 := startBackend(t, data, b.addr)
	eventually(t, "queued StateLogs delivered", func() bool { return len(b2.logs(t, "app")) >= 12 })
	logs := b2.logs(t, "app")
	for i, e := range logs {
		if want := fmt.Sprintf("s%d", i%3+1); e.StateID != want || !e.Result {
			t.Fatalf("log %d is %s (%v), want %s: a StateLog was lost or reordered", i, e.StateID, e.Result, want)
		}
	}
}

func TestTokenMismatchRefused(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/app/recipe", `{"state":[]}`)
	first := agentRoot(t, b.addr, "app", "i-same", "")
	startAgent(t, first)
	eventually(t, "first agent known", func() bool {
		inst, _ := b.api(t, "GET", "/api/apps/app/instances", "")["instances"].([]any)
		return len(inst) == 1
	})
	impostor := agentRoot(t, b.addr, "app", "i-same", "")
	startAgent(t, impostor)
	eventually(t, "impostor refused", func() bool {
		_, rep := status(t, impostor)
		st, _ := rep["status"].(map[string]any)
		conn, _ := st["connection"].(map[string]any)
		e, _ := conn["last_error"].(string)
		return strings.Contains(e, "instance token mismatch")
	})
}

func TestSecondAgentOnSameRootRefused(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	root := agentRoot(t, b.addr, "app", "i-1", "")
	startAgent(t, root)
	eventually(t, "first agent running", func() bool { code, _ := status(t, root); return code == 0 })
	second := start(t, "--root", root, "run")
	select {
	case <-second.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("second agent did not exit")
	}
	if code := second.cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(second.out.String(), "already running as pid") {
		t.Errorf("exit %d output %q", code, second.out.String())
	}
}

func TestBrokenConfigNamesTheKey(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/opsagent.conf"), []byte("[userdata]\nws_uri = ws://127.0.0.1:1/agent/\n"), 0o640)
	p := start(t, "--root", root, "run")
	<-p.exited
	if code := p.cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(p.out.String(), "[userdata] app_id is missing") {
		t.Errorf("exit %d output %q", code, p.out.String())
	}
}

func TestSIGHUPReloadsConfig(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/app/recipe", `{"state":[{"id":"c","module":"meta.comment"}]}`)
	root := agentRoot(t, b.addr, "app", "i-1", "[salt]\ndelay = 60\n")
	agent := startAgent(t, root)
	eventually(t, "first round", func() bool { return len(b.logs(t, "app")) == 1 })
	confPath := filepath.Join(root, "etc/opsagent.conf")
	good, _ := os.ReadFile(confPath)

	// A broken config is refused; the agent keeps running with the old one.
	os.WriteFile(confPath, []byte("[userdata]\nws_uri = nope\n"), 0o640)
	_ = agent.cmd.Process.Signal(syscall.SIGHUP)
	logFile := filepath.Join(root, "var/log/visualops/agent.log")
	eventually(t, "reload refused", func() bool {
		data, _ := os.ReadFile(logFile)
		return strings.Contains(string(data), "config reload failed; keeping the running config")
	})
	// A good config is applied: the agent restarts its connection and
	// resumes the persisted recipe at once (a new round).
	os.WriteFile(confPath, good, 0o640)
	_ = agent.cmd.Process.Signal(syscall.SIGHUP)
	eventually(t, "round after reload", func() bool { return len(b.logs(t, "app")) >= 2 })
	if code, _ := status(t, root); code != 0 {
		t.Errorf("agent not running after reload: status exit %d", code)
	}
}
