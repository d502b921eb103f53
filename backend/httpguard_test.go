package backend

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
)

// status sends req and returns the status and body.
func status(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data)
}

func TestForeignHostRefusedEverywhere(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.AllowedHosts = append(o.AllowedHosts, "Backend.Example") })
	_, port, _ := net.SplitHostPort(e.http.Listener.Addr().String())
	for _, path := range []string{"/api/healthz", "/api/apps", "/agent/", "/nowhere"} {
		for _, host := range []string{"evil.example:" + port, "evil.example", "localhost:" + port, "127.0.0.1:1"} {
			req := e.request("GET", path, "")
			req.Host = host
			code, body := status(t, req)
			if code != http.StatusMisdirectedRequest || !strings.Contains(body, host) || !strings.Contains(body, "--allow-host") {
				t.Errorf("GET %s Host %s: %d %s; want 421 naming the host and --allow-host", path, host, code, body)
			}
		}
		// Configured names are allowed on any port, in any case.
		for _, host := range []string{"backend.example", "BACKEND.example:" + port} {
			req := e.request("GET", path, "")
			req.Host = host
			if code, body := status(t, req); code == http.StatusMisdirectedRequest {
				t.Errorf("GET %s Host %s: %d %s", path, host, code, body)
			}
		}
	}
	// A rebinding page cannot open the agent socket either.
	url := "ws" + strings.TrimPrefix(e.http.URL, "http") + "/agent/"
	_, resp, err := websocket.DefaultDialer.Dial(url, http.Header{"Host": {"evil.example:" + port}})
	if !errors.Is(err, websocket.ErrBadHandshake) || resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("websocket with a foreign Host: %v", err)
	}
}

func TestListenAndServeAllowsItsOwnNames(t *testing.T) {
	srv, err := New(Options{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addrc, done := make(chan net.Addr, 1), make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, "127.0.0.1:0", func(a net.Addr) { addrc <- a }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	addr := (<-addrc).String()
	_, port, _ := net.SplitHostPort(addr)
	other := "1"
	if port == "1" {
		other = "2"
	}
	for host, want := range map[string]int{
		"127.0.0.1:" + port: 200, "localhost:" + port: 200, "[::1]:" + port: 200, "LocalHost:" + port: 200,
		"localhost:" + other: 421, "evil.example:" + port: 421, "127.0.0.1.nip.io:" + port: 421,
	} {
		req, _ := http.NewRequest("GET", "http://"+addr+"/api/healthz", nil)
		req.Host = host
		if code, body := status(t, req); code != want {
			t.Errorf("Host %q: %d %s, want %d", host, code, body, want)
		}
	}
}

func TestHostSetForWildcardListener(t *testing.T) {
	h := newHostSet([]string{"backend.example:8443"}).withListener("0.0.0.0:0", &net.TCPAddr{IP: net.IPv4zero, Port: 8963})
	for host, want := range map[string]bool{
		"10.1.2.3:8963": true, "[fd00::1]:8963": true, "localhost:8963": true, "backend.example:8443": true,
		"10.1.2.3:80": false, "backend.example:8963": false, "evil.example:8963": false, "10.1.2.3": false,
	} {
		if got := h.allows(host); got != want {
			t.Errorf("allows(%q) = %v, want %v", host, got, want)
		}
	}
	// A name without a port matches a Host without one; a port-80 listener
	// matches the portless Host browsers send for it.
	h = newHostSet(nil).withListener("localhost:80", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 80})
	if !h.allows("localhost") || h.allows("evil.example") {
		t.Error("port 80 listener")
	}
}

func TestCrossOriginRefused(t *testing.T) {
	e := newEnv(t, "", nil)
	self := e.http.URL // http://127.0.0.1:port
	for origin, want := range map[string]int{
		"http://evil.example": 403, "null": 403, "https://evil.example:443": 403,
		"http://127.0.0.1:1": 403, "file://": 403, self + "/x": 403,
		self: 200, "": 200,
	} {
		req := e.request("PUT", "/api/apps/app1/recipe", recipeJSON)
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		if code, body := status(t, req); code != want {
			t.Errorf("Origin %q: %d %s, want %d", origin, code, body, want)
		}
	}
	url := "ws" + strings.TrimPrefix(self, "http") + "/agent/"
	_, resp, err := websocket.DefaultDialer.Dial(url, http.Header{"Origin": {"http://evil.example"}})
	if !errors.Is(err, websocket.ErrBadHandshake) || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("websocket from another origin: %v", err)
	}
	// The upgrader checks too (gorilla's default would accept an Origin
	// equal to a foreign Host).
	req, _ := http.NewRequest("GET", "http://evil.example/agent/", nil)
	req.Header.Set("Origin", "http://evil.example")
	if e.srv.up.CheckOrigin == nil || e.srv.up.CheckOrigin(req) {
		t.Error("Upgrader.CheckOrigin accepts a foreign origin")
	}
}

func TestMutatingRoutesNeedJSONContentType(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	n := 0
	for _, rt := range e.srv.apiRoutes() {
		if rt.method != http.MethodPut && rt.method != http.MethodPost {
			continue
		}
		n++
		path := strings.ReplaceAll(rt.pattern, "{app}", "app1")
		for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"} {
			req := e.request(rt.method, path, "{}")
			req.Header.Set("Content-Type", ct)
			if code, body := status(t, req); code != http.StatusUnsupportedMediaType || !strings.Contains(body, "Content-Type: application/json") {
				t.Errorf("%s %s with Content-Type %q: %d %s; want 415 saying what to send", rt.method, path, ct, code, body)
			}
		}
		req := e.request(rt.method, path, "{}")
		req.Header.Set("Content-Type", "Application/JSON; charset=utf-8")
		if code, body := status(t, req); code == http.StatusUnsupportedMediaType {
			t.Errorf("%s %s with a charset: %d %s", rt.method, path, code, body)
		}
	}
	if n < 4 {
		t.Fatalf("only %d mutating routes found", n)
	}
}

func TestBodyMustBeExactlyOneObject(t *testing.T) {
	e := newEnv(t, "", nil)
	for body, want := range map[string]int{
		`{"state":[]} garbage`:        400,
		`{"state":[]}{"state":[]}`:    400,
		`{"state":[]} []`:             400,
		"{\"state\":[]}\n\t ":         200,
		`{"state":[]}`:                200,
		`{"state":[],"unknown":true}`: 400,
	} {
		code, out := e.api("PUT", "/api/apps/app1/recipe", body)
		if code != want {
			t.Errorf("body %q: %d %v, want %d", body, code, out, want)
		}
		if code == 400 && strings.Contains(body, "} ") && !strings.Contains(out["error"].(string), "trailing data") {
			t.Errorf("body %q: %v does not say why", body, out)
		}
	}
	code, out := e.api("POST", "/api/apps/app1/waits", `{"instance_id":"i","state_id":"w"}x`)
	if code != 400 || !strings.Contains(out["error"].(string), "trailing data") {
		t.Errorf("waits with trailing data: %d %v", code, out)
	}
	big := `{"state":[{"id":"a","module":"linux.cmd","parameter":{"x":"` + strings.Repeat("x", maxBody) + `"}}]}`
	if code, out := e.api("PUT", "/api/apps/app1/recipe", big); code != http.StatusRequestEntityTooLarge {
		t.Errorf("oversize body: %d %v", code, out)
	}
}

func TestEveryRouteButHealthzNeedsTheToken(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.APIToken = "s3cret-api-token" })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	var public []string
	for _, rt := range e.srv.apiRoutes() {
		if rt.public {
			public = append(public, rt.method+" "+rt.pattern)
		}
		path := strings.ReplaceAll(rt.pattern, "{app}", "app1")
		for _, auth := range []string{"", "Bearer", "Bearer ", "Bearer wrong", "s3cret-api-token", "Basic s3cret-api-token", "Bearer s3cret-api-token-and-more", "bearer s3cret-api-token", "Bearer s3cret-api-toke"} {
			req := e.request(rt.method, path, "{}")
			req.Header.Set("Authorization", auth)
			code, body := status(t, req)
			if rt.public != (code != http.StatusUnauthorized) {
				t.Errorf("%s %s with Authorization %q: %d %s", rt.method, path, auth, code, body)
			}
		}
		if code, body := status(t, e.request(rt.method, path, "{}")); code == http.StatusUnauthorized {
			t.Errorf("%s %s with the token: %d %s", rt.method, path, code, body)
		}
	}
	if strings.Join(public, ",") != "GET /api/healthz" {
		t.Errorf("public routes %v, want only GET /api/healthz", public)
	}
}

func TestRecipeRefusedByTheProtocolValidator(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	cases := map[string]string{
		`{"state":[{"id":"a","module":"linux.cmd"},{"id":"b","module":"Linux.Cmd"}]}`: "field state[1].module",
		`{"state":[{"id":"a","module":"linux"}]}`:                                     "field state[0].module",
		`{"state":[{"id":"a\u0007","module":"linux.cmd"}]}`:                           "field state[0].id",
		`{"state":[{"id":"` + strings.Repeat("i", 257) + `","module":"linux.cmd"}]}`:  "field state[0].id",
		`{"module":{"repo":"https://x/y.git","tag":"--upload-pack=x"},"state":[]}`:    "field module.tag",
	}
	for body, want := range cases {
		code, out := e.api("PUT", "/api/apps/app1/recipe", body)
		if code != 400 || !strings.Contains(out["error"].(string), want) {
			t.Errorf("%.60s: %d %v, want 400 naming %s", body, code, out, want)
		}
	}
	if _, out := e.api("GET", "/api/apps/app1/recipe", ""); out["recipe_version"].(float64) != 1 {
		t.Errorf("a refused recipe was stored: %v", out)
	}
	if code, out := e.api("PUT", "/api/apps/app1/recipe", `{"state":[{"id":"ok","module":"common.git-repo.latest"}]}`); code != 200 {
		t.Errorf("valid recipe: %d %v", code, out)
	}
}

func TestSplitHost(t *testing.T) {
	// splitHost is what both Host and Origin checks rest on.
	for in, want := range map[string]string{
		"LocalHost:80": "localhost|80", "[::1]:8963": "::1|8963", "[::1]": "::1|", "example.com": "example.com|", "": "|",
	} {
		h, p := splitHost(in)
		if got := h + "|" + p; got != want {
			t.Errorf("splitHost(%q) = %s, want %s", in, got, want)
		}
	}
}
