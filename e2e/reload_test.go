package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runReturns runs opsagent with args and fails the test if it has not
// returned within a generous deadline: a command blocked on a FIFO never
// returns, which must show as a failure, not as a hung test binary.
func runReturns(t *testing.T, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	out, _ := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("opsagent %s did not return (blocked)", strings.Join(args, " "))
	}
	return string(out), cmd.ProcessState.ExitCode()
}

// TestStatusWithFIFOsAtItsPaths: a FIFO planted at status.json, at the
// lock file or at the config made `opsagent status` hang; it returns at
// once and says what is wrong, naming the path.
func TestStatusWithFIFOsAtItsPaths(t *testing.T) {
	for _, tc := range []struct {
		name, path, want string
	}{
		{"status.json", "var/lib/visualops/opsagent/status.json", "is a named pipe (FIFO)"},
		{"lock", "var/lib/visualops/opsagent/lock", "is a named pipe (FIFO)"},
		{"config", "etc/opsagent.conf", "is a named pipe (FIFO)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := agentRoot(t, "127.0.0.1:1", "app", "i-1", "")
			p := filepath.Join(root, tc.path)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			_ = os.Remove(p)
			if err := syscall.Mkfifo(p, 0o644); err != nil {
				t.Fatal(err)
			}
			out, code := runReturns(t, "--root", root, "status")
			if !strings.Contains(out, tc.want) || !strings.Contains(out, p) || code == 0 {
				t.Errorf("exit %d, output:\n%s\nwant it to say %q", code, out, tc.want)
			}
		})
	}
}

// TestSIGHUPWithAnUnreadableConfigKeepsTheSession: on SIGHUP the new config
// is loaded before anything is stopped. One that cannot be loaded (a FIFO
// in its place, which used to wedge the agent: disconnected, deaf to
// SIGTERM, alive for the watchdog; or a broken file, which used to restart
// the session and its connection anyway) is refused and logged, and the
// running session goes on with its connection untouched; SIGTERM still
// stops the agent.
func TestSIGHUPWithAnUnreadableConfigKeepsTheSession(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/app/recipe", `{"state":[{"id":"c","module":"meta.comment"}]}`)
	for _, tc := range []struct {
		name, want string
		plant      func(p string) error
	}{
		{"fifo", "is a named pipe (FIFO)", func(p string) error { return syscall.Mkfifo(p, 0o640) }},
		{"broken", "ws_uri", func(p string) error { return os.WriteFile(p, []byte("[userdata]\nws_uri = nope\n"), 0o640) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := agentRoot(t, b.addr, "app", "i-"+tc.name, "[salt]\ndelay = 60\n")
			agent := startAgent(t, root)
			conn := func() map[string]any { c, _ := statusOf(root)["connection"].(map[string]any); return c }
			eventually(t, "connected", func() bool { return conn()["connected"] == true })
			since := conn()["since"]
			confPath := filepath.Join(root, "etc/opsagent.conf")
			if err := os.Remove(confPath); err != nil {
				t.Fatal(err)
			}
			if err := tc.plant(confPath); err != nil {
				t.Fatal(err)
			}
			_ = agent.cmd.Process.Signal(syscall.SIGHUP)
			logFile := filepath.Join(root, "var/log/visualops/agent.log")
			eventually(t, "the reload refused and logged", func() bool {
				data, _ := os.ReadFile(logFile)
				i := strings.Index(string(data), "config reload failed")
				return i >= 0 && strings.Contains(string(data[i:]), tc.want)
			})
			if c := conn(); c["connected"] != true || c["since"] != since {
				t.Errorf("the connection was touched: connected %v since %v (was %v)", c["connected"], c["since"], since)
			}
			if v := b.connectedAs("app", "i-"+tc.name); v == "" {
				t.Error("the backend no longer sees the agent connected")
			}
			if code, _ := agent.stop(t, syscall.SIGTERM); code != 0 {
				t.Errorf("SIGTERM after the refused reload: exit %d", code)
			}
		})
	}
}
