// Package natscluster runs real NATS JetStream clusters for tests: each
// node a nats-server process built from the module the backend links (the
// same version), on loopback ports, configured from the project's example
// configuration (examples/fleet/nats-server.conf), so that a node can be
// killed with SIGKILL and restarted on its data.
package natscluster

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/internal/testutil/testcache"
	"github.com/visualops/opsagent/internal/testutil/wait"
)

// Module is the nats-server module whose binary the nodes run.
const Module = "github.com/nats-io/nats-server/v2"

// Binary returns the path of a nats-server binary built from the module
// version in go.mod, building it on first use into the test cache
// (OPSAGENT_TEST_CACHE, else the user's cache directory). Concurrent test
// processes build it once, under a lock.
func Binary(tb testing.TB) string {
	tb.Helper()
	version, err := goOut("list", "-m", "-f", "{{.Version}}", Module)
	if err != nil {
		tb.Fatalf("natscluster: which %s go.mod names: %v", Module, err)
	}
	dir := filepath.Join(testcache.Dir(), "nats-server-"+version+"-"+runtime.GOOS+"-"+runtime.GOARCH)
	bin := filepath.Join(dir, "nats-server")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		tb.Fatal(err)
	}
	if _, err := os.Stat(bin); err == nil {
		return bin // another process built it while we waited
	}
	tmp := bin + ".tmp"
	if _, err := goOut("build", "-o", tmp, Module); err != nil {
		tb.Fatalf("natscluster: building nats-server %s: %v", version, err)
	}
	if err := os.Rename(tmp, bin); err != nil {
		tb.Fatal(err)
	}
	return bin
}

func goOut(args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// ConfigFile is the example node configuration the clusters are started
// from; tests find it from their package directory.
func ConfigFile(tb testing.TB) string {
	tb.Helper()
	out, err := goOut("list", "-m", "-f", "{{.Dir}}")
	if err != nil {
		tb.Fatalf("natscluster: the module's directory: %v", err)
	}
	path := filepath.Join(out, "examples", "fleet", "nats-server.conf")
	if _, err := os.Stat(path); err != nil {
		tb.Fatalf("natscluster: the example NATS configuration: %v", err)
	}
	return path
}

// Node is one nats-server process of a Cluster.
type Node struct {
	Name                              string
	ClientPort, ClusterPort, HTTPPort int
	StoreDir                          string
	env                               []string
	cmd                               *exec.Cmd
	out                               *syncbuf.Buffer
	exited                            chan struct{}
}

// URL is the node's client URL.
func (n *Node) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(n.ClientPort) }

// Cluster is n nats-server processes routed to each other.
type Cluster struct {
	tb    testing.TB
	bin   string
	conf  string
	Nodes []*Node
}

// Start runs an n-node cluster and waits until JetStream is current on
// every node. n = 1 is a single server (the example's settings less its
// cluster block: JetStream would wait for peers). The nodes are killed
// when the test ends.
func Start(tb testing.TB, n int) *Cluster {
	tb.Helper()
	c := &Cluster{tb: tb, bin: Binary(tb), conf: ConfigFile(tb)}
	dir := tb.TempDir()
	if n == 1 {
		example, err := os.ReadFile(c.conf)
		if err != nil {
			tb.Fatal(err)
		}
		single, _, ok := strings.Cut(string(example), "\ncluster {")
		if !ok {
			tb.Fatalf("natscluster: %s has no cluster block", c.conf)
		}
		c.conf = filepath.Join(dir, "single.conf")
		if err := os.WriteFile(c.conf, []byte(single), 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	ports := freePorts(tb, 3*n)
	var routes []string
	for i := range n {
		routes = append(routes, "nats-route://127.0.0.1:"+strconv.Itoa(ports[3*i+1]))
	}
	for len(routes) < 3 { // the example lists three routes
		routes = append(routes, routes[0])
	}
	for i := range n {
		node := &Node{Name: "n" + strconv.Itoa(i), ClientPort: ports[3*i], ClusterPort: ports[3*i+1], HTTPPort: ports[3*i+2],
			StoreDir: filepath.Join(dir, "n"+strconv.Itoa(i))}
		node.env = []string{"NATS_NAME=" + node.Name, "NATS_HOST=127.0.0.1", "NATS_PORT=" + strconv.Itoa(node.ClientPort),
			"NATS_CLUSTER_PORT=" + strconv.Itoa(node.ClusterPort), "NATS_MONITOR_PORT=" + strconv.Itoa(node.HTTPPort),
			"NATS_STORE=" + node.StoreDir, "NATS_ROUTE_1=" + routes[0], "NATS_ROUTE_2=" + routes[1], "NATS_ROUTE_3=" + routes[2]}
		c.Nodes = append(c.Nodes, node)
		c.start(node)
	}
	for _, node := range c.Nodes {
		c.WaitCurrent(node)
	}
	return c
}

// URLs is every node's client URL, comma-separated (the backend's --nats).
func (c *Cluster) URLs() string {
	var urls []string
	for _, n := range c.Nodes {
		urls = append(urls, n.URL())
	}
	return strings.Join(urls, ",")
}

// Pids is the process id of every node (benchmarks watch their CPU time).
func (c *Cluster) Pids() []int {
	var pids []int
	for _, n := range c.Nodes {
		pids = append(pids, n.cmd.Process.Pid)
	}
	return pids
}

func (c *Cluster) start(n *Node) {
	c.tb.Helper()
	n.cmd = exec.Command(c.bin, "-c", c.conf)
	n.cmd.Env = append(os.Environ(), n.env...)
	n.out = &syncbuf.Buffer{}
	n.cmd.Stdout, n.cmd.Stderr = n.out, n.out
	n.exited = make(chan struct{})
	if err := n.cmd.Start(); err != nil {
		c.tb.Fatal(err)
	}
	cmd, exited, out := n.cmd, n.exited, n.out
	go func() { _ = cmd.Wait(); close(exited) }()
	c.tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if c.tb.Failed() {
			c.tb.Logf("nats-server %s output (tail):\n%s", n.Name, tail(out.String(), 3000))
		}
	})
}

// WaitReady waits until the node answers that JetStream is ready.
func (c *Cluster) WaitReady(n *Node) { c.waitHealth(n, "/healthz?js-enabled-only=true") }

// WaitCurrent waits until the node's JetStream is current: a meta leader
// known, and every stream and consumer it holds caught up with a leader
// (what a restarted node needs before writes are quick again).
func (c *Cluster) WaitCurrent(n *Node) { c.waitHealth(n, "/healthz") }

func (c *Cluster) waitHealth(n *Node, path string) {
	c.tb.Helper()
	url := "http://127.0.0.1:" + strconv.Itoa(n.HTTPPort) + path
	wait.EventuallyWithin(c.tb, 2*time.Minute, "nats-server "+n.Name+" "+path, func() bool {
		select {
		case <-n.exited:
			c.tb.Fatalf("nats-server %s exited:\n%s", n.Name, tail(n.out.String(), 3000))
		default:
		}
		resp, err := http.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// Kill ends node i with SIGKILL: no flush, no shutdown.
func (c *Cluster) Kill(i int) {
	n := c.Nodes[i]
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.exited
}

// Restart starts the given nodes again on their data (after Kill) and
// waits until every node of the cluster is current.
func (c *Cluster) Restart(nodes ...int) {
	c.tb.Helper()
	for _, i := range nodes {
		c.start(c.Nodes[i])
	}
	for _, n := range c.Nodes {
		c.WaitCurrent(n)
	}
}

// Output is what node i printed so far.
func (c *Cluster) Output(i int) string { return c.Nodes[i].out.String() }

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// freePorts reserves n distinct loopback ports (listening on each until all
// are found, so none is handed out twice).
func freePorts(tb testing.TB, n int) []int {
	tb.Helper()
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(errors.Join(errors.New("natscluster: a free port"), err))
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports
}
