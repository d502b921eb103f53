package backend

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"time"

	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go/jetstream"
)

// Which replica holds which instance. Each replica beats in the
// opsagent-replicas bucket (its entries expire after replicaTTL) under a
// session id of its own process; each connection it holds is written once
// to opsagent-presence (app.instance → session, replica name, since) and
// deleted when it ends, if it is still that connection's. An instance is
// connected when its presence entry names a session that beats: a replica
// killed with -9 stops beating, and its instances show as disconnected
// within replicaTTL without anyone writing for them. One write per
// connection and one per replica every few seconds, rather than one per
// connection every few seconds.

// presenceRecord is one instance's entry in opsagent-presence.
type presenceRecord struct {
	Session      string    `json:"session"`
	Replica      string    `json:"replica"`
	Since        time.Time `json:"since"`
	AgentVersion string    `json:"agent_version,omitempty"`
	InitErrors   string    `json:"init_errors,omitempty"`
	rev          uint64
}

func newSession() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// applyPresence takes an instance's presence. An entry written after the
// one of this replica's own connection of the instance (a higher
// revision) means the agent connected again through another replica: the
// connection here is stale, and is closed. Called with s.mu held.
func (s *Server) applyPresence(ev kvEvent) func() {
	parts, err := splitKey(ev.key, 2)
	if err != nil {
		return nil
	}
	a, inst := s.view(parts[0]), parts[1]
	if ev.deleted {
		delete(a.presence, inst)
		return nil
	}
	var rec presenceRecord
	if json.Unmarshal(ev.value, &rec) != nil {
		return nil
	}
	rec.rev = ev.rev
	a.presence[inst] = rec
	c := s.agents[a.AppID][inst]
	if c == nil || rec.Session == s.session {
		return nil
	}
	if mine := c.presenceRev.Load(); mine == 0 || ev.rev < mine {
		return nil // older than this connection (its own entry is still on its way)
	}
	return func() {
		c.close(websocket.CloseNormalClosure, "replaced by a newer connection through another backend replica")
	}
}

// connectedAt says where an instance is connected: here (its connection),
// on another live replica (its presence), or nowhere. Called with s.mu
// held.
func (s *Server) connectedAt(a *appState, inst string) (c *agentConn, p presenceRecord, ok bool) {
	if c = s.agents[a.AppID][inst]; c != nil {
		return c, presenceRecord{Session: s.session, Replica: s.replicaName(), Since: c.since, AgentVersion: c.agentVersion, InitErrors: c.initErrors}, true
	}
	p, ok = a.presence[inst]
	if !ok || p.Session == s.session {
		return nil, p, false // this replica's, and no longer connected
	}
	seen, alive := s.alive[p.Session]
	return nil, p, alive && time.Since(seen) < replicaTTL
}

// connectedCount is how many of an app's instances are connected to any
// replica. Called with s.mu held.
func (s *Server) connectedCount(a *appState) int {
	n := len(s.agents[a.AppID])
	for inst := range a.presence {
		if s.agents[a.AppID][inst] != nil {
			continue
		}
		if _, _, ok := s.connectedAt(a, inst); ok {
			n++
		}
	}
	return n
}

// announce writes a new connection's presence, and deletes it when the
// connection ends (unless another connection of the instance wrote its
// own since). It runs on its own goroutine: the agent is served meanwhile.
func (s *Server) announce(c *agentConn) {
	rec := presenceRecord{Session: s.session, Replica: s.replicaName(), Since: c.since, AgentVersion: c.agentVersion, InitErrors: c.initErrors}
	data, _ := json.Marshal(rec)
	key := instanceKey(c.app, c.instance)
	ctx, cancel := opCtx(context.Background())
	rev, err := s.st.presence.Put(ctx, key, data)
	cancel()
	if err != nil {
		s.log.Warn("cannot record which replica holds an instance (other replicas show it disconnected)", "app_id", c.app, "instance_id", c.instance, "err", err)
	} else {
		c.presenceRev.Store(rev)
		s.apply(kvEvent{bucket: bucketPresence, key: key, value: data, rev: rev})
	}
	<-c.done
	if rev == 0 {
		return
	}
	ctx, cancel = opCtx(context.Background())
	defer cancel()
	_ = s.st.presence.Delete(ctx, key, jetstream.LastRevision(rev))
}

// heartbeat keeps this replica's session alive until stop is closed, then
// deletes it.
func (s *Server) heartbeat(stop <-chan struct{}) {
	defer s.bg.Done()
	started := time.Now().UTC()
	t := time.NewTicker(replicaTTL / 3)
	defer t.Stop()
	for {
		data, _ := json.Marshal(map[string]any{"replica": s.replicaName(), "started": started})
		ctx, cancel := opCtx(context.Background())
		if rev, err := s.st.replicaKV.Put(ctx, s.session, data); err != nil {
			s.log.Warn("cannot beat in NATS (other replicas will show this one's agents as disconnected)", "err", err)
		} else {
			s.apply(kvEvent{bucket: bucketReplicas, key: s.session, value: data, rev: rev})
		}
		cancel()
		select {
		case <-stop:
			ctx, cancel := opCtx(context.Background())
			_ = s.st.replicaKV.Delete(ctx, s.session)
			cancel()
			return
		case <-t.C:
		}
	}
}
