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
