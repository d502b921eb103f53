package rounds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
	"github.com/visualops/opsagent/updater"
)

const hang = 10 * time.Second // guard against a hung test, never a timing assertion

type logEntry struct {
	Version int64
	StateID string
	Result  state.Result
}

type fakeLink struct {
	reports    chan logEntry
	mu         sync.Mutex
	queries    []int64
	supersedes []int64
}

func newFakeLink() *fakeLink { return &fakeLink{reports: make(chan logEntry, 1000)} }

func (f *fakeLink) Report(v int64, id string, r state.Result) { f.reports <- logEntry{v, id, r} }
func (f *fakeLink) QueryWaits(v int64) {
	f.mu.Lock()
	f.queries = append(f.queries, v)
	f.mu.Unlock()
}
func (f *fakeLink) Supersede(v int64) {
	f.mu.Lock()
	f.supersedes = append(f.supersedes, v)
	f.mu.Unlock()
}

func (f *fakeLink) next(t *testing.T) logEntry {
	t.Helper()
	select {
	case e := <-f.reports:
		return e
	case <-time.After(hang):
		t.Fatal("no StateLog reported")
		return logEntry{}
	}
}

func (f *fakeLink) expect(t *testing.T, version int64, id string, ok bool) logEntry {
	t.Helper()
	e := f.next(t)
	if e.Version != version || e.StateID != id || e.Result.OK != ok {
		t.Fatalf("got StateLog v%d %s ok=%v (%q), want v%d %s ok=%v", e.Version, e.StateID, e.Result.OK, e.Result.Comment, version, id, ok)
	}
	return e
}

func (f *fakeLink) none(t *testing.T) {
	t.Helper()
	select {
	case e := <-f.reports:
		t.Fatalf("unexpected StateLog %+v", e)
	default:
	}
}

// script is an executor whose behaviour per state id is set by the test.
type script struct {
	mu      sync.Mutex
	fail    map[string]int // state id -> remaining failures
	block   map[string]chan struct{}
	started chan string
	calls   []string
}

func newScript() *script {
	return &script{fail: map[string]int{}, block: map[string]chan struct{}{}, started: make(chan string, 1000)}
}

func (s *script) Execute(ctx context.Context, req state.Request) state.Result {
	s.mu.Lock()
	s.calls = append(s.calls, req.StateID)
	gate := s.block[req.StateID]
	fail := s.fail[req.StateID] > 0
	if fail {
		s.fail[req.StateID]--
	}
	s.mu.Unlock()
	s.started <- req.StateID
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return state.Failed("stopped")
		}
	}
	if fail {
		return state.Failed("boom " + req.StateID)
	}
	return state.Result{OK: true, Comment: "ok " + req.StateID}
}

func (s *script) waitStarted(t *testing.T, id string) {
	t.Helper()
	select {
	case got := <-s.started:
		if got != id {
			t.Fatalf("started %s, want %s", got, id)
		}
	case <-time.After(hang):
		t.Fatalf("state %s never started", id)
	}
}

// fakeUpdater prepares updates as the test says and records what it
// prepares, installs and discards.
type fakeUpdater struct {
	applied   chan protocol.AgentUpdate // Install called
	prepared  chan protocol.AgentUpdate // Prepare called (nil: not recorded)
	gate      chan struct{}             // Prepare blocks until it is closed or ctx is done (nil: does not block)
	restart   bool                      // Install answers with a Restart
	err       error                     // Prepare refuses
	onPrepare func()                    // called first thing in Prepare

	mu        sync.Mutex
	cancelled []string // versions whose preparation was cancelled
	discarded []string
}

func (f *fakeUpdater) Prepare(ctx context.Context, u protocol.AgentUpdate) (Prepared, error) {
	if f.onPrepare != nil {
		f.onPrepare()
	}
	if f.prepared != nil {
		f.prepared <- u
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			f.mu.Lock()
			f.cancelled = append(f.cancelled, u.Version)
			f.mu.Unlock()
			return nil, ctx.Err()
		}
	}
	if f.err != nil {
		return nil, f.err
	}
	return &fakePrepared{f: f, u: u}, nil
}

type fakePrepared struct {
	f *fakeUpdater
	u protocol.AgentUpdate
}

func (p *fakePrepared) Install() (*updater.Restart, error) {
	p.f.applied <- p.u
	if p.f.restart {
		return &updater.Restart{Binary: "/opt/visualops/bin/opsagent", Version: p.u.Version}, nil
	}
	return nil, nil
}

func (p *fakePrepared) Discard() {
	p.f.mu.Lock()
	p.f.discarded = append(p.f.discarded, p.u.Version)
	p.f.mu.Unlock()
}

type harness struct {
	t       *testing.T
	eng     *Engine
	link    *fakeLink
	exec    *script
	clk     *clock.Fake
	store   *Store
	dir     string
	cancel  context.CancelFunc
	done    chan struct{}
	ctx     context.Context
	restart *updater.Restart // what Run returned
}

func newHarness(t *testing.T, dir string, mod func(*Options)) *harness {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	h := &harness{t: t, link: newFakeLink(), exec: newScript(), clk: clk, dir: dir, done: make(chan struct{})}
	h.store = NewStore(Files{Recipe: filepath.Join(dir, "recipe.json"), PendingUpdate: filepath.Join(dir, "pending-update.json")}, clk, nil)
	opts := Options{
		Executor: h.exec, Link: h.link, Store: h.store, Clock: clk, InstanceID: func() string { return "i-1" },
		RoundDelay: 10 * time.Minute, RetryDelay: 30 * time.Second,
	}
	if mod != nil {
		mod(&opts)
	}
	h.eng = New(opts)
	h.ctx, h.cancel = context.WithCancel(context.Background())
	go func() {
		defer close(h.done)
		h.restart, _ = h.eng.Run(h.ctx)
	}()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	h.cancel()
	select {
	case <-h.done:
	case <-time.After(hang):
		h.t.Fatal("engine did not stop")
	}
}

func (h *harness) push(m protocol.Message) { h.eng.Deliver(h.ctx, m) }

// advanceTimer waits for the engine to arm a timer, checks its duration and
// fires it.
func (h *harness) advanceTimer(want time.Duration) {
	h.t.Helper()
	stop := make(chan struct{})
	timer := time.AfterFunc(hang, func() { close(stop) })
	defer timer.Stop()
	d, ok := h.clk.WaitForTimer(stop)
	if !ok {
		h.t.Fatalf("no timer armed (want %s)", want)
	}
	if d != want {
		h.t.Fatalf("timer of %s armed, want %s", d, want)
	}
	h.clk.Advance(d)
}

func recipe(version int64, states ...string) *protocol.RecipeMetadata {
	m := &protocol.RecipeMetadata{RecipeVersion: version, States: []protocol.RecipeState{}}
	for _, s := range states {
		id, module, _ := strings.Cut(s, ":")
		if module == "" {
			module = "linux.cmd"
		}
		m.States = append(m.States, protocol.RecipeState{ID: id, Module: module, Parameter: json.RawMessage(`{}`)})
	}
	return m
}

func TestRoundOrderCommentAndDelay(t *testing.T) {
	h := newHarness(t, "", nil)
	h.push(recipe(7, "a", "note:meta.comment", "b"))
	h.link.expect(t, 7, "a", true)
	c := h.link.expect(t, 7, "note", true)
	if c.Result.Comment != "skipped: comment" {
		t.Errorf("comment state reported %q", c.Result.Comment)
	}
	h.link.expect(t, 7, "b", true)
	h.advanceTimer(10 * time.Minute)
	h.link.expect(t, 7, "a", true)
	h.link.expect(t, 7, "note", true)
	h.link.expect(t, 7, "b", true)
	h.exec.mu.Lock()
	defer h.exec.mu.Unlock()
	if got := strings.Join(h.exec.calls, ","); got != "a,b,a,b" {
		t.Errorf("executed %s; comments must not be executed", got)
	}
}

func TestFailureRestartsThenBacksOff(t *testing.T) {
	h := newHarness(t, "", nil)
	h.exec.fail["b"] = 3
	h.push(recipe(1, "a", "b", "c"))
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", false)
	// immediate restart from the first state
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", false)
	// ceased: retry_delay, then a fresh round, which restarts at once again
	h.advanceTimer(30 * time.Second)
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", false)
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", true)
	h.link.expect(t, 1, "c", true)
	h.advanceTimer(10 * time.Minute)
	h.link.expect(t, 1, "a", true)
	st := h.eng.Status()
	if st.RoundsFailed != 3 {
		t.Errorf("rounds failed = %d, want 3", st.RoundsFailed)
	}
}

func TestWaitBlocksUntilReleasedAndIsRemembered(t *testing.T) {
	h := newHarness(t, "", nil)
	h.push(recipe(3, "a", "w:meta.wait", "b"))
	h.link.expect(t, 3, "a", true)
	waitFor(t, func() bool { return h.eng.Status().WaitingOn == "w" })
	h.push(&protocol.StatePush{RecipeVersion: 2, StateID: "w"}) // other version: ignored
	h.push(&protocol.StatePush{RecipeVersion: 3, StateID: "a"}) // not a wait: ignored
	h.eng.Connected()
	waitFor(t, func() bool { h.link.mu.Lock(); defer h.link.mu.Unlock(); return len(h.link.queries) == 1 })
	h.link.none(t)
	h.push(&protocol.WaitList{RecipeVersion: 3, Waited: []protocol.WaitEntry{{InstanceID: "i-other", StateID: "w"}}})
	h.link.none(t)
	h.push(&protocol.WaitList{RecipeVersion: 3, Waited: []protocol.WaitEntry{{InstanceID: "i-1", StateID: "w"}}})
	h.link.expect(t, 3, "w", true)
	h.link.expect(t, 3, "b", true)
	h.advanceTimer(10 * time.Minute)
	h.link.expect(t, 3, "a", true)
	h.link.expect(t, 3, "w", true) // remembered for this version
	h.link.expect(t, 3, "b", true)
}

func TestNewRecipePreemptsRunningState(t *testing.T) {
	h := newHarness(t, "", nil)
	h.exec.block["slow"] = make(chan struct{}) // never released
	h.push(recipe(1, "a", "slow", "z"))
	h.link.expect(t, 1, "a", true)
	h.exec.waitStarted(t, "a")
	h.exec.waitStarted(t, "slow")
	h.push(recipe(1, "x")) // same version while running: ignored
	h.push(recipe(2, "n1", "n2"))
	h.link.expect(t, 2, "n1", true) // the stopped state's result is not reported
	h.link.expect(t, 2, "n2", true)
	h.link.mu.Lock()
	defer h.link.mu.Unlock()
	if fmt.Sprint(h.link.supersedes) != "[1 2]" {
		t.Errorf("supersede calls %v, want [1 2]", h.link.supersedes)
	}
}

func TestNewRecipeDuringWait(t *testing.T) {
	h := newHarness(t, "", nil)
	h.push(recipe(1, "w:meta.wait", "never"))
	waitFor(t, func() bool { return h.eng.Status().WaitingOn == "w" })
	h.push(recipe(2, "n"))
	h.link.expect(t, 2, "n", true)
}

func TestVersionOnlyRelabels(t *testing.T) {
	h := newHarness(t, "", nil)
	gate := make(chan struct{})
	h.exec.block["b"] = gate
	h.push(recipe(5, "a", "b", "c"))
	h.link.expect(t, 5, "a", true)
	h.exec.waitStarted(t, "a")
	h.exec.waitStarted(t, "b")
	h.push(&protocol.RecipeMetadata{RecipeVersion: 6})
	waitFor(t, func() bool { return h.eng.Status().RecipeVersion == 6 })
	close(gate)
	h.link.expect(t, 6, "b", true)
	h.link.expect(t, 6, "c", true)
}

func TestUpdateHeldUntilRoundEnds(t *testing.T) {
	up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 2)}
	h := newHarness(t, "", func(o *Options) { o.Updater = up })
	gate := make(chan struct{})
	h.exec.block["b"] = gate
	h.push(recipe(1, "a", "b"))
	h.exec.waitStarted(t, "a")
	h.exec.waitStarted(t, "b")
	h.push(&protocol.AgentUpdate{Version: "2.2"})
	h.push(&protocol.AgentUpdate{Version: "2.3"}) // replaces the pending one
	waitFor(t, func() bool { return h.eng.Status().PendingUpdate == "2.3" })
	if _, err := os.Stat(filepath.Join(h.dir, "pending-update.json")); err != nil {
		t.Fatalf("pending update not persisted: %v", err)
	}
	select {
	case u := <-up.applied:
		t.Fatalf("update %s applied during the round", u.Version)
	default:
	}
	close(gate)
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", true)
	select {
	case u := <-up.applied:
		if u.Version != "2.3" {
			t.Fatalf("applied %s, want 2.3", u.Version)
		}
	case <-time.After(hang):
		t.Fatal("update not applied after the round")
	}
	// Forgotten once Install returned (the fake answers before).
	waitFor(t, func() bool {
		_, err := os.Stat(filepath.Join(h.dir, "pending-update.json"))
		return os.IsNotExist(err)
	})
}

// While an update is being prepared (a release server that stalls), the
// engine goes on: a new recipe is applied, a wait is released, the timer
// between rounds fires. The update is installed once it is ready and no
// round runs.
func TestRecipesAndWaitsHandledWhileAnUpdatePrepares(t *testing.T) {
	up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 2), prepared: make(chan protocol.AgentUpdate, 2), gate: make(chan struct{})}
	h := newHarness(t, "", func(o *Options) { o.Updater = up })
	h.push(recipe(1, "a"))
	h.link.expect(t, 1, "a", true)
	h.push(&protocol.AgentUpdate{Version: "2.2"})
	if u := <-up.prepared; u.Version != "2.2" {
		t.Fatalf("preparing %s", u.Version)
	}
	waitFor(t, func() bool { return h.eng.Status().UpdateStage == "preparing" })
	// The preparation hangs; the engine does not.
	h.push(recipe(2, "b", "w:meta.wait", "c"))
	h.link.expect(t, 2, "b", true)
	waitFor(t, func() bool { return h.eng.Status().WaitingOn == "w" })
	h.push(&protocol.StatePush{RecipeVersion: 2, StateID: "w"})
	h.link.expect(t, 2, "w", true)
	h.link.expect(t, 2, "c", true)
	h.advanceTimer(10 * time.Minute)
	h.link.expect(t, 2, "b", true)
	h.link.expect(t, 2, "w", true)
	h.link.expect(t, 2, "c", true)
	// The backend offers the same update again at a Handshake: the
	// preparation goes on.
	h.push(&protocol.AgentUpdate{Version: "2.2"})
	select {
	case u := <-up.applied:
		t.Fatalf("update %s installed before it was prepared", u.Version)
	default:
	}
	close(up.gate)
	select {
	case u := <-up.applied:
		if u.Version != "2.2" {
			t.Fatalf("installed %s", u.Version)
		}
	case <-time.After(hang):
		t.Fatal("the prepared update was not installed between rounds")
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	if len(up.cancelled) != 0 || len(up.prepared) != 0 {
		t.Errorf("the same update offered again restarted its preparation: cancelled %v, %d more preparations", up.cancelled, len(up.prepared))
	}
}

// A newer update cancels the preparation of the pending one; a person's
// request restarts even the preparation of the same version (its
// permissions are taken at the start).
func TestNewerUpdateCancelsThePreparation(t *testing.T) {
	up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 2), prepared: make(chan protocol.AgentUpdate, 4), gate: make(chan struct{})}
	h := newHarness(t, "", func(o *Options) { o.Updater = up })
	h.push(&protocol.AgentUpdate{Version: "2.2"})
	<-up.prepared
	h.push(&protocol.AgentUpdate{Version: "2.3"})
	if u := <-up.prepared; u.Version != "2.3" {
		t.Fatalf("preparing %s, want 2.3", u.Version)
	}
	h.eng.DeliverUpdateByHand(h.ctx, protocol.AgentUpdate{Version: "2.3"})
	if u := <-up.prepared; u.Version != "2.3" {
		t.Fatalf("preparing %s, want 2.3 again", u.Version)
	}
	up.mu.Lock()
	got := fmt.Sprint(up.cancelled)
	up.mu.Unlock()
	if got != "[2.2 2.3]" {
		t.Errorf("cancelled preparations %s, want [2.2 2.3]", got)
	}
	close(up.gate)
	if u := <-up.applied; u.Version != "2.3" {
		t.Fatalf("installed %s", u.Version)
	}
}

// After a start, the persisted recipe's first round runs before the
// persisted pending update is prepared again: a release server that
// stalls, or an update that crashes the agent, cannot keep an instance
// from converging.
func TestPersistedRecipeRoundsBeforePendingUpdate(t *testing.T) {
	dir := t.TempDir()
	h := newHarness(t, dir, nil)
	h.push(recipe(4, "a", "b"))
	h.link.expect(t, 4, "a", true)
	h.link.expect(t, 4, "b", true)
	h.stop()
	store := NewStore(Files{Recipe: filepath.Join(dir, "recipe.json"), PendingUpdate: filepath.Join(dir, "pending-update.json")}, clock.Real{}, nil)
	if err := store.SaveUpdate(&protocol.AgentUpdate{Version: "2.2"}); err != nil {
		t.Fatal(err)
	}

	gate := make(chan struct{})
	var early atomic.Bool
	up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 2), prepared: make(chan protocol.AgentUpdate, 2), onPrepare: func() {
		select {
		case <-gate:
		default:
			early.Store(true) // the first round still runs
		}
	}}
	h2 := newHarness(t, dir, func(o *Options) {
		o.Updater = up
		o.Executor.(*script).block["a"] = gate
	})
	h2.exec.waitStarted(t, "a")
	waitFor(t, func() bool { st := h2.eng.Status(); return st.PendingUpdate == "2.2" && st.UpdateStage == "held" })
	// The backend offers it again at the Handshake: still held.
	h2.push(&protocol.AgentUpdate{Version: "2.2"})
	close(gate)
	h2.link.expect(t, 4, "a", true)
	h2.link.expect(t, 4, "b", true)
	if u := <-up.prepared; u.Version != "2.2" {
		t.Fatalf("prepared %s", u.Version)
	}
	if u := <-up.applied; u.Version != "2.2" {
		t.Fatalf("installed %s", u.Version)
	}
	if early.Load() {
		t.Error("the pending update was prepared before the resumed recipe's first round ended")
	}
}

// Stopped while an update is being prepared, the engine keeps it persisted
// for the next start (the cancelled preparation is no refusal).
func TestStopKeepsThePendingUpdate(t *testing.T) {
	for i := 0; i < 20; i++ { // the engine's select picks at random between the stop and the cancelled preparation
		up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 1), prepared: make(chan protocol.AgentUpdate, 1), gate: make(chan struct{})}
		h := newHarness(t, "", func(o *Options) { o.Updater = up })
		h.push(&protocol.AgentUpdate{Version: "2.2"})
		<-up.prepared
		h.stop()
		if u, err := h.store.LoadUpdate(); err != nil || u == nil || u.Version != "2.2" {
			t.Fatalf("after a stop during the preparation, the pending update is %+v (%v), want 2.2 kept", u, err)
		}
	}
}

func TestUpdateWithoutUpdaterIsDroppedWithNote(t *testing.T) {
	h := newHarness(t, "", nil)
	h.push(&protocol.AgentUpdate{Version: "9.9"})
	waitFor(t, func() bool { return strings.Contains(h.eng.Status().UpdateNote, "not available") })
}

func TestResumeFromPersistedRecipeWithBackendDown(t *testing.T) {
	dir := t.TempDir()
	h := newHarness(t, dir, nil)
	h.push(recipe(4, "a", "w:meta.wait", "b"))
	h.link.expect(t, 4, "a", true)
	h.push(&protocol.StatePush{RecipeVersion: 4, StateID: "w"})
	h.link.expect(t, 4, "w", true)
	h.link.expect(t, 4, "b", true)
	h.stop()

	// A new engine with the same store and nothing delivered resumes at once.
	h2 := newHarness(t, dir, nil)
	h2.link.expect(t, 4, "a", true)
	h2.link.expect(t, 4, "w", true) // satisfied wait survived the restart
	h2.link.expect(t, 4, "b", true)
}

func TestCorruptRecipeMovedAside(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "recipe.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, dir, nil)
	waitFor(t, func() bool {
		m, _ := filepath.Glob(filepath.Join(dir, "recipe.json.corrupt-*"))
		return len(m) == 1
	})
	h.push(recipe(1, "a"))
	h.link.expect(t, 1, "a", true)
}

func TestStateTimeout(t *testing.T) {
	h := newHarness(t, "", func(o *Options) { o.StateTimeout = time.Millisecond })
	h.exec.block["slow"] = make(chan struct{})
	h.push(recipe(1, "slow"))
	e := h.link.expect(t, 1, "slow", false)
	if !strings.Contains(e.Result.Comment, "timed out") {
		t.Errorf("comment %q does not say it timed out", e.Result.Comment)
	}
}

func TestInvalidRecipeRefusedCurrentContinues(t *testing.T) {
	h := newHarness(t, "", nil)
	gate := make(chan struct{})
	h.exec.block["a"] = gate
	h.push(recipe(1, "a", "b"))
	h.exec.waitStarted(t, "a")
	bad := recipe(2, "x:Not A Module")
	h.push(bad)
	// The backend hears of the refusal at once, as a failed StateLog of the
	// refused version, and the running recipe goes on.
	e := h.link.expect(t, 2, RefusedStateID, false)
	if !strings.Contains(e.Result.Comment, "refused") || !strings.Contains(e.Result.Comment, "state[0].module") {
		t.Errorf("refusal comment %q does not say why", e.Result.Comment)
	}
	close(gate)
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", true)
}

// An update that asks to re-execute ends Run with the Restart, after the
// round, with nothing running; a refused one leaves the engine going.
func TestUpdateRestartEndsRunAfterTheRound(t *testing.T) {
	up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 2), restart: true}
	h := newHarness(t, "", func(o *Options) { o.Updater = up })
	gate := make(chan struct{})
	h.exec.block["b"] = gate
	h.push(recipe(1, "a", "b"))
	h.exec.waitStarted(t, "a")
	h.exec.waitStarted(t, "b")
	h.push(&protocol.AgentUpdate{Version: "2.2"})
	close(gate)
	h.link.expect(t, 1, "a", true)
	h.link.expect(t, 1, "b", true)
	select {
	case <-h.done:
	case <-time.After(hang):
		t.Fatal("Run did not return after the update asked to restart")
	}
	if h.restart == nil || h.restart.Version != "2.2" {
		t.Fatalf("Run returned %+v", h.restart)
	}
	if st := h.eng.Status(); st.Phase != "restarting" || st.StateIndex != -1 {
		t.Errorf("status after restart: %+v", st)
	}
}

func TestRefusedUpdateKeepsRunning(t *testing.T) {
	up := &fakeUpdater{applied: make(chan protocol.AgentUpdate, 2), err: errors.New("signature does not match")}
	h := newHarness(t, "", func(o *Options) { o.Updater = up })
	h.push(&protocol.AgentUpdate{Version: "2.2"})
	waitFor(t, func() bool { return strings.Contains(h.eng.Status().UpdateNote, "signature does not match") })
	h.push(recipe(1, "a"))
	h.link.expect(t, 1, "a", true)
}

// The module a recipe names is remembered by the engine (not written into
// its options) and used by later recipes that name none.
func TestModuleRememberedAcrossRecipes(t *testing.T) {
	var changes []protocol.ModuleSource
	var mu sync.Mutex
	h := newHarness(t, "", func(o *Options) {
		o.DefaultModule = &protocol.ModuleSource{Repo: "https://a/states.git", Tag: "v1"}
		o.OnModuleChange = func(m protocol.ModuleSource) { mu.Lock(); changes = append(changes, m); mu.Unlock() }
	})
	m2 := recipe(1, "a")
	m2.Module = &protocol.ModuleSource{Repo: "https://b/states.git", Tag: "v2"}
	h.push(m2)
	h.link.expect(t, 1, "a", true)
	h.push(recipe(2, "a"))
	h.link.expect(t, 2, "a", true)
	rec, err := h.store.LoadRecipe()
	if err != nil || rec.Module == nil || rec.Module.Tag != "v2" {
		t.Fatalf("recipe 2 module: %+v %v", rec, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(changes) != 1 || changes[0].Tag != "v2" {
		t.Errorf("OnModuleChange calls: %+v", changes)
	}
}

func TestOutputTruncated(t *testing.T) {
	long := strings.Repeat("é", 100)
	got := truncate(long, 11)
	if !strings.HasPrefix(got, strings.Repeat("é", 5)+"\n[… truncated 190 bytes]") {
		t.Errorf("truncate: %q", got)
	}
	if truncate("short", 10) != "short" {
		t.Error("short string changed")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	wait.EventuallyWithin(t, hang, "the engine's state", cond)
}
