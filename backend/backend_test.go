package backend

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

type env struct {
	t     testing.TB
	dir   string
	srv   *Server
	http  *httptest.Server
	token string // the API token the requests carry (none when "")
	halt  func() // stops the server (idempotent); a restart on the same dir needs it first
	// readTimeout bounds each read of its agents (default 5 s).
	readTimeout time.Duration
}

// newEnv serves a Server on a loopback httptest server. The listener is
// made first so that its address can be an allowed host (Handler on its
// own knows no listen address).
func newEnv(t testing.TB, dir string, tweak func(*Options)) *env {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{DataDir: dir, AllowedHosts: []string{ln.Addr().String()}}
	// OPSAGENT_TEST_BACKEND_LOG=1 shows the backend's log (debugging).
	if os.Getenv("OPSAGENT_TEST_BACKEND_LOG") != "" {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if tweak != nil {
		tweak(&opts)
	}
	srv, err := New(opts)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	hs := &httptest.Server{Listener: ln, Config: &http.Server{Handler: srv.Handler()}}
	hs.Start()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			srv.CloseAgents()
			hs.Close()
			if err := srv.Close(); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(stop)
	token := opts.APIToken
	if token == "" {
		token = readTokenFile(t, srv.APITokenFile())
	}
	return &env{t: t, dir: dir, srv: srv, http: hs, token: token, halt: stop}
}

// stop ends a Server as a shutdown would, so the data dir can be reopened.
func (e *env) stop() { e.halt() }

// kvGet reads a key of one of the backend's buckets straight from NATS.
func (e *env) kvGet(bucket, key string) ([]byte, error) {
	e.t.Helper()
	kv, err := e.srv.st.js.KeyValue(context.Background(), bucket)
	if err != nil {
		e.t.Fatal(err)
	}
	entry, err := kv.Get(context.Background(), key)
	if err != nil {
		return nil, err
	}
	return entry.Value(), nil
}

// readTokenFile is what a client does with <data>/api-token.
func readTokenFile(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

// request is a well-formed API call: JSON Content-Type on PUT/POST and the
// API token (unless a test cleared e.token).
func (e *env) request(method, path, body string) *http.Request {
	e.t.Helper()
	req, err := http.NewRequest(method, e.http.URL+path, strings.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if method == http.MethodPut || method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json")
	}
	if e.token != "" {
		req.Header.Set("Authorization", "Bearer "+e.token)
	}
	return req
}

func (e *env) api(method, path, body string) (int, map[string]any) {
	e.t.Helper()
	return e.do(e.request(method, path, body))
}

func (e *env) do(req *http.Request) (int, map[string]any) {
	e.t.Helper()
	method, path := req.Method, req.URL.Path
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(data, &out); err != nil {
		e.t.Fatalf("%s %s: answer is not JSON: %q", method, path, data)
	}
	return resp.StatusCode, out
}

const recipeJSON = `{"module":{"repo":"https://example.com/states.git","tag":"v1"},
 "state":[{"id":"s1","module":"linux.cmd","parameter":{"cmd":"true"}},{"id":"w1","module":"meta.wait","parameter":{}}]}`

type agent struct {
	t  testing.TB
	ws *websocket.Conn
	// timeout bounds each read (default 5 s).
	timeout time.Duration
}

// tok makes a test token long enough for the backend's 16-byte minimum.
func tok(s string) string { return s + "-token-0123456789" }

// secret is the app's enrollment secret, or "" when the app does not exist.
func (e *env) secret(app string) string {
	e.t.Helper()
	code, out := e.api("GET", "/api/apps/"+app+"/enrollment", "")
	if code != http.StatusOK {
		return ""
	}
	return out["enrollment_secret"].(string)
}

// dial opens an agent socket without sending anything.
func (e *env) dial() *agent {
	e.t.Helper()
	url := "ws" + strings.TrimPrefix(e.http.URL, "http") + "/agent/"
	ws, _, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ws.Close() })
	return &agent{t: e.t, ws: ws, timeout: e.readTimeout}
}

// connect handshakes as a well-behaved agent: with the app's enrollment
// secret, and tok(token) as its token.
func (e *env) connect(instance, app, token, version string) *agent {
	e.t.Helper()
	a := e.dial()
	a.send(&protocol.Handshake{Identity: identity(instance, app, tok(token), version, e.secret(app))})
	return a
}

func identity(instance, app, token, version, secret string) protocol.Identity {
	return protocol.Identity{InstanceID: instance, AppID: app, AgentVersion: version, ProtocolVersion: 1, InstanceToken: token, EnrollmentSecret: secret}
}

func (a *agent) send(m protocol.Message) {
	a.t.Helper()
	frame, err := protocol.Encode(m)
	if err != nil {
		a.t.Fatal(err)
	}
	if err := a.ws.WriteMessage(websocket.TextMessage, frame); err != nil {
		a.t.Fatal(err)
	}
}

func (a *agent) next() (protocol.Message, error) {
	timeout := a.timeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	_ = a.ws.SetReadDeadline(time.Now().Add(timeout))
	_, data, err := a.ws.ReadMessage()
	if err != nil {
		return nil, err
	}
	return protocol.Decode(data)
}

func (a *agent) expect() protocol.Message {
	a.t.Helper()
	m, err := a.next()
	if err != nil {
		a.t.Fatalf("agent read: %v", err)
	}
	return m
}

func TestUnknownAppGetsAppNotReady(t *testing.T) {
	e := newEnv(t, "", nil)
	a := e.connect("i-1", "nope", "tok", "2.1")
	if _, ok := a.expect().(*protocol.AppNotReady); !ok {
		t.Fatal("want AppNotReady")
	}
	// The connection stays; once the app exists a new Handshake succeeds.
	if code, _ := e.api("PUT", "/api/apps/nope/recipe", recipeJSON); code != 200 {
		t.Fatalf("put recipe: %d", code)
	}
	a.send(&protocol.Handshake{Identity: identity("i-1", "nope", tok("tok"), "2.1", e.secret("nope"))})
	if r, ok := a.expect().(*protocol.RecipeMetadata); !ok || r.RecipeVersion != 1 {
		t.Fatalf("want the recipe, got %#v", r)
	}
}

func TestRecipePushToConnectedAndLateAgents(t *testing.T) {
	e := newEnv(t, "", nil)
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 || out["recipe_version"].(float64) != 1 {
		t.Fatalf("put: %d %v", code, out)
	}
	a := e.connect("i-1", "app1", "tok1", "2.1")
	r := a.expect().(*protocol.RecipeMetadata)
	if r.RecipeVersion != 1 || len(r.States) != 2 || r.Module.Tag != "v1" {
		t.Fatalf("recipe %+v", r)
	}
	code, out := e.api("PUT", "/api/apps/app1/recipe", `{"state":[{"stateid":"x","module":"meta.comment"}]}`)
	if code != 200 || out["recipe_version"].(float64) != 2 || out["pushed_to"].(float64) != 1 {
		t.Fatalf("second put: %d %v", code, out)
	}
	r = a.expect().(*protocol.RecipeMetadata)
	if r.RecipeVersion != 2 || r.States[0].ID != "x" || r.Module != nil {
		t.Fatalf("pushed %+v", r)
	}
	late := e.connect("i-2", "app1", "tok2", "2.1")
	if r := late.expect().(*protocol.RecipeMetadata); r.RecipeVersion != 2 {
		t.Fatalf("late agent got version %d", r.RecipeVersion)
	}
}

func TestTokenTrustOnFirstUse(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "good", "2.1")
	a.expect()
	a.ws.Close()
	bad := e.connect("i-1", "app1", "evil", "2.1")
	_, err := bad.next()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.ClosePolicyViolation || !strings.Contains(ce.Text, "token") {
		t.Fatalf("mismatched token: %v, want close 1008", err)
	}
	// The store holds a hash, never the token.
	data, err := e.kvGet(bucketInstances, instanceKey("app1", "i-1"))
	if err != nil || bytes.Contains(data, []byte("good")) || !bytes.Contains(data, []byte(hashToken(tok("good")))) {
		t.Errorf("token storage: %s %v", data, err)
	}
	ok := e.connect("i-1", "app1", "good", "2.1")
	if _, isRecipe := ok.expect().(*protocol.RecipeMetadata); !isRecipe {
		t.Fatal("the right token is refused")
	}
}

func TestStateLogsStoredAndServed(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expect()
	comment := "File /x updated"
	for i, id := range []string{"s1", "s2", "s3"} {
		a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: id, Result: i != 1, Comment: &comment})
	}
	// A StateLog claiming another instance is ignored.
	a.send(&protocol.StateLog{InstanceID: "i-9", AppID: "app1", RecipeVersion: 1, StateID: "forged", Result: true})
	var logs []any
	deadline := time.Now().Add(5 * time.Second)
	for len(logs) < 3 && time.Now().Before(deadline) {
		_, out := e.api("GET", "/api/apps/app1/logs", "")
		logs = out["logs"].([]any)
		time.Sleep(10 * time.Millisecond)
	}
	if len(logs) != 3 {
		t.Fatalf("logs %v", logs)
	}
	_, out := e.api("GET", "/api/apps/app1/logs?after=1&limit=1", "")
	page := out["logs"].([]any)
	if len(page) != 1 || page[0].(map[string]any)["state_id"] != "s2" || out["next"].(float64) != 2 {
		t.Fatalf("page %v", out)
	}
	// The listing's summary follows the StateLogs' storage closely.
	eventually(t, "the listing shows the last StateLog", func() bool {
		_, out = e.api("GET", "/api/apps/app1/instances", "")
		inst := out["instances"].([]any)[0].(map[string]any)
		last, _ := inst["last_state_log"].(map[string]any)
		return last != nil && last["state_id"] == "s3"
	})
	inst := out["instances"].([]any)[0].(map[string]any)
	if inst["instance_id"] != "i-1" || inst["connected"] != true || inst["agent_version"] != "2.1" {
		t.Fatalf("instances %v", out)
	}
}

func TestWaitsRememberedAndRepushed(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expect()
	code, out := e.api("POST", "/api/apps/app1/waits", `{"instance_id":"i-1","state_id":"w1"}`)
	if code != 200 || out["pushed"] != true {
		t.Fatalf("wait: %d %v", code, out)
	}
	if p := a.expect().(*protocol.StatePush); p.StateID != "w1" || p.RecipeVersion != 1 {
		t.Fatalf("push %+v", p)
	}
	a.send(&protocol.WaitQuery{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1})
	wl := a.expect().(*protocol.WaitList)
	if len(wl.Waited) != 1 || wl.Waited[0].StateID != "w1" {
		t.Fatalf("waitlist %+v", wl)
	}
	a.ws.Close()
	b := e.connect("i-1", "app1", "tok", "2.1")
	b.expect() // recipe
	if p := b.expect().(*protocol.StatePush); p.StateID != "w1" {
		t.Fatalf("re-push %+v", p)
	}
	// A new recipe version forgets the waits.
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	b.expect()
	b.send(&protocol.WaitQuery{InstanceID: "i-1", AppID: "app1", RecipeVersion: 2})
	if wl := b.expect().(*protocol.WaitList); len(wl.Waited) != 0 {
		t.Fatalf("waits survived a new recipe: %+v", wl)
	}
}

func TestUpdatePushedWhenVersionDiffers(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	old := e.connect("i-1", "app1", "t1", "2.1")
	old.expect()
	cur := e.connect("i-2", "app1", "t2", "2.2")
	cur.expect()
	code, out := e.api("POST", "/api/apps/app1/update", `{"version":"2.2","url":"http://127.0.0.1/2.2/opsagent.tgz"}`)
	if code != 200 || out["pushed_to"].(float64) != 1 {
		t.Fatalf("update: %d %v", code, out)
	}
	if u := old.expect().(*protocol.AgentUpdate); u.Version != "2.2" {
		t.Fatalf("update %+v", u)
	}
	old.ws.Close()
	again := e.connect("i-1", "app1", "t1", "2.1")
	again.expect()
	if _, ok := again.expect().(*protocol.AgentUpdate); !ok {
		t.Fatal("update not re-sent at Handshake")
	}
}

func TestBadFramesIgnoredOversizeClosed(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.MaxFrame = 4096 })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expect()
	_ = a.ws.WriteMessage(websocket.TextMessage, []byte("garbage"))
	_ = a.ws.WriteMessage(websocket.TextMessage, []byte(`{"code":"StateLog"}`))
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if ans, ok := a.expect().(*protocol.TestAns); !ok || !ans.Result {
		t.Fatalf("connection did not survive bad frames: %#v", ans)
	}
	_ = a.ws.WriteMessage(websocket.TextMessage, bytes.Repeat([]byte("x"), 8192))
	_, err := a.next()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.CloseMessageTooBig || !strings.Contains(ce.Text, "limited to 4096 bytes") {
		t.Fatalf("oversize frame: %v, want close 1009 naming the limit", err)
	}
}

func TestPersistenceAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expect()
	a.send(&protocol.StateLog{InstanceID: "i-1", AppID: "app1", RecipeVersion: 1, StateID: "s1", Result: true})
	e.api("POST", "/api/apps/app1/waits", `{"instance_id":"i-1","state_id":"w1"}`)
	eventually(t, "the StateLog stored", func() bool {
		_, out := e.api("GET", "/api/apps/app1/logs", "")
		return len(out["logs"].([]any)) == 1
	})
	secret := e.secret("app1")
	e.stop()

	e2 := newEnv(t, dir, nil)
	code, out := e2.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	if code != 200 || out["recipe_version"].(float64) != 2 {
		t.Fatalf("version after restart: %v", out)
	}
	_, out = e2.api("GET", "/api/apps/app1/logs", "")
	if n := len(out["logs"].([]any)); n != 1 {
		t.Fatalf("logs after restart: %v", out)
	}
	if e2.secret("app1") != secret {
		t.Error("enrollment secret changed across restart")
	}
	e2.connect("i-1", "app1", "other", "2.1").expectClose(websocket.ClosePolicyViolation, "token mismatch")
}

func TestAPIErrors(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	cases := []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"PUT", "/api/apps/app1/recipe", ``, 400, "empty body"},
		{"PUT", "/api/apps/app1/recipe", `[]`, 400, "JSON object"},
		{"PUT", "/api/apps/app1/recipe", `{"state":{}}`, 400, "field state"},
		{"PUT", "/api/apps/app1/recipe", `{"module":{"repo":"r"}}`, 400, "field state: missing"},
		{"PUT", "/api/apps/app1/recipe", `{"state":[{"module":"linux.cmd"}]}`, 400, "field state[0].id"},
		{"PUT", "/api/apps/app1/recipe", `{"state":[{"id":"a","module":"x","parameter":[]}]}`, 400, "field state[0].parameter"},
		{"PUT", "/api/apps/app1/recipe", `{"module":{"repo":"r"},"state":[]}`, 400, "field module.tag"},
		{"PUT", "/api/apps/app1/recipe", `{"state":[],"extra":1}`, 400, "unknown field"},
		{"PUT", "/api/apps/bad%20id/recipe", `{"state":[]}`, 400, "app id"},
		{"GET", "/api/apps/ghost/instances", ``, 404, "does not exist"},
		{"POST", "/api/apps/app1/waits", `{"instance_id":"i"}`, 400, "field state_id"},
		{"POST", "/api/apps/app1/waits", `{"instance_id":5,"state_id":"w"}`, 400, "field instance_id"},
		{"POST", "/api/apps/app1/update", `{"url":"http://x"}`, 400, "field version"},
		{"POST", "/api/apps/app1/update", `{"version":"2.2","url":"ftp://x"}`, 400, "field url"},
		{"GET", "/api/apps/app1/logs?after=-1", ``, 400, "after"},
		{"GET", "/api/apps/app1/logs?limit=0", ``, 400, "limit"},
		{"DELETE", "/api/apps/app1/recipe", ``, 405, ""},
		{"GET", "/api/nothing", ``, 404, "no such endpoint"},
	}
	for _, tc := range cases {
		t.Run(tc.method+" "+tc.path+" "+tc.body, func(t *testing.T) {
			resp, err := http.DefaultClient.Do(e.request(tc.method, tc.path, tc.body))
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.code || !strings.Contains(string(data), tc.want) {
				t.Errorf("%d %s; want %d containing %q", resp.StatusCode, data, tc.code, tc.want)
			}
		})
	}
}
