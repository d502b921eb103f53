package backend

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/visualops/opsagent/internal/testutil/natscluster"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
)

// The store suite: what the backend's storage must do so that no
// acknowledged StateLog is lost and no stored app is created over,
// whatever happens to the storage around a restart (issue 25). It runs a
// real Server, agents over WebSocket and the API, on each harness: the
// embedded single-node NATS server (the default, `backend --data`) and a
// three-node cluster of nats-server processes with every stream and bucket
// replicated three times (`backend --nats … --nats-replicas 3`). A
// harness injects real faults where it can: a JetStream store that is
// full (its storage limit reached), a kill -9 of everything that holds the
// data, NATS out of reach (a cluster without quorum); a case whose fault
// the harness cannot make is skipped, saying why.

// storeHarness is one way of running the backend's store.
type storeHarness struct {
	// options points a Server's Options at the harness's NATS.
	options func(o *Options)
	// crash makes what is stored look as after a kill -9 of whatever
	// holds it; the Server is stopped.
	crash func(t *testing.T, dir string)
	// fillDisk fills the store until writes fail for lack of space, until
	// freeDisk; noDisk says why they are nil, when they are.
	fillDisk, freeDisk func(t *testing.T, e *env)
	noDisk             string
	// stopNATS makes NATS unreachable (for writes) until startNATS; noStop
	// says why they are nil.
	stopNATS, startNATS func(t *testing.T)
	noStop              string
	// readTimeout bounds an agent's wait for a frame (a cluster electing
	// leaders after a crash takes seconds).
	readTimeout time.Duration
}

type storeCase struct {
	name       string
	disk, stop bool // needs fillDisk, stopNATS
	run        func(t *testing.T, h *storeHarness)
}

func runStoreSuite(t *testing.T, newHarness func(t *testing.T) *storeHarness) {
	for _, c := range storeCases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			if c.disk && h.fillDisk == nil {
				t.Skip("this store cannot be filled here: " + h.noDisk)
			}
			if c.stop && h.stopNATS == nil {
				t.Skip("NATS cannot be taken away from this store here: " + h.noStop)
			}
			c.run(t, h)
		})
	}
}

var storeCases = []storeCase{
	{name: "AckedStateLogsSurviveACrash", run: caseAckedSurviveCrash},
	{name: "CreateNeverOverwritesAStoredApp", run: caseCreateNeverOverwrites},
	{name: "AppThatFailsToLoadIsKeptAndLoadsOnceRepaired", run: caseFailedLoadKept},
	{name: "FullStoreRefusesStateLogsNeverAcksThem", disk: true, run: caseFullStoreRefuses},
	{name: "RestartOnAFullStoreAfterACrashLosesNothing", disk: true, run: caseFullStoreRestart},
	{name: "RevocationSurvivesACrash", run: caseRevocation},
	{name: "NATSOutOfReachRefusesAndRecoversWithoutRestart", stop: true, run: caseNATSOutOfReach},
}

// TestEmbeddedStore runs the store suite on the embedded NATS server.
func TestEmbeddedStore(t *testing.T) { runStoreSuite(t, embeddedHarness) }

// TestClusterStore runs the store suite on a three-node NATS cluster
// (real nats-server processes), streams and buckets replicated three
// times.
func TestClusterStore(t *testing.T) { runStoreSuite(t, clusterHarness) }

// embeddedHarness caps the embedded server's JetStream storage, so that
// a store filled by another stream is a full store as JetStream sees it.
// A kill -9 is what the process leaves of JetStream's files: blocks
// written, no index (the server rebuilds it from the blocks).
func embeddedHarness(t *testing.T) *storeHarness {
	return &storeHarness{
		options: func(o *Options) { o.NATS.maxStore = 64 << 20 },
		crash: func(t *testing.T, dir string) {
			n := 0
			_ = filepath.WalkDir(filepath.Join(dir, "nats"), func(path string, d os.DirEntry, err error) error {
				if err == nil && !d.IsDir() && (d.Name() == "index.db" || strings.HasSuffix(d.Name(), ".idx")) {
					if os.Remove(path) == nil {
						n++
					}
				}
				return nil
			})
			if n == 0 {
				t.Fatal("no JetStream index file to remove: the crash simulation no longer matches the store's layout")
			}
		},
		fillDisk: fillStore,
		freeDisk: freeStore,
		noStop:   "the embedded server lives in the backend's own process",
	}
}

// clusterHarness starts a three-node cluster for the case. A kill -9 is of
// all three nodes at once; NATS out of reach is two nodes of three gone
// (no quorum for any write).
func clusterHarness(t *testing.T) *storeHarness {
	c := natscluster.Start(t, 3)
	return &storeHarness{
		options: func(o *Options) { o.NATS.URLs, o.NATS.Replicas = strings.Split(c.URLs(), ","), 3 },
		crash: func(t *testing.T, _ string) {
			for i := range c.Nodes {
				c.Kill(i)
			}
			c.Restart(0, 1, 2)
		},
		noDisk:      "the example cluster configuration sets no JetStream storage limit (the embedded harness fills one)",
		readTimeout: 30 * time.Second,
		stopNATS: func(t *testing.T) {
			c.Kill(1)
			c.Kill(2)
		},
		startNATS: func(t *testing.T) { c.Restart(1, 2) },
	}
}

// fillStore publishes into a stream of its own until JetStream refuses
// for lack of storage.
func fillStore(t *testing.T, e *env) {
	t.Helper()
	ctx := context.Background()
	s, err := e.srv.st.js.CreateStream(ctx, jetstream.StreamConfig{Name: "FILLER", Subjects: []string{"filler.>"}, Replicas: e.srv.st.replicas})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	for range 10000 {
		if _, err := e.srv.st.js.Publish(ctx, "filler.x", data); err != nil {
			t.Logf("store full: %v", err)
			return
		}
	}
	info, _ := s.Info(ctx)
	t.Fatalf("the store took %d bytes and is not full", info.State.Bytes)
}

func freeStore(t *testing.T, e *env) {
	t.Helper()
	if err := e.srv.st.js.DeleteStream(context.Background(), "FILLER"); err != nil {
		t.Fatal(err)
	}
}

// serverOn starts a Server on the harness's store with dir as its data
// directory (a restart when dir was used before).
func serverOn(t *testing.T, h *storeHarness, dir string) *env {
	e := newEnv(t, dir, h.options)
	e.readTimeout = h.readTimeout
	return e
}

// fat is a StateLog output that takes room.
var fat = strings.Repeat("o", 5000)

// seedServer stores app1 through the API at recipe version 2, with i-1
// enrolled and n StateLogs acknowledged, and stops the server.
func seedServer(t *testing.T, h *storeHarness, dir string, n int64) {
	e := serverOn(t, h, dir)
	for v := 1; v <= 2; v++ {
		if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 {
			t.Fatalf("PUT: %d %v", code, out)
		}
	}
	a := e.connect2("i-1", "app1", "1", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	if n > 0 {
		a.push("i-1", "s1", 1, n, fat)
	}
	e.stop()
}

// push sends StateLogs from..to with stdout over protocol 2 and waits for
// their acknowledgement.
func (a *agent) push(instance, stream string, from, to int64, stdout string) {
	a.t.Helper()
	for seq := from; seq <= to; seq++ {
		m := stateLog(instance, seq)
		m.Stdout = &stdout
		a.send(m)
	}
	a.waitAck(stream, to)
}

// checkSeeded: app1 is as seedServer left it with n StateLogs (version
// at least 2, i-1's token, its StateLogs 1..n once each and in order) and
// a protocol-2 Handshake is acknowledged n.
func checkSeeded(t *testing.T, e *env, n int64) {
	t.Helper()
	b := e.connect2("i-1", "app1", "1", "s1")
	if seq := b.expectAck("s1"); seq != n {
		t.Fatalf("first StateLogAck %d, want %d", seq, n)
	}
	if r := b.expectRecipe(); r.RecipeVersion < 2 {
		t.Fatalf("recipe version %d, want 2 or more (never back to 1)", r.RecipeVersion)
	}
	logs := e.storedLogs("app1", 7)
	if got := agentSeqs(logs, "i-1", "s1"); !slices.Equal(got, seqRange(1, n)) {
		t.Fatalf("stored agent seqs %v, want 1..%d each once", got, n)
	}
	e.handshake(identity("i-1", "app1", tok("thief"), "2.2", e.secret("app1"))).expectClose(websocket.ClosePolicyViolation, "instance token mismatch")
}

// expectStorageRefusal: the API answers 503 naming the app or the
// storage, and nothing is changed.
func expectStorageRefusal(t *testing.T, e *env) {
	t.Helper()
	for _, c := range []struct{ method, path, body string }{
		{"PUT", "/api/apps/app1/recipe", recipeJSON},
		{"POST", "/api/apps/app1/waits", `{"instance_id":"i-1","state_id":"w1"}`},
		{"POST", "/api/apps/app1/update", `{"version":"9.9"}`},
		{"POST", "/api/apps/app1/enrollment/rotate", `{}`},
	} {
		code, out := e.api(c.method, c.path, c.body)
		if msg, _ := out["error"].(string); code == http.StatusOK && c.method == "PUT" {
			t.Fatalf("%s %s answered 200 %v: the app was changed (created afresh?) while it could not be stored", c.method, c.path, out)
		} else if code != http.StatusServiceUnavailable || !strings.Contains(msg, "app1") && !strings.Contains(msg, "storage") {
			t.Errorf("%s %s: %d %v, want 503 naming the app or the storage", c.method, c.path, code, out)
		}
	}
}

// expectStateLogsRefused connects i-1 and sends StateLogs from..to: the
// Handshake's acknowledgement is at most acked, none comes past it, and
// the connection is closed 1011 (the agent sends them again later).
func expectStateLogsRefused(t *testing.T, e *env, acked, from, to int64) {
	t.Helper()
	a := e.connect2("i-1", "app1", "1", "s1")
	if seq := a.expectAck("s1"); seq > acked {
		t.Fatalf("first StateLogAck %d, but only %d are stored", seq, acked)
	}
	a.expectRecipe()
	for seq := from; seq <= to; seq++ {
		m := stateLog("i-1", seq)
		m.Stdout = &fat
		frame, _ := protocol.Encode(m)
		if a.ws.WriteMessage(websocket.TextMessage, frame) != nil {
			break // closed already: what it says is read below
		}
	}
	for {
		m, err := a.next()
		var ce *websocket.CloseError
		if errors.As(err, &ce) {
			if ce.Code != websocket.CloseInternalServerErr {
				t.Fatalf("StateLogs that cannot be stored: closed %d %q, want 1011", ce.Code, ce.Text)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if ack, ok := m.(*protocol.StateLogAck); ok && ack.Seq > acked {
			t.Fatalf("StateLogAck %d: nothing past %d is stored", ack.Seq, acked)
		}
	}
}

func caseAckedSurviveCrash(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 20)
	h.crash(t, dir)
	checkSeeded(t, serverOn(t, h, dir), 20)
}

func caseCreateNeverOverwrites(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 5)
	e := serverOn(t, h, dir)
	secret := e.secret("app1")
	if _, _, err := e.srv.st.createApp(context.Background(), "app1", "other-secret-0123456789"); !errors.Is(err, errAppExists) {
		t.Fatalf("createApp of a stored app: %v, want errAppExists", err)
	}
	if _, _, err := e.srv.st.getApp(context.Background(), "nope"); !errors.Is(err, errNoApp) {
		t.Fatalf("getApp of an app never stored: %v, want errNoApp", err)
	}
	checkSeeded(t, e, 5)
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 || out["recipe_version"] != float64(3) {
		t.Fatalf("PUT: %d %v, want recipe_version 3", code, out)
	}
	if e.secret("app1") != secret {
		t.Fatal("the enrollment secret changed")
	}
}

// breakApp stores a record of app1 that does not decode; repairApp puts
// the one before back.
func breakApp(t *testing.T, e *env) (repair func(*env)) {
	t.Helper()
	good, err := e.kvGet(bucketApps, "app1")
	if err != nil {
		t.Fatal(err)
	}
	put := func(e *env, data []byte) {
		kv, err := e.srv.st.js.KeyValue(context.Background(), bucketApps)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(context.Background(), "app1", data); err != nil {
			t.Fatal(err)
		}
	}
	put(e, []byte(`{"app_id": "app1", "recipe_version": "not a number"`))
	return func(e *env) { put(e, good) }
}

// caseFailedLoadKept: app1's record stops decoding while the backend
// runs, and is still broken at a restart. It is listed as failed; PUTs
// and other writes answer 503; Handshakes, of its instance or of a
// newcomer with the secret claiming its id, close 1013, so none of its
// StateLogs is taken; creating it is refused. Once a good record is back
// it serves again, without a restart, with its version, tokens and
// StateLogs.
func caseFailedLoadKept(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 10)
	e := serverOn(t, h, dir)
	secret := e.secret("app1")
	repair := breakApp(t, e)
	wait.Eventually(t, "app1 refused", func() bool { code, _ := e.api("GET", "/api/apps/app1/recipe", ""); return code == 503 })
	expectStorageRefusal(t, e)
	e.stop()

	e = serverOn(t, h, dir)
	_, out := e.api("GET", "/api/apps", "")
	if apps, _ := out["apps"].([]any); len(apps) != 1 || apps[0].(map[string]any)["failed"] == nil {
		t.Fatalf("GET /api/apps: %v, want app1 listed as failed", out)
	}
	expectStorageRefusal(t, e)
	e.connect2("i-1", "app1", "1", "s1").expectClose(websocket.CloseTryAgainLater, "cannot load this app")
	e.handshake(identity("i-1", "app1", tok("thief"), "2.2", secret)).expectClose(websocket.CloseTryAgainLater, "cannot load this app")
	if _, _, err := e.srv.st.createApp(context.Background(), "app1", "other-secret-0123456789"); !errors.Is(err, errAppExists) {
		t.Fatalf("createApp over an app that does not load: %v, want errAppExists", err)
	}

	repair(e)
	wait.Eventually(t, "app1 served again", func() bool { code, _ := e.api("GET", "/api/apps/app1/recipe", ""); return code == 200 })
	checkSeeded(t, e, 10)
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 || out["recipe_version"] != float64(3) {
		t.Fatalf("PUT after the repair: %d %v, want recipe_version 3", code, out)
	}
}

// caseFullStoreRefuses: with the store full, StateLogs are refused and
// never acknowledged (over several reconnections), a PUT answers 503;
// once there is room again, the StateLogs sent again are stored, each
// once.
func caseFullStoreRefuses(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 10)
	e := serverOn(t, h, dir)
	h.fillDisk(t, e)
	for range 3 { // each attempt over a new connection, as an agent reconnects
		expectStateLogsRefused(t, e, 10, 11, 20)
	}
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != http.StatusServiceUnavailable {
		t.Fatalf("PUT on a full store: %d %v, want 503", code, out)
	}
	h.freeDisk(t, e)
	a := e.connect2("i-1", "app1", "1", "s1")
	if seq := a.expectAck("s1"); seq != 10 {
		t.Fatalf("after freeing the store: first StateLogAck %d, want 10", seq)
	}
	a.expectRecipe()
	a.push("i-1", "s1", 11, 20, fat)
	e.stop()
	h.crash(t, dir)
	checkSeeded(t, serverOn(t, h, dir), 20)
}

// caseFullStoreRestart is issue 25's sequence: a kill -9 soon after
// StateLogs were acknowledged, a restart on a full store, StateLogs sent
// meanwhile, then room made again.
func caseFullStoreRestart(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 40)
	e := serverOn(t, h, dir)
	h.fillDisk(t, e)
	e.stop()
	h.crash(t, dir)
	e = serverOn(t, h, dir)
	for range 3 {
		expectStateLogsRefused(t, e, 40, 41, 50)
	}
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != http.StatusServiceUnavailable {
		t.Fatalf("PUT on a full store: %d %v, want 503 (never a new app at version 1)", code, out)
	}
	h.freeDisk(t, e)
	a := e.connect2("i-1", "app1", "1", "s1")
	if seq := a.expectAck("s1"); seq != 40 {
		t.Fatalf("after freeing the store: first StateLogAck %d, want 40", seq)
	}
	a.expectRecipe()
	a.push("i-1", "s1", 41, 50, fat)
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 || out["recipe_version"] != float64(3) {
		t.Fatalf("PUT after freeing the store: %d %v, want recipe_version 3", code, out)
	}
	e.stop()
	checkSeeded(t, serverOn(t, h, dir), 50)
}

// caseRevocation: a revocation and an admission are stored before they
// are answered, and survive a crash.
func caseRevocation(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 0)
	e := serverOn(t, h, dir)
	e.connect("i-2", "app1", "2", "2.1").expectRecipe()
	if code, out := e.api("DELETE", "/api/apps/app1/instances/i-1", ""); code != 200 {
		t.Fatalf("DELETE: %d %v", code, out)
	}
	revokedAt := e.instance("app1", "i-1").RevokedAt
	e.stop()
	h.crash(t, dir)
	e = serverOn(t, h, dir)
	if in := e.instance("app1", "i-1"); in.RevokedAt == nil || !in.RevokedAt.Equal(*revokedAt) {
		t.Fatalf("after a crash i-1 is %+v, want it revoked at %v", in, revokedAt)
	}
	e.handshake(identity("i-1", "app1", tok("1"), "2.2", e.secret("app1"))).expectClose(websocket.ClosePolicyViolation, "instance revoked")
	e.connect("i-2", "app1", "2", "2.1").expectRecipe()
	if code, out := e.api("POST", "/api/apps/app1/instances/i-1/admit", ""); code != 200 {
		t.Fatalf("admit: %d %v", code, out)
	}
	e.connect("i-1", "app1", "new", "2.1").expectRecipe()
	e.stop()
	h.crash(t, dir)
	e = serverOn(t, h, dir)
	e.handshake(identity("i-1", "app1", tok("1"), "2.2", "")).expectClose(websocket.ClosePolicyViolation, "instance token mismatch")
	e.connect("i-1", "app1", "new", "2.1").expectRecipe()
}

// caseNATSOutOfReach: with NATS unable to take writes, the API refuses
// changes with 503 and StateLogs are refused, never acknowledged; once
// NATS is back, the same backend process serves again and the StateLogs
// sent again are stored once.
func caseNATSOutOfReach(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 10)
	e := serverOn(t, h, dir)
	h.stopNATS(t)
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != http.StatusServiceUnavailable {
		t.Fatalf("PUT with NATS out of reach: %d %v, want 503", code, out)
	}
	expectStateLogsRefused(t, e, 10, 11, 15)
	h.startNATS(t)
	wait.EventuallyWithin(t, time.Minute, "PUT accepted again", func() bool {
		code, _ := e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
		return code == 200
	})
	// A StateLog refused while NATS was away may still have been stored
	// (a write its leader committed once the others came back): then the
	// Handshake says so, and it is not sent again.
	var a *agent
	var acked int64
	wait.EventuallyWithin(t, time.Minute, "the agent's StateLogs taken again", func() bool {
		a = e.connect2("i-1", "app1", "1", "s1")
		m, err := a.next()
		ack, ok := m.(*protocol.StateLogAck)
		if err != nil || !ok {
			return false // the cluster is still electing its leaders
		}
		acked = ack.Seq
		a.expectRecipe()
		if acked >= 11 {
			return true
		}
		a.send(stateLog("i-1", 11))
		for {
			got, err := a.next()
			if err != nil {
				return false // refused: not yet
			}
			if ack, ok := got.(*protocol.StateLogAck); ok && ack.Seq == 11 {
				acked = 11
				return true
			}
		}
	})
	if acked < 15 {
		a.push("i-1", "s1", acked+1, 15, fat)
	}
	if got := agentSeqs(e.storedLogs("app1", 100), "i-1", "s1"); !slices.Equal(got, seqRange(1, 15)) {
		t.Fatalf("stored %v, want 1..15", got)
	}
}

func TestEsc(t *testing.T) {
	for _, s := range []string{"app1", "a.b", "i-0:1", "=", "x=y", "日本", "a b", "_-"} {
		got := esc(s)
		if strings.ContainsAny(got, ". *>") {
			t.Errorf("esc(%q) = %q: not one token", s, got)
		}
		if back, err := unesc(got); err != nil || back != s {
			t.Errorf("unesc(esc(%q)) = %q, %v", s, back, err)
		}
	}
	if esc("a.b") == esc("a=2Eb") {
		t.Error("esc is not injective")
	}
	if got := fmt.Sprint(esc("app1"), esc("i-1")); got != "app1i-1" {
		t.Errorf("plain ids changed: %s", got)
	}
}
