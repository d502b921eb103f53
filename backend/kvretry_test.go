package backend

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
