package backend

import (
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/testutil/natscluster"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
)

// replicas starts n backend Servers (each its own data directory) on one
// NATS cluster, streams and buckets replicated three times, sharing one
// API token as real replicas do.
func replicas(t *testing.T, c *natscluster.Cluster, n int) []*env {
	t.Helper()
	var out []*env
	for i := range n {
		out = append(out, newEnv(t, "", func(o *Options) {
			o.NATS.URLs, o.NATS.Replicas = strings.Split(c.URLs(), ","), 3
			o.ReplicaName = string(rune('A' + i))
		}))
		out[i].readTimeout = 15 * time.Second
	}
	return out
}

// TestReplicas: three backend replicas on a three-node NATS cluster; any
// replica serves any agent and any API call.
func TestReplicas(t *testing.T) {
	c := natscluster.Start(t, 3)
	r := replicas(t, c, 3)
	a, b, cc := r[0], r[1], r[2]

	t.Run("TheAPITokenIsShared", func(t *testing.T) {
		if a.token != b.token || b.token != cc.token {
			t.Fatalf("replicas made their own tokens: %q %q %q", a.token, b.token, cc.token)
		}
	})

	t.Run("RecipePutOnOneReplicaReachesAgentsOnOthers", func(t *testing.T) {
		if code, out := a.api("PUT", "/api/apps/fan/recipe", recipeJSON); code != 200 {
			t.Fatalf("PUT on A: %d %v", code, out)
		}
		secret := a.secret("fan")
		if b.secret("fan") != secret {
			t.Fatal("the secret differs between replicas")
		}
		onB := b.handshake(identity("i-b", "fan", tok("b"), "2.1", secret))
		onC := cc.handshake(identity("i-c", "fan", tok("c"), "2.1", secret))
		onB.expectRecipe()
		onC.expectRecipe()
		wait.Eventually(t, "A sees both agents connected", func() bool {
			got := a.instances("fan")
			return got["i-b"] && got["i-c"]
		})
		if in := a.instance("fan", "i-c"); in.Replica != "C" {
			t.Errorf("A names the replica holding i-c %q, want C", in.Replica)
		}
		code, out := a.api("PUT", "/api/apps/fan/recipe", `{"state":[{"id":"x","module":"meta.comment"}]}`)
		if code != 200 || out["recipe_version"] != float64(2) || out["pushed_to"] != float64(2) {
			t.Fatalf("second PUT on A: %d %v", code, out)
		}
		for _, ag := range []*agent{onB, onC} {
			if r := ag.expectRecipe(); r.RecipeVersion != 2 || r.States[0].ID != "x" {
				t.Fatalf("pushed %+v", r)
			}
		}
		// Two PUTs at once on two replicas make two versions.
		var wg sync.WaitGroup
		versions := make([]float64, 2)
		for i, e := range []*env{b, cc} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code, out := e.api("PUT", "/api/apps/fan/recipe", recipeJSON)
				if code != 200 {
					t.Errorf("PUT: %d %v", code, out)
				}
				versions[i], _ = out["recipe_version"].(float64)
			}()
		}
		wg.Wait()
		if slices.Sort(versions); !slices.Equal(versions, []float64{3, 4}) {
			t.Fatalf("two concurrent PUTs made versions %v, want 3 and 4", versions)
		}
		wait.Eventually(t, "A at version 4", func() bool {
			_, out := a.api("GET", "/api/apps/fan/recipe", "")
			return out["recipe_version"] == float64(4)
		})
	})

	t.Run("WaitReleasedOnOneReplicaReachesAnAgentOnAnother", func(t *testing.T) {
		recipe := `{"state":[
		  {"id":"s1","module":"linux.cmd","parameter":{"cmd":"true"}},
		  {"id":"w-hand","module":"meta.wait","parameter":{}},
		  {"id":"w-relay","module":"meta.wait","parameter":{"state":["@{i-b.state.s1}","@{i-c.state.s1}"]}}]}`
		if code, out := a.api("PUT", "/api/apps/waits/recipe", recipe); code != 200 {
			t.Fatalf("PUT: %d %v", code, out)
		}
		secret := a.secret("waits")
		onA := a.handshake(identity("i-a", "waits", tok("a"), "2.1", secret))
		onB := b.handshake(identity("i-b", "waits", tok("b"), "2.1", secret))
		onC := cc.handshake(identity("i-c", "waits", tok("c"), "2.1", secret))
		for _, ag := range []*agent{onA, onB, onC} {
			ag.expectRecipe()
		}
		wait.Eventually(t, "B sees i-c connected", func() bool { return b.instances("waits")["i-c"] })
		if code, out := b.api("POST", "/api/apps/waits/waits", `{"instance_id":"i-c","state_id":"w-hand"}`); code != 200 || out["pushed"] != true {
			t.Fatalf("POST waits on B: %d %v", code, out)
		}
		if p, ok := onC.expect().(*protocol.StatePush); !ok || p.StateID != "w-hand" {
			t.Fatalf("the agent on C got %#v, want w-hand", p)
		}
		// The relayed wait: its references succeed on two replicas, the
		// agent waiting is on a third.
		done := "done"
		onB.send(&protocol.StateLog{InstanceID: "i-b", AppID: "waits", RecipeVersion: 1, StateID: "s1", Result: true, Comment: &done})
		onC.send(&protocol.StateLog{InstanceID: "i-c", AppID: "waits", RecipeVersion: 1, StateID: "s1", Result: true, Comment: &done})
		for _, ag := range []*agent{onA, onB, onC} {
			if p, ok := ag.expect().(*protocol.StatePush); !ok || p.StateID != "w-relay" {
				t.Fatalf("got %#v, want w-relay released for every instance", p)
			}
		}
		// A late agent on another replica gets both in its welcome.
		onA.ws.Close()
		late := b.handshake(identity("i-a", "waits", tok("a"), "2.1", ""))
		late.expectRecipe()
		if p, ok := late.expect().(*protocol.StatePush); !ok || p.StateID != "w-relay" {
			t.Fatalf("late agent got %#v, want w-relay", p)
		}
	})

	t.Run("RevokeOnOneReplicaDisconnectsOnAnother", func(t *testing.T) {
		a.api("PUT", "/api/apps/rev/recipe", recipeJSON)
		secret := a.secret("rev")
		onC := cc.handshake(identity("i-1", "rev", tok("1"), "2.1", secret))
		onC.expectRecipe()
		wait.Eventually(t, "A sees i-1", func() bool { return a.instances("rev")["i-1"] })
		if code, out := a.api("DELETE", "/api/apps/rev/instances/i-1", ""); code != 200 || out["disconnected"] != true {
			t.Fatalf("DELETE on A: %d %v", code, out)
		}
		onC.expectClose(websocket.ClosePolicyViolation, "instance revoked")
		b.handshake(identity("i-1", "rev", tok("1"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "instance revoked")
	})

	// A revocation holds on every replica as soon as its DELETE has
	// answered, and so does an admission: each Handshake goes to another
	// replica than the call, at once, while that replica's view may not
	// have heard of the change yet (its watch lags by a moment; a CI run
	// once admitted a revoked id that way).
	t.Run("RevocationHoldsOnEveryReplicaOnceAnswered", func(t *testing.T) {
		a.api("PUT", "/api/apps/cycle/recipe", recipeJSON)
		secret := a.secret("cycle")
		b.handshake(identity("i-1", "cycle", tok("1"), "2.1", secret)).expectRecipe()
		// The first DELETE goes to A, which must know of i-1 (each later
		// one goes to the replica that has just welcomed it).
		wait.Eventually(t, "A sees i-1", func() bool { return a.instances("cycle")["i-1"] })
		for i := range 25 {
			call, other := r[i%3], r[(i+1)%3]
			if code, out := call.api("DELETE", "/api/apps/cycle/instances/i-1", ""); code != 200 {
				t.Fatalf("cycle %d: DELETE: %d %v", i, code, out)
			}
			other.handshake(identity("i-1", "cycle", tok("1"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "instance revoked")
			if code, out := call.api("POST", "/api/apps/cycle/instances/i-1/admit", ""); code != 200 {
				t.Fatalf("cycle %d: admit: %d %v", i, code, out)
			}
			ag := other.handshake(identity("i-1", "cycle", tok("1"), "2.1", secret))
			ag.expectRecipe()
			ag.ws.Close()
		}
	})

	t.Run("TwoReplicasRacingOnOneStreamStoreOnce", func(t *testing.T) {
		a.api("PUT", "/api/apps/race/recipe", recipeJSON)
		secret := a.secret("race")
		id := identity("i-1", "race", tok("1"), "2.2", secret)
		id.ProtocolVersion, id.LogStream = 2, "s1"
		send := func(ag *agent, from, to int64) {
			for seq := from; seq <= to; seq++ {
				m := stateLog("i-1", seq)
				m.AppID = "race"
				frame, _ := protocol.Encode(m)
				if ag.ws.WriteMessage(websocket.TextMessage, frame) != nil {
					return // closed: the rest is sent through the other
				}
			}
		}
		onA := a.handshake(id)
		onA.expectAck("s1")
		onA.expectRecipe()
		sentA := make(chan struct{})
		go func() { defer close(sentA); send(onA, 1, 1100) }() // 1001.. are A's late frames
		for acked := int64(0); acked < 20; {                   // A is storing
			if ack, ok := onA.expect().(*protocol.StateLogAck); ok {
				acked = ack.Seq
			}
		}
		// The agent gave up on A (a half-open connection, say) and
		// reconnected through B while A still reads what it sent.
		onB := b.handshake(id)
		high := onB.expectAck("s1")
		onB.expectRecipe()
		send(onB, high+1, 1200)
		onB.waitAck("s1", 1200)
		<-sentA
		for {
			m, err := onA.next()
			if err != nil {
				break // closed: replaced, or its StateLogs refused
			}
			if ack, ok := m.(*protocol.StateLogAck); ok && ack.Seq > high {
				t.Fatalf("A acknowledged %d after B took the stream at %d", ack.Seq, high)
			}
		}
		logs := cc.storedLogs("race", 1000)
		if got := agentSeqs(logs, "i-1", "s1"); !slices.Equal(got, seqRange(1, 1200)) {
			t.Fatalf("stored %d StateLogs (%v…), want 1..1200 each once, in order", len(got), got[:min(len(got), 20)])
		}
		t.Logf("B took the stream at %d", high)
	})

	t.Run("AnyReplicaPagesTheLogs", func(t *testing.T) {
		var seqs [3][]int64
		for i, e := range []*env{a, b, cc} {
			for _, l := range e.storedLogs("race", 13) {
				seqs[i] = append(seqs[i], l.Seq)
			}
		}
		if len(seqs[0]) != 1200 || !slices.Equal(seqs[0], seqs[1]) || !slices.Equal(seqs[1], seqs[2]) {
			t.Fatalf("replicas page differently: %d, %d, %d StateLogs", len(seqs[0]), len(seqs[1]), len(seqs[2]))
		}
	})
}
