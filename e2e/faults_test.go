package e2e

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The whole story under faults: a backend restarted mid-round, a network
// cut while a wait is pending, an agent killed while the backend is down,
// and two agents whose waits the backend relays.

// checkUninterrupted fails unless the state ids go s01…sNN round after
// round with no round started over.
func checkUninterrupted(t *testing.T, logs []map[string]any, n int) {
	t.Helper()
	want := 1
	for i, l := range logs {
		if id, exp := l["state_id"].(string), fmt.Sprintf("s%02d", want); id != exp {
			t.Fatalf("StateLog %d is %s, want %s: the round was interrupted or a StateLog lost", i, id, exp)
		}
		want = want%n + 1
	}
}

// TestBackendRestartMidRound: the backend is stopped and started again on
// its data directory while a state runs. The round goes on as if nothing
// happened (nothing is run again), and every StateLog is stored once.
func TestBackendRestartMidRound(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	const n = 6
	recipe := strings.Replace(cmdRecipe(n, 3), "sleep 0.3", "sleep 1.5", 1)
	b.api(t, "PUT", "/api/apps/brm/recipe", recipe)
	root := agentRoot(t, b.addr, "brm", "i-brm", "[salt]\ndelay = 500ms\n[agent]\nengine = native\n")
	agent := startAgent(t, root)
	for restart := 0; restart < 2; restart++ {
		eventually(t, "the sleepy state running", func() bool { return engineField(root, "state_id") == "s03" })
		stored := len(agentLogs(t, b, "brm", "i-brm"))
		if restart == 0 {
			b.stop(t, syscall.SIGTERM)
		} else {
			b.stop(t, syscall.SIGKILL)
		}
		b = startBackend(t, data, b.addr)
		eventually(t, "the round's end stored after the restart", func() bool {
			return len(agentLogs(t, b, "brm", "i-brm")) >= stored+n-2
		})
	}
	eventually(t, "three full rounds stored", func() bool { return len(agentLogs(t, b, "brm", "i-brm")) >= 3*n })
	select {
	case <-agent.exited:
		t.Fatal("the agent exited")
	default:
	}
	checkUninterrupted(t, agentLogs(t, b, "brm", "i-brm"), n)
	checkExactlyOnce(t, b, "brm", "i-brm")
}

// tcpProxy forwards loopback TCP to a backend and can cut the network:
// drop every connection, then refuse new ones for a while.
type tcpProxy struct {
	t      *testing.T
	addr   string
	target string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
}

// newProxy listens; call setTarget before the first connection.
func newProxy(t *testing.T) *tcpProxy {
	p := &tcpProxy{t: t, conns: map[net.Conn]bool{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.serve(ln)
	t.Cleanup(func() { p.cut() })
	return p
}

func (p *tcpProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			target := p.target
			p.mu.Unlock()
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns[c], p.conns[up] = true, true
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
}

// setTarget names the address connections are forwarded to.
func (p *tcpProxy) setTarget(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = addr
}

// cut closes every connection and the listener: connecting is refused.
func (p *tcpProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// restore listens again on the same address.
func (p *tcpProxy) restore() {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatalf("proxy: listen again on %s: %v", p.addr, err)
	}
	p.serve(ln)
}

var reconnectLine = regexp.MustCompile(`connection lost; reconnecting.* in=(\S+) attempt=(\d+)`)

// TestNetworkCutWhileAWaitIsPending: the agent waits on a meta.wait; the
// network is cut (every connection dropped, connecting refused for 3 s),
// and the wait is released meanwhile, when it cannot be pushed. The agent
// backs off, reconnects, learns of the release (pushed again after the
// Handshake, and in the WaitList answering its WaitQuery), and completes
// the round.
func TestNetworkCutWhileAWaitIsPending(t *testing.T) {
	proxy := newProxy(t)
	// Agents reach the backend by the proxy's address: allowed as a Host.
	b := startBackend(t, t.TempDir(), "127.0.0.1:0", "--allow-host", proxy.addr)
	proxy.setTarget(b.addr)
	b.api(t, "PUT", "/api/apps/cut/recipe", `{"state":[
	  {"id":"s01","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}},
	  {"id":"s02","module":"meta.wait","parameter":{"state":["@{db.state.1}"]}},
	  {"id":"s03","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	root := agentRoot(t, proxy.addr, "cut", "i-cut", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	startAgent(t, root)
	eventually(t, "the agent waiting on s02", func() bool { return engineField(root, "waiting_on") == "s02" })

	proxy.cut()
	eventually(t, "the agent sees the cut", func() bool {
		_, rep := status(t, root)
		st, _ := rep["status"].(map[string]any)
		conn, _ := st["connection"].(map[string]any)
		return conn["connected"] == false
	})
	resp := b.api(t, "POST", "/api/apps/cut/waits", `{"instance_id":"i-cut","state_id":"s02"}`)
	if resp["pushed"] != false {
		t.Fatalf("the release reached the agent through a cut network: %v", resp)
	}
	time.Sleep(3 * time.Second) // connecting is refused meanwhile
	proxy.restore()

	eventually(t, "the round completed after the reconnect", func() bool {
		logs := agentLogs(t, b, "cut", "i-cut")
		return len(logs) >= 3 && logs[len(logs)-1]["state_id"] == "s03" || len(logs) >= 4
	})
	logs := agentLogs(t, b, "cut", "i-cut")
	if logs[1]["state_id"] != "s02" || logs[1]["result"] != true || logs[2]["state_id"] != "s03" {
		t.Errorf("StateLogs %v, want s01, s02 (released), s03", logs[:3])
	}
	agentLog, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/agent.log"))
	attempts := reconnectLine.FindAllStringSubmatch(string(agentLog), -1)
	if len(attempts) < 2 {
		t.Errorf("%d reconnect attempts logged during a 3 s refusal, want backoff over several:\n%s", len(attempts), agentLog)
	}
	// The backend re-sends released waits after the Handshake and answers
	// the agent's WaitQuery: whichever arrives first releases it.
	if !regexp.MustCompile(`msg="wait released by the backend" part=rounds state_id=s02 via=(State|WaitList)`).Match(agentLog) {
		t.Errorf("agent.log does not show the release after the reconnect:\n%s", agentLog)
	}
	for _, a := range attempts {
		t.Logf("reconnect attempt %s after %s", a[2], a[1])
	}
	checkExactlyOnce(t, b, "cut", "i-cut")
}

// TestAgentKill9WithBackendDownResumesFromWatchdog: the agent, installed,
// is killed with SIGKILL in the middle of a round while the backend is
// down. The watchdog (cron.sh, run here as cron would) starts it again,
// and it resumes the persisted recipe at once, queuing StateLogs, before
// the backend is back; then everything is delivered once.
func TestAgentKill9WithBackendDownResumesFromWatchdog(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	const n = 5
	b.api(t, "PUT", "/api/apps/wd/recipe", cmdRecipe(n, 3))
	root := t.TempDir()
	stopAgentsBelow(t, root)
	out, err := exec.Command(binary, "--root", root, "install", "--ws-uri", "ws://"+b.addr+"/agent/", "--app-id", "wd",
		"--version", "2.1.0", "--base-remote", "http://127.0.0.1:1", "--skip-packages", "--start",
		"--set", "network.instance_id=i-wd", "--set", "network.metadata=http://127.0.0.1:1",
		"--set", "agent.engine=native", "--set", "salt.delay=500ms").CombinedOutput()
	if err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	eventually(t, "a round stored", func() bool { return len(agentLogs(t, b, "wd", "i-wd")) >= n })
	eventually(t, "the sleepy state running", func() bool { return engineField(root, "state_id") == "s03" })
	b.stop(t, syscall.SIGKILL)
	pid := agentPID(root)
	if pid == 0 {
		t.Fatal("no agent runs")
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	eventually(t, "the agent gone", func() bool { return agentPID(root) == 0 })

	cron := exec.Command("/bin/sh", filepath.Join(root, "var/lib/visualops/opsagent/cron.sh"))
	if out, err := cron.CombinedOutput(); err != nil {
		t.Fatalf("cron.sh: %v\n%s", err, out)
	}
	eventually(t, "the watchdog started the agent", func() bool { return agentPID(root) != 0 && agentPID(root) != pid })
	// With the backend still down, rounds go on from the persisted recipe
	// and their StateLogs queue in the outbox.
	eventually(t, "rounds resumed with the backend down", func() bool {
		_, rep := status(t, root)
		st, _ := rep["status"].(map[string]any)
		conn, _ := st["connection"].(map[string]any)
		depth, _ := conn["outbox_depth"].(float64)
		return conn["connected"] == false && depth >= n
	})
	boot, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/bootstrap.log"))
	if !strings.Contains(string(boot), "the agent was not running; started it") {
		t.Errorf("bootstrap.log does not show the watchdog's start:\n%s", boot)
	}
	b = startBackend(t, data, b.addr)
	eventually(t, "the queue delivered", func() bool { return len(agentLogs(t, b, "wd", "i-wd")) >= 3*n })
	checkExactlyOnce(t, b, "wd", "i-wd")
	checkRoundsInOrder(t, agentLogs(t, b, "wd", "i-wd"), n)
}

// TestTwoAgentsRelayAWait: agents A and B of one app run one recipe whose
// meta.wait names B's first state. When B reports it, the backend releases
// the wait for both, and both complete their rounds; nobody released it
// by hand.
func TestTwoAgentsRelayAWait(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	b.api(t, "PUT", "/api/apps/pair/recipe", `{"state":[
	  {"id":"init","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}},
	  {"id":"after-b","module":"meta.wait","parameter":{"state":[{"key":"@{i-b.state.init}"}]}},
	  {"id":"done","module":"linux.cmd","parameter":{"cmd":"true","cwd":"/tmp"}}]}`)
	rootA := agentRoot(t, b.addr, "pair", "i-a", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	startAgent(t, rootA)
	eventually(t, "A waiting on B", func() bool { return engineField(rootA, "waiting_on") == "after-b" })
	rootB := agentRoot(t, b.addr, "pair", "i-b", "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	startAgent(t, rootB)
	for _, id := range []string{"i-a", "i-b"} {
		eventually(t, id+" completes its round", func() bool {
			for _, l := range agentLogs(t, b, "pair", id) {
				if l["state_id"] == "done" && l["result"] == true {
					return true
				}
			}
			return false
		})
	}
	for _, id := range []string{"i-a", "i-b"} {
		var ids []string
		for _, l := range agentLogs(t, b, "pair", id)[:3] {
			ids = append(ids, l["state_id"].(string))
		}
		if strings.Join(ids, ",") != "init,after-b,done" {
			t.Errorf("%s: %v", id, ids)
		}
	}
}

// TestRecipeCannotLeaveTheRoot: recipes plant symlinks to a directory
// outside the agent's root (absolute and relative) and then write through
// them, and through ".." and absolute paths. Nothing appears outside the
// root, whatever each state reports, and the agent goes on.
func TestRecipeCannotLeaveTheRoot(t *testing.T) {
	outside := t.TempDir()
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	up := strings.Repeat("../", 12) + strings.TrimPrefix(outside, "/")
	plant := []string{
		`{"id":"srv","module":"linux.dir","parameter":{"path":["/srv"]}}`,
		fmt.Sprintf(`{"id":"abs-link","module":"linux.symlink","parameter":{"source":%q,"target":"/srv/abs"}}`, outside),
		fmt.Sprintf(`{"id":"rel-link","module":"linux.symlink","parameter":{"source":%q,"target":"/srv/rel"}}`, up),
	}
	attacks := []string{
		`{"id":"via-abs","module":"linux.file","parameter":{"path":"/srv/abs/pwned-abs","content":"x"}}`,
		`{"id":"via-rel","module":"linux.file","parameter":{"path":"/srv/rel/pwned-rel","content":"x"}}`,
		`{"id":"dir-rel","module":"linux.dir","parameter":{"path":["/srv/rel/pwned-dir"]}}`,
		fmt.Sprintf(`{"id":"dotdot","module":"linux.file","parameter":{"path":%q,"content":"x"}}`, "/srv/../../../../../"+up+"/pwned-dotdot"),
		fmt.Sprintf(`{"id":"absolute","module":"linux.file","parameter":{"path":%q,"content":"x"}}`, outside+"/pwned-absolute"),
		`{"id":"cmd-cwd","module":"linux.cmd","parameter":{"cmd":"touch pwned-cmd","cwd":"/srv/rel"}}`,
		`{"id":"link-over","module":"linux.file","parameter":{"path":"/srv/abs","content":"x"}}`,
	}
	root := agentRoot(t, b.addr, "esc", "i-esc", "[salt]\ndelay = 500ms\n[agent]\nengine = native\n")
	startAgent(t, root)
	for _, attack := range attacks {
		var id string
		fmt.Sscanf(strings.SplitN(attack, `"`, 5)[3], "%s", &id)
		b.api(t, "PUT", "/api/apps/esc/recipe", `{"state":[`+strings.Join(append(plant, attack), ",")+`]}`)
		var got map[string]any
		eventually(t, id+" reported", func() bool {
			for _, l := range agentLogs(t, b, "esc", "i-esc") {
				if l["state_id"] == id {
					got = l
					return true
				}
			}
			return false
		})
		t.Logf("%-9s ok=%v %v", id, got["result"], got["comment"])
	}
	entries, _ := os.ReadDir(outside)
	for _, e := range entries {
		t.Errorf("written outside the root: %s", filepath.Join(outside, e.Name()))
	}
}
