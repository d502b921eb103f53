package native

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
)

func TestDockerParamsAreReadAsTheIDEWritesThem(t *testing.T) {
	p, err := parseParams(json.RawMessage(`{
		"container": "web", "image": "host.example:5000/ns/app:1.2", "count": "2",
		"command": "/usr/bin/apache2 -D 'FOREGROUND mode' \"a \\\"b\\\"\" c\\ d",
		"environment": [{"key": "FOO", "value": "bar"}, {"key": "A", "value": 1}],
		"volumes": [{"key": "/host/path", "value": "/mount/point"}, {"key": "/host/ro", "value": "/mount/ro:ro"}],
		"files": [{"key": "/etc/nginx/nginx.conf", "value": "/local/nginx.conf"}],
		"devices": [{"key": "/dev/xvdf", "value": "/dev/xvdf:r"}, {"key": "/dev/sda", "value": "/dev/xvda"}],
		"mem_limit": "512m", "cpu_shares": "0-3",
		"port_bindings": [{"key": "5000/tcp", "value": "127.0.0.1:5000"}, {"key": "80", "value": "6666"}, {"key": "53/udp", "value": ""}]
	}`))
	if err != nil {
		t.Fatal(err)
	}
	plan, err := parseRunning(p, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if plan.ref.String() != "host.example:5000/ns/app:1.2" || len(plan.want) != 2 || plan.want[0].name != "web_1" || plan.want[1].name != "web_2" {
		t.Fatalf("plan %+v", plan)
	}
	s := plan.want[1].spec
	for _, c := range []struct {
		what      string
		got, want any
	}{
		{"cmd", s.Cmd, []string{"/usr/bin/apache2", "-D", "FOREGROUND mode", `a "b"`, "c d"}},
		{"env", s.Env, []string{"A=1", "FOO=bar"}},
		{"binds", s.Binds, []string{"/host/path:/mount/point", "/host/ro:/mount/ro:ro", "/local/nginx.conf:/etc/nginx/nginx.conf"}},
		{"devices", s.Devices, []string{"/dev/sda:/dev/xvda:rwm", "/dev/xvdf:/dev/xvdf:r"}},
		{"memory", s.Memory, int64(512 << 20)},
		{"cpuset", s.CpusetCpus, "0-3"},
		{"port 5000", s.Ports["5000/tcp"].HostIP + ":" + s.Ports["5000/tcp"].HostPort, "127.0.0.1:5001"},
		{"port 80", s.Ports["80/tcp"].HostIP + ":" + s.Ports["80/tcp"].HostPort, "0.0.0.0:6667"},
		{"port 53", s.Ports["53/udp"].HostPort, ""},
	} {
		g, _ := json.Marshal(c.got)
		w, _ := json.Marshal(c.want)
		if string(g) != string(w) {
			t.Errorf("%s: %s, want %s", c.what, g, w)
		}
	}
	// The label is stable: the same parameters give the same configuration.
	again, _ := parseRunning(p, nil, "")
	if again.want[1].spec.encode() != s.encode() {
		t.Fatal("the configuration label is not deterministic")
	}
	// Objects are read like key/value lists.
	p2, _ := parseParams(json.RawMessage(`{"container": "web", "image": "app", "environment": {"FOO": "bar", "A": "1"}, "port_bindings": {"80": 8080}}`))
	plan2, err := parseRunning(p2, nil, "")
	if err != nil || !slices.Equal(plan2.want[0].spec.Env, []string{"A=1", "FOO=bar"}) || plan2.want[0].spec.Ports["80/tcp"].HostPort != "8080" {
		t.Fatalf("objects: %+v %v", plan2, err)
	}
}

func TestDockerMemAndCPU(t *testing.T) {
	for in, want := range map[string]int64{"": 0, "1024": 1024, "512m": 512 << 20, "2G": 2 << 30, "64k": 64 << 10, "100b": 100} {
		if got, err := memLimit(in); err != nil || got != want {
			t.Errorf("memLimit(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"lots", "12q", "-5m"} {
		if _, err := memLimit(bad); err == nil {
			t.Errorf("memLimit(%q) accepted", bad)
		}
	}
	if n, set, err := cpuParam("512"); n != 512 || set != "" || err != nil {
		t.Errorf("shares: %d %q %v", n, set, err)
	}
	if n, set, err := cpuParam("0,2-3"); n != 0 || set != "0,2-3" || err != nil {
		t.Errorf("cpuset: %d %q %v", n, set, err)
	}
	if _, _, err := cpuParam("half"); err == nil {
		t.Error("cpu_shares half accepted")
	}
}

func TestDockerImageRefs(t *testing.T) {
	for _, c := range []struct{ image, tag, want, fails string }{
		{"nginx", "", "nginx:latest", ""},
		{"nginx", "1.25", "nginx:1.25", ""},
		{"ns/app:2", "", "ns/app:2", ""},
		{"ns/app:2", "2", "ns/app:2", ""},
		{"localhost:5000/app", "", "localhost:5000/app:latest", ""},
		{"reg:5000/app:v1", "", "reg:5000/app:v1", ""},
		{"app@sha256:" + strings.Repeat("a", 64), "", "app@sha256:" + strings.Repeat("a", 64), ""},
		{"ns/app:2", "3", "", "give the tag once"},
		{"Bad/Name", "", "", "not a valid image name"},
		{"app", "bad tag", "", "not a valid tag"},
	} {
		raw, _ := json.Marshal(map[string]string{"image": c.image, "tag": c.tag})
		p, _ := parseParams(raw)
		ref, err := parseImageRef(p, "image", "tag")
		switch {
		case c.fails != "":
			if err == nil || !strings.Contains(err.Error(), c.fails) {
				t.Errorf("%s %s: %v, want %q", c.image, c.tag, err, c.fails)
			}
		case err != nil || ref.String() != c.want:
			t.Errorf("%s %s: %s %v, want %s", c.image, c.tag, ref, err, c.want)
		}
	}
}

func TestDockerignore(t *testing.T) {
	rules, err := parseDockerignore("# comment\n*.log\n!keep.log\nbuild/\n**/tmp\ndocs/*.md\n/abs\n")
	if err != nil {
		t.Fatal(err)
	}
	for rel, want := range map[string]bool{
		"a.log": true, "keep.log": false, "sub/a.log": false, // *.log is one level, as docker's
		"build": true, "build/x/y": true, "src/tmp": true, "tmp": true, "a/b/tmp/c": true,
		"docs/x.md": true, "docs/sub/x.md": false, "abs": true, "main.go": false,
	} {
		if got := ignored(rules, rel); got != want {
			t.Errorf("ignored(%q) = %v, want %v", rel, got, want)
		}
	}
	if _, err := parseDockerignore("[abc\n"); err == nil {
		t.Error("an unterminated class was accepted")
	}
}

func TestDockerBadParametersFailNamingThem(t *testing.T) {
	root := t.TempDir()
	fr, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	e := New(Options{Root: fr})
	for _, c := range []struct{ module, param, want string }{
		{"linux.docker.running", `{"image": "app"}`, "parameter container: is required"},
		{"linux.docker.running", `{"container": "x", "image": "app"}`, `parameter container: "x" is not a container name`},
		{"linux.docker.running", `{"container": "web", "image": "app", "count": "-1"}`, "parameter count: must be between 0 and 1000"},
		{"linux.docker.running", `{"container": "web", "image": "app", "volumes": [{"key": "/h", "value": "rel"}]}`, "the container path must be absolute"},
		{"linux.docker.running", `{"container": "web", "image": "app", "volumes": [{"key": "/h", "value": "/c:rx"}]}`, "the mode after the container path is ro or rw"},
		{"linux.docker.running", `{"container": "web", "image": "app", "port_bindings": {"http": "80"}}`, "the container port must be a port number"},
		{"linux.docker.running", `{"container": "web", "image": "app", "command": "unterminated 'quote"}`, "unterminated ' quote"},
		{"linux.docker.running", `{"container": "web", "image": "app", "devices": {"/dev/sda": "/dev/xvda:rwx"}}`, "parameter devices./dev/sda"},
		{"linux.docker.pulled", `{"repo": "app", "username": "u"}`, "parameter password: is required when a username is given"},
		{"linux.docker.pulled", `{"repo": "app", "password": "p"}`, "parameter username: is required when a password is given"},
		{"linux.docker.pulled", `{"repo": "app", "containers": ["ok-name", "bad name"]}`, "parameter containers[1]"},
		{"linux.docker.built", `{"tag": "app", "path": "/nowhere"}`, "/nowhere does not exist"},
		{"linux.docker.built", `{"tag": "app", "path": "relative"}`, "must be an absolute path"},
		{"linux.docker.pushed", `{"repository": "app@sha256:` + strings.Repeat("a", 64) + `"}`, "must be a name[:tag], not a digest"},
		{"linux.docker.deploy", `{"container": "web", "image": "app", "files": [{"key": "relative", "value": "x"}]}`, "the key must be the absolute path"},
	} {
		res := e.Execute(context.Background(), state.Request{StateID: "s", Module: c.module, Parameter: json.RawMessage(c.param)})
		if res.OK || !strings.Contains(res.Comment, c.want) || !strings.HasPrefix(res.Comment, c.module+": ") {
			t.Errorf("%s %s: %q, want %q", c.module, c.param, res.Comment, c.want)
		}
	}
}

func TestDockerTooOldEngineFailsWithoutInstallingAnything(t *testing.T) {
	root := t.TempDir()
	sock := filepath.Join(root, "var/run/docker.sock")
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", sock, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Api-Version", "1.24") // Docker 1.12
		_, _ = w.Write([]byte("OK"))
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	fr, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	runs := &recordingRunner{Runner: proc.New()}
	e := New(Options{Root: fr, Runner: runs})
	res := e.Execute(context.Background(), state.Request{StateID: "s", Module: "linux.docker.running", Parameter: json.RawMessage(`{"container": "web", "image": "app"}`)})
	if res.OK || !strings.Contains(res.Comment, "the Docker engine is too old: it speaks API 1.24; at least 1.30 (Docker 17.06) is needed: upgrade it") {
		t.Fatalf("%+v", res)
	}
	if runs.Mark() != 0 {
		t.Fatalf("ran %v", runs.Since(0))
	}
}
