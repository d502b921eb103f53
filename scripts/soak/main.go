// Command soak runs one opsagent for a long time under disturbance
// (`make soak`, one hour by default) and reports how it holds up.
//
// It builds two signed releases V1 < V2 (patch numbers taken from the
// clock, so re-runs never collide) and serves them on loopback as
// <base>/<version>/opsagent.tgz, starts the embedded backend, puts a recipe
// of 50 states (a round every few seconds), and installs V1 into a
// temporary root with `opsagent install --start`. While it runs it kills
// the backend with SIGKILL at random moments (every 1 to 4 minutes, scaled
// down for short runs) and restarts it on the same data directory and
// port, and at a third of the duration it asks for a self-update to V2
// through the API. Every -interval it prints one line: the agent's pid,
// RSS, threads, open descriptors, goroutines (when status.json has them),
// the StateLogs stored so far and the rounds completed. At the end it
// prints first, last and max of RSS, threads and descriptors, and checks
// that the stored StateLogs carry every agent_seq of the agent's stream
// exactly once and in order.
//
// It exits 1 when the agent died for good, the update did not happen, or
// seqs are missing or duplicated (130 when interrupted). Everything lives
// in a temporary directory that is removed at the end (unless -keep), and
// every process it started, directly or not, is stopped, also on SIGINT.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
)

const (
	appID      = "soak"
	instanceID = "i-soak"
	// agentGone is how long the agent may be absent (no live process
	// holding its lock) before it counts as dead for good.
	agentGone = 90 * time.Second
	// updateWait is how long the agent gets to come back as V2.
	updateWait = 3 * time.Minute
)

type options struct {
	duration, interval time.Duration
	keep               bool
	bin, source        string
	seed               uint64
}

func main() {
	var o options
	flag.DurationVar(&o.duration, "duration", time.Hour, "how long the agent runs under disturbance")
	flag.DurationVar(&o.interval, "interval", time.Minute, "how often a line of figures is printed")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory (root, logs, releases, backend data)")
	flag.StringVar(&o.bin, "bin", "bin/opsagent", "the opsagent binary that runs the backend and builds the releases")
	flag.StringVar(&o.source, "source", ".", "repository root the releases are built from")
	flag.Uint64Var(&o.seed, "seed", 0, "seed of the random disconnects (0: from the clock)")
	flag.Parse()
	if flag.NArg() > 0 || o.duration <= 0 || o.interval <= 0 {
		fmt.Fprintln(os.Stderr, "usage: soak [-duration 1h] [-interval 1m] [-keep] [-bin bin/opsagent] [-source .] [-seed N]")
		os.Exit(2)
	}
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	os.Exit(run(o))
}

func say(format string, a ...any) { fmt.Printf(format+"\n", a...) }

// soak is one run.
type soak struct {
	o      options
	dir    string // the temporary directory
	tmp    string // TMPDIR of every child
	root   string // the agent's root
	layout config.Layout
	bin    string
	v1, v2 string
	pub    string
	rng    *rand.Rand
	start  time.Time // when the measured run began (agent connected)

	backend *backend
	api     string // http://127.0.0.1:port
	token   string // the backend's API token (<data>/api-token)
	client  *http.Client

	files *fileServer

	// the StateLogs read so far
	logs logCheck

	// rounds completed, summed over the agent's runs (a re-exec restarts
	// its counters)
	roundsBase, roundsLast int64
	startedAt              string

	phase      *phase
	updateLine string
	tail       string

	samples  []sample
	lastLine time.Time
	failures []string
}

func run(o options) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	s := &soak{o: o, rng: rand.New(rand.NewPCG(o.seed, o.seed^0x9e3779b97f4a7c15)), client: &http.Client{Timeout: 10 * time.Second}}
	bin, err := filepath.Abs(o.bin)
	if err != nil {
		say("soak: %v", err)
		return 1
	}
	s.bin = bin
	if s.dir, err = os.MkdirTemp("", "opsagent-soak-"); err != nil {
		say("soak: %v", err)
		return 1
	}
	s.root = filepath.Join(s.dir, "root")
	root, err := fsutil.NewRoot(s.root)
	if err != nil {
		say("soak: %v", err)
		return 1
	}
	s.layout = config.NewLayout(root, "", nil)
	defer s.cleanup()
	// children put their temporary files (release builds, go build) in
	// here, so that an interrupted build leaves nothing behind
	s.tmp = filepath.Join(s.dir, "tmp")
	if err := os.Mkdir(s.tmp, 0o700); err != nil {
		say("soak: %v", err)
		return 1
	}

	err = s.setup(ctx)
	if err == nil {
		err = s.loop(ctx)
	}
	interrupted := ctx.Err() != nil
	if err != nil && !interrupted {
		s.fail("%v", err)
	}
	if s.start.IsZero() && interrupted {
		say("soak: interrupted during setup")
		return 130
	}
	if s.start.IsZero() {
		say("soak: FAILED before the run began: %v", err)
		s.dumpLogs()
		return 1
	}
	if interrupted {
		say("soak: interrupted; summary of what ran")
	}
	s.summary(interrupted)
	switch {
	case interrupted:
		return 130
	case len(s.failures) > 0:
		s.dumpLogs()
		return 1
	}
	return 0
}

func (s *soak) fail(format string, a ...any) {
	s.failures = append(s.failures, fmt.Sprintf(format, a...))
}

func (s *soak) elapsed() string {
	if s.start.IsZero() {
		return "setup"
	}
	return fmtDur(time.Since(s.start))
}

func fmtDur(d time.Duration) string {
	d = d.Round(time.Second)
	if d < time.Hour {
		return fmt.Sprintf("%dm%02ds", int(d/time.Minute), int(d%time.Minute/time.Second))
	}
	return fmt.Sprintf("%dh%02dm%02ds", int(d/time.Hour), int(d%time.Hour/time.Minute), int(d%time.Minute/time.Second))
}

func (s *soak) event(format string, a ...any) {
	say("%8s  %s", s.elapsed(), fmt.Sprintf(format, a...))
}

// ---- setup --------------------------------------------------------------

func (s *soak) setup(ctx context.Context) error {
	say("== soak: %s, a line every %s, work dir %s (seed %d)", s.o.duration, s.o.interval, s.dir, s.o.seed)
	if _, err := os.Stat(s.bin); err != nil {
		return fmt.Errorf("binary %s: %w (run make build, or pass -bin)", s.bin, err)
	}
	base := "2.1"
	if b, err := os.ReadFile(filepath.Join(s.o.source, "VERSION")); err == nil {
		if p := strings.Split(strings.TrimSpace(string(b)), "."); len(p) >= 2 {
			base = p[0] + "." + p[1]
		}
	}
	t := time.Now().Unix()
	s.v1, s.v2 = fmt.Sprintf("%s.%d", base, t), fmt.Sprintf("%s.%d", base, t+1)

	keys := filepath.Join(s.dir, "keys")
	if _, err := s.command(ctx, s.bin, "release", "keygen", "--unencrypted", "--out", keys); err != nil {
		return err
	}
	pub, err := os.ReadFile(filepath.Join(keys, "minisign.pub"))
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimSpace(string(pub)), "\n")
	s.pub = strings.TrimSpace(lines[len(lines)-1])

	say("   building releases %s and %s (signed, linux/amd64 + linux/arm64) …", s.v1, s.v2)
	began := time.Now()
	rel := filepath.Join(s.dir, "releases")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, v := range []string{s.v1, s.v2} {
		wg.Go(func() {
			_, errs[i] = s.command(ctx, s.bin, "release", "build", "--version", v, "--key", filepath.Join(keys, "minisign.key"),
				"--out", filepath.Join(rel, v), "--source", s.o.source, "--allow-dirty")
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	say("   built in %s", fmtDur(time.Since(began)))

	if s.files, err = serveFiles(rel); err != nil {
		return err
	}
	say("   releases served at %s/<version>/opsagent.tgz", s.files.url)

	s.backend = &backend{bin: s.bin, data: filepath.Join(s.dir, "backend-data"), logPath: filepath.Join(s.dir, "backend.log"),
		addrFile: filepath.Join(s.dir, "backend.addr"), env: s.childEnv()}
	if err := s.backend.start(ctx, s.client); err != nil {
		return err
	}
	s.api = "http://" + s.backend.addr
	say("   backend (--open-enrollment) at %s, pid %d", s.api, s.backend.pid())
	tok, err := fsutil.ReadFileLimit(filepath.Join(s.backend.data, "api-token"), 4<<10)
	if err != nil {
		return fmt.Errorf("the backend's API token: %w", err)
	}
	s.token = strings.TrimSpace(string(tok))

	var put struct {
		RecipeVersion int64 `json:"recipe_version"`
	}
	if err := s.call(ctx, "PUT", "/api/apps/"+appID+"/recipe", recipe(), &put); err != nil {
		return err
	}
	say("   recipe of %d states put as recipe_version %d", recipeStates, put.RecipeVersion)

	v1bin := filepath.Join(s.dir, "v1", "opsagent")
	if err := extractBinary(ctx, filepath.Join(rel, s.v1, "opsagent.tgz"), dist.BinaryName(runtime.GOARCH), v1bin); err != nil {
		return err
	}
	out, err := s.command(ctx, v1bin, "--root", s.root, "install",
		"--ws-uri", "ws://"+s.backend.addr+"/agent/", "--app-id", appID, "--version", s.v1,
		"--base-remote", s.files.url, "--pubkey", s.pub, "--skip-packages", "--start",
		"--set", "network.instance_id="+instanceID, "--set", "network.metadata=http://127.0.0.1:1",
		"--set", "agent.engine=native", "--set", "salt.delay=2s", "--set", "agent.retry_delay=1s")
	_ = os.WriteFile(filepath.Join(s.dir, "install.log"), out, 0o644)
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	pid, ok := s.agentPID()
	if !ok {
		return fmt.Errorf("install said it started the agent, but no agent holds the lock (see %s)", s.agentLog())
	}
	say("   installed %s into %s and started it: pid %d", s.v1, s.root, pid)

	deadline := time.Now().Add(60 * time.Second)
	for {
		in, err := s.instance(ctx)
		if err == nil && in.Connected && in.AgentVersion == s.v1 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the agent did not connect as %s within 60s (see %s)", s.v1, s.agentLog())
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
	say("   agent %s connected as %s", instanceID, s.v1)
	return nil
}

// command runs a short command in a process group of its own (killed as a
// whole when ctx ends) and returns its combined output.
func (s *soak) command(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = s.childEnv()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w\n%s", filepath.Base(name), strings.Join(args[:min(2, len(args))], " "), err, lastLines(out.String(), 15))
	}
	return out.Bytes(), nil
}

// childEnv is our environment without the variables that would point a
// child at another config or root.
func (s *soak) childEnv() []string {
	env := []string{"TMPDIR=" + s.tmp}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "TMPDIR", "OPSAGENT_CONFIG", "OPSAGENT_ROOT", "OPSAGENT_LOG_LEVEL", "WS_URI", "APP_ID", "VERSION", "BASE_REMOTE", "PUBKEY", "ENROLL_SECRET", "MOD_REPO", "MOD_TAG",
			"OPSAGENT_API_TOKEN": // the backend makes its own, read back from its data directory
			continue
		}
		env = append(env, kv)
	}
	return env
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

const recipeStates = 50

// recipe is 50 states: a comment, 4 directories, 5 files and 40 commands,
// all inside the root, so that a round takes well under a second.
func recipe() map[string]any {
	var st []map[string]any
	add := func(id, module string, p map[string]any) {
		st = append(st, map[string]any{"id": id, "module": module, "parameter": p})
	}
	add("about", "meta.comment", map[string]any{"comment": "opsagent soak: 50 states a round"})
	for i := range 4 {
		add(fmt.Sprintf("dir-%d", i), "linux.dir", map[string]any{"path": []string{fmt.Sprintf("/srv/soak/d%d", i)}, "mode": "0755"})
	}
	for i := range 5 {
		add(fmt.Sprintf("file-%d", i), "linux.file", map[string]any{"path": fmt.Sprintf("/srv/soak/d%d/f%d.txt", i%4, i),
			"content": fmt.Sprintf("soak file %d\n", i), "mode": "0644"})
	}
	for i := range recipeStates - len(st) {
		add(fmt.Sprintf("cmd-%02d", i+1), "linux.cmd", map[string]any{"cmd": "true", "cwd": "/srv/soak/work"})
	}
	return map[string]any{"state": st}
}

func lastStateID() string { return fmt.Sprintf("cmd-%02d", recipeStates-10) }

// extractBinary takes the binary out of a release tarball, with the
// updater's own extraction rules.
func extractBinary(ctx context.Context, tgz, name, dst string) error {
	f, err := os.Open(tgz)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	err = archive.ExtractFile(ctx, f, name, out, archive.DefaultLimits())
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("%s: %w", tgz, err)
	}
	return nil
}

// ---- the release server ---------------------------------------------------

type fileServer struct {
	url string
	srv *http.Server

	mu   sync.Mutex
	gets []string // "path status"
}

func serveFiles(dir string) (*fileServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	fs := &fileServer{url: "http://" + ln.Addr().String()}
	files := http.FileServer(http.Dir(dir))
	fs.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		files.ServeHTTP(rec, r)
		fs.mu.Lock()
		fs.gets = append(fs.gets, fmt.Sprintf("%s %s %d", r.Method, r.URL.Path, rec.code))
		fs.mu.Unlock()
	})}
	go func() { _ = fs.srv.Serve(ln) }()
	return fs, nil
}

func (f *fileServer) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.gets...)
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) { r.code = code; r.ResponseWriter.WriteHeader(code) }

// ---- the backend ------------------------------------------------------------

type backend struct {
	bin, data, logPath, addrFile string
	env                          []string
	addr                         string // fixed after the first start

	cmd    *exec.Cmd
	exited chan struct{}
	kills  int
}

func (b *backend) pid() int {
	if b.cmd == nil {
		return 0
	}
	return b.cmd.Process.Pid
}

// start starts the backend (any free port the first time, the same port
// afterwards) and returns once it answers /api/healthz.
func (b *backend) start(ctx context.Context, client *http.Client) error {
	listen := b.addr
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	_ = os.Remove(b.addrFile)
	logf, err := os.OpenFile(b.logPath, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(b.bin, "backend", "--listen", listen, "--data", b.data, "--addr-file", b.addrFile, "--open-enrollment")
	cmd.Env = b.env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	b.cmd, b.exited = cmd, make(chan struct{})
	exited := b.exited
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if a, err := os.ReadFile(b.addrFile); err == nil && len(bytes.TrimSpace(a)) > 0 {
			addr := strings.TrimSpace(string(a))
			if b.addr == "" {
				b.addr = addr
			}
			resp, err := client.Get("http://" + addr + "/api/healthz")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return nil
				}
			}
		}
		select {
		case <-exited:
			return fmt.Errorf("the backend exited at once: %s (see %s)", cmd.ProcessState, b.logPath)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the backend did not answer within 20s (see %s)", b.logPath)
		}
	}
}

// kill9 kills the backend's process group with SIGKILL and waits for it.
func (b *backend) kill9() {
	if b.cmd == nil {
		return
	}
	_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	<-b.exited
	b.kills++
}

// stop asks the backend to stop, SIGKILL after 10 s.
func (b *backend) stop() {
	if b.cmd == nil {
		return
	}
	select {
	case <-b.exited:
		return
	default:
	}
	_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
		<-b.exited
	}
}

// ---- API ------------------------------------------------------------------------

func (s *soak) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.api+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+s.token)
	resp, err := s.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s %s", method, path, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

type instance struct {
	InstanceID     string     `json:"instance_id"`
	Connected      bool       `json:"connected"`
	AgentVersion   string     `json:"agent_version"`
	ConnectedSince *time.Time `json:"connected_since"`
}

func (s *soak) instance(ctx context.Context) (instance, error) {
	var out struct {
		Instances []instance `json:"instances"`
	}
	if err := s.call(ctx, "GET", "/api/apps/"+appID+"/instances", nil, &out); err != nil {
		return instance{}, err
	}
	for _, in := range out.Instances {
		if in.InstanceID == instanceID {
			return in, nil
		}
	}
	return instance{}, fmt.Errorf("instance %s not known to the backend yet", instanceID)
}

// ---- StateLogs ----------------------------------------------------------------

type logEntry struct {
	Seq        int64  `json:"seq"`
	InstanceID string `json:"instance_id"`
	LogStream  string `json:"log_stream"`
	AgentSeq   int64  `json:"agent_seq"`
	StateID    string `json:"state_id"`
	Result     bool   `json:"result"`
	Comment    *string
}

// stream is what was seen of one (instance, log_stream).
type stream struct {
	first, last int64
	count       int64
	missing     int64 // seqs skipped
	dups        int64 // seqs at or below one already seen
}

// logCheck follows the logs API and checks agent_seq as it goes.
type logCheck struct {
	cursor    int64 // the API's next cursor: StateLogs stored so far
	streams   map[string]*stream
	order     []string
	noStream  int64 // StateLogs without a log_stream (protocol 1)
	failed    int64
	failEx    []string
	lastIDs   int64    // StateLogs of the recipe's last state: rounds seen by the backend
	problems  []string // the first 20
	nproblems int64
}

func (c *logCheck) add(e logEntry) {
	if c.streams == nil {
		c.streams = map[string]*stream{}
	}
	if !e.Result {
		c.failed++
		if len(c.failEx) < 5 {
			cm := ""
			if e.Comment != nil {
				cm = *e.Comment
			}
			c.failEx = append(c.failEx, fmt.Sprintf("seq %d %s: %s", e.Seq, e.StateID, cm))
		}
	}
	if e.StateID == lastStateID() {
		c.lastIDs++
	}
	if e.LogStream == "" {
		c.noStream++
		return
	}
	key := e.InstanceID + "/" + e.LogStream
	st := c.streams[key]
	if st == nil {
		st = &stream{first: e.AgentSeq}
		c.streams[key] = st
		c.order = append(c.order, key)
		if e.AgentSeq != 1 {
			st.missing += e.AgentSeq - 1
			c.problem("%s: first agent_seq is %d (backend seq %d): 1..%d missing", key, e.AgentSeq, e.Seq, e.AgentSeq-1)
		}
		st.last, st.count = e.AgentSeq, 1
		return
	}
	st.count++
	switch {
	case e.AgentSeq == st.last+1:
		st.last = e.AgentSeq
	case e.AgentSeq <= st.last:
		st.dups++
		c.problem("%s: agent_seq %d after %d (backend seq %d): duplicate or out of order", key, e.AgentSeq, st.last, e.Seq)
	default:
		st.missing += e.AgentSeq - st.last - 1
		c.problem("%s: agent_seq %d after %d (backend seq %d): %d..%d missing", key, e.AgentSeq, st.last, e.Seq, st.last+1, e.AgentSeq-1)
		st.last = e.AgentSeq
	}
}

func (c *logCheck) problem(format string, a ...any) {
	c.nproblems++
	if len(c.problems) < 20 {
		c.problems = append(c.problems, fmt.Sprintf(format, a...))
	}
}

// pollLogs reads every StateLog stored since the last call.
func (s *soak) pollLogs(ctx context.Context) error {
	for {
		var page struct {
			Logs []logEntry `json:"logs"`
			Next int64      `json:"next"`
		}
		if err := s.call(ctx, "GET", fmt.Sprintf("/api/apps/%s/logs?after=%d&limit=5000", appID, s.logs.cursor), nil, &page); err != nil {
			return err
		}
		for _, e := range page.Logs {
			s.logs.add(e)
		}
		if page.Next > s.logs.cursor {
			s.logs.cursor = page.Next
		}
		if len(page.Logs) < 5000 {
			return nil
		}
	}
}

// ---- the agent ----------------------------------------------------------------

func (s *soak) agentLog() string     { return s.layout.LogFile() }
func (s *soak) bootstrapLog() string { return s.layout.BootstrapLog() }

// agentPID is the pid holding the agent's lock, when that process is a
// live `opsagent … run`.
func (s *soak) agentPID() (int, bool) {
	pid, held, err := fsutil.HolderPID(s.layout.LockFile())
	if err != nil || !held || pid <= 0 {
		return 0, false
	}
	return pid, isAgent(pid)
}

func isAgent(pid int) bool {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(st, ')'); i < 0 || i+2 >= len(st) || st[i+2] == 'Z' {
		return false
	}
	cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(cl), "\x00"), "\x00")
	return len(args) > 0 && args[len(args)-1] == "run"
}

// status is what the soak reads of status.json.
type status struct {
	PID          int    `json:"pid"`
	AgentVersion string `json:"agent_version"`
	StartedAt    string `json:"started_at"`
	Connection   struct {
		Connected   bool   `json:"connected"`
		OutboxDepth int    `json:"outbox_depth"`
		NextSeq     int64  `json:"next_seq"`
		DroppedLogs int64  `json:"dropped_logs"`
		LastError   string `json:"last_error"`
	} `json:"connection"`
	Engine struct {
		Phase           string `json:"phase"`
		RoundsSucceeded int64  `json:"rounds_succeeded"`
		RoundsFailed    int64  `json:"rounds_failed"`
	} `json:"engine"`
	Goroutines string `json:"-"`
}

func (s *soak) readStatus() (*status, error) {
	b, err := os.ReadFile(s.layout.StatusFile())
	if err != nil {
		return nil, err
	}
	var st status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, err
	}
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	st.Goroutines = findGoroutines(m, 0)
	// rounds, summed over the agent's runs
	if st.StartedAt != s.startedAt {
		if s.startedAt != "" {
			s.roundsBase += s.roundsLast
		}
		s.startedAt = st.StartedAt
	}
	s.roundsLast = st.Engine.RoundsSucceeded + st.Engine.RoundsFailed
	return &st, nil
}

// findGoroutines looks for a numeric "goroutines" field at the top of
// status.json or one object below; "-" when there is none.
func findGoroutines(m map[string]any, depth int) string {
	if v, ok := m["goroutines"].(float64); ok {
		return strconv.FormatInt(int64(v), 10)
	}
	if depth == 0 {
		for _, v := range m {
			if sub, ok := v.(map[string]any); ok {
				if g := findGoroutines(sub, 1); g != "-" {
					return g
				}
			}
		}
	}
	return "-"
}

func (s *soak) rounds() int64 { return s.roundsBase + s.roundsLast }

type sample struct {
	at                time.Duration
	pid               int
	rss, threads, fds int64
	goroutines        string
	stateLogs, rounds int64
	version           string
}

// procFigures reads VmRSS (kB) and Threads from /proc/<pid>/status and
// counts /proc/<pid>/fd.
func procFigures(pid int) (rss, threads, fds int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		switch k {
		case "VmRSS":
			rss, _ = strconv.ParseInt(f[0], 10, 64)
		case "Threads":
			threads, _ = strconv.ParseInt(f[0], 10, 64)
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return rss, threads, 0, err
	}
	return rss, threads, int64(len(ents)), nil
}

// ---- the run ------------------------------------------------------------------

type phase struct {
	killsScale     float64
	nextKill       time.Time
	updateAt       time.Time
	updatePosted   time.Time
	updatedAt      time.Time
	reconnectSince time.Time
	reconnectKill  int
	reconnects     []time.Duration
	goneSince      time.Time
	lastPID        int
	pidChanges     int
}

func (s *soak) loop(ctx context.Context) error {
	s.start = time.Now()
	end := s.start.Add(s.o.duration)
	p := &phase{killsScale: min(1, max(0.125, float64(s.o.duration)/float64(time.Hour)))}
	p.nextKill = s.start.Add(s.killGap(p))
	p.updateAt = s.start.Add(s.o.duration / 3)
	s.phase = p
	say("   backend kill -9 every %s to %s at random; self-update to %s at %s",
		fmtDur(time.Duration(float64(time.Minute)*p.killsScale)), fmtDur(time.Duration(float64(4*time.Minute)*p.killsScale)), s.v2, fmtDur(s.o.duration/3))
	say("%8s  %7s %8s %7s %4s %10s %9s %6s  %s", "elapsed", "pid", "rss_kB", "threads", "fds", "goroutines", "statelogs", "rounds", "version")

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	nextSample := s.start
	for {
		now := time.Now()
		s.observe(ctx, p)
		if !now.Before(nextSample) {
			s.sampleLine()
			nextSample = nextSample.Add(s.o.interval)
		}
		if err := s.check(p); err != nil {
			return err
		}
		if !now.Before(end) {
			break
		}
		if p.updatePosted.IsZero() && !now.Before(p.updateAt) {
			if err := s.postUpdate(ctx, p); err != nil {
				return err
			}
		}
		// no disconnect in the last 20 s: the tail check needs the backend
		if !now.Before(p.nextKill) && end.Sub(now) > 20*time.Second {
			if err := s.disconnect(ctx, p); err != nil {
				return err
			}
			p.nextKill = time.Now().Add(s.killGap(p))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
	// a last line at the very end, unless one was just printed
	if time.Since(s.lastLine) > 2*time.Second {
		s.sampleLine()
	}
	if p.updatePosted.IsZero() {
		return fmt.Errorf("the self-update was never requested")
	}
	// give a late update its time (the agent must stay alive meanwhile),
	// then check the tail of the stream
	for p.updatedAt.IsZero() {
		if err := s.check(p); err != nil {
			return err
		}
		if sleep(ctx, time.Second) != nil {
			return nil
		}
		s.observe(ctx, p)
	}
	s.updateLine = fmt.Sprintf("requested at %s, agent connected as %s %s later", fmtDur(p.updatePosted.Sub(s.start)), s.v2, fmtDur(p.updatedAt.Sub(p.updatePosted)))
	return s.drain(ctx)
}

// check fails the run when the agent is gone for good or the update is
// overdue.
func (s *soak) check(p *phase) error {
	if !p.goneSince.IsZero() && time.Since(p.goneSince) > agentGone {
		return fmt.Errorf("the agent died for good: no live agent for %s (see %s and %s)", fmtDur(time.Since(p.goneSince)), s.agentLog(), s.bootstrapLog())
	}
	if !p.updatePosted.IsZero() && p.updatedAt.IsZero() && time.Since(p.updatePosted) > updateWait {
		return fmt.Errorf("the agent did not come back as %s within %s of the update request (see %s)", s.v2, updateWait, s.agentLog())
	}
	return nil
}

// killGap is the pause before the next disconnect: 1 to 4 minutes, scaled.
func (s *soak) killGap(p *phase) time.Duration {
	return time.Duration((60 + s.rng.Float64()*180) * p.killsScale * float64(time.Second))
}

// observe polls the logs, the backend's view of the instance and the
// agent's process; it notes reconnects, the update and a vanished agent.
func (s *soak) observe(ctx context.Context, p *phase) {
	_ = s.pollLogs(ctx) // fails while the backend is down: read on the next tick
	st, _ := s.readStatus()
	pid, alive := s.agentPID()
	switch {
	case alive && !p.goneSince.IsZero():
		s.event("agent back: pid %d after %s", pid, fmtDur(time.Since(p.goneSince)))
		p.goneSince = time.Time{}
	case !alive && p.goneSince.IsZero():
		p.goneSince = time.Now()
		s.event("agent NOT RUNNING (lock pid %d); waiting up to %s for it to come back", pid, agentGone)
	}
	if alive {
		if p.lastPID != 0 && pid != p.lastPID {
			p.pidChanges++
			s.event("agent pid changed %d → %d", p.lastPID, pid)
		}
		p.lastPID = pid
	}
	in, err := s.instance(ctx)
	if err != nil {
		return
	}
	if !p.reconnectSince.IsZero() && in.Connected && in.ConnectedSince != nil && in.ConnectedSince.After(p.reconnectSince) {
		d := in.ConnectedSince.Sub(p.reconnectSince)
		p.reconnects = append(p.reconnects, d)
		s.event("agent reconnected %.1fs after kill #%d", d.Seconds(), p.reconnectKill)
		p.reconnectSince = time.Time{}
	}
	if !p.updatePosted.IsZero() && p.updatedAt.IsZero() && in.Connected && in.AgentVersion == s.v2 {
		p.updatedAt = time.Now()
		v := "?"
		if st != nil {
			v = st.AgentVersion
		}
		s.event("self-update done: the backend sees %s (status.json says %s, pid %d), %s after the request", in.AgentVersion, v, pid, fmtDur(p.updatedAt.Sub(p.updatePosted)))
	}
}

func (s *soak) sampleLine() {
	s.lastLine = time.Now()
	pid, alive := s.agentPID()
	smp := sample{at: time.Since(s.start), pid: pid, goroutines: "-", stateLogs: s.logs.cursor, rounds: s.rounds()}
	if st, err := s.readStatus(); err == nil {
		smp.goroutines, smp.version, smp.rounds = st.Goroutines, st.AgentVersion, s.rounds()
	}
	if !alive {
		s.event("%7d  (not running)  statelogs %d rounds %d", pid, smp.stateLogs, smp.rounds)
		return
	}
	var err error
	if smp.rss, smp.threads, smp.fds, err = procFigures(pid); err != nil {
		s.event("%7d  (cannot read /proc: %v)", pid, err)
		return
	}
	s.samples = append(s.samples, smp)
	say("%8s  %7d %8d %7d %4d %10s %9d %6d  %s", fmtDur(smp.at), smp.pid, smp.rss, smp.threads, smp.fds, smp.goroutines, smp.stateLogs, smp.rounds, smp.version)
}

// disconnect kills the backend with SIGKILL and restarts it on the same
// data directory and port after a short random pause.
func (s *soak) disconnect(ctx context.Context, p *phase) error {
	old := s.backend.pid()
	s.backend.kill9()
	down := time.Duration(200+s.rng.IntN(2800)) * time.Millisecond
	if err := sleep(ctx, down); err != nil {
		return nil
	}
	var err error
	for range 5 {
		if err = s.backend.start(ctx, s.client); err == nil || ctx.Err() != nil {
			break
		}
		_ = sleep(ctx, time.Second)
	}
	if err != nil {
		return fmt.Errorf("backend restart after kill #%d: %w", s.backend.kills, err)
	}
	if p.reconnectSince.IsZero() { // else measured from the earlier kill it has not yet recovered from
		p.reconnectSince, p.reconnectKill = time.Now().Add(-down), s.backend.kills
	}
	s.event("backend kill -9 #%d (pid %d), down %.1fs, restarted as pid %d", s.backend.kills, old, down.Seconds(), s.backend.pid())
	return nil
}

func (s *soak) postUpdate(ctx context.Context, p *phase) error {
	var err error
	for range 30 {
		var out struct {
			PushedTo int `json:"pushed_to"`
		}
		if err = s.call(ctx, "POST", "/api/apps/"+appID+"/update", map[string]string{"version": s.v2}, &out); err == nil {
			p.updatePosted = time.Now()
			s.event("POST /api/apps/%s/update {\"version\": %q}: pushed to %d agent(s)", appID, s.v2, out.PushedTo)
			return nil
		}
		if sleep(ctx, time.Second) != nil {
			return nil
		}
	}
	return fmt.Errorf("cannot request the update: %w", err)
}

// drain waits until the backend stored every StateLog the agent numbered
// before it was asked (its status' next_seq), so that the tail of the
// stream is checked too.
func (s *soak) drain(ctx context.Context) error {
	st, err := s.readStatus()
	if err != nil {
		return fmt.Errorf("status.json: %w", err)
	}
	want := st.Connection.NextSeq - 1
	deadline := time.Now().Add(60 * time.Second)
	for {
		_ = s.pollLogs(ctx)
		if s.highest() >= want {
			s.tail = fmt.Sprintf("the agent had numbered up to %d; the backend stored up to %d", want, s.highest())
			return nil
		}
		if time.Now().After(deadline) || sleep(ctx, 500*time.Millisecond) != nil {
			s.fail("tail: the agent had numbered StateLogs up to %d, the backend stored only up to %d after 60s (outbox %d)", want, s.highest(), st.Connection.OutboxDepth)
			return nil
		}
	}
}

func (s *soak) highest() int64 {
	var h int64
	for _, st := range s.logs.streams {
		h = max(h, st.last)
	}
	return h
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// ---- the end ------------------------------------------------------------------

func (s *soak) summary(interrupted bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = s.pollLogs(ctx) // the backend still runs: read what came last
	st, stErr := s.readStatus()
	pid, alive := s.agentPID()
	p := s.phase
	say("== summary after %s (agent %s, %s → %s)", fmtDur(time.Since(s.start)), instanceID, s.v1, s.v2)
	if len(s.samples) > 0 {
		series := func(name string, get func(sample) int64) {
			first, last, hi := get(s.samples[0]), get(s.samples[len(s.samples)-1]), int64(0)
			for _, x := range s.samples {
				hi = max(hi, get(x))
			}
			say("   %-8s first %7d   last %7d   max %7d   (%d samples)", name, first, last, hi, len(s.samples))
		}
		series("RSS kB", func(x sample) int64 { return x.rss })
		series("threads", func(x sample) int64 { return x.threads })
		series("fds", func(x sample) int64 { return x.fds })
	}
	if p != nil {
		line := fmt.Sprintf("   backend kill -9: %d", s.backend.kills)
		if n := len(p.reconnects); n > 0 {
			var sum, hi time.Duration
			for _, d := range p.reconnects {
				sum += d
				hi = max(hi, d)
			}
			line += fmt.Sprintf("; agent reconnected %d times, %.1fs mean, %.1fs max after the kill", n, (sum / time.Duration(n)).Seconds(), hi.Seconds())
		}
		say("%s", line)
		if p.pidChanges > 0 {
			say("   agent pid changed %d times", p.pidChanges)
		}
	}
	if s.updateLine != "" {
		say("   self-update: %s", s.updateLine)
	}
	var got []string
	for _, r := range s.files.requests() {
		if strings.Contains(r, "/"+s.v2+"/") {
			got = append(got, r)
		}
	}
	if len(got) > 0 {
		say("   release server: %s", strings.Join(got, ", "))
	}
	say("   StateLogs stored: %d (logs API next cursor); failed: %d; without log_stream: %d", s.logs.cursor, s.logs.failed, s.logs.noStream)
	for _, e := range s.logs.failEx {
		say("     failed: %s", e)
	}
	for _, key := range s.logs.order {
		x := s.logs.streams[key]
		say("   stream %s: %d StateLogs, agent_seq %d..%d, missing %d, duplicate/out of order %d", key, x.count, x.first, x.last, x.missing, x.dups)
	}
	if s.tail != "" {
		say("   tail: %s", s.tail)
	}
	for _, pr := range s.logs.problems {
		say("   GAP: %s", pr)
	}
	if more := s.logs.nproblems - int64(len(s.logs.problems)); more > 0 {
		say("   … and %d more seq problems", more)
	}
	switch {
	case len(s.logs.streams) == 0:
		s.fail("no StateLog with a log_stream was stored: nothing to check agent_seq on")
	case s.logs.nproblems > 0:
		s.fail("agent_seq: %d problems (missing or duplicated StateLogs)", s.logs.nproblems)
	}
	if len(s.logs.streams) > 1 {
		say("   note: %d log streams (a new stream means the agent lost its counter)", len(s.logs.streams))
	}
	if s.logs.noStream > 0 {
		s.fail("%d StateLogs without log_stream (protocol 1): exactly-once not checked for them", s.logs.noStream)
	}
	if stErr == nil {
		say("   rounds: %d completed (status.json, summed over the agent's runs); %d StateLogs of the last state %s; outbox %d, dropped %d",
			s.rounds(), s.logs.lastIDs, lastStateID(), st.Connection.OutboxDepth, st.Connection.DroppedLogs)
		if st.Connection.DroppedLogs > 0 {
			s.fail("the agent dropped %d StateLogs from its outbox", st.Connection.DroppedLogs)
		}
	}
	if in, err := s.instance(ctx); err == nil {
		say("   at the end: agent pid %d (running: %v), the backend sees it connected: %v, as %s", pid, alive, in.Connected, in.AgentVersion)
		if !interrupted && in.Connected && !s.phase.updatedAt.IsZero() && in.AgentVersion != s.v2 {
			s.fail("the agent runs %s at the end, not %s (rolled back?)", in.AgentVersion, s.v2)
		}
	}
	if !interrupted && !alive {
		s.fail("the agent is not running at the end (lock pid %d)", pid)
	}
	for _, f := range s.failures {
		say("   FAIL: %s", f)
	}
	switch {
	case interrupted:
		say("== result: INTERRUPTED after %s", fmtDur(time.Since(s.start)))
	case len(s.failures) > 0:
		say("== result: FAILED")
	default:
		say("== result: OK")
	}
}

// dumpLogs prints the end of the agent's and the backend's logs.
func (s *soak) dumpLogs() {
	for _, f := range []struct {
		path string
		n    int
	}{{s.agentLog(), 12}, {s.bootstrapLog(), 4}, {filepath.Join(s.dir, "backend.log"), 4}} {
		b, err := os.ReadFile(f.path)
		if err != nil || len(b) == 0 {
			continue
		}
		say("-- last lines of %s", f.path)
		say("%s", lastLines(string(b), f.n))
	}
}

// cleanup stops the agent (SIGTERM, then SIGKILL on its process group), the
// backend and the release server, then kills whatever process still runs
// from or on the temporary directory (the update's watchdog, a state), and
// removes the directory unless -keep.
func (s *soak) cleanup() {
	if pid, ok := s.agentPID(); ok {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(15 * time.Second)
		for isAgent(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if isAgent(pid) {
			killGroup(pid)
		}
	}
	if s.backend != nil {
		s.backend.stop()
	}
	if s.files != nil {
		_ = s.files.srv.Close()
	}
	for i := 0; i < 50; i++ {
		left := s.leftovers()
		if len(left) == 0 {
			break
		}
		for _, pid := range left {
			killGroup(pid)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if left := s.leftovers(); len(left) > 0 {
		say("soak: processes still running from %s: %v", s.dir, left)
	}
	if s.o.keep {
		say("(kept %s: root/, backend-data/, backend.log, install.log, releases/)", s.dir)
		return
	}
	if err := os.RemoveAll(s.dir); err != nil {
		say("soak: cannot remove %s: %v", s.dir, err)
	}
}

// leftovers are the live processes whose executable or command line names
// the temporary directory.
func (s *soak) leftovers() []int {
	ents, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		if i := bytes.LastIndexByte(st, ')'); i < 0 || i+2 >= len(st) || st[i+2] == 'Z' {
			continue
		}
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		cl, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if strings.HasPrefix(exe, s.dir+"/") || strings.Contains(string(cl), s.dir+"/") {
			out = append(out, pid)
		}
	}
	return out
}

// killGroup sends SIGKILL to pid's process group, or to pid alone when it
// shares our group.
func killGroup(pid int) {
	pgid, err := syscall.Getpgid(pid)
	if err != nil {
		return
	}
	if pgid == syscall.Getpgrp() || pgid <= 1 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		return
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}
