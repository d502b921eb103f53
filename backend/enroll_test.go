package backend

import (
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
	path := filepath.Join(e.dir, "apps", "app1", "enroll.secret")
	info, err := os.Stat(path)
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v %v, want mode 0600", path, info, err)
	}
	if data, _ := os.ReadFile(path); strings.TrimSpace(string(data)) != secret {
		t.Errorf("file holds %q, API says %q", data, secret)
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
	// app1 as a backend from before enrollment secrets left it.
	if err := os.Remove(filepath.Join(dir, "apps", "app1", "enroll.secret")); err != nil {
		t.Fatal(err)
	}
	e.stop()
	e2 := newEnv(t, dir, nil)
	secret := e2.secret("app1")
	if len(secret) != 64 {
		t.Fatalf("app1 secret after load: %q", secret)
	}
	info, err := os.Stat(filepath.Join(dir, "apps", "app1", "enroll.secret"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("created secret: %v %v", info, err)
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
