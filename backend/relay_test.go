package backend

import (
	"testing"

	"github.com/visualops/opsagent/protocol"
)

// Two instances of one app run the same recipe; its meta.wait waits on
// instance b's first state. When b reports that state, the backend releases
// the wait for both, pushes State to both, and a WaitQuery (after a
// reconnect) lists it; a failed StateLog releases nothing.
func TestRelayReleasesWaitsAcrossInstances(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.OpenEnrollment = true })
	recipe := `{"state":[
	  {"id":"s1","module":"linux.cmd","parameter":{"cmd":"true"}},
	  {"id":"w","module":"meta.wait","parameter":{"state":[{"key":"@{i-b.state.s1}"}]}},
	  {"id":"s3","module":"linux.cmd","parameter":{"cmd":"true"}}]}`
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipe); code != 200 {
		t.Fatalf("%d %v", code, out)
	}
	a := e.connect("i-a", "app1", tok("a"), "2.1")
	a.expectRecipe()
	b := e.connect("i-b", "app1", tok("b"), "2.1")
	b.expectRecipe()
	okc, failc := "done", "boom"
	a.send(&protocol.StateLog{InstanceID: "i-a", AppID: "app1", RecipeVersion: 1, StateID: "s1", Result: true, Comment: &okc})
	b.send(&protocol.StateLog{InstanceID: "i-b", AppID: "app1", RecipeVersion: 1, StateID: "s1", Result: false, Comment: &failc})
	b.send(&protocol.StateLog{InstanceID: "i-b", AppID: "app1", RecipeVersion: 1, StateID: "s1", Result: true, Comment: &okc})
	for name, ag := range map[string]*agent{"a": a, "b": b} {
		m, ok := ag.expect().(*protocol.StatePush)
		if !ok || m.StateID != "w" || m.RecipeVersion != 1 {
			t.Fatalf("%s got %#v, want State w", name, m)
		}
	}
	// A WaitQuery lists it too (an agent that was away when it was pushed).
	a.send(&protocol.WaitQuery{InstanceID: "i-a", AppID: "app1", RecipeVersion: 1})
	wl, ok := a.expect().(*protocol.WaitList)
	if !ok || len(wl.Waited) != 1 || wl.Waited[0].StateID != "w" {
		t.Fatalf("WaitList %#v", wl)
	}
	// A new recipe version starts with nothing released.
	if code, _ := e.api("PUT", "/api/apps/app1/recipe", recipe); code != 200 {
		t.Fatal(code)
	}
	a.expectRecipe()
	a.send(&protocol.WaitQuery{InstanceID: "i-a", AppID: "app1", RecipeVersion: 2})
	if wl, ok := a.expect().(*protocol.WaitList); !ok || len(wl.Waited) != 0 {
		t.Fatalf("after a new version: %#v", wl)
	}
}

// TestRelayCountsOnlyTheNamedInstancesRecipeStates: a wait on
// @{i-b.state.X} is released only by i-b reporting success for X, and
// only when X is a state of the app's current recipe. A success for a
// state id the recipe does not have (here "ghost", which a second wait
// names), from the named instance or another, releases nothing.
func TestRelayCountsOnlyTheNamedInstancesRecipeStates(t *testing.T) {
	e := newEnv(t, "", func(o *Options) { o.OpenEnrollment = true })
	recipe := `{"state":[
	  {"id":"s1","module":"linux.cmd","parameter":{"cmd":"true"}},
	  {"id":"w-ghost","module":"meta.wait","parameter":{"state":["@{i-b.state.ghost}"]}},
	  {"id":"w-s1","module":"meta.wait","parameter":{"state":["@{i-b.state.s1}"]}}]}`
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipe); code != 200 {
		t.Fatalf("%d %v", code, out)
	}
	a := e.connect("i-a", "app1", tok("a"), "2.1")
	a.expectRecipe()
	b := e.connect("i-b", "app1", tok("b"), "2.1")
	b.expectRecipe()
	okc := "done"
	success := func(ag *agent, instance, state string, version int64) {
		ag.send(&protocol.StateLog{InstanceID: instance, AppID: "app1", RecipeVersion: version, StateID: state, Result: true, Comment: &okc})
	}
	success(b, "i-b", "ghost", 1) // not in the recipe
	success(a, "i-a", "s1", 1)    // not the named instance
	success(b, "i-b", "s1", 7)    // another recipe version
	success(b, "i-b", "s1", 1)    // the one that counts
	// Frames arrive in order: the first State pushed must be w-s1.
	if m, ok := a.expect().(*protocol.StatePush); !ok || m.StateID != "w-s1" {
		t.Fatalf("first State pushed: %#v, want w-s1 only", m)
	}
	a.send(&protocol.WaitQuery{InstanceID: "i-a", AppID: "app1", RecipeVersion: 1})
	wl, ok := a.expect().(*protocol.WaitList)
	if !ok || len(wl.Waited) != 1 || wl.Waited[0].StateID != "w-s1" {
		t.Fatalf("WaitList %#v, want only w-s1 released", wl)
	}
	e.srv.mu.Lock()
	done := len(e.srv.apps["app1"].relayed)
	e.srv.mu.Unlock()
	if done != 2 {
		t.Errorf("the relay took %d successes, want 2 (i-a/s1, i-b/s1): others must not be kept", done)
	}
}
