package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/visualops/opsagent/protocol"
)

// Each replica keeps a view of the shared state in memory, fed by watches
// on the KV buckets, and serves its reads from it (a Handshake checks a
// token without a round trip). Every change goes through JetStream first
// and reaches every replica's view the same way, its own included: the
// writer applies what it wrote at once (so that it reads its own writes),
// and the watch later delivers it again, which the revision check turns
// into a no-op. Applying a change also does its work on the replica's own
// agents: a new recipe is pushed to them, a released wait too, a revoked
// instance is disconnected. That is how a recipe put on one replica reaches
// agents connected to another.

// appState is the view of one app: its record (recipe, version, update),
// secret, instances, released waits and where its instances are connected.
// The Server's mu guards it.
type appState struct {
	AppID string
	// exists is set once the app's record is seen; failed when that record
	// does not decode (the app is then refused until it does).
	exists        bool
	failed        error
	RecipeVersion int64
	Module        *protocol.ModuleSource
	States        []stateJSON
	Update        *protocol.AgentUpdate

	Secret      string
	TokenHashes map[string]string    // instance → SHA-256 of its token
	Revoked     map[string]time.Time // instance → when it was revoked
	// waits maps instance (allInstances: all) → state id → the recipe
	// version it was released in; only those of RecipeVersion count.
	waits    map[string]map[string]int64
	presence map[string]presenceRecord // instance → the replica holding it
	// relayed is which "version/instance/state" this replica already
	// reported to the relay (the states run again every round).
	relayed map[string]bool
	// stateIDs is the set of States' ids, built on first use (hasState).
	stateIDs map[string]bool
}

type stateJSON struct {
	ID        string          `json:"id"`
	Module    string          `json:"module"`
	Parameter json.RawMessage `json:"parameter"`
}

func newAppState(id string) *appState {
	return &appState{AppID: id, TokenHashes: map[string]string{}, Revoked: map[string]time.Time{},
		waits: map[string]map[string]int64{}, presence: map[string]presenceRecord{}, relayed: map[string]bool{}}
}

func (a *appState) recipe() *protocol.RecipeMetadata {
	m := &protocol.RecipeMetadata{RecipeVersion: a.RecipeVersion, Module: a.Module, States: []protocol.RecipeState{}}
	for _, s := range a.States {
		m.States = append(m.States, protocol.RecipeState{ID: s.ID, Module: s.Module, Parameter: s.Parameter})
	}
	return m
}

// releasedFor lists the waits of the current version released for an
// instance: by hand for it, and by the relay for all. Called with s.mu held.
func (a *appState) releasedFor(instance string) []string {
	var out []string
	for _, who := range []string{instance, allInstances} {
		for _, id := range sortedKeys(a.waits[who]) {
			if a.waits[who][id] == a.RecipeVersion && !slices.Contains(out, id) {
				out = append(out, id)
			}
		}
	}
	return out
}

// released reports whether a wait of the current version is released for
// instance (or for all). Called with s.mu held.
func (a *appState) released(instance, state string) bool {
	return a.waits[instance][state] == a.RecipeVersion
}

// kvEvent is one change of a bucket, from a watch or from this replica's
// own write.
type kvEvent struct {
	bucket, key string
	value       []byte
	rev         uint64
	deleted     bool
}

func eventOf(bucket string, e jetstream.KeyValueEntry) kvEvent {
	op := e.Operation()
	return kvEvent{bucket: bucket, key: e.Key(), value: e.Value(), rev: e.Revision(), deleted: op == jetstream.KeyValueDelete || op == jetstream.KeyValuePurge}
}

// watchAll starts the watches and returns once each has delivered what is
// stored, so that the view is complete before the backend serves.
func (s *Server) watchAll() error {
	ctx, cancel := context.WithCancel(context.Background())
	s.stopWatch = cancel
	buckets := []struct {
		name string
		kv   jetstream.KeyValue
	}{
		{bucketApps, s.st.apps}, {bucketSecrets, s.st.secrets}, {bucketInstances, s.st.instances},
		{bucketWaits, s.st.waits}, {bucketPresence, s.st.presence}, {bucketReplicas, s.st.replicaKV},
	}
	ready := make(chan error, len(buckets))
	for _, b := range buckets {
		w, err := b.kv.WatchAll(ctx)
		if err != nil {
			return fmt.Errorf("watching bucket %s: %w", b.name, err)
		}
		s.watchDone.Add(1)
		go func() {
			defer s.watchDone.Done()
			defer func() { _ = w.Stop() }()
			initial := true
			for {
				select {
				case <-ctx.Done():
					return
				case e, ok := <-w.Updates():
					if !ok {
						return
					}
					if e == nil {
						if initial {
							initial = false
							ready <- nil
						}
						continue
					}
					s.apply(eventOf(b.name, e))
				}
			}
		}()
	}
	timeout := time.After(2 * time.Minute)
	for range buckets {
		select {
		case <-ready:
		case <-timeout:
			return errors.New("the KV buckets were not read within 2 minutes")
		}
	}
	return nil
}

// apply brings a change into the view, unless the view has seen it (or a
// later one) already, and does its work on this replica's agents.
func (s *Server) apply(ev kvEvent) {
	s.mu.Lock()
	k := ev.bucket + "/" + ev.key
	if ev.rev != 0 && ev.rev <= s.revs[k] {
		s.mu.Unlock()
		return
	}
	if ev.rev != 0 {
		s.revs[k] = ev.rev
	}
	var after func()
	switch ev.bucket {
	case bucketApps:
		after = s.applyApp(ev)
	case bucketSecrets:
		if id, err := unesc(ev.key); err == nil && !ev.deleted {
			s.view(id).Secret = string(ev.value)
		}
	case bucketInstances:
		after = s.applyInstance(ev)
	case bucketWaits:
		after = s.applyWait(ev)
	case bucketPresence:
		after = s.applyPresence(ev)
	case bucketReplicas:
		if ev.deleted {
			delete(s.alive, ev.key)
		} else {
			s.alive[ev.key] = time.Now()
		}
	}
	s.mu.Unlock()
	if after != nil {
		after()
	}
}

// view is the app's view, made empty on first use. Called with s.mu held.
func (s *Server) view(id string) *appState {
	a := s.apps[id]
	if a == nil {
		a = newAppState(id)
		s.apps[id] = a
	}
	return a
}

// applyApp takes a new record: a newer recipe is pushed to this replica's
// agents of the app (with the waits already released in it), a new update
// offer to those of other versions. Called with s.mu held.
func (s *Server) applyApp(ev kvEvent) func() {
	id, err := unesc(ev.key)
	if err != nil {
		return nil
	}
	a := s.view(id)
	if ev.deleted {
		a.exists, a.failed = false, nil
		return nil
	}
	rec, err := decodeApp(id, ev.value)
	if err != nil {
		if a.failed == nil {
			s.log.Error("an app's record does not decode; the app refuses every change until a valid one is stored", "app_id", id, "err", err)
		}
		a.failed = err
		return nil
	}
	if a.failed != nil {
		s.log.Info("app's record decodes again", "app_id", id)
	}
	newRecipe := rec.RecipeVersion != a.RecipeVersion
	newUpdate := rec.Update != nil && (a.Update == nil || *rec.Update != *a.Update)
	a.exists, a.failed = true, nil
	a.RecipeVersion, a.Module, a.States, a.Update = rec.RecipeVersion, rec.Module, rec.States, rec.Update
	a.stateIDs = nil
	if newRecipe {
		clear(a.relayed)
	}
	var targets []*agentConn
	for _, c := range s.agents[id] {
		targets = append(targets, c)
	}
	if len(targets) == 0 || !newRecipe && !newUpdate {
		return nil
	}
	type push struct {
		c      *agentConn
		frames []*websocket.PreparedMessage
	}
	var pushes []push
	// The recipe and the update offer are framed once for all the agents
	// (a recipe of thousands of states, to thousands of agents).
	var recipe, update *websocket.PreparedMessage
	if newRecipe && a.RecipeVersion > 0 {
		recipe = prepare(a.recipe())
	}
	if newUpdate {
		update = prepare(a.Update)
	}
	for _, c := range targets {
		var frames []*websocket.PreparedMessage
		if recipe != nil {
			frames = append(frames, recipe)
			c.recipeVersion.Store(a.RecipeVersion)
			for _, w := range a.releasedFor(c.instance) {
				frames = append(frames, prepare(&protocol.StatePush{RecipeVersion: a.RecipeVersion, StateID: w}))
			}
		}
		if update != nil && c.agentVersion != a.Update.Version {
			frames = append(frames, update)
		}
		pushes = append(pushes, push{c, frames})
	}
	return func() {
		for _, p := range pushes {
			for _, f := range p.frames {
				if f != nil {
					p.c.sendPrepared(f)
				}
			}
		}
	}
}

// prepare frames a message for sendPrepared; nil if it cannot be encoded.
func prepare(m protocol.Message) *websocket.PreparedMessage {
	frame, err := protocol.Encode(m)
	if err != nil {
		return nil
	}
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, frame)
	if err != nil {
		return nil
	}
	return pm
}

// applyInstance takes an enrollment, a revocation (which disconnects the
// instance here) or an admission. Called with s.mu held.
func (s *Server) applyInstance(ev kvEvent) func() {
	parts, err := splitKey(ev.key, 2)
	if err != nil {
		return nil
	}
	a, inst := s.view(parts[0]), parts[1]
	if ev.deleted {
		delete(a.TokenHashes, inst)
		delete(a.Revoked, inst)
		return nil
	}
	var rec instanceRecord
	if json.Unmarshal(ev.value, &rec) != nil {
		return nil
	}
	if rec.RevokedAt == nil {
		a.TokenHashes[inst] = rec.SHA256
		delete(a.Revoked, inst)
		return nil
	}
	delete(a.TokenHashes, inst)
	a.Revoked[inst] = *rec.RevokedAt
	if c := s.agents[a.AppID][inst]; c != nil {
		return func() { c.close(websocket.ClosePolicyViolation, revokedReason) }
	}
	return nil
}

// applyWait takes a released wait and pushes it to the instance (or every
// instance) connected here. Called with s.mu held.
func (s *Server) applyWait(ev kvEvent) func() {
	parts, err := splitKey(ev.key, 3)
	if err != nil {
		return nil
	}
	a, inst, state := s.view(parts[0]), parts[1], parts[2]
	if inst == anyToken {
		inst = allInstances
	}
	if ev.deleted {
		delete(a.waits[inst], state)
		return nil
	}
	var rec waitRecord
	if json.Unmarshal(ev.value, &rec) != nil {
		return nil
	}
	if a.waits[inst] == nil {
		a.waits[inst] = map[string]int64{}
	}
	a.waits[inst][state] = rec.RecipeVersion
	if rec.RecipeVersion != a.RecipeVersion {
		return nil // a recipe this replica has not seen yet pushes it with itself
	}
	var targets []*agentConn
	for id, c := range s.agents[a.AppID] {
		if inst == allInstances || id == inst {
			targets = append(targets, c)
		}
	}
	if len(targets) == 0 {
		return nil
	}
	frame, _ := protocol.Encode(&protocol.StatePush{RecipeVersion: rec.RecipeVersion, StateID: state})
	return func() {
		for _, c := range targets {
			c.send(frame)
		}
	}
}
