package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/conn"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/testutil/natscluster"
	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/protocol"
)

// The fleet: three backend replicas (`opsagent backend --nats …` processes)
// on a three-node NATS cluster (nats-server processes), HAProxy in front
// of them, real agents (`opsagent run`) and a simulated fleet (the real
// connection code as goroutines). NATS and HAProxy run from the project's
// example configurations (examples/fleet).

// haproxyBin finds HAProxy (a Debian package). Without it the fleet
// tests skip, saying so, unless OPSAGENT_REQUIRE_RIGS is set (CI), where
// they fail.
func haproxyBin(tb testing.TB) string {
	tb.Helper()
	for _, p := range []string{"haproxy", "/usr/sbin/haproxy"} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	const why = "haproxy is not installed (apt-get install haproxy): the fleet tests need a real load balancer"
	if os.Getenv("OPSAGENT_REQUIRE_RIGS") != "" {
		tb.Fatal(why)
	}
	tb.Skip(why)
	return ""
}

type fleetRig struct {
	tb       testing.TB
	nats     *natscluster.Cluster
	replicas []*backendProc
	addrs    []string // each replica's listen address, kept across restarts
	data     []string
	extra    []string     // more flags for every replica
	lb       *backendProc // the API through HAProxy (no process of its own)
	haproxy  *exec.Cmd
}

// startFleet starts NATS, three replicas (with the extra flags) and
// HAProxy.
func startFleet(tb testing.TB, extra ...string) *fleetRig {
	tb.Helper()
	hap := haproxyBin(tb)
	f := &fleetRig{tb: tb, nats: natscluster.Start(tb, 3), extra: extra}
	for i := range 3 {
		f.data = append(f.data, tb.TempDir())
		f.addrs = append(f.addrs, "127.0.0.1:0")
		f.replicas = append(f.replicas, nil)
		f.startReplica(i)
	}
	lb := freeAddr(tb)
	f.haproxy = exec.Command(hap, "-f", "../examples/fleet/haproxy.cfg", "-db")
	f.haproxy.Env = append(os.Environ(), "OPSAGENT_LB="+lb, "OPSAGENT_R1="+f.addrs[0], "OPSAGENT_R2="+f.addrs[1],
		"OPSAGENT_R3="+f.addrs[2], "OPSAGENT_HOST=127.0.0.1")
	out := &syncbuf.Buffer{}
	f.haproxy.Stdout, f.haproxy.Stderr = out, out
	if err := f.haproxy.Start(); err != nil {
		tb.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = f.haproxy.Wait(); close(exited) }()
	tb.Cleanup(func() {
		_ = f.haproxy.Process.Kill()
		<-exited
		if tb.Failed() {
			tb.Logf("haproxy output:\n%s", out.String())
		}
	})
	f.lb = &backendProc{addr: lb, token: f.replicas[0].token}
	eventually(tb, "HAProxy serving", func() bool {
		select {
		case <-exited:
			tb.Fatalf("haproxy exited:\n%s", out.String())
		default:
		}
		resp, err := http.Get("http://" + lb + "/api/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return f
}

func freeAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startReplica starts replica i (again, on its data directory and
// address, after a kill).
func (f *fleetRig) startReplica(i int) {
	f.tb.Helper()
	args := append([]string{"--nats", f.nats.URLs(), "--nats-replicas", "3", "--allow-host", "127.0.0.1"}, f.extra...)
	b := startBackend(f.tb, f.data[i], f.addrs[i], args...)
	f.replicas[i], f.addrs[i] = b, b.addr
	for j, r := range f.replicas {
		if r != nil && r.token != b.token {
			f.tb.Fatalf("replica %d has API token %q, replica %d %q: they must share one", i, b.token, j, r.token)
		}
	}
}

// kill ends replica i with SIGKILL.
func (f *fleetRig) kill(i int) {
	_ = f.replicas[i].cmd.Process.Signal(syscall.SIGKILL)
	<-f.replicas[i].exited
}

// allLogs pages through an app's StateLogs.
func (b *backendProc) allLogs(tb testing.TB, app string) []fleetLog {
	tb.Helper()
	var all []fleetLog
	for after := int64(0); ; {
		var page struct {
			Logs []fleetLog `json:"logs"`
			Next int64      `json:"next"`
			More bool       `json:"more"`
		}
		// A 503 says to try again (a stream's leader being elected after a
		// node died can take longer than the backend's own retries), as a
		// client of the API does; for a minute at most.
		for deadline := time.Now().Add(time.Minute); ; {
			req, _ := http.NewRequest("GET", fmt.Sprintf("http://%s/api/apps/%s/logs?after=%d&limit=10000", b.addr, app, after), nil)
			req.Header.Set("Authorization", "Bearer "+b.token)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				tb.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode == http.StatusServiceUnavailable && time.Now().Before(deadline) {
				tb.Logf("GET logs of %s: 503 %s (trying again)", app, bytes.TrimSpace(body))
				time.Sleep(500 * time.Millisecond)
				continue
			}
			if err == nil {
				err = json.Unmarshal(body, &page)
			}
			if err != nil || resp.StatusCode != 200 {
				tb.Fatalf("GET logs of %s: %d %v %s", app, resp.StatusCode, err, bytes.TrimSpace(body))
			}
			break
		}
		all = append(all, page.Logs...)
		if len(page.Logs) == 0 || !page.More {
			return all
		}
		after = page.Next
	}
}

type fleetLog struct {
	Seq        int64   `json:"seq"`
	InstanceID string  `json:"instance_id"`
	LogStream  string  `json:"log_stream"`
	AgentSeq   int64   `json:"agent_seq"`
	StateID    string  `json:"state_id"`
	Result     bool    `json:"result"`
	Stdout     *string `json:"stdout"`
}

// simAgent is a simulated agent: the real connection manager (in-memory
// outbox, protocol 2) with a handler that records what arrives and when.
type simAgent struct {
	id string
	m  *conn.Manager

	mu       sync.Mutex
	recipes  []recipeAt // every RecipeMetadata, in order
	pushes   map[string]time.Time
	notified chan struct{}
}

type recipeAt struct {
	version int64
	at      time.Time
}

func (a *simAgent) Deliver(_ context.Context, m protocol.Message) {
	now := time.Now()
	a.mu.Lock()
	switch m := m.(type) {
	case *protocol.RecipeMetadata:
		a.recipes = append(a.recipes, recipeAt{m.RecipeVersion, now})
	case *protocol.StatePush:
		if _, seen := a.pushes[m.StateID]; !seen {
			a.pushes[m.StateID] = now
		}
	}
	a.mu.Unlock()
	select {
	case a.notified <- struct{}{}:
	default:
	}
}

func (a *simAgent) Connected() {}

// got reports when the agent first received recipe version v (after
// since), or the zero time.
func (a *simAgent) got(v int64, since time.Time) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.recipes {
		if r.version == v && !r.at.Before(since) {
			return r.at
		}
	}
	return time.Time{}
}

func (a *simAgent) pushed(state string) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pushes[state]
}

// simFleet connects n simulated agents of app, agent k to urls[k%len];
// they stop when the test ends (simFleetStop stops them sooner).
func simFleet(tb testing.TB, app string, n int, urls ...string) []*simAgent {
	agents, _ := simFleetStop(tb, app, n, urls...)
	return agents
}

// simFleetStop is simFleet with a function that stops the agents (and
// waits for them).
func simFleetStop(tb testing.TB, app string, n int, urls ...string) ([]*simAgent, func()) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	stop := func() { cancel(); wg.Wait() }
	tb.Cleanup(stop)
	agents := make([]*simAgent, n)
	for i := range agents {
		a := &simAgent{id: fmt.Sprintf("%s-%05d", app, i), pushes: map[string]time.Time{}, notified: make(chan struct{}, 1)}
		id := conn.Identity{InstanceID: a.id, AppID: app, AgentVersion: "2.1.0", Token: fmt.Sprintf("sim-token-%s", a.id)}
		a.m = conn.New(conn.Options{
			URL:              "ws://" + urls[i%len(urls)] + "/agent/",
			Identity:         func(context.Context, bool) (conn.Identity, error) { return id, nil },
			Handler:          a,
			AppNotReadyDelay: 500 * time.Millisecond,
		})
		agents[i] = a
		wg.Add(1)
		go func() { defer wg.Done(); _ = a.m.Run(ctx) }()
	}
	return agents, stop
}

// report has every agent report n StateLogs, perTick at a time every
// tick (so that they span what the test does meanwhile).
func report(agents []*simAgent, n, perTick int, tick time.Duration) (done <-chan struct{}) {
	ch := make(chan struct{})
	res := state.Result{OK: true, Comment: "Command \"true\" run"}
	go func() {
		defer close(ch)
		for sent := 0; sent < n; sent += perTick {
			for _, a := range agents {
				for range min(perTick, n-sent) {
					a.m.Report(1, "s", res)
				}
			}
			time.Sleep(tick)
		}
	}()
	return ch
}

// drained waits until every agent's outbox is empty: everything it
// reported is acknowledged.
func drained(tb testing.TB, agents []*simAgent, within time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for _, a := range agents {
		for a.m.Status().Outbox.Depth > 0 {
			if time.Now().After(deadline) {
				tb.Fatalf("agent %s still has %d StateLogs unacknowledged after %v (%s)", a.id, a.m.Status().Outbox.Depth, within, a.m.Status().LastError)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// exactlyOnce checks that each simulated agent's StateLogs 1..n are stored
// once each, in order.
func exactlyOnce(tb testing.TB, logs []fleetLog, agents []*simAgent, n int64) {
	tb.Helper()
	seqs := map[string][]int64{}
	for _, l := range logs {
		seqs[l.InstanceID] = append(seqs[l.InstanceID], l.AgentSeq)
	}
	want := make([]int64, n)
	for i := range want {
		want[i] = int64(i + 1)
	}
	bad := 0
	for _, a := range agents {
		if got := seqs[a.id]; !slices.Equal(got, want) {
			if bad++; bad <= 3 {
				tb.Errorf("agent %s: %d StateLogs stored (%v…), want 1..%d each once", a.id, len(got), got[:min(len(got), 10)], n)
			}
		}
	}
	if bad > 0 {
		tb.Fatalf("%d of %d agents' StateLogs not stored exactly once", bad, len(agents))
	}
}

// realAgent starts `opsagent run` for app through addr, with a recipe
// whose states each append a fresh uuid to the agent's file (and print
// it): ran lists what it executed.
func realAgent(t *testing.T, addr, app, instance string) (root string, ran func() []string) {
	t.Helper()
	root = agentRoot(t, addr, app, instance, "metadata = http://127.0.0.1:1\n[salt]\ndelay = 1h\n[agent]\nengine = native\napp_not_ready_delay = 1s\n")
	startAgent(t, root)
	file := filepath.Join(root, "ran.txt")
	return root, func() []string {
		data, _ := os.ReadFile(file)
		return strings.Fields(string(data))
	}
}

// uuidStates is a recipe of n states that each append a uuid to
// <root>/ran.txt and print it, then a wait that nothing releases (so the
// round ends there).
func uuidStates(root, prefix string, n int, sleep string) string {
	var st []string
	for k := range n {
		cmd := fmt.Sprintf("sleep %s; u=$(cat /proc/sys/kernel/random/uuid); echo $u >> %s/ran.txt; echo $u", sleep, root)
		st = append(st, fmt.Sprintf(`{"id":"%s%d","module":"linux.cmd","parameter":{"cmd":%q}}`, prefix, k, cmd))
	}
	st = append(st, fmt.Sprintf(`{"id":"%s-end","module":"meta.wait","parameter":{"state":["@{nobody.state.x}"]}}`, prefix))
	return `{"state":[` + strings.Join(st, ",") + `]}`
}

// executionsOnce checks that each execution an agent recorded is stored
// exactly once (its uuid in a StateLog's stdout).
func executionsOnce(t *testing.T, logs []fleetLog, ran []string) {
	t.Helper()
	seen := map[string]int{}
	for _, l := range logs {
		if l.Stdout != nil {
			seen[strings.TrimSpace(*l.Stdout)]++
		}
	}
	for _, u := range ran {
		if seen[u] != 1 {
			t.Fatalf("execution %s stored %d times, want once (%d executions)", u, seen[u], len(ran))
		}
	}
}

func agentDrained(t *testing.T, root string) bool {
	_, rep := status(t, root)
	st, _ := rep["status"].(map[string]any)
	c, _ := st["connection"].(map[string]any)
	depth, ok := c["outbox_depth"].(float64)
	return c["connected"] == true && ok && depth == 0
}

// TestFleetReplicaKilledWhileAgentsSend: a replica is killed with -9 while
// real and simulated agents send through HAProxy. Its agents reconnect
// through the balancer to the others, and every StateLog is stored
// exactly once.
func TestFleetReplicaKilledWhileAgentsSend(t *testing.T) {
	f := startFleet(t)
	var roots []string
	var rans []func() []string
	for i := range 3 {
		app := fmt.Sprintf("real%d", i)
		root, ran := realAgent(t, f.lb.addr, app, fmt.Sprintf("i-real%d", i))
		f.lb.api(t, "PUT", "/api/apps/"+app+"/recipe", uuidStates(root, "a", 40, "0.05"))
		roots, rans = append(roots, root), append(rans, ran)
	}
	f.lb.api(t, "PUT", "/api/apps/sim/recipe", `{"state":[{"id":"s","module":"meta.comment"}]}`)
	sims := simFleet(t, "sim", 90, f.lb.addr)
	const perAgent = 200
	sent := report(sims, perAgent, 10, 50*time.Millisecond)
	eventually(t, "the real agents half way", func() bool {
		for _, ran := range rans {
			if len(ran()) < 15 {
				return false
			}
		}
		return true
	})
	f.kill(1)
	t.Log("replica 1 killed")
	<-sent
	drained(t, sims, 2*time.Minute)
	for i, root := range roots {
		eventually(t, "real agent drained", func() bool { return len(rans[i]()) == 40 && agentDrained(t, root) })
	}
	exactlyOnce(t, f.lb.allLogs(t, "sim"), sims, perAgent)
	for i := range roots {
		executionsOnce(t, f.lb.allLogs(t, fmt.Sprintf("real%d", i)), rans[i]())
	}
	reconnected := 0
	for _, a := range sims {
		a.mu.Lock()
		if len(a.recipes) > 1 {
			reconnected++
		}
		a.mu.Unlock()
	}
	if reconnected == 0 {
		t.Fatal("no simulated agent reconnected: none was on the killed replica?")
	}
	t.Logf("%d of %d simulated agents reconnected after the kill", reconnected, len(sims))
}

// TestFleetNATSNodeKilled: one NATS node of three is killed with -9 while
// agents send; streams and buckets are replicated three times, so nothing
// acknowledged is lost and service goes on: StateLogs are taken, a new
// recipe reaches every agent.
func TestFleetNATSNodeKilled(t *testing.T) {
	f := startFleet(t)
	f.lb.api(t, "PUT", "/api/apps/sim/recipe", `{"state":[{"id":"s","module":"meta.comment"}]}`)
	sims := simFleet(t, "sim", 60, f.lb.addr)
	const perAgent = 200
	sent := report(sims, perAgent, 10, 50*time.Millisecond)
	time.Sleep(300 * time.Millisecond) // some acknowledged before the kill, most after
	f.nats.Kill(2)
	t.Log("NATS node 2 killed")
	push := time.Now()
	var out map[string]any
	eventually(t, "a recipe put after the kill", func() bool {
		defer func() { _ = recover() }() // 503 while the cluster elects leaders
		out = f.lb.api(t, "PUT", "/api/apps/sim/recipe", `{"state":[{"id":"t","module":"meta.comment"}]}`)
		return true
	})
	version := int64(out["recipe_version"].(float64))
	<-sent
	drained(t, sims, 2*time.Minute)
	for _, a := range sims {
		eventually(t, "the new recipe at every agent", func() bool { return !a.got(version, push).IsZero() })
	}
	exactlyOnce(t, f.lb.allLogs(t, "sim"), sims, perAgent)
}

// TestFleetWaitsAcrossReplicas: a wait released through one replica
// reaches a real agent connected to another, and so does a wait the relay
// releases when a state of an agent on a third replica succeeds.
func TestFleetWaitsAcrossReplicas(t *testing.T) {
	f := startFleet(t)
	// By hand: released on replica 0 for the agent on replica 2.
	hand := agentRoot(t, f.addrs[2], "hand", "i-hand", "metadata = http://127.0.0.1:1\n[salt]\ndelay = 1h\n[agent]\nengine = native\n")
	f.replicas[0].api(t, "PUT", "/api/apps/hand/recipe", fmt.Sprintf(`{"state":[
	  {"id":"w","module":"meta.wait","parameter":{}},
	  {"id":"after","module":"linux.cmd","parameter":{"cmd":"touch %s/after"}}]}`, hand))
	startAgent(t, hand)
	eventually(t, "the agent on replica 2 waiting", func() bool { return f.replicas[0].instance("hand", "i-hand")["connected"] == true })
	// Replicas listen on port 0 here: the name shows the port each got.
	if rep, _ := f.replicas[0].instance("hand", "i-hand")["replica"].(string); !strings.HasSuffix(rep, " "+f.addrs[2]) {
		t.Fatalf("replica 0 names the replica holding i-hand %q, want one ending with replica 2's address %s", rep, f.addrs[2])
	}
	f.replicas[0].api(t, "POST", "/api/apps/hand/waits", `{"instance_id":"i-hand","state_id":"w"}`)
	eventually(t, "the state after the wait run", func() bool { _, err := os.Stat(filepath.Join(hand, "after")); return err == nil })

	// Relayed: i-x on replica 0 waits on i-y's s1, i-y is on replica 1.
	f.replicas[2].api(t, "PUT", "/api/apps/relay/recipe", `{"state":[
	  {"id":"s1","module":"linux.cmd","parameter":{"cmd":"true"}},
	  {"id":"w","module":"meta.wait","parameter":{"state":["@{i-y.state.s1}"]}},
	  {"id":"after","module":"linux.cmd","parameter":{"cmd":"true"}}]}`)
	for _, a := range []struct{ inst, addr string }{{"i-x", f.addrs[0]}, {"i-y", f.addrs[1]}} {
		root := agentRoot(t, a.addr, "relay", a.inst, "metadata = http://127.0.0.1:1\n[salt]\ndelay = 1h\n[agent]\nengine = native\n")
		startAgent(t, root)
	}
	eventually(t, "both agents past the relayed wait", func() bool {
		logs := f.replicas[2].allLogs(t, "relay")
		after := 0
		for _, l := range logs {
			if l.StateID == "after" && l.Result {
				after++
			}
		}
		return after == 2
	})
}

// TestFleetImportIntoTheCluster: a replica started on a data directory
// written by the single-process backend (the last file store's, committed
// as backend/testdata) imports it into the cluster on its first start:
// the other replicas serve it.
func TestFleetImportIntoTheCluster(t *testing.T) {
	f := startFleet(t)
	data := t.TempDir()
	src := "../backend/testdata/legacy/84b2210"
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(data, rel), 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(data, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	var expect struct {
		Logs []fleetLog `json:"logs"`
	}
	raw, err := os.ReadFile(src + ".expect.json")
	if err != nil || json.Unmarshal(raw, &expect) != nil {
		t.Fatal(err)
	}
	startBackend(t, data, "127.0.0.1:0", "--nats", f.nats.URLs(), "--nats-replicas", "3", "--allow-host", "127.0.0.1")
	if v := f.replicas[1].api(t, "GET", "/api/apps/legacy/recipe", "")["recipe_version"]; v != float64(2) {
		t.Fatalf("the imported recipe through another replica: version %v, want 2", v)
	}
	logs := f.lb.allLogs(t, "legacy")
	if len(logs) != len(expect.Logs) {
		t.Fatalf("%d StateLogs through the balancer, %d imported", len(logs), len(expect.Logs))
	}
	for i := range logs {
		if logs[i].Seq != expect.Logs[i].Seq || logs[i].AgentSeq != expect.Logs[i].AgentSeq {
			t.Fatalf("StateLog %d: %+v, was %+v", i, logs[i], expect.Logs[i])
		}
	}
	streams, _ := f.replicas[2].instance("legacy", "i-1")["log_streams"].(map[string]any)
	if streams["s1"] != float64(62) {
		t.Fatalf("i-1's stream high through another replica: %v, want 62", streams)
	}
}
