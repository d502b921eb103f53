package e2e

import (
	"context"
	"fmt"
	"os"

	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/conn"
	"github.com/visualops/opsagent/protocol"
)

// vmRSS reads a process's resident set size in KiB.
func vmRSS(tb testing.TB, pid int) int64 { return procStatus(tb, pid, "VmRSS:") }

// procStatus reads one KiB field of /proc/<pid>/status.
func procStatus(tb testing.TB, pid int, field string) int64 {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, field) {
			f := strings.Fields(line)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	tb.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// fleetAgent is a simulated agent: the real connection manager with a
// handler that records when the recipe arrived.
type fleetAgent struct {
	got chan time.Time
}

func (a *fleetAgent) Deliver(_ context.Context, m protocol.Message) {
	if r, ok := m.(*protocol.RecipeMetadata); ok && r.RecipeVersion == 2 {
		select {
		case a.got <- time.Now():
		default:
		}
	}
}
func (a *fleetAgent) Connected() {}

// BenchmarkFleet connects N agents (the real agent/conn code, as goroutines)
// to one backend process and measures connect time, backend memory per idle
// connection, and recipe push latency.
func BenchmarkFleet(b *testing.B) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	for _, n := range []int{100, 1000, 5000} {
		if n > 1000 && testing.Short() {
			continue
		}
		b.Run(fmt.Sprintf("agents=%d", n), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				fleet(b, n)
			}
		})
	}
}

func fleet(b *testing.B, n int) {
	be := startBackend(b, b.TempDir(), "127.0.0.1:0")
	// Version 1 exists so handshakes succeed; version 2 is the measured push.
	be.api(nil, "PUT", "/api/apps/fleet/recipe", `{"state":[]}`)
	time.Sleep(200 * time.Millisecond)
	rssBefore := vmRSS(b, be.cmd.Process.Pid)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agents := make([]*fleetAgent, n)
	var wg sync.WaitGroup
	begin := time.Now()
	for i := range agents {
		a := &fleetAgent{got: make(chan time.Time, 1)}
		agents[i] = a
		id := conn.Identity{InstanceID: fmt.Sprintf("i-%05d", i), AppID: "fleet", AgentVersion: "2.1.0", Token: fmt.Sprintf("fleet-token-%08d", i)}
		m := conn.New(conn.Options{
			URL:      "ws://" + be.addr + "/agent/",
			Identity: func(context.Context, bool) (conn.Identity, error) { return id, nil },
			Handler:  a,
		})
		wg.Add(1)
		go func() { defer wg.Done(); _ = m.Run(ctx) }()
	}
	connected := func() int {
		out := be.api(nil, "GET", "/api/apps", "")
		for _, app := range out["apps"].([]any) {
			if a := app.(map[string]any); a["app_id"] == "fleet" {
				return int(a["connected"].(float64))
			}
		}
		return 0
	}
	for connected() < n {
		if time.Since(begin) > 2*time.Minute {
			b.Fatalf("only %d of %d agents connected", connected(), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	connectTime := time.Since(begin)
	time.Sleep(500 * time.Millisecond) // let the backend settle
	rssAfter := vmRSS(b, be.cmd.Process.Pid)

	push := time.Now()
	be.api(nil, "PUT", "/api/apps/fleet/recipe", `{"state":[{"id":"s","module":"meta.comment"}]}`)
	lat := make([]time.Duration, n)
	for i, a := range agents {
		select {
		case at := <-a.got:
			lat[i] = at.Sub(push)
		case <-time.After(time.Minute):
			b.Fatalf("agent %d never got the recipe", i)
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 { return float64(lat[int(p*float64(n-1))].Microseconds()) / 1000 }
	b.ReportMetric(float64(connectTime.Milliseconds()), "connect-all-ms")
	b.ReportMetric(float64(rssAfter-rssBefore)/float64(n), "backend-KiB/conn")
	b.ReportMetric(pct(0.5), "push-p50-ms")
	b.ReportMetric(pct(0.99), "push-p99-ms")
	b.ReportMetric(pct(1), "push-max-ms")
	cancel()
	wg.Wait()
}

// BenchmarkIdleAgentRSS measures the real `opsagent run` process after 60 s
// connected with nothing to do.
func BenchmarkIdleAgentRSS(b *testing.B) {
	if testing.Short() {
		b.Skip("takes 60 s")
	}
	for i := 0; i < b.N; i++ {
		be := startBackend(b, b.TempDir(), "127.0.0.1:0")
		be.api(nil, "PUT", "/api/apps/idle/recipe", `{"state":[{"id":"c","module":"meta.comment"}]}`)
		root := agentRoot(b, be.addr, "idle", "i-idle", "")
		agent := start(b, "--root", root, "run")
		time.Sleep(60 * time.Second)
		pid := agent.cmd.Process.Pid
		b.ReportMetric(float64(vmRSS(b, pid))/1024, "agent-RSS-MiB")
		// Anonymous memory is what the agent really costs; the rest is
		// pages of the (shared, clean) binary file.
		b.ReportMetric(float64(procStatus(b, pid, "RssAnon:"))/1024, "agent-anon-MiB")

	}
}
