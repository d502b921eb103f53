package backend

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

// handshake sends a Handshake with exactly the given identity.
func (e *env) handshake(id protocol.Identity) *agent {
	e.t.Helper()
	a := e.dial()
	a.send(&protocol.Handshake{Identity: id})
	return a
}

// expectClose reads until the backend closes, and checks code and reason.
func (a *agent) expectClose(code int, reason string) {
	a.t.Helper()
	m, err := a.next()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != code || !strings.Contains(ce.Text, reason) {
		a.t.Fatalf("got %#v, %v; want close %d containing %q", m, err, code, reason)
	}
}

func (a *agent) expectRecipe() *protocol.RecipeMetadata {
	a.t.Helper()
	m := a.expect()
	r, ok := m.(*protocol.RecipeMetadata)
	if !ok {
		a.t.Fatalf("got %#v, want the recipe", m)
	}
	return r
}

// instances is GET /api/apps/{app}/instances as instance id → connected.
func (e *env) instances(app string) map[string]bool {
	e.t.Helper()
	_, out := e.api("GET", "/api/apps/"+app+"/instances", "")
	got := map[string]bool{}
	for _, in := range out["instances"].([]any) {
		in := in.(map[string]any)
		got[in["instance_id"].(string)] = in["connected"].(bool)
	}
	return got
}

func TestEnrollmentSecretCreatedWithTheApp(t *testing.T) {
	e := newEnv(t, "", nil)
	if code, _ := e.api("GET", "/api/apps/app1/enrollment", ""); code != 404 {
		t.Errorf("enrollment of a missing app: %d", code)
	}
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	code, out := e.api("GET", "/api/apps/app1/enrollment", "")
	secret, _ := out["enrollment_secret"].(string)
	if raw, err := hex.DecodeString(secret); code != 200 || out["app_id"] != "app1" || err != nil || len(raw) != 32 {
		t.Fatalf("enrollment: %d %v", code, out)
	}
	if data, err := e.kvGet(bucketSecrets, "app1"); err != nil || string(data) != secret {
		t.Errorf("bucket %s holds %q (%v), API says %q", bucketSecrets, data, err, secret)
	}
	// A second recipe does not replace it.
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	if e.secret("app1") != secret {
		t.Error("the secret changed with a new recipe")
	}
}

func TestFirstHandshakeNeedsTheEnrollmentSecret(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	for _, wrong := range []string{"", flipFirst(secret), secret + "0", strings.ToUpper(secret)} {
		a := e.handshake(identity("i-new", "app1", tok("t"), "2.1", wrong))
		a.expectClose(websocket.ClosePolicyViolation, "enrollment secret missing or wrong (set [userdata] enroll_secret")
	}
	if got := e.instances("app1"); len(got) != 0 {
		t.Fatalf("refused handshakes enrolled instances: %v", got)
	}
	a := e.handshake(identity("i-new", "app1", tok("t"), "2.1", secret))
	a.expectRecipe()
	a.ws.Close()
	// Enrolled: the instance token identifies it from now on, secret or not.
	e.handshake(identity("i-new", "app1", tok("t"), "2.1", "")).expectRecipe()
	e.handshake(identity("i-new", "app1", tok("x"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "token mismatch")
}

func TestRotateKeepsEnrolledInstances(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	old := e.secret("app1")
	e.handshake(identity("i-1", "app1", tok("1"), "2.1", old)).expectRecipe()
	code, out := e.api("POST", "/api/apps/app1/enrollment/rotate", "")
	if code != 200 || out["enrollment_secret"] == old || out["app_id"] != "app1" {
		t.Fatalf("rotate: %d %v", code, out)
	}
	fresh := out["enrollment_secret"].(string)
	if e.secret("app1") != fresh {
		t.Fatal("GET does not return the rotated secret")
	}
	e.handshake(identity("i-2", "app1", tok("2"), "2.1", old)).expectClose(websocket.ClosePolicyViolation, "enrollment secret")
	e.handshake(identity("i-2", "app1", tok("2"), "2.1", fresh)).expectRecipe()
	e.handshake(identity("i-1", "app1", tok("1"), "2.1", "")).expectRecipe()
	// The rotation survives a restart.
	e.stop()
	e2 := newEnv(t, e.dir, nil)
	if e2.secret("app1") != fresh {
		t.Error("rotated secret lost across a restart")
	}
	e = e2
	if code, _ := e.api("POST", "/api/apps/ghost/enrollment/rotate", "{}"); code != 404 {
		t.Errorf("rotate a missing app: %d", code)
	}
	if code, out := e.api("POST", "/api/apps/app1/enrollment/rotate", `{"x":1}`); code != 400 {
		t.Errorf("rotate with a body: %d %v", code, out)
	}
}

func TestAppsLoadedWithoutASecretGetOne(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	e.api("PUT", "/api/apps/app2/recipe", recipeJSON)
	kept := e.secret("app2")
	// app1 as a crash between its parts (or an import of an app from
	// before enrollment secrets) left it.
	kv, err := e.srv.st.js.KeyValue(context.Background(), bucketSecrets)
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Purge(context.Background(), "app1"); err != nil {
		t.Fatal(err)
	}
	e.stop()
	e2 := newEnv(t, dir, nil)
	secret := e2.secret("app1")
	if len(secret) != 64 {
		t.Fatalf("app1 secret after load: %q", secret)
	}
	if data, err := e2.kvGet(bucketSecrets, "app1"); err != nil || string(data) != secret {
		t.Fatalf("created secret: %q %v", data, err)
	}
	if e2.secret("app2") != kept {
		t.Error("an existing secret was replaced at load")
	}
	e2.handshake(identity("i-1", "app1", tok("1"), "2.1", "")).expectClose(websocket.ClosePolicyViolation, "enrollment secret")
}

func TestOpenEnrollment(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.OpenEnrollment = true })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	e.handshake(identity("i-1", "app1", tok("1"), "2.1", "")).expectRecipe()
	e.handshake(identity("i-2", "app1", tok("2"), "2.1", "anything")).expectRecipe()
}

func TestHandshakeIdentityLimits(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	ok := func(instance, token string) protocol.Identity {
		return identity(instance, "app1", token, "2.1", secret)
	}
	cases := []struct {
		name   string
		id     protocol.Identity
		reason string
	}{
		{"instance too long", ok(strings.Repeat("i", 129), tok("t")), "instance_id"},
		{"instance leading dash", ok("-i", tok("t")), "instance_id"},
		{"instance slash", ok("i/../x", tok("t")), "instance_id"},
		{"instance space", ok("i 1", tok("t")), "instance_id"},
		{"instance non-ascii", ok("i-é", tok("t")), "instance_id"},
		{"app id", identity("i-1", "app 1", tok("t"), "2.1", secret), "app_id"},
		{"no token", ok("i-1", ""), "instance_token"},
		{"token short", ok("i-1", strings.Repeat("t", 15)), "instance_token: must be 16 to 512 bytes, got 15"},
		{"token long", ok("i-1", strings.Repeat("t", 513)), "instance_token: must be 16 to 512 bytes, got 513"},
		{"secret long", identity("i-1", "app1", tok("t"), "2.1", strings.Repeat("s", 257)), "enrollment_secret: at most 256 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.handshake(tc.id).expectClose(websocket.ClosePolicyViolation, tc.reason)
		})
	}
	if got := e.instances("app1"); len(got) != 0 {
		t.Fatalf("refused handshakes enrolled instances: %v", got)
	}
	// The limits themselves are accepted.
	e.handshake(ok(strings.Repeat("i", 128), strings.Repeat("t", 16))).expectRecipe()
	e.handshake(ok("i-0abc:eu-west-1.x_y", strings.Repeat("t", 512))).expectRecipe()
}

func TestCloseReasonFitsAFrame(t *testing.T) {
	if len(enrollReason) > maxCloseReason {
		t.Errorf("enrollReason is %d bytes", len(enrollReason))
	}
	if got := textcut.Prefix(strings.Repeat("é", 100), maxCloseReason); len(got) != 122 || !strings.HasSuffix(got, "é") {
		t.Errorf("textcut.Prefix split a character: %d bytes", len(got))
	}
}

// flipFirst changes the first character, so the result always differs.
func flipFirst(s string) string {
	if s[0] == '0' {
		return "1" + s[1:]
	}
	return "0" + s[1:]
}

// TestEnrollmentLimitPerApp: an app enrolls at most EnrollLimit new
// instances per window; the next one is closed 1013 (the agent comes back
// later). Refused secrets do not use up the quota, known instances are
// never counted, and each app has its own.
func TestEnrollmentLimitPerApp(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) {
		o.EnrollLimit, o.EnrollWindow, o.Logger, o.refusalEvery = 3, time.Hour, logs.logger(), time.Hour
	})
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	e.api("PUT", "/api/apps/app2/recipe", recipeJSON)
	secret := e.secret("app1")
	for i := range 5 {
		e.handshake(identity(fmt.Sprintf("i-bad-%d", i), "app1", tok("b"), "2.1", "wrong")).expectClose(websocket.ClosePolicyViolation, "enrollment secret")
	}
	for i := 1; i <= 3; i++ {
		e.handshake(identity(fmt.Sprintf("i-%d", i), "app1", tok("t"), "2.1", secret)).expectRecipe()
	}
	e.handshake(identity("i-4", "app1", tok("t"), "2.1", secret)).expectClose(websocket.CloseTryAgainLater, "too many new instances for this app (over 3 per 1h0m0s)")
	if got := e.instances("app1"); len(got) != 3 || got["i-4"] {
		t.Fatalf("instances %v, want i-1..i-3 only", got)
	}
	e.handshake(identity("i-1", "app1", tok("t"), "2.1", "")).expectRecipe() // known: not counted
	e.handshake(identity("i-1", "app2", tok("t"), "2.1", e.secret("app2"))).expectRecipe()
	e.srv.refusals.flush()
	if n := logs.count("by_kind.bad_enrollment_secret=5 by_kind.over_enrollment_limit=1"); n != 1 {
		t.Errorf("want one summary of the refusals:\n%s", logs.String())
	}
}

func TestEnrollLimiterRefills(t *testing.T) {
	l := newEnrollLimiter(2, time.Minute)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, s := range []struct {
		at   time.Duration
		app  string
		want bool
	}{
		{0, "a", true}, {0, "a", true}, {0, "a", false}, {0, "b", true}, // a full window's worth at once, per app
		{20 * time.Second, "a", false}, {30 * time.Second, "a", true}, {30 * time.Second, "a", false}, // then at 2 a minute
		{time.Hour, "a", true}, {time.Hour, "a", true}, {time.Hour, "a", false}, // never more than the burst
	} {
		if got := l.allow(s.app, t0.Add(s.at)); got != s.want {
			t.Errorf("at %v, app %s: allow = %v", s.at, s.app, got)
		}
	}
	if !newEnrollLimiter(-1, time.Minute).allow("a", t0) {
		t.Error("a limit of -1 refused")
	}
}

// TestRevokeInstance: DELETE …/instances/{id} forgets the instance's token
// and bars its id (with or without the enrollment secret, any token),
// closes its connection, shows in the listing and survives a restart;
// POST …/admit lets it enroll again.
func TestRevokeInstance(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	a := e.connect("i-1", "app1", "1", "2.1")
	a.expectRecipe()
	b := e.connect("i-2", "app1", "2", "2.1")
	b.expectRecipe()
	code, out := e.api("DELETE", "/api/apps/app1/instances/i-1", "")
	if code != 200 || out["disconnected"] != true || out["revoked_at"] == nil {
		t.Fatalf("DELETE: %d %v", code, out)
	}
	a.expectClose(websocket.ClosePolicyViolation, "instance revoked")
	for _, id := range []protocol.Identity{identity("i-1", "app1", tok("1"), "2.1", ""), identity("i-1", "app1", tok("1"), "2.1", secret),
		identity("i-1", "app1", tok("new"), "2.1", secret)} {
		e.handshake(id).expectClose(websocket.ClosePolicyViolation, "instance revoked")
	}
	b.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-2", AppID: "app1"}})
	if _, ok := b.expect().(*protocol.TestAns); !ok {
		t.Fatal("another instance was disturbed")
	}
	if code, out := e.api("DELETE", "/api/apps/app1/instances/i-1", ""); code != 200 || out["disconnected"] != false {
		t.Errorf("DELETE again: %d %v, want 200 (already revoked)", code, out)
	}
	if code, out := e.api("DELETE", "/api/apps/app1/instances/i-9", ""); code != 404 {
		t.Errorf("DELETE of an instance never enrolled: %d %v", code, out)
	}
	if code, out := e.api("POST", "/api/apps/app1/instances/i-2/admit", "{}"); code != 404 {
		t.Errorf("admit of an instance not revoked: %d %v", code, out)
	}
	e.stop()
	e = newEnv(t, e.dir, nil)
	if in := e.instance("app1", "i-1"); in.RevokedAt == nil || in.Connected {
		t.Fatalf("after a restart i-1 is %+v, want it listed as revoked", in)
	}
	e.handshake(identity("i-1", "app1", tok("1"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "instance revoked")
	if code, out := e.api("POST", "/api/apps/app1/instances/i-1/admit", ""); code != 200 {
		t.Fatalf("admit: %d %v", code, out)
	}
	e.handshake(identity("i-1", "app1", tok("1"), "2.1", "")).expectClose(websocket.ClosePolicyViolation, "enrollment secret")
	e.handshake(identity("i-1", "app1", tok("new"), "2.1", secret)).expectRecipe()
	if in := e.instance("app1", "i-1"); in.RevokedAt != nil {
		t.Errorf("after admission: %+v", in)
	}
}

// TestBadHandshakesLoggedAsOneSummary: 2 000 refused Handshakes of every
// kind, as fast as they come, log nothing one by one; the interval's
// summary counts them all in one line.
func TestBadHandshakesLoggedAsOneSummary(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) { o.Logger, o.refusalEvery = logs.logger(), time.Hour })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	e.connect("i-known", "app1", "k", "2.1").expectRecipe()
	e.connect("i-gone", "app1", "g", "2.1").expectRecipe()
	if code, out := e.api("DELETE", "/api/apps/app1/instances/i-gone", ""); code != 200 {
		t.Fatal(code, out)
	}
	before := len(strings.Split(logs.String(), "\n"))
	kinds := []protocol.Identity{
		identity("i-new", "app1", tok("n"), "2.1", "wrong secret"),   // bad secret
		identity("i-new", "app1", "short", "2.1", secret),            // bad identity
		identity("i-known", "app1", tok("other"), "2.1", secret),     // token mismatch
		identity("i-gone", "app1", tok("g"), "2.1", secret),          // revoked
		identity("i-new", "no-such-app", tok("n"), "2.1", "nothing"), // AppNotReady
	}
	url := "ws" + strings.TrimPrefix(e.http.URL, "http") + "/agent/"
	const total, workers = 2000, 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < total; i += workers {
				ws, _, err := websocket.DefaultDialer.Dial(url, nil)
				if err != nil {
					errs <- err
					return
				}
				frame, _ := protocol.Encode(&protocol.Handshake{Identity: kinds[i%len(kinds)]})
				_ = ws.WriteMessage(websocket.TextMessage, frame)
				_, _, err = ws.ReadMessage() // a close, or AppNotReady
				ws.Close()
				if err != nil && !websocket.IsCloseError(err, websocket.ClosePolicyViolation) {
					errs <- fmt.Errorf("handshake %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// The AppNotReady ones are counted as the backend answers; the client
	// closes as soon as it has read the answer.
	eventually(t, "every refusal counted", func() bool {
		e.srv.refusals.mu.Lock()
		defer e.srv.refusals.mu.Unlock()
		n := 0
		for _, c := range e.srv.refusals.counts {
			n += c
		}
		return n == total
	})
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	for _, l := range lines[before-1:] {
		if !strings.Contains(l, "agent disconnected") { // the two setup agents, closed by their cleanup
			t.Errorf("logged during the refusals: %s", l)
		}
	}
	e.srv.refusals.flush()
	if n := logs.count("total=2000"); n != 1 || logs.count("by_kind.") != 1 {
		t.Fatalf("want exactly one summary line with total=2000:\n%s", logs.String())
	}
	for _, kind := range []string{"bad_enrollment_secret=400", "bad_identity=400", "token_mismatch=400", "revoked=400", "app_unknown=400"} {
		if logs.count(kind) != 1 {
			t.Errorf("summary without %s:\n%s", kind, logs.String())
		}
	}
}
