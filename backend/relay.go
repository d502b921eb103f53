package backend

import (
	"encoding/json"
	"regexp"
	"slices"

	"github.com/visualops/opsagent/protocol"
)

// The backend relays waits between the instances of an app: a meta.wait
// state whose parameter names other states as "@{<instance id>.state.<state
// id>}" (the IDE's reference form, with the instance id as the component)
// is released, for every instance of the app, once each of those states
// has succeeded in the current recipe version, as reported by the named
// instance itself for a state of that recipe. Waits the backend releases
// itself are kept under allInstances; POST /api/apps/{app}/waits still
// releases a wait for one instance by hand.
const allInstances = "*"

var refPattern = regexp.MustCompile(`^@\{([A-Za-z0-9][A-Za-z0-9._:-]*)\.state\.([^{}]+)\}$`)

// waitRefs reads a meta.wait's "state" parameter: a list of references,
// each a string or {"key": reference} as the IDE sends lists.
func waitRefs(param json.RawMessage) [][2]string {
	var p struct {
		State []json.RawMessage `json:"state"`
	}
	if json.Unmarshal(param, &p) != nil {
		return nil
	}
	var out [][2]string
	for _, raw := range p.State {
		var s string
		if json.Unmarshal(raw, &s) != nil {
			var kv struct {
				Key string `json:"key"`
			}
			if json.Unmarshal(raw, &kv) != nil {
				continue
			}
			s = kv.Key
		}
		if m := refPattern.FindStringSubmatch(s); m != nil {
			out = append(out, [2]string{m[1], m[2]})
		}
	}
	return out
}

// relay records that instance's state succeeded in version and releases
// the waits this completes. Only a state of the instance's own recipe (its
// app's current one) counts: a success reported for any other id would let
// an enrolled instance release waits on states it does not have, and grow
// the done set without bound.
func (s *Server) relay(app, instance string, version int64, stateID string) {
	s.mu.Lock()
	a := s.apps[app]
	if a == nil || version != a.RecipeVersion || !a.hasState(stateID) {
		s.mu.Unlock()
		return
	}
	key := instance + "/" + stateID
	if a.done == nil {
		a.done = map[string]bool{}
	}
	if a.done[key] {
		s.mu.Unlock()
		return
	}
	a.done[key] = true
	var released []string
	for _, st := range a.States {
		if st.Module != "meta.wait" || slices.Contains(a.Waits[allInstances], st.ID) {
			continue
		}
		refs := waitRefs(st.Parameter)
		complete, mentions := len(refs) > 0, false
		for _, r := range refs {
			mentions = mentions || r[0] == instance && r[1] == stateID
			complete = complete && a.done[r[0]+"/"+r[1]]
		}
		if complete && mentions {
			released = append(released, st.ID)
		}
	}
	if len(released) == 0 {
		s.mu.Unlock()
		return
	}
	next := *a
	next.Waits = map[string][]string{}
	for k, v := range a.Waits {
		next.Waits[k] = v
	}
	next.Waits[allInstances] = append(slices.Clone(a.Waits[allInstances]), released...)
	if err := s.st.SaveApp(&next); err != nil {
		a.Waits = next.Waits
		s.mu.Unlock()
		s.log.Error("cannot store released waits; they are released in memory only", "app_id", app, "err", err)
	} else {
		*a = next
		s.mu.Unlock()
	}
	for _, id := range released {
		frame, _ := protocol.Encode(&protocol.StatePush{RecipeVersion: version, StateID: id})
		n := s.broadcast(app, frame, nil)
		s.log.Info("wait released: every state it waits on succeeded", "app_id", app, "state_id", id, "after", key, "pushed_to", n)
	}
}

// hasState reports whether the current recipe has a state with this id.
// Called with s.mu held.
func (a *appState) hasState(id string) bool {
	if a.stateIDs == nil {
		a.stateIDs = make(map[string]bool, len(a.States))
		for _, st := range a.States {
			a.stateIDs[st.ID] = true
		}
	}
	return a.stateIDs[id]
}

// releasedFor lists the waits of the current version released for an
// instance: by hand for it, and by the relay for all. Called with s.mu held.
func (a *appState) releasedFor(instance string) []string {
	return append(slices.Clone(a.Waits[instance]), a.Waits[allInstances]...)
}
