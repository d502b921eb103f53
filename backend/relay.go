package backend

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
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
// an enrolled instance release waits on states it does not have. What has
// succeeded is shared by the replicas (opsagent-relay, one compare-and-set
// per reference), since the instances a wait names may be connected to
// different ones; the replica that completes a wait stores its release for
// every instance, and every replica pushes it to its own agents (view.go).
// A success is reported once per replica and version: the states run
// again every round.
func (s *Server) relay(app, instance string, version int64, stateID string) {
	s.mu.Lock()
	a := s.apps[app]
	if a == nil || version != a.RecipeVersion || !a.hasState(stateID) {
		s.mu.Unlock()
		return
	}
	key := fmt.Sprintf("%d/%s/%s", version, instance, stateID)
	if a.relayed[key] {
		s.mu.Unlock()
		return
	}
	a.relayed[key] = true
	type wait struct {
		id   string
		refs []string
	}
	var waits []wait
	for _, st := range a.States {
		if st.Module != "meta.wait" || a.released(allInstances, st.ID) {
			continue
		}
		refs, mentions := []string{}, false
		for _, r := range waitRefs(st.Parameter) {
			refs = append(refs, r[0]+"/"+r[1])
			mentions = mentions || r[0] == instance && r[1] == stateID
		}
		if mentions {
			waits = append(waits, wait{st.ID, refs})
		}
	}
	s.mu.Unlock()
	if len(waits) == 0 {
		return
	}
	// Off the connection's reader: these are round trips to NATS.
	go func() {
		ref := instance + "/" + stateID
		for _, w := range waits {
			done, err := s.st.relayDone(context.Background(), app, version, w.id, ref)
			if err == nil && !containsAll(done, w.refs) {
				continue
			}
			var rev uint64
			if err == nil {
				rev, err = s.st.releaseWait(context.Background(), app, version, allInstances, w.id)
			}
			if err != nil {
				s.mu.Lock()
				delete(a.relayed, key) // reported again with the next success
				s.mu.Unlock()
				s.log.Error("cannot store a relayed wait; tried again when the state succeeds again", "app_id", app, "state_id", w.id, "after", ref, "err", err)
				continue
			}
			data, _ := json.Marshal(waitRecord{RecipeVersion: version})
			s.apply(kvEvent{bucket: bucketWaits, key: waitKey(app, allInstances, w.id), value: data, rev: rev})
			s.log.Info("wait released: every state it waits on succeeded", "app_id", app, "state_id", w.id, "after", ref)
		}
	}()
}

func containsAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
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
