package native

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/dockerapi"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/aptrepo"
	"github.com/visualops/opsagent/internal/testutil/dockerd"
	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/internal/testutil/testcache"
)

// dockerRig is an Executor on a bare test root whose
// /var/run/docker.sock leads to a real engine started for the test
// (through a proxy that counts the API calls by endpoint). Commands the
// executor runs are recorded, and its log is kept: the docker modules
// run no process at all, and log no credential.
type dockerRig struct {
	root   string
	e      *Executor
	runs   *recordingRunner
	log    *syncbuf.Buffer
	engine *dockerd.Engine
	calls  *dockerd.Calls
}

func newDockerRig(t testing.TB) *dockerRig {
	t.Helper()
	engine := dockerd.Start(t)
	root := dockerd.ShortTempDir(t, "dkr")
	calls := engine.Serve(t, filepath.Join(root, "var/run/docker.sock"))
	rig := &dockerRig{root: root, engine: engine, calls: calls, log: &syncbuf.Buffer{}, runs: &recordingRunner{Runner: proc.New()}}
	rig.restart(t)
	return rig
}

// restart makes a new Executor, as an agent restart does: nothing kept
// in memory survives.
func (r *dockerRig) restart(t testing.TB) {
	t.Helper()
	fr, err := fsutil.NewRoot(r.root)
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r.e = New(Options{Root: fr, Runner: r.runs, Logger: logger, KillGrace: time.Second, WatchDir: filepath.Join(r.root, "var/lib/visualops/opsagent/watch")})
}

func (r *dockerRig) apply(t testing.TB, module, param string, test bool) state.Result {
	t.Helper()
	if !json.Valid([]byte(param)) {
		t.Fatalf("bad test parameter %s", param)
	}
	return r.e.Execute(context.Background(), state.Request{RecipeVersion: 1, StateID: "s-" + module, Module: module, Parameter: json.RawMessage(param), Test: test})
}

// must applies a state that must succeed with the given Changed.
func (r *dockerRig) must(t testing.TB, module, param string, test, wantChanged bool) state.Result {
	t.Helper()
	res := r.apply(t, module, param, test)
	if !res.OK || res.Changed != wantChanged {
		t.Fatalf("%s %s (check mode %v): %+v, want OK and Changed=%v", module, param, test, res, wantChanged)
	}
	return res
}

// quiet applies a state that must change nothing and make exactly the
// API calls want (in any order), then checks that check mode agrees.
func (r *dockerRig) quiet(t testing.TB, module, param string, want ...string) state.Result {
	t.Helper()
	mark := r.calls.Mark()
	res := r.must(t, module, param, false, false)
	got := r.calls.Since(mark)
	slices.Sort(got)
	want = slices.Clone(want)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("%s: a round with nothing to change made the API calls %q, want %q", module, got, want)
	}
	r.must(t, module, param, true, false)
	return res
}

// container inspects a container as the engine has it (raw JSON).
func (r *dockerRig) container(t testing.TB, name string) map[string]any {
	t.Helper()
	var out map[string]any
	r.getJSON(t, "/containers/"+name+"/json", &out)
	return out
}

func (r *dockerRig) getJSON(t testing.TB, path string, out any) int {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", r.engine.Socket)
	}}}
	resp, err := c.Get("http://docker/v1.41" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			t.Fatal(err)
		}
	}
	return resp.StatusCode
}

// exists reports whether the engine has a container of that name.
func (r *dockerRig) exists(t testing.TB, name string) bool {
	t.Helper()
	var out map[string]any
	return r.getJSON(t, "/containers/"+name+"/json", &out) == http.StatusOK
}

// field digs into inspected JSON: field(m, "HostConfig", "Memory").
func field(m map[string]any, keys ...string) any {
	var v any = m
	for _, k := range keys {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[k]
	}
	return v
}

// logs is the output of a container so far.
func (r *dockerRig) logs(t testing.TB, name string) string {
	t.Helper()
	out, err := r.engine.Client.LogsTail(context.Background(), name, 100)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// testApp is the program of the test images: it prints its arguments, the
// GREETING variable and the files named after "cat", exits 3 when an
// argument is "exit", and otherwise runs until SIGTERM (at once: PID 1 of
// a container gets no default signal handling).
const testApp = `package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	fmt.Println("args", os.Args[1:], "greeting", os.Getenv("GREETING"))
	for i, a := range os.Args {
		if a == "exit" {
			fmt.Println("giving up")
			os.Exit(3)
		}
		if a == "cat" && i+1 < len(os.Args) {
			data, err := os.ReadFile(os.Args[i+1])
			fmt.Printf("cat %s: %q %v\n", os.Args[i+1], data, err)
		}
	}
	<-sig
}
`

// buildApp puts testApp, compiled statically, at dir/app (no registry
// on the internet: the images are FROM scratch with this one binary).
func buildApp(t testing.TB, dir string) {
	t.Helper()
	data := cachedBinary(t, "docker-test-app", testApp)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "app"), data, 0o755); err != nil {
		t.Fatal(err)
	}
}

// cachedBinary compiles a one-file Go program statically and returns
// the binary, cached in the test cache (beside debroot's) by source.
func cachedBinary(t testing.TB, name, source string) []byte {
	t.Helper()
	cache := testcache.Dir()
	sum := sha256.Sum256([]byte(source + runtime.Version()))
	bin := filepath.Join(cache, fmt.Sprintf("%s-%x", name, sum[:8]))
	if _, err := os.Stat(bin); err != nil {
		src := t.TempDir()
		if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(source), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module "+name+"\n\ngo 1.21\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(cache, 0o755); err != nil {
			t.Fatal(err)
		}
		tmp := fmt.Sprintf("%s.%d", bin, os.Getpid())
		cmd := exec.Command("go", "build", "-trimpath", "-o", tmp, ".")
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build of %s: %v\n%s", name, err, out)
		}
		if err := os.Rename(tmp, bin); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// writeContext writes a build context: the app and a Dockerfile whose
// variant line makes a distinct image.
func writeContext(t testing.TB, dir, variant string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "app")); err != nil {
		buildApp(t, dir)
	}
	df := "FROM scratch\nCOPY app /app\nLABEL variant=" + variant + "\nCMD [\"/app\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
		t.Fatal(err)
	}
}

// buildImage builds tag from a fresh context through the engine's API
// directly (the test's setup, not the module under test); it returns the
// image id.
func (r *dockerRig) buildImage(t testing.TB, tag, variant string) string {
	t.Helper()
	dir := filepath.Join(r.engine.Dir, "ctx-"+variant)
	writeContext(t, dir, variant)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range []string{"Dockerfile", "app"} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(data))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	tw.Close()
	prog, err := r.engine.Client.Build(context.Background(), &buf, dockerapi.BuildOptions{Tag: tag})
	if err != nil {
		t.Fatalf("build %s: %v\n%s", tag, err, prog.Output)
	}
	img, err := r.engine.Client.ImageInspect(context.Background(), tag)
	if err != nil {
		t.Fatal(err)
	}
	return img.ID
}

// noSecret fails when secret appears in a result, the executor's log or
// any command line it ran (it must run none).
func (r *dockerRig) noSecret(t testing.TB, secret string, results ...state.Result) {
	t.Helper()
	for _, res := range results {
		if strings.Contains(res.Comment, secret) || strings.Contains(res.Stdout, secret) {
			t.Fatalf("the password is in a state's result: %+v", res)
		}
	}
	if strings.Contains(r.log.String(), secret) {
		t.Fatalf("the password is in the log: %s", r.log.String())
	}
	if n := r.runs.Mark(); n != 0 {
		t.Fatalf("the docker modules ran processes: %v", r.runs.Since(0))
	}
}

func TestDockerRunningConvergesAndRecreatesOnlyOnChange(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	id1 := rig.buildImage(t, "test/app:1", "one")
	id2 := rig.buildImage(t, "test/app:2", "two")
	data := filepath.Join(rig.root, "srv")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	params := map[string]any{
		"container":     "web",
		"image":         "test/app",
		"tag":           "1",
		"command":       []string{"/app", "serve"},
		"environment":   []map[string]string{{"key": "GREETING", "value": "hello"}},
		"port_bindings": []map[string]string{{"key": "80", "value": "127.0.0.1:18080"}},
		"volumes":       []map[string]string{{"key": data, "value": "/data:ro"}},
		"devices":       []map[string]string{{"key": "/dev/null", "value": "/dev/xnull:rw"}},
		"mem_limit":     "64m",
		"cpu_shares":    "512",
	}
	param := func() string { b, _ := json.Marshal(params); return string(b) }

	// Check mode first: nothing is created.
	res := rig.must(t, "linux.docker.running", param(), true, true)
	if !strings.Contains(res.Comment, "would be created") || rig.exists(t, "web") {
		t.Fatalf("check mode: %+v (container exists: %v)", res, rig.exists(t, "web"))
	}
	res = rig.must(t, "linux.docker.running", param(), false, true)
	if !strings.Contains(res.Comment, "Container web created from test/app:1 and started") {
		t.Fatalf("first round: %q", res.Comment)
	}
	c := rig.container(t, "web")
	if field(c, "State", "Running") != true || field(c, "Image") != id1 {
		t.Fatalf("container: running %v, image %v", field(c, "State", "Running"), field(c, "Image"))
	}
	for _, check := range []struct {
		what string
		got  any
		want string
	}{
		{"cmd", field(c, "Config", "Cmd"), `["/app","serve"]`},
		{"memory", field(c, "HostConfig", "Memory"), `67108864`},
		{"cpu shares", field(c, "HostConfig", "CpuShares"), `512`},
		{"binds", field(c, "HostConfig", "Binds"), fmt.Sprintf(`["%s:/data:ro"]`, data)},
		{"ports", field(c, "HostConfig", "PortBindings"), `{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"18080"}]}`},
		{"devices", field(c, "HostConfig", "Devices"), `[{"CgroupPermissions":"rw","PathInContainer":"/dev/xnull","PathOnHost":"/dev/null"}]`},
		{"hostname", field(c, "Config", "Hostname"), `"web"`},
	} {
		b, _ := json.Marshal(check.got)
		if string(b) != check.want {
			t.Errorf("%s: %s, want %s", check.what, b, check.want)
		}
	}
	if env, _ := json.Marshal(field(c, "Config", "Env")); !strings.Contains(string(env), "GREETING=hello") {
		t.Errorf("env %s", env)
	}
	wantID := field(c, "Id")

	// The next rounds change nothing and cost a ping and one list, also
	// after an agent restart (the state is the label on the container).
	quietRound := []string{"GET /_ping", "GET /containers/json"}
	res = rig.quiet(t, "linux.docker.running", param(), quietRound...)
	if res.Comment != "Container web is already in the correct state" {
		t.Fatalf("second round: %q", res.Comment)
	}
	rig.restart(t)
	rig.quiet(t, "linux.docker.running", param(), quietRound...)
	if field(rig.container(t, "web"), "Id") != wantID {
		t.Fatal("the container was recreated by a round that had nothing to change")
	}

	// Each parameter's change recreates the container once.
	for _, change := range []struct {
		param string
		value any
		check func(c map[string]any) bool
	}{
		{"environment", map[string]string{"GREETING": "bonjour"}, func(c map[string]any) bool {
			b, _ := json.Marshal(field(c, "Config", "Env"))
			return strings.Contains(string(b), "GREETING=bonjour")
		}},
		{"command", "/app serve 'two words'", func(c map[string]any) bool {
			b, _ := json.Marshal(field(c, "Config", "Cmd"))
			return string(b) == `["/app","serve","two words"]`
		}},
		{"port_bindings", map[string]string{"80/tcp": "18090"}, func(c map[string]any) bool {
			b, _ := json.Marshal(field(c, "HostConfig", "PortBindings"))
			return string(b) == `{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"18090"}]}`
		}},
		{"volumes", []map[string]string{{"key": data, "value": "/data"}}, func(c map[string]any) bool {
			b, _ := json.Marshal(field(c, "HostConfig", "Binds"))
			return string(b) == fmt.Sprintf(`["%s:/data"]`, data)
		}},
		{"mem_limit", "128m", func(c map[string]any) bool { return field(c, "HostConfig", "Memory") == float64(128<<20) }},
		{"cpu_shares", "0-1", func(c map[string]any) bool {
			return field(c, "HostConfig", "CpusetCpus") == "0-1" && field(c, "HostConfig", "CpuShares") == float64(0)
		}},
		{"devices", nil, func(c map[string]any) bool { d, _ := field(c, "HostConfig", "Devices").([]any); return len(d) == 0 }},
		{"tag", "2", func(c map[string]any) bool { return field(c, "Image") == id2 }},
	} {
		params[change.param] = change.value
		what := change.param
		if what == "tag" {
			what = "image"
		}
		if check := rig.must(t, "linux.docker.running", param(), true, true); !strings.Contains(check.Comment, "would be recreated: "+what+" changed") {
			t.Fatalf("%s: check mode %q", change.param, check.Comment)
		}
		if field(rig.container(t, "web"), "Id") != wantID {
			t.Fatalf("%s: check mode recreated the container", change.param)
		}
		res := rig.must(t, "linux.docker.running", param(), false, true)
		if !strings.Contains(res.Comment, "Container web recreated: ") {
			t.Fatalf("%s: %q", change.param, res.Comment)
		}
		c := rig.container(t, "web")
		if field(c, "Id") == wantID || !change.check(c) || field(c, "State", "Running") != true {
			b, _ := json.Marshal(c["HostConfig"])
			t.Fatalf("%s: not recreated as asked: %s", change.param, b)
		}
		wantID = field(c, "Id")
		rig.quiet(t, "linux.docker.running", param(), quietRound...)
	}

	// A container stopped behind the agent's back is started, not
	// recreated.
	if err := rig.engine.Client.Stop(context.Background(), "web", time.Second); err != nil {
		t.Fatal(err)
	}
	res = rig.must(t, "linux.docker.running", param(), false, true)
	if !strings.Contains(res.Comment, "Container web started (it was exited)") || field(rig.container(t, "web"), "Id") != wantID {
		t.Fatalf("stopped container: %q", res.Comment)
	}
	rig.quiet(t, "linux.docker.running", param(), quietRound...)

	// force recreates on each round, as documented.
	params["force"] = true
	res = rig.must(t, "linux.docker.running", param(), false, true)
	if !strings.Contains(res.Comment, "recreated: force is set") {
		t.Fatalf("force: %q", res.Comment)
	}
	rig.noSecret(t, "no-password-in-this-test")
}

func TestDockerRunningCountNamesAndPorts(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	rig.buildImage(t, "test/app:latest", "one")
	param := func(count string) string {
		return `{"container": "api", "image": "test/app", "count": "` + count + `", "port_bindings": [{"key": "8000/tcp", "value": "127.0.0.1:19000"}]}`
	}
	// A container of that name made without the agent (by hand, or by the
	// 2014 agent) is recreated once: its configuration is unknown.
	if _, err := rig.engine.Client.Create(context.Background(), "api", dockerapi.CreateBody{Image: "test/app"}); err != nil {
		t.Fatal(err)
	}
	res := rig.must(t, "linux.docker.running", param("0"), false, true)
	if !rig.exists(t, "api") || !strings.Contains(res.Comment, "Container api recreated: it was not created by this agent (it has no configuration label)") {
		t.Fatalf("no count: %q", res.Comment)
	}
	res = rig.must(t, "linux.docker.running", param("3"), false, true)
	for i, want := range []string{"19000", "19001", "19002"} {
		name := fmt.Sprintf("api_%d", i+1)
		b, _ := json.Marshal(field(rig.container(t, name), "HostConfig", "PortBindings"))
		if !strings.Contains(string(b), `"HostPort":"`+want+`"`) {
			t.Fatalf("%s: ports %s, want host port %s", name, b, want)
		}
	}
	if rig.exists(t, "api") || !strings.Contains(res.Comment, "Container api removed (the state runs api_1…api_3 (count 3))") {
		t.Fatalf("count 3 kept the container named without a number: %q", res.Comment)
	}
	rig.quiet(t, "linux.docker.running", param("3"), "GET /_ping", "GET /containers/json")
	res = rig.must(t, "linux.docker.running", param("1"), false, true)
	if rig.exists(t, "api_2") || rig.exists(t, "api_3") || !rig.exists(t, "api_1") {
		t.Fatalf("count 1: %q", res.Comment)
	}
	// Overlapping port ranges are refused before anything is done.
	bad := rig.apply(t, "linux.docker.running", `{"container": "api", "image": "test/app", "count": "2", "port_bindings": {"80": "9000", "81": "9001"}}`, false)
	if bad.OK || !strings.Contains(bad.Comment, "both use host port 0.0.0.0:9001/tcp") {
		t.Fatalf("overlapping ports: %+v", bad)
	}
}

func TestDockerRunningRestartsOnWatchedFile(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	rig.buildImage(t, "test/app:latest", "one")
	conf := filepath.Join(rig.root, "etc/app.conf")
	if err := os.MkdirAll(filepath.Dir(conf), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(conf, []byte("a=1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	param := `{"container": "watcher", "image": "test/app", "watch": ["/etc/app.conf"]}`
	rig.must(t, "linux.docker.running", param, false, true)
	// The first sight of a watched file is recorded, not acted on (the
	// 2014 watch map: tfirst is false for docker.running).
	rig.quiet(t, "linux.docker.running", param, "GET /_ping", "GET /containers/json")
	started := field(rig.container(t, "watcher"), "State", "StartedAt")
	if err := os.WriteFile(conf, []byte("a=2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := rig.must(t, "linux.docker.running", param, true, true); !strings.Contains(res.Comment, "Container watcher would be restarted: /etc/app.conf changed") {
		t.Fatalf("check mode: %q", res.Comment)
	}
	mark := rig.calls.Mark()
	res := rig.must(t, "linux.docker.running", param, false, true)
	if !strings.Contains(res.Comment, "Container watcher restarted: /etc/app.conf changed") || rig.calls.Count(mark, "POST /containers/{id}/restart") != 1 {
		t.Fatalf("watched file changed: %q, calls %q", res.Comment, rig.calls.Since(mark))
	}
	if field(rig.container(t, "watcher"), "State", "StartedAt") == started {
		t.Fatal("the container was not restarted")
	}
	rig.quiet(t, "linux.docker.running", param, "GET /_ping", "GET /containers/json")
}

func TestDockerRunningFailsWithTheOutputOfAContainerThatStops(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	rig.buildImage(t, "test/app:latest", "one")
	param := `{"container": "bad", "image": "test/app", "command": ["/app", "exit"]}`
	// The first round may see it stop at once, or not yet.
	res := rig.apply(t, "linux.docker.running", param, false)
	if !res.OK && !strings.Contains(res.Comment, "Container bad stopped right after it started (exited, exit code 3)") {
		t.Fatalf("%+v", res)
	}
	waitFor(t, "the container to stop", func() bool { return field(rig.container(t, "bad"), "State", "Running") == false })
	// The next round starts it again and fails with its exit code and
	// output, and so does every round while it crashes.
	for range 2 {
		waitFor(t, "the container to stop", func() bool { return field(rig.container(t, "bad"), "State", "Running") == false })
		res = rig.apply(t, "linux.docker.running", param, false)
		if res.OK || !res.Changed || !strings.Contains(res.Comment, "Container bad had stopped (exited, exit code 3), its last output:") || !strings.Contains(res.Comment, "giving up") || !strings.Contains(res.Comment, "it was started again") {
			t.Fatalf("%+v", res)
		}
	}
	// A missing image that no registry has fails naming it.
	res = rig.apply(t, "linux.docker.running", `{"container": "none", "image": "127.0.0.1:1/nothing"}`, false)
	if res.OK || !strings.Contains(res.Comment, "Container none: image 127.0.0.1:1/nothing:latest is not here and cannot be pulled") {
		t.Fatalf("%+v", res)
	}
}

// writeRootContext writes a build context below the rig's root.
func (r *dockerRig) writeRootContext(t testing.TB, dir, variant string) string {
	t.Helper()
	host := filepath.Join(r.root, dir)
	writeContext(t, host, variant)
	return host
}

func TestDockerBuiltBuildsOnlyWhenTheContextChanges(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	ctxDir := rig.writeRootContext(t, "opt/docker/app", "one")
	if err := os.WriteFile(filepath.Join(ctxDir, ".dockerignore"), []byte("# logs are not part of the image\n*.log\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	param := `{"tag": "test/built", "path": "/opt/docker/app", "containers": ["svc", "legacy"]}`
	if res := rig.must(t, "linux.docker.built", param, true, true); !strings.Contains(res.Comment, "would be built from /opt/docker/app: it is not here") {
		t.Fatalf("check mode: %q", res.Comment)
	}
	res := rig.must(t, "linux.docker.built", param, false, true)
	if !strings.Contains(res.Comment, "Image test/built:latest built from /opt/docker/app (it is not here)") || !strings.Contains(res.Stdout, "Successfully built") {
		t.Fatalf("first build: %+v", res)
	}
	first, err := rig.engine.Client.ImageInspect(context.Background(), "test/built")
	if err != nil {
		t.Fatal(err)
	}
	// A container runs the image, as linux.docker.running made it.
	rig.must(t, "linux.docker.running", `{"container": "svc", "image": "test/built"}`, false, true)

	quiet := []string{"GET /_ping", "GET /images/{name}/json"}
	rig.quiet(t, "linux.docker.built", param, quiet...)
	rig.restart(t)
	rig.quiet(t, "linux.docker.built", param, quiet...)
	// A file .dockerignore excludes, and a new modification time, change
	// nothing.
	if err := os.WriteFile(filepath.Join(ctxDir, "debug.log"), []byte("noise"), 0o644); err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(filepath.Join(ctxDir, "app"), later, later); err != nil {
		t.Fatal(err)
	}
	rig.quiet(t, "linux.docker.built", param, quiet...)

	// A container made without the agent's label (by hand, or by the 2014
	// agent) cannot be recreated from it: it is removed, as in 2014.
	if _, err := rig.engine.Client.Create(context.Background(), "legacy", dockerapi.CreateBody{Image: "test/built"}); err != nil {
		t.Fatal(err)
	}
	// A change in the context rebuilds, recreates the container on the
	// new image and removes the old image.
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\nCOPY app /app\nLABEL variant=changed\nCMD [\"/app\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := rig.must(t, "linux.docker.built", param, true, true); !strings.Contains(res.Comment, "would be built from /opt/docker/app: its build context changed") {
		t.Fatalf("check mode: %q", res.Comment)
	}
	res = rig.must(t, "linux.docker.built", param, false, true)
	second, err := rig.engine.Client.ImageInspect(context.Background(), "test/built")
	if err != nil {
		t.Fatal(err)
	}
	if second.ID == first.ID || !strings.Contains(res.Comment, "Container svc recreated (image test/built:latest rebuilt)") || !strings.Contains(res.Comment, "Previous image "+shortID(first.ID)+" removed") {
		t.Fatalf("rebuild: %q", res.Comment)
	}
	if field(rig.container(t, "svc"), "Image") != second.ID {
		t.Fatal("the container does not run the new image")
	}
	if rig.exists(t, "legacy") || !strings.Contains(res.Comment, "Container legacy removed (image test/built:latest rebuilt; a linux.docker.running state creates it again)") {
		t.Fatalf("a container without the label: %q", res.Comment)
	}
	if _, err := rig.engine.Client.ImageInspect(context.Background(), first.ID); !dockerapi.IsNotFound(err) {
		t.Fatalf("the old image is still there: %v", err)
	}
	rig.quiet(t, "linux.docker.built", param, quiet...)
	// The recreated container is what linux.docker.running wants: its
	// next round changes nothing.
	rig.quiet(t, "linux.docker.running", `{"container": "svc", "image": "test/built"}`, "GET /_ping", "GET /containers/json")

	// force builds on each round; the engine's cache gives the same image,
	// so nothing changed.
	res = rig.must(t, "linux.docker.built", `{"tag": "test/built", "path": "/opt/docker/app", "force": true}`, false, false)
	if !strings.Contains(res.Comment, "rebuilt from /opt/docker/app (force is set): the same image") {
		t.Fatalf("force: %q", res.Comment)
	}
	// A build that fails says why, with the build's output.
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\nCOPY missing /missing\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res = rig.apply(t, "linux.docker.built", param, false)
	if res.OK || !strings.Contains(res.Comment, "Image test/built:latest: build from /opt/docker/app failed") || !strings.Contains(res.Comment, "missing") {
		t.Fatalf("failed build: %+v", res)
	}
	rig.noSecret(t, "no-password-in-this-test")
}

func TestDockerPushedAndPulledWithCredentials(t *testing.T) {
	t.Parallel()
	const user, password = "deployer", "s3cret-Pa55word"
	rig := newDockerRig(t)
	reg := dockerd.StartRegistry(t, user, password)
	image := reg.Host + "/team/app"
	ctxDir := rig.writeRootContext(t, "opt/app", "one")
	login := fmt.Sprintf(`"username": %q, "password": %q, "email": "ops@example.com"`, user, password)
	var results []state.Result
	keep := func(r state.Result) state.Result { results = append(results, r); return r }

	keep(rig.must(t, "linux.docker.built", fmt.Sprintf(`{"tag": "%s:v1", "path": "/opt/app"}`, image), false, true))
	pushed := fmt.Sprintf(`{"repository": %q, "tag": "v1", %s}`, image, login)
	keep(rig.must(t, "linux.docker.pushed", pushed, true, true))
	if reg.Pushes(0) != 0 {
		t.Fatal("check mode pushed")
	}
	mark := reg.Mark()
	res := keep(rig.must(t, "linux.docker.pushed", pushed, false, true))
	if reg.Pushes(mark) != 1 || !strings.Contains(res.Comment, "Image "+image+":v1 pushed (sha256:") {
		t.Fatalf("push: %q, registry saw %q", res.Comment, reg.Since(mark))
	}
	// The next rounds push nothing, also after an agent restart.
	mark = reg.Mark()
	keep(rig.quiet(t, "linux.docker.pushed", pushed, "GET /_ping", "GET /images/{name}/json"))
	rig.restart(t)
	keep(rig.quiet(t, "linux.docker.pushed", pushed, "GET /_ping", "GET /images/{name}/json"))
	if len(reg.Since(mark)) != 0 {
		t.Fatalf("rounds with nothing to push reached the registry: %q", reg.Since(mark))
	}
	// Without the login the registry refuses, and the state says so.
	if err := rig.engine.Client.Tag(context.Background(), image+":v1", image, "v3"); err != nil {
		t.Fatal(err)
	}
	bad := rig.apply(t, "linux.docker.pushed", fmt.Sprintf(`{"repository": %q, "tag": "v3"}`, image), false)
	if bad.OK || !strings.Contains(bad.Comment, "Image "+image+":v3: push failed") {
		t.Fatalf("push without the login: %+v", bad)
	}

	// Pull: the local image is the registry's, so nothing is downloaded.
	pulled := fmt.Sprintf(`{"repo": %q, "tag": "v1", "containers": ["client"], %s}`, image, login)
	v1, err := rig.engine.Client.ImageInspect(context.Background(), image+":v1")
	if err != nil {
		t.Fatal(err)
	}
	mark = reg.Mark()
	keep(rig.quiet(t, "linux.docker.pulled", pulled, "GET /_ping", "GET /images/{name}/json", "GET /distribution/{name}/json"))
	if n := reg.BlobDownloads(mark, v1.ID); n != 0 {
		t.Fatalf("an up-to-date pull downloaded %d layers: %q", n, reg.Since(mark))
	}
	keep(rig.must(t, "linux.docker.running", fmt.Sprintf(`{"container": "client", "image": %q, "tag": "v1", %s}`, image, login), false, true))

	// A new image pushed to the tag from elsewhere (here: rebuilt, pushed,
	// and the local tag put back on the old image) is pulled, and the
	// container listed is recreated on it.
	writeContext(t, ctxDir, "two")
	keep(rig.must(t, "linux.docker.built", fmt.Sprintf(`{"tag": "%s:v1", "path": "/opt/app"}`, image), false, true))
	mark = reg.Mark()
	res = keep(rig.must(t, "linux.docker.pushed", pushed, false, true))
	if reg.Pushes(mark) != 1 {
		t.Fatalf("a changed image was not pushed: %q", res.Comment)
	}
	v2, err := rig.engine.Client.ImageInspect(context.Background(), image+":v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := rig.engine.Client.Tag(context.Background(), v1.ID, image, "v1"); err != nil {
		t.Fatal(err)
	}
	if err := rig.engine.Client.RemoveImage(context.Background(), v2.ID); err != nil {
		t.Fatal(err)
	}
	if res := keep(rig.must(t, "linux.docker.pulled", pulled, true, true)); !strings.Contains(res.Comment, "would be pulled (the registry has sha256:") || !strings.Contains(res.Comment, "Container client would be recreated") {
		t.Fatalf("check mode: %q", res.Comment)
	}
	mark, apiMark := reg.Mark(), rig.calls.Mark()
	res = keep(rig.must(t, "linux.docker.pulled", pulled, false, true))
	if rig.calls.Count(apiMark, "POST /images/create") != 1 || len(reg.Since(mark)) == 0 || !strings.Contains(res.Comment, "pulled: "+shortID(v2.ID)+" replaces "+shortID(v1.ID)) || !strings.Contains(res.Comment, "Container client recreated (image "+image+":v1 changed)") {
		t.Fatalf("pull of a new image: %q (registry %q)", res.Comment, reg.Since(mark))
	}
	if field(rig.container(t, "client"), "Image") != v2.ID {
		t.Fatal("the container does not run the pulled image")
	}
	keep(rig.quiet(t, "linux.docker.pulled", pulled, "GET /_ping", "GET /images/{name}/json", "GET /distribution/{name}/json"))

	// Without a login the registry refuses; the state fails saying so.
	res = keep(rig.apply(t, "linux.docker.pulled", fmt.Sprintf(`{"repo": %q, "tag": "v1"}`, image), false))
	if res.OK || !strings.Contains(res.Comment, "cannot ask its registry") {
		t.Fatalf("no login: %+v", res)
	}
	if reg.Unauthorized() == 0 {
		t.Fatal("the registry never asked for the login")
	}
	rig.noSecret(t, password, results...)
}

func TestDockerPushedCommitsAContainerOncePerContainer(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	reg := dockerd.StartRegistry(t, "", "")
	rig.buildImage(t, "test/app:latest", "one")
	rig.must(t, "linux.docker.running", `{"container": "box", "image": "test/app"}`, false, true)
	param := fmt.Sprintf(`{"repository": "%s/box", "container": "box", "message": "snapshot", "author": "ops", "dep_containers": ["dep"]}`, reg.Host)
	rig.must(t, "linux.docker.running", `{"container": "dep", "image": "test/app"}`, false, true)
	depID := field(rig.container(t, "dep"), "Id")
	res := rig.must(t, "linux.docker.pushed", param, false, true)
	if reg.Pushes(0) != 1 || !strings.Contains(res.Comment, "Container box committed as "+reg.Host+"/box:latest") || !strings.Contains(res.Comment, "Container dep recreated (image "+reg.Host+"/box:latest pushed)") {
		t.Fatalf("commit and push: %q", res.Comment)
	}
	img, err := rig.engine.Client.ImageInspect(context.Background(), reg.Host+"/box:latest")
	if err != nil {
		t.Fatal(err)
	}
	if field(rig.container(t, "dep"), "Id") == depID {
		t.Fatal("the dependent container was not recreated")
	}
	_ = img
	mark := reg.Mark()
	rig.quiet(t, "linux.docker.pushed", param, "GET /_ping", "GET /containers/{id}/json")
	if reg.Pushes(mark) != 0 {
		t.Fatal("the same container was committed and pushed again")
	}
	// A recreated container is another one: committed and pushed again.
	rig.must(t, "linux.docker.running", `{"container": "box", "image": "test/app", "environment": {"A": "1"}}`, false, true)
	res = rig.must(t, "linux.docker.pushed", param, false, true)
	if reg.Pushes(mark) != 1 {
		t.Fatalf("a new container was not pushed: %q", res.Comment)
	}
}

func TestDockerDeployWritesFilesAndRecreatesOnChange(t *testing.T) {
	t.Parallel()
	rig := newDockerRig(t)
	reg := dockerd.StartRegistry(t, "", "")
	image := reg.Host + "/deploy/app"
	rig.buildImage(t, image+":latest", "one")
	if _, err := rig.engine.Client.Push(context.Background(), image, "latest", nil); err != nil {
		t.Fatal(err)
	}
	param := func(content string) string {
		b, _ := json.Marshal(map[string]any{
			"container": "site",
			"image":     image,
			"command":   []string{"/app", "cat", "/etc/site.conf"},
			"files":     []map[string]string{{"key": "/etc/site.conf", "value": content}},
		})
		return string(b)
	}
	res := rig.must(t, "linux.docker.deploy", param("colour=blue"), true, true)
	if rig.exists(t, "site") {
		t.Fatalf("check mode created the container: %q", res.Comment)
	}
	res = rig.must(t, "linux.docker.deploy", param("colour=blue"), false, true)
	host := filepath.Join(rig.root, "var/lib/visualops/opsagent/docker-config/site/-etc-site.conf")
	if data, err := os.ReadFile(host); err != nil || string(data) != "colour=blue" {
		t.Fatalf("deploy file: %q %v (%q)", data, err, res.Comment)
	}
	var out string
	waitFor(t, "the container's output", func() bool { out = rig.logs(t, "site"); return strings.Contains(out, "cat /etc/site.conf: ") })
	if !strings.Contains(out, `"colour=blue"`) {
		t.Fatalf("the container sees %q", out)
	}
	quiet := []string{"GET /_ping", "GET /images/{name}/json", "GET /distribution/{name}/json", "GET /containers/json"}
	rig.quiet(t, "linux.docker.deploy", param("colour=blue"), quiet...)

	id := field(rig.container(t, "site"), "Id")
	res = rig.must(t, "linux.docker.deploy", param("colour=green"), false, true)
	if !strings.Contains(res.Comment, "written") || !strings.Contains(res.Comment, "Container site recreated: files changed") || field(rig.container(t, "site"), "Id") == id {
		t.Fatalf("changed file: %q", res.Comment)
	}
	waitFor(t, "the container's output", func() bool { out = rig.logs(t, "site"); return strings.Contains(out, "cat /etc/site.conf: ") })
	if !strings.Contains(out, `"colour=green"`) {
		t.Fatalf("the container sees %q", out)
	}
	rig.quiet(t, "linux.docker.deploy", param("colour=green"), quiet...)
}

// waitFor polls cond (a container's output comes a moment after it
// starts).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDockerWithoutAnEngine(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	fr, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	runs := &recordingRunner{Runner: proc.New()}
	e := New(Options{Root: fr, Runner: runs})
	apply := func(module, param string, test bool) state.Result {
		return e.Execute(context.Background(), state.Request{StateID: "s", Module: module, Parameter: json.RawMessage(param), Test: test})
	}
	res := apply("linux.docker.running", `{"container": "web", "image": "nginx"}`, true)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "no Docker engine answers on /var/run/docker.sock") || !strings.Contains(res.Comment, "would be installed and started") {
		t.Fatalf("check mode: %+v", res)
	}
	if runs.Mark() != 0 {
		t.Fatalf("check mode ran %v", runs.Since(0))
	}
	// This root has no distribution: nothing can install the engine, and
	// the state says what is missing.
	res = apply("linux.docker.pulled", `{"repo": "nginx"}`, false)
	if res.OK || !strings.Contains(res.Comment, "Image nginx:latest: no Docker engine answers on /var/run/docker.sock, and dockerd is not installed and cannot be") {
		t.Fatalf("%+v", res)
	}
}

// fakeDockerd is the "dockerd" of the test's docker.io package: it
// serves /var/run/docker.sock in the root it runs in (chrooted there by
// the init script) and forwards every connection to an abstract socket,
// which the test's real engine answers through (abstract sockets belong
// to the network namespace, not the file system, so a chroot reaches
// them). The root thus gets a working engine at its own socket, started
// by its own init script.
const fakeDockerd = `package main

import (
	"io"
	"net"
	"os"
)

func main() {
	_ = os.Remove("/var/run/docker.sock")
	l, err := net.Listen("unix", "/var/run/docker.sock")
	if err != nil {
		os.Exit(1)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("unix", os.Args[1])
			if err != nil {
				return
			}
			defer u.Close()
			go func() { _, _ = io.Copy(u, c); _ = u.(*net.UnixConn).CloseWrite() }()
			_, _ = io.Copy(c, u)
		}()
	}
}
`

// dockerInit is the package's init script.
const dockerInit = `#!/bin/sh
PIDFILE=/run/docker-test.pid
running() { [ -s $PIDFILE ] && kill -0 "$(cat $PIDFILE)" 2>/dev/null; }
case "$1" in
start)
	running && exit 0
	start-stop-daemon --start --quiet --background --make-pidfile --pidfile $PIDFILE --exec /usr/sbin/dockerd -- "$(cat /etc/default/docker-test)"
	;;
stop)
	start-stop-daemon --stop --quiet --pidfile $PIDFILE --remove-pidfile
	;;
status)
	running && exit 0
	exit 3
	;;
*)
	exit 2
	;;
esac
`

func TestDockerEngineInstalledAndStartedWhenMissing(t *testing.T) {
	t.Parallel()
	engine := dockerd.Start(t)
	rig := newDebianRig(t)
	abstract := fmt.Sprintf("@opsagent-test-dockerd-%d-%d", os.Getpid(), time.Now().UnixNano())
	calls := engine.Serve(t, abstract)
	repo := aptrepo.New(t)
	repo.Add(t, aptrepo.Package{Name: "docker.io", Version: "99.0-1", Files: map[string]string{
		"/usr/sbin/dockerd":        string(cachedBinary(t, "fake-dockerd", fakeDockerd)),
		"/etc/init.d/docker":       dockerInit,
		"/etc/default/docker-test": abstract,
	}})
	repo.Use(t, rig.root)
	// The image, built on the engine beforehand (the test's setup).
	dr := &dockerRig{engine: engine}
	dr.buildImage(t, "test/app:latest", "one")
	param := `{"container": "web", "image": "test/app"}`

	mark := rig.runs.Mark()
	res := rig.apply(t, "linux.docker.running", param, true)
	if !res.OK || !res.Changed || !strings.Contains(res.Comment, "the Docker engine would be installed and started") {
		t.Fatalf("check mode: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 0 {
		t.Fatalf("check mode ran %v", ran)
	}
	res = rig.apply(t, "linux.docker.running", param, false)
	if !res.OK || !res.Changed {
		t.Fatalf("first round: %+v", res)
	}
	for _, want := range []string{"package docker.io installed (Docker engine)", "service docker started", "Container web created from test/app:latest and started"} {
		if !strings.Contains(res.Comment, want) {
			t.Fatalf("first round: %q lacks %q", res.Comment, want)
		}
	}
	if n := calls.Count(0, "POST /containers/create"); n != 1 {
		t.Fatalf("the root's engine created %d containers", n)
	}
	// The next round finds the engine running: no package manager, no
	// service command, nothing changed.
	mark = rig.runs.Mark()
	res = rig.apply(t, "linux.docker.running", param, false)
	if !res.OK || res.Changed || res.Comment != "Container web is already in the correct state" {
		t.Fatalf("second round: %+v", res)
	}
	if ran := rig.runs.Since(mark); len(ran) != 0 {
		t.Fatalf("the second round ran %v", ran)
	}
}
