package e2e

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/testutil/natscluster"
	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/internal/testutil/testcache"
)

// The fleet benchmarks run side by side, in one run, the backends they
// compare, and report each one's figures and their ratios:
//
//   - before: the single-process backend of the last file-store commit
//     (fileStoreCommit, built from git; skipped, saying so, without the
//     history),
//   - embedded: this backend, one process, its embedded NATS server,
//   - replicas: three replicas on a three-node NATS cluster (nats-server
//     processes), streams and buckets replicated three times, the agents
//     spread evenly over them (connected directly: the balancer is measured
//     by the failover benchmark),
//   - nats-only (fan-out): no backend, one NATS publish to n NATS clients
//     subscribed to a subject, spread over the three nodes.
//
// Agents are simulated (the real connection code as goroutines in this
// process), so every timestamp is taken on one clock.
//
//	make bench                          (everything)
//	go test -run '^$' -bench 'BenchmarkFleet(Fanout|Ingest|WaitRelay|Failover)' -benchtime 1x ./e2e/

// fileStoreCommit is the last commit of the single-process backend (file
// store), the "before" of the comparisons.
const fileStoreCommit = "84b2210"

var (
	baselineOnce sync.Once
	baselineBin  string
	baselineWhy  string
)

// baseline builds the before backend from git once per process, into the
// test cache.
func baseline(b *testing.B) string {
	baselineOnce.Do(func() {
		dir := filepath.Join(testcache.Dir(), "opsagent-"+fileStoreCommit)
		baselineBin = filepath.Join(dir, "opsagent")
		if _, err := os.Stat(baselineBin); err == nil {
			return
		}
		src := filepath.Join(dir, "src")
		_ = os.RemoveAll(src)
		if err := os.MkdirAll(src, 0o755); err != nil {
			baselineWhy = err.Error()
			return
		}
		// From the top of the work tree: run in a subdirectory, git
		// archive takes only that subdirectory.
		archive := exec.Command("sh", "-c", `cd "$(git rev-parse --show-toplevel)" && git archive `+fileStoreCommit+` | tar -x -C "$0"`, src)
		if out, err := archive.CombinedOutput(); err != nil {
			baselineWhy = fmt.Sprintf("git archive %s: %v: %s (a clone with history is needed)", fileStoreCommit, err, bytes.TrimSpace(out))
			return
		}
		build := exec.Command("go", "build", "-trimpath", "-o", baselineBin, "./cmd/opsagent")
		build.Dir, build.Env = src, append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			baselineWhy = fmt.Sprintf("building %s: %v: %s", fileStoreCommit, err, out)
		}
	})
	if baselineWhy != "" {
		b.Logf("no before figures: %s", baselineWhy)
		return ""
	}
	return baselineBin
}

// benchProc is a backend process of a benchmark.
type benchProc struct {
	cmd  *exec.Cmd
	addr string
	out  *syncbuf.Buffer
	done chan struct{}
}

// startBin starts `bin backend --data … extra…` and waits for it to
// listen.
func startBin(b *testing.B, bin string, extra ...string) *benchProc {
	b.Helper()
	addrFile := filepath.Join(b.TempDir(), "addr")
	args := append([]string{"backend", "--listen", "127.0.0.1:0", "--addr-file", addrFile, "--open-enrollment", "--enroll-limit", "-1"}, extra...)
	p := &benchProc{cmd: exec.Command(bin, args...), out: &syncbuf.Buffer{}, done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), "OPSAGENT_API_TOKEN=bench-api-token-0123456789abcdef", "OPSAGENT_LOG_LEVEL=warn")
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	b.Cleanup(func() { p.kill() })
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		data, _ := os.ReadFile(addrFile)
		if p.addr = strings.TrimSpace(string(data)); p.addr != "" {
			return p
		}
		select {
		case <-p.done:
			b.Fatalf("backend exited:\n%s", p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("backend did not listen within a minute:\n%s", p.out.String())
		}
	}
}

func (p *benchProc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

func (p *benchProc) api(b *testing.B, method, path, body string) {
	b.Helper()
	req, _ := http.NewRequest(method, "http://"+p.addr+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer bench-api-token-0123456789abcdef")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Fatalf("%s %s: %d", method, path, resp.StatusCode)
	}
}

// setup is one backend under test: the addresses agents connect to (one
// per replica) and the process the API is called on.
type setup struct {
	name  string
	addrs []string
	api   *benchProc
	procs []*benchProc
	stop  func()
	pids  []int // every process of the setup: backends, nats-servers
}

// settle waits until the setup's processes are idle (their CPU time grows
// by under a tenth of the wall time over half a second, for at most a
// minute): what connecting agents set off (presence, log stream fences,
// the watches that carry them to every replica) is done, so that a
// measurement starts from a quiet fleet, as a recipe put usually does.
func (s *setup) settle(b *testing.B) {
	b.Helper()
	const window = 500 * time.Millisecond
	cpu := func() time.Duration {
		var ticks int64
		for _, pid := range s.pids {
			data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil {
				b.Fatal(err)
			}
			// Fields after the command's closing parenthesis; utime and
			// stime are the 14th and 15th of the line.
			f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+2:]))
			u, _ := strconv.ParseInt(f[11], 10, 64)
			st, _ := strconv.ParseInt(f[12], 10, 64)
			ticks += u + st
		}
		return time.Duration(ticks) * 10 * time.Millisecond // USER_HZ is 100 on Linux
	}
	deadline := time.Now().Add(time.Minute)
	for before := cpu(); time.Now().Before(deadline); {
		time.Sleep(window)
		after := cpu()
		if after-before < window/10 {
			return
		}
		before = after
	}
	b.Logf("%s: still busy after a minute; measuring anyway", s.name)
}

// setups starts the backends to compare, one at a time (each is stopped
// before the next starts): before (when it can be built), embedded,
// replicas.
func setups(b *testing.B, each func(s *setup)) {
	raiseNoFile()
	if bin := baseline(b); bin != "" {
		p := startBin(b, bin, "--data", b.TempDir())
		each(&setup{name: "before", addrs: []string{p.addr}, api: p, procs: []*benchProc{p}, stop: p.kill, pids: []int{p.cmd.Process.Pid}})
		p.kill()
	}
	p := startBin(b, binary, "--data", b.TempDir())
	each(&setup{name: "embedded", addrs: []string{p.addr}, api: p, procs: []*benchProc{p}, stop: p.kill, pids: []int{p.cmd.Process.Pid}})
	p.kill()
	c := natscluster.Start(b, 3)
	var procs []*benchProc
	var addrs []string
	pids := c.Pids()
	for range 3 {
		p := startBin(b, binary, "--data", b.TempDir(), "--nats", c.URLs(), "--nats-replicas", "3")
		procs, addrs, pids = append(procs, p), append(addrs, p.addr), append(pids, p.cmd.Process.Pid)
	}
	each(&setup{name: "replicas", addrs: addrs, api: procs[0], procs: procs, pids: pids, stop: func() {
		for _, p := range procs {
			p.kill()
		}
	}})
	for _, p := range procs {
		p.kill()
	}
}

func raiseNoFile() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

// connectAll waits until every agent has its welcome recipe (version v).
func connectAll(b *testing.B, agents []*simAgent, v int64) {
	b.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for _, a := range agents {
		for a.got(v, time.Time{}).IsZero() {
			if time.Now().After(deadline) {
				b.Fatalf("agent %s not connected after 3 minutes: %s", a.id, a.m.Status().LastError)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// pct is the p-th percentile of ds, in milliseconds.
func pct(ds []time.Duration, p float64) float64 {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return float64(ds[int(p*float64(len(ds)-1))].Microseconds()) / 1000
}

// ratios reports figure a/figure b for each pair that both have.
func ratios(b *testing.B, m map[string]float64, pairs ...[3]string) {
	for _, p := range pairs {
		if x, ok := m[p[0]]; ok {
			if y, ok := m[p[1]]; ok && y > 0 {
				b.ReportMetric(x/y, p[2])
			}
		}
	}
}

// BenchmarkFleetFanout: a recipe put through the API (on the first
// replica) until each agent has it, p50/p99, at 1 000, 5 000 and 10 000
// agents.
func BenchmarkFleetFanout(b *testing.B) {
	for _, n := range []int{1000, 5000, 10000} {
		b.Run(fmt.Sprintf("agents=%d", n), func(b *testing.B) {
			for range b.N {
				m := map[string]float64{}
				setups(b, func(s *setup) {
					s.api.api(b, "PUT", "/api/apps/fan/recipe", `{"state":[]}`)
					agents, stop := simFleetStop(b, "fan", n, s.addrs...)
					connectAll(b, agents, 1)
					s.settle(b)
					begin := time.Now()
					s.api.api(b, "PUT", "/api/apps/fan/recipe", `{"state":[{"id":"s","module":"meta.comment"}]}`)
					lat := make([]time.Duration, n)
					for i, a := range agents {
						for {
							if at := a.got(2, begin); !at.IsZero() {
								lat[i] = at.Sub(begin)
								break
							}
							if time.Since(begin) > 2*time.Minute {
								b.Fatalf("%s: agent %s never got the recipe", s.name, a.id)
							}
							time.Sleep(time.Millisecond)
						}
					}
					m[s.name+"-p50-ms"], m[s.name+"-p99-ms"] = pct(lat, 0.5), pct(lat, 0.99)
					stop()
				})
				m["nats-only-p50-ms"], m["nats-only-p99-ms"] = natsFanout(b, n)
				for k, v := range m {
					b.ReportMetric(v, k)
				}
				ratios(b, m, [3]string{"replicas-p99-ms", "before-p99-ms", "replicas/before-p99"},
					[3]string{"embedded-p99-ms", "before-p99-ms", "embedded/before-p99"},
					[3]string{"replicas-p99-ms", "nats-only-p99-ms", "replicas/nats-only-p99"},
					[3]string{"replicas-p50-ms", "before-p50-ms", "replicas/before-p50"})
			}
		})
	}
}

// natsFanout: n NATS clients spread over a three-node cluster subscribe to
// a subject; one publish; the time until each has it.
func natsFanout(b *testing.B, n int) (p50, p99 float64) {
	c := natscluster.Start(b, 3)
	urls := strings.Split(c.URLs(), ",")
	got := make([]chan time.Time, n)
	conns := make([]*nats.Conn, n)
	defer func() {
		for _, nc := range conns {
			if nc != nil {
				nc.Close()
			}
		}
	}()
	for i := range n {
		nc, err := nats.Connect(urls[i%3], nats.NoReconnect())
		if err != nil {
			b.Fatal(err)
		}
		conns[i] = nc
		ch := make(chan time.Time, 1)
		got[i] = ch
		if _, err := nc.Subscribe("opsagent.bench.fanout", func(*nats.Msg) { ch <- time.Now() }); err != nil {
			b.Fatal(err)
		}
	}
	for _, nc := range conns {
		if err := nc.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	// Subscriptions travel the routes: wait until a probe reaches every
	// client, then measure a publish.
	probe := conns[0]
	_ = probe.Publish("opsagent.bench.fanout", []byte("probe"))
	for _, ch := range got {
		select {
		case <-ch:
		case <-time.After(time.Minute):
			b.Fatal("the NATS probe did not reach every client")
		}
	}
	begin := time.Now()
	_ = probe.Publish("opsagent.bench.fanout", []byte(`{"state":[]}`))
	lat := make([]time.Duration, n)
	for i, ch := range got {
		select {
		case at := <-ch:
			lat[i] = at.Sub(begin)
		case <-time.After(time.Minute):
			b.Fatal("a NATS client never got the message")
		}
	}
	return pct(lat, 0.5), pct(lat, 0.99)
}

// BenchmarkFleetIngest: StateLogs stored and acknowledged per second, two
// ways: 1 000 agents reporting 20 each at once, and one agent with a
// backlog of 10 000.
func BenchmarkFleetIngest(b *testing.B) {
	res := state.Result{OK: true, Comment: "Command \"true\" run", Stdout: strings.Repeat("x", 200)}
	for range b.N {
		m := map[string]float64{}
		setups(b, func(s *setup) {
			for _, c := range []struct {
				name          string
				agents, count int
			}{{"fleet", 1000, 20}, {"backlog", 1, 10000}} {
				app := "ingest-" + c.name
				s.api.api(b, "PUT", "/api/apps/"+app+"/recipe", `{"state":[{"id":"s","module":"meta.comment"}]}`)
				agents, stop := simFleetStop(b, app, c.agents, s.addrs...)
				connectAll(b, agents, 1)
				begin := time.Now()
				for _, a := range agents {
					for range c.count {
						a.m.Report(1, "s", res)
					}
				}
				drained(b, agents, 3*time.Minute)
				m[s.name+"-"+c.name+"-statelogs/s"] = float64(c.agents*c.count) / time.Since(begin).Seconds()
				stop()
			}
		})
		for k, v := range m {
			b.ReportMetric(v, k)
		}
		ratios(b, m, [3]string{"embedded-fleet-statelogs/s", "before-fleet-statelogs/s", "embedded/before-fleet"},
			[3]string{"replicas-fleet-statelogs/s", "before-fleet-statelogs/s", "replicas/before-fleet"},
			[3]string{"embedded-backlog-statelogs/s", "before-backlog-statelogs/s", "embedded/before-backlog"},
			[3]string{"replicas-backlog-statelogs/s", "before-backlog-statelogs/s", "replicas/before-backlog"})
	}
}

// BenchmarkFleetWaitRelay: 300 agents spread over three replicas. A wait
// released by hand (POST …/waits on one replica) until the agent, held by
// another replica, has it; and a relayed wait ("@{i.state.s}") from the
// StateLog of its state (to one replica) until agents on the others have
// it. p50/p99 (goal: p99 under 50 ms).
func BenchmarkFleetWaitRelay(b *testing.B) {
	raiseNoFile()
	const trials = 100
	var relayStates []string
	for k := range trials {
		relayStates = append(relayStates, fmt.Sprintf(`{"id":"s%d","module":"linux.cmd","parameter":{"cmd":"true"}}`, k),
			fmt.Sprintf(`{"id":"w%d","module":"meta.wait","parameter":{"state":["@{relay-00000.state.s%d}"]}}`, k, k))
	}
	for range b.N {
		c := natscluster.Start(b, 3)
		var replicas []*benchProc
		var addrs []string
		for range 3 {
			p := startBin(b, binary, "--data", b.TempDir(), "--nats", c.URLs(), "--nats-replicas", "3")
			replicas, addrs = append(replicas, p), append(addrs, p.addr)
		}
		replicas[0].api(b, "PUT", "/api/apps/relay/recipe", `{"state":[`+strings.Join(relayStates, ",")+`]}`)
		agents := simFleet(b, "relay", 300, addrs...)
		connectAll(b, agents, 1)
		time.Sleep(time.Second) // presence written, watches caught up

		var hand, relay []time.Duration
		for k := range trials {
			// Agent k is on replica k%3; the wait is posted on the next.
			a := agents[k%len(agents)]
			state := fmt.Sprintf("hand%d", k)
			begin := time.Now()
			replicas[(k+1)%3].api(b, "POST", "/api/apps/relay/waits", fmt.Sprintf(`{"instance_id":%q,"state_id":%q}`, a.id, state))
			hand = append(hand, waitPush(b, a, state, begin))
		}
		src := agents[0] // on replica 0
		for k := range trials {
			state := fmt.Sprintf("w%d", k)
			begin := time.Now()
			src.m.Report(1, fmt.Sprintf("s%d", k), state0)
			for _, a := range []*simAgent{agents[1], agents[2]} { // on replicas 1 and 2
				relay = append(relay, waitPush(b, a, state, begin))
			}
		}
		b.ReportMetric(pct(hand, 0.5), "posted-p50-ms")
		b.ReportMetric(pct(hand, 0.99), "posted-p99-ms")
		b.ReportMetric(pct(relay, 0.5), "relayed-p50-ms")
		b.ReportMetric(pct(relay, 0.99), "relayed-p99-ms")
	}
}

var state0 = state.Result{OK: true, Comment: "done"}

func waitPush(b *testing.B, a *simAgent, state string, begin time.Time) time.Duration {
	for {
		if at := a.pushed(state); !at.IsZero() {
			return at.Sub(begin)
		}
		if time.Since(begin) > time.Minute {
			b.Fatalf("agent %s never got %s", a.id, state)
		}
		select {
		case <-a.notified:
		case <-time.After(time.Millisecond):
		}
	}
}

// BenchmarkFleetFailover: 900 agents through HAProxy on three replicas;
// one replica is killed with -9; the time until each of its agents has
// handshaked again through the balancer (its welcome recipe), p50/p99.
func BenchmarkFleetFailover(b *testing.B) {
	raiseNoFile()
	for range b.N {
		// No enrollment limit: agents refused by it while the fleet
		// enrolls back off, and a connection younger than the agent's
		// StableAfter (60 s) keeps that backoff, so the figures would be
		// the agents' backoff rather than the failover.
		f := startFleet(b, "--enroll-limit", "-1")
		f.lb.api(b, "PUT", "/api/apps/fo/recipe", `{"state":[]}`)
		agents := simFleet(b, "fo", 900, f.lb.addr)
		connectAll(b, agents, 1)
		victim := f.replicas[1].addr
		onVictim := map[string]bool{}
		eventually(b, "every agent listed with its replica", func() bool {
			rows, _ := f.lb.api(b, "GET", "/api/apps/fo/instances", "")["instances"].([]any)
			clear(onVictim)
			connected := 0
			for _, r := range rows {
				r := r.(map[string]any)
				if r["connected"] == true {
					connected++
				}
				if rep, _ := r["replica"].(string); strings.HasSuffix(rep, victim) {
					onVictim[r["instance_id"].(string)] = true
				}
			}
			return connected == len(agents)
		})
		killed := time.Now()
		f.kill(1)
		var lat []time.Duration
		for _, a := range agents {
			if !onVictim[a.id] {
				continue
			}
			for {
				if at := a.got(1, killed); !at.IsZero() {
					lat = append(lat, at.Sub(killed))
					break
				}
				if time.Since(killed) > 2*time.Minute {
					b.Fatalf("agent %s not back 2 minutes after the kill", a.id)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		b.ReportMetric(float64(len(lat)), "agents-moved")
		b.ReportMetric(pct(lat, 0.5), "back-p50-ms")
		b.ReportMetric(pct(lat, 0.99), "back-p99-ms")
		b.ReportMetric(pct(lat, 1), "back-max-ms")
	}
}
