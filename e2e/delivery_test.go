package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

// cmdRecipe is n linux.cmd states, the k-th sleeping a little so that a
// kill lands in the middle of a round.
func cmdRecipe(n int, sleepy int) string {
	var states []string
	for i := 1; i <= n; i++ {
		cmd := "true"
		if i == sleepy {
			cmd = "sleep 0.3"
		}
		states = append(states, fmt.Sprintf(`{"id":"s%02d","module":"linux.cmd","parameter":{"cmd":%q,"cwd":"/tmp"}}`, i, cmd))
	}
	return `{"state":[` + strings.Join(states, ",") + `]}`
}

// agentLogs are one instance's StateLogs at the backend, in storage order.
func agentLogs(t *testing.T, b *backendProc, app, id string) []map[string]any {
	resp := b.api(t, "GET", "/api/apps/"+app+"/logs?limit=10000", "")
	var out []map[string]any
	for _, x := range resp["logs"].([]any) {
		if l := x.(map[string]any); l["instance_id"] == id {
			out = append(out, l)
		}
	}
	return out
}

// checkRoundsInOrder fails unless the state ids follow the recipe's order
// round after round (a round may be cut short where the agent was killed:
// the state it was running is run again and reported once).
func checkRoundsInOrder(t *testing.T, logs []map[string]any, n int) {
	t.Helper()
	want := 1
	for _, l := range logs {
		id := l["state_id"].(string)
		var k int
		fmt.Sscanf(id, "s%d", &k)
		switch {
		case k == want:
		case k == 1: // a new round (after a kill, the round restarts)
		default:
			t.Fatalf("state %s after s%02d: out of order", id, want-1)
		}
		want = k%n + 1
	}
}

// TestAgentKill9MidRoundReportsEachStateOnce: the agent is killed with
// SIGKILL in the middle of a round and started again; at the backend every
// state that ran is reported exactly once, in order (agent seq and state
// ids).
func TestAgentKill9MidRoundReportsEachStateOnce(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	const n = 10
	b.api(t, "PUT", "/api/apps/k9/recipe", cmdRecipe(n, 6))
	root := agentRoot(t, b.addr, "k9", "i-k9", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	for kill := 0; kill < 3; kill++ {
		agent := startAgent(t, root)
		eventually(t, "the sleepy state running", func() bool { return engineField(root, "state_id") == "s06" })
		_ = agent.cmd.Process.Signal(syscall.SIGKILL)
		<-agent.exited
	}
	startAgent(t, root)
	eventually(t, "two more full rounds", func() bool { return len(agentLogs(t, b, "k9", "i-k9")) >= 3*5+2*n })
	logs := agentLogs(t, b, "k9", "i-k9")
	checkExactlyOnce(t, b, "k9", "i-k9")
	checkRoundsInOrder(t, logs, n)
}

// TestBackendKill9WhileAgentsSend: the backend is killed with SIGKILL while
// three agents send StateLogs, and restarted on the same data directory
// and port: nothing is lost, nothing stored twice.
func TestBackendKill9WhileAgentsSend(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/fleet3/recipe", cmdRecipe(20, 0))
	ids := []string{"i-a", "i-b", "i-c"}
	for _, id := range ids {
		startAgent(t, agentRoot(t, b.addr, "fleet3", id, "[salt]\ndelay = 1s\n[agent]\nengine = native\n"))
	}
	for round := 0; round < 3; round++ {
		eventually(t, "StateLogs flowing", func() bool {
			return len(b.logs(t, "fleet3")) >= (round+1)*30
		})
		_ = b.cmd.Process.Signal(syscall.SIGKILL)
		<-b.exited
		b = startBackend(t, data, b.addr)
	}
	eventually(t, "more StateLogs after the last restart", func() bool { return len(b.logs(t, "fleet3")) >= 150 })
	for _, id := range ids {
		if n := checkExactlyOnce(t, b, "fleet3", id); n == 0 {
			t.Errorf("%s: no StateLogs", id)
		}
	}
}

// TestRebootWithAFullOutbox: the agent runs rounds while the backend is
// down (its outbox fills), is stopped, the backend comes back, and at the
// agent's next start everything queued is delivered, in order.
func TestRebootWithAFullOutbox(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/boot/recipe", cmdRecipe(5, 0))
	root := agentRoot(t, b.addr, "boot", "i-boot", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	agent := startAgent(t, root)
	// Rounds running (the recipe reached the agent: "connected" alone can
	// come before the Handshake's answer does).
	eventually(t, "the first StateLogs", func() bool { return len(b.logs(t, "boot")) > 0 })
	addr := b.addr
	b.stop(t, syscall.SIGTERM)
	eventually(t, "StateLogs queued while the backend is down", func() bool {
		conn, _ := statusOf(root)["connection"].(map[string]any)
		d, _ := conn["outbox_depth"].(float64)
		return d >= 20
	})
	agent.stop(t, syscall.SIGTERM) // the instance shuts down
	b = startBackend(t, data, addr)
	startAgent(t, root)
	eventually(t, "the queue delivered", func() bool {
		conn, _ := statusOf(root)["connection"].(map[string]any)
		d, _ := conn["outbox_depth"].(float64)
		return len(agentLogs(t, b, "boot", "i-boot")) >= 25 && d < 5
	})
	checkExactlyOnce(t, b, "boot", "i-boot")
}

// protocol1Backend speaks the 2014 protocol: it ignores protocol_version
// and log_stream, never acknowledges, and records the StateLogs it gets.
type protocol1Backend struct {
	*httptest.Server
	mu   sync.Mutex
	logs []*protocol.StateLog
}

func newProtocol1Backend(t *testing.T, recipe string) *protocol1Backend {
	fb := &protocol1Backend{}
	up := websocket.Upgrader{}
	fb.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		if _, _, err := ws.ReadMessage(); err != nil { // the Handshake
			return
		}
		_ = ws.WriteMessage(websocket.TextMessage, []byte(recipe))
		for {
			_, data, err := ws.ReadMessage()
			if err != nil {
				return
			}
			if m, err := protocol.Decode(data); err == nil {
				if sl, ok := m.(*protocol.StateLog); ok {
					fb.mu.Lock()
					fb.logs = append(fb.logs, sl)
					fb.mu.Unlock()
				}
			}
		}
	}))
	t.Cleanup(fb.Close)
	return fb
}

// TestProtocol1Backend: with a backend that never acknowledges, the agent
// delivers as the 2014 protocol did (each StateLog leaves once written),
// without seq.
func TestProtocol1Backend(t *testing.T) {
	fb := newProtocol1Backend(t, `{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"a","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}},{"id":"b","module":"meta.comment"}]}`)
	root := agentRoot(t, strings.TrimPrefix(fb.URL, "http://"), "p1", "i-p1", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	startAgent(t, root)
	eventually(t, "StateLogs at the protocol-1 backend", func() bool {
		fb.mu.Lock()
		defer fb.mu.Unlock()
		return len(fb.logs) >= 4
	})
	fb.mu.Lock()
	for _, l := range fb.logs {
		if l.Seq != 0 {
			t.Errorf("a protocol-1 backend got seq %d", l.Seq)
		}
	}
	fb.mu.Unlock()
	eventually(t, "an empty outbox", func() bool {
		conn, _ := statusOf(root)["connection"].(map[string]any)
		return conn["outbox_depth"] == float64(0) && conn["protocol"] == float64(1)
	})
}

// TestOutboxDiskFaults: a torn or garbage tail is cut off with a log line;
// an unusable outbox directory makes the agent keep StateLogs in memory and
// say so in its status; the agent keeps running and delivering.
func TestOutboxDiskFaults(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/disk/recipe", cmdRecipe(3, 0))
	root := agentRoot(t, b.addr, "disk", "i-disk", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	outbox := filepath.Join(root, "var/lib/visualops/opsagent/outbox/outbox.log")
	logFile := filepath.Join(root, "var/log/visualops/agent.log")
	for _, damage := range []struct {
		name string
		do   func()
	}{
		{"truncated mid-record", func() {
			st, _ := os.Stat(outbox)
			_ = os.Truncate(outbox, st.Size()-7)
		}},
		{"garbage appended", func() {
			f, _ := os.OpenFile(outbox, os.O_APPEND|os.O_WRONLY, 0)
			f.Write(bytes.Repeat([]byte{0xff}, 100))
			f.Close()
		}},
	} {
		agent := startAgent(t, root)
		n := len(agentLogs(t, b, "disk", "i-disk"))
		eventually(t, "StateLogs", func() bool { return len(agentLogs(t, b, "disk", "i-disk")) > n+3 })
		agent.stop(t, syscall.SIGTERM)
		damage.do()
		before, _ := os.ReadFile(logFile)
		startAgent(t, root)
		eventually(t, damage.name+": the cut logged", func() bool {
			data, _ := os.ReadFile(logFile)
			return bytes.Contains(data[len(before):], []byte("tail was cut off"))
		})
		eventually(t, damage.name+": still delivering", func() bool { return len(agentLogs(t, b, "disk", "i-disk")) > n+6 })
		pid := agentPID(root)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		eventually(t, "stopped", func() bool { return agentPID(root) == 0 })
	}
	// The outbox directory is a file now: memory, said in the status.
	dir := filepath.Dir(outbox)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, []byte("in the way"), 0o600); err != nil {
		t.Fatal(err)
	}
	n := len(agentLogs(t, b, "disk", "i-disk"))
	startAgent(t, root)
	eventually(t, "status says memory", func() bool {
		conn, _ := statusOf(root)["connection"].(map[string]any)
		s, _ := conn["outbox_storage"].(string)
		return strings.HasPrefix(s, "memory: ")
	})
	eventually(t, "still delivering from memory", func() bool { return len(agentLogs(t, b, "disk", "i-disk")) > n+3 })
	out, _ := json.Marshal(statusOf(root)["connection"])
	t.Logf("connection status: %s", out)
}
