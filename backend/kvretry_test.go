package backend

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/visualops/opsagent/internal/testutil/natscluster"
)

// flakyKV answers its first fails Gets with "no responders", as a cluster
// just formed does while a bucket's leader is unknown to the node asked.
type flakyKV struct {
	jetstream.KeyValue
	fails atomic.Int32
}

func (f *flakyKV) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	if f.fails.Add(-1) >= 0 {
		return nil, nats.ErrNoResponders
	}
	return f.KeyValue.Get(ctx, key)
}

// staleReplica starts two replicas on one NATS node, puts app's recipe
// on A, welcomes instance i-1 (token tok("one")) on B, then stops B's
// watch: from then on B's view lags whatever A stores.
func staleReplica(t *testing.T, app string) (a, b *env, secret string) {
	t.Helper()
	c := natscluster.Start(t, 1)
	a = newEnv(t, "", func(o *Options) { o.NATS.URLs = []string{c.Nodes[0].URL()} })
	b = newEnv(t, "", func(o *Options) { o.NATS.URLs = []string{c.Nodes[0].URL()} })
	if code, out := a.api("PUT", "/api/apps/"+app+"/recipe", recipeJSON); code != 200 {
		t.Fatalf("PUT on A: %d %v", code, out)
	}
	secret = a.secret(app)
	b.handshake(identity("i-1", app, tok("one"), "2.1", secret)).expectRecipe()
	b.srv.stopWatch()
	b.srv.watchDone.Wait()
	return a, b, secret
}

// TestRevocationHoldsOnAReplicaWhoseViewLags: a replica whose view has
// not heard of a revocation (its watch stopped here; it lags by a moment
// in life) refuses the revoked instance, and admits it again once an
// admission is stored: the stored record decides a Handshake.
func TestRevocationHoldsOnAReplicaWhoseViewLags(t *testing.T) {
	a, b, secret := staleReplica(t, "lag")
	if code, out := a.api("DELETE", "/api/apps/lag/instances/i-1", ""); code != 200 {
		t.Fatalf("DELETE on A: %d %v", code, out)
	}
	b.handshake(identity("i-1", "lag", tok("one"), "2.1", secret)).expectClose(websocket.ClosePolicyViolation, "instance revoked")
	if code, out := a.api("POST", "/api/apps/lag/instances/i-1/admit", ""); code != 200 {
		t.Fatalf("admit on A: %d %v", code, out)
	}
	b.handshake(identity("i-1", "lag", tok("one"), "2.1", secret)).expectRecipe()
}

// TestReadsRetryNoResponders: a recipe put for a new app reads the app and
// its secret back; a read answered "no responders" is made again (within
// the operation's time) instead of failing the call with a 503.
func TestReadsRetryNoResponders(t *testing.T) {
	e := newEnv(t, "", nil)
	apps := &flakyKV{KeyValue: e.srv.st.apps}
	secrets := &flakyKV{KeyValue: e.srv.st.secrets}
	apps.fails.Store(2)
	secrets.fails.Store(2)
	e.srv.st.apps, e.srv.st.secrets = apps, secrets
	if code, out := e.api("PUT", "/api/apps/fresh/recipe", recipeJSON); code != 200 {
		t.Fatalf("PUT recipe while reads answer no responders: %d %v", code, out)
	}
	if apps.fails.Load() >= 0 || secrets.fails.Load() >= 0 {
		t.Fatalf("the reads were not all made: %d, %d failures left", apps.fails.Load(), secrets.fails.Load())
	}
}

// TestHandshakeAfterAStaleView: a replica whose view lags the store (its
// watch stopped here; after a NATS node's loss it catches up only later)
// welcomes an agent with the recipe stored, not with the older one it
// holds: the agent may have the newer one from another replica, and would
// run the older again and drop the StateLogs queued for the newer.
func TestHandshakeAfterAStaleView(t *testing.T) {
	a, b, secret := staleReplica(t, "stale")
	if code, out := a.api("PUT", "/api/apps/stale/recipe", `{"state":[{"id":"v2","module":"meta.comment"}]}`); code != 200 {
		t.Fatalf("second PUT on A: %d %v", code, out)
	}
	if got := b.handshake(identity("i-2", "stale", tok("two"), "2.1", secret)).expectRecipe(); got.RecipeVersion != 2 {
		t.Fatalf("B welcomed an agent with recipe version %d, want 2 (the one stored)", got.RecipeVersion)
	}
}

// placementJS refuses its first fails stream creations with desc, as the
// meta leader of a cluster just formed does ("peer offline") before it has
// heard every peer's statistics.
type placementJS struct {
	jetstream.JetStream
	desc  string
	fails atomic.Int32
}

func (p *placementJS) CreateStream(ctx context.Context, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	if p.fails.Add(-1) >= 0 {
		return nil, &jetstream.APIError{Code: 400, ErrorCode: errCodeNoPeers, Description: p.desc}
	}
	return p.JetStream.CreateStream(ctx, cfg)
}

// TestStreamPlacementRetriesPeerOffline: a new app's StateLog stream
// refused for "peer offline" is asked for again within the call (a cluster
// whose meta leader re-made a route had forgotten a peer for a few seconds
// and a CI run's PUT failed with 503); a refusal that waiting does not
// cure (no storage) fails the call at once, naming the stream.
func TestStreamPlacementRetriesPeerOffline(t *testing.T) {
	e := newEnv(t, "", nil)
	js := &placementJS{JetStream: e.srv.st.js, desc: "no suitable peers for placement, peer offline"}
	js.fails.Store(2)
	e.srv.st.js = js
	if code, out := e.api("PUT", "/api/apps/placed/recipe", recipeJSON); code != 200 {
		t.Fatalf("PUT recipe while placement answers peer offline: %d %v", code, out)
	}
	if js.fails.Load() >= 0 {
		t.Fatalf("the stream was not asked for again: %d failures left", js.fails.Load())
	}

	js.desc = "no suitable peers for placement, insufficient storage"
	js.fails.Store(1000)
	code, out := e.api("PUT", "/api/apps/unplaced/recipe", recipeJSON)
	if code != 503 || !strings.Contains(fmt.Sprint(out), "opsagent-logs-unplaced") || !strings.Contains(fmt.Sprint(out), "insufficient storage") {
		t.Fatalf("PUT recipe with no storage for the stream: %d %v, want 503 naming the stream and the reason", code, out)
	}
	if n := 1000 - js.fails.Load(); n != 1 {
		t.Fatalf("a permanent refusal was asked %d times, want once", n)
	}
}
