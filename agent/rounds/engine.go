// Package rounds is the recipe engine of spec/rounds.md: it applies the
// pushed recipe in rounds, state after state, forever; reports each state;
// restarts a round on failure and backs off when the failure repeats; holds
// meta.wait states until the backend releases them; and lets a new recipe,
// an update or a shutdown interrupt it at once.
package rounds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sort"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/protocol"
)

// Built-in modules the engine handles itself.
const (
	ModuleComment = "meta.comment"
	ModuleWait    = "meta.wait"
)

// Link is how the engine talks to the backend. Implementations queue while
// disconnected; none of the methods may block for long.
type Link interface {
	// Report sends one StateLog.
	Report(version int64, stateID string, res state.Result)
	// QueryWaits asks which waits of version the backend has released.
	QueryWaits(version int64)
	// Supersede says that StateLogs of any version but current are stale.
	Supersede(current int64)
}

// Updater applies a self-update. Apply normally does not return (the new
// binary replaces the process); it returns an error when the update could
// not be applied, and nil in tests or when the restart is left to the
// caller.
type Updater interface {
	Apply(ctx context.Context, u protocol.AgentUpdate) error
}

// RoundAware is implemented by executors that prepare per round (the Salt
// bridge re-fetches a moving states branch at each round start).
type RoundAware interface {
	BeginRound(module *protocol.ModuleSource)
}

// Options configures an Engine.
type Options struct {
	Executor state.Executor
	Link     Link
	Store    *Store
	Clock    clock.Clock
	Logger   *slog.Logger
	Updater  Updater // nil: self-update not available in this build
	// InstanceID returns this instance's id, to pick our entries out of a
	// WaitList (a function: the id may become known after the engine starts).
	InstanceID func() string

	RoundDelay   time.Duration // pause after a successful round ([salt] delay)
	RetryDelay   time.Duration // pause after a round ceased on a repeated failure
	StateTimeout time.Duration // 0: none
	OutputLimit  int           // bytes kept of a comment or stdout; 0: 64 KiB

	// DefaultModule is the states repository from the config, used when a
	// recipe names none.
	DefaultModule *protocol.ModuleSource
	// OnModuleChange is called when a recipe names another states
	// repository or tag, so that the caller writes it back to the config.
	OnModuleChange func(protocol.ModuleSource)
}

// Status is a snapshot of what the engine is doing.
type Status struct {
	RecipeVersion   int64                  `json:"recipe_version"`
	States          int                    `json:"states"`
	Phase           string                 `json:"phase"` // idle, running, waiting, delay, retry-delay
	Round           int64                  `json:"round"`
	StateIndex      int                    `json:"state_index"` // 0-based; -1 when no state runs
	StateID         string                 `json:"state_id,omitempty"`
	WaitingOn       string                 `json:"waiting_on,omitempty"`
	NextRoundAt     time.Time              `json:"next_round_at,omitzero"`
	LastResults     map[string]StateResult `json:"last_results,omitempty"`
	PendingUpdate   string                 `json:"pending_update,omitempty"`
	UpdateNote      string                 `json:"update_note,omitempty"`
	RoundsSucceeded int64                  `json:"rounds_succeeded"`
	RoundsFailed    int64                  `json:"rounds_failed"`
}

// StateResult is the last result of one state.
type StateResult struct {
	OK      bool      `json:"ok"`
	Comment string    `json:"comment"`
	At      time.Time `json:"at"`
}

// Engine runs rounds. Create it with New, feed it with Deliver and
// Connected, and run it with Run.
type Engine struct {
	opts      Options
	log       *slog.Logger
	events    chan protocol.Message
	connected chan struct{}

	version atomic.Int64 // current recipe version, read by the round goroutine

	wmu         sync.Mutex
	satisfied   map[string]bool // released meta.wait ids of the current version
	waitChanged chan struct{}   // closed and replaced when satisfied changes
	waitingOn   string          // wait state the round is blocked on

	smu    sync.Mutex
	status Status
}

// New returns an Engine; call Run to start it.
func New(opts Options) *Engine {
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.OutputLimit <= 0 {
		opts.OutputLimit = 64 << 10
	}
	return &Engine{
		opts:        opts,
		log:         opts.Logger,
		events:      make(chan protocol.Message, 64),
		connected:   make(chan struct{}, 1),
		satisfied:   map[string]bool{},
		waitChanged: make(chan struct{}),
		status:      Status{Phase: "idle", StateIndex: -1, LastResults: map[string]StateResult{}},
	}
}

// Deliver hands a backend message to the engine (RecipeMetadata, State,
// WaitList, AgentUpdate; others are ignored). It blocks only if the engine
// is far behind, which applies back-pressure to the connection reader.
func (e *Engine) Deliver(ctx context.Context, m protocol.Message) {
	switch m.(type) {
	case *protocol.RecipeMetadata, *protocol.StatePush, *protocol.WaitList, *protocol.AgentUpdate:
	default:
		return
	}
	select {
	case e.events <- m:
	case <-ctx.Done():
	}
}

// Connected tells the engine a Handshake has just been sent, so that a
// round blocked on a wait asks the backend what it missed.
func (e *Engine) Connected() {
	select {
	case e.connected <- struct{}{}:
	default:
	}
}

// Status returns a snapshot.
func (e *Engine) Status() Status {
	e.smu.Lock()
	defer e.smu.Unlock()
	s := e.status
	s.LastResults = make(map[string]StateResult, len(e.status.LastResults))
	for k, v := range e.status.LastResults {
		s.LastResults[k] = v
	}
	e.wmu.Lock()
	s.WaitingOn = e.waitingOn
	e.wmu.Unlock()
	return s
}

func (e *Engine) setStatus(f func(*Status)) {
	e.smu.Lock()
	f(&e.status)
	e.smu.Unlock()
}

type outcome int

const (
	roundSucceeded outcome = iota
	roundFailed
	roundStopped
)

type roundRun struct {
	cancel context.CancelFunc
	done   chan outcome
}

// loop is the engine's control state, owned by the Run goroutine.
type loop struct {
	e         *Engine
	ctx       context.Context
	rec       *Recipe
	pending   *protocol.AgentUpdate
	cur       *roundRun
	timer     clock.Timer
	restarted bool // the running round is the immediate restart after a failure
	round     int64
}

// Run applies recipes until ctx is cancelled. It resumes the persisted
// recipe at once, before the backend is reachable, and applies a persisted
// pending update first.
func (e *Engine) Run(ctx context.Context) error {
	l := &loop{e: e, ctx: ctx}
	rec, err := e.opts.Store.LoadRecipe()
	if err != nil {
		e.log.Error("cannot read the persisted recipe; starting without it", "err", err)
	}
	if rec != nil {
		e.adopt(rec)
		l.rec = rec
		e.log.Info("resuming persisted recipe", "recipe_version", rec.Version, "states", len(rec.States))
	}
	if u, err := e.opts.Store.LoadUpdate(); err != nil {
		e.log.Error("cannot read the persisted pending update", "err", err)
	} else if u != nil {
		l.setPending(u)
		l.applyUpdate()
	}
	if l.rec != nil && len(l.rec.States) > 0 {
		l.startRound()
	}
	for {
		var doneC <-chan outcome
		if l.cur != nil {
			doneC = l.cur.done
		}
		var timerC <-chan time.Time
		if l.timer != nil {
			timerC = l.timer.C()
		}
		select {
		case <-ctx.Done():
			l.stopRound()
			l.stopTimer()
			e.setStatus(func(s *Status) { s.Phase = "stopped"; s.StateIndex = -1; s.StateID = "" })
			return nil
		case m := <-e.events:
			l.handle(m)
		case <-e.connected:
			e.wmu.Lock()
			blocked := e.waitingOn != ""
			e.wmu.Unlock()
			if blocked {
				e.opts.Link.QueryWaits(e.version.Load())
			}
		case out := <-doneC:
			l.cur = nil
			l.roundEnded(out)
		case <-timerC:
			l.timer = nil
			l.restarted = false
			l.startRound()
		}
	}
}

// adopt makes rec the current recipe for the round goroutine and waits.
func (e *Engine) adopt(rec *Recipe) {
	e.version.Store(rec.Version)
	e.wmu.Lock()
	e.satisfied = map[string]bool{}
	for _, id := range rec.Satisfied {
		e.satisfied[id] = true
	}
	close(e.waitChanged)
	e.waitChanged = make(chan struct{})
	e.wmu.Unlock()
	e.setStatus(func(s *Status) {
		s.RecipeVersion = rec.Version
		s.States = len(rec.States)
		s.LastResults = map[string]StateResult{}
	})
}

var moduleName = regexp.MustCompile(`^[a-z][a-z0-9_]*(\.[a-z0-9_-]+)+$`)

// validate applies the engine's rules on top of protocol validation.
func validate(m *protocol.RecipeMetadata) error {
	for i, st := range m.States {
		if !moduleName.MatchString(st.Module) {
			return fmt.Errorf("state[%d] (%s): module %q is not a module name such as linux.cmd", i, st.ID, st.Module)
		}
	}
	return nil
}

func (l *loop) handle(m protocol.Message) {
	e := l.e
	switch m := m.(type) {
	case *protocol.RecipeMetadata:
		l.recipe(m)
	case *protocol.StatePush:
		l.release(m.RecipeVersion, []string{m.StateID})
	case *protocol.WaitList:
		var ids []string
		self := ""
		if e.opts.InstanceID != nil {
			self = e.opts.InstanceID()
		}
		for _, w := range m.Waited {
			if w.InstanceID == self {
				ids = append(ids, w.StateID)
			}
		}
		l.release(m.RecipeVersion, ids)
	case *protocol.AgentUpdate:
		if l.pending != nil {
			e.log.Info("update replaces the pending one", "version", m.Version, "replaced", l.pending.Version)
		}
		l.setPending(m)
		if l.cur == nil {
			l.applyUpdate()
		} else {
			e.log.Info("update held until the current round ends", "version", m.Version)
		}
	}
}

func (l *loop) recipe(m *protocol.RecipeMetadata) {
	e := l.e
	if err := validate(m); err != nil {
		e.log.Error("recipe refused; the current recipe continues", "recipe_version", m.RecipeVersion, "problem", err)
		return
	}
	if m.VersionOnly() {
		if l.rec == nil {
			e.log.Warn("version-only recipe push while no recipe is known; waiting for a full recipe", "recipe_version", m.RecipeVersion)
			return
		}
		if m.RecipeVersion == l.rec.Version {
			return
		}
		e.log.Info("recipe version relabelled; the round continues", "from", l.rec.Version, "to", m.RecipeVersion)
		l.rec.Version = m.RecipeVersion
		e.version.Store(m.RecipeVersion)
		e.setStatus(func(s *Status) { s.RecipeVersion = m.RecipeVersion })
		e.opts.Link.Supersede(m.RecipeVersion)
		l.persistRecipe()
		return
	}
	if l.cur != nil && l.rec != nil && m.RecipeVersion == l.rec.Version {
		e.log.Debug("recipe already running; ignored", "recipe_version", m.RecipeVersion)
		return
	}
	l.stopRound()
	l.stopTimer()
	module := m.Module
	switch {
	case module == nil && l.rec != nil && l.rec.Module != nil:
		module = l.rec.Module
	case module == nil:
		module = e.opts.DefaultModule
	}
	if module != nil && m.Module != nil && (e.opts.DefaultModule == nil || *e.opts.DefaultModule != *m.Module) {
		e.opts.DefaultModule = m.Module
		if e.opts.OnModuleChange != nil {
			e.opts.OnModuleChange(*m.Module)
		}
	}
	l.rec = &Recipe{Version: m.RecipeVersion, Module: module, States: m.States}
	e.adopt(l.rec)
	e.opts.Link.Supersede(m.RecipeVersion)
	l.persistRecipe()
	l.restarted = false
	e.log.Info("new recipe", "recipe_version", m.RecipeVersion, "states", len(m.States))
	if len(l.rec.States) == 0 {
		e.setStatus(func(s *Status) { s.Phase = "idle" })
		return
	}
	l.startRound()
}

// release marks waits as satisfied for version.
func (l *loop) release(version int64, ids []string) {
	e := l.e
	if l.rec == nil || version != l.rec.Version {
		e.log.Debug("wait release for another recipe version ignored", "recipe_version", version)
		return
	}
	waits := map[string]bool{}
	for _, st := range l.rec.States {
		if st.Module == ModuleWait {
			waits[st.ID] = true
		}
	}
	changed := false
	e.wmu.Lock()
	for _, id := range ids {
		if !waits[id] {
			e.log.Debug("wait release names no meta.wait state of this recipe; ignored", "state_id", id)
			continue
		}
		if !e.satisfied[id] {
			e.satisfied[id] = true
			changed = true
		}
	}
	if changed {
		close(e.waitChanged)
		e.waitChanged = make(chan struct{})
	}
	e.wmu.Unlock()
	if changed {
		l.persistRecipe()
	}
}

func (l *loop) persistRecipe() {
	e := l.e
	e.wmu.Lock()
	l.rec.Satisfied = l.rec.Satisfied[:0]
	for id := range e.satisfied {
		l.rec.Satisfied = append(l.rec.Satisfied, id)
	}
	e.wmu.Unlock()
	sort.Strings(l.rec.Satisfied)
	if err := e.opts.Store.SaveRecipe(l.rec); err != nil {
		e.log.Error("cannot persist the recipe; it will be lost on restart", "err", err)
	}
}

func (l *loop) setPending(u *protocol.AgentUpdate) {
	l.pending = u
	if err := l.e.opts.Store.SaveUpdate(u); err != nil {
		l.e.log.Error("cannot persist the pending update", "err", err)
	}
	version := ""
	if u != nil {
		version = u.Version
	}
	l.e.setStatus(func(s *Status) { s.PendingUpdate = version })
}

// applyUpdate runs between rounds only.
func (l *loop) applyUpdate() {
	e := l.e
	if l.pending == nil {
		return
	}
	u := *l.pending
	l.setPending(nil)
	if e.opts.Updater == nil {
		note := fmt.Sprintf("self-update is not available in this build; update to %s dropped", u.Version)
		e.log.Warn(note)
		e.setStatus(func(s *Status) { s.UpdateNote = note })
		return
	}
	e.log.Info("applying update", "version", u.Version, "url", u.URL)
	if err := e.opts.Updater.Apply(l.ctx, u); err != nil {
		note := fmt.Sprintf("update to %s failed: %v", u.Version, err)
		e.log.Error("update failed; keeping the running version", "version", u.Version, "err", err)
		e.setStatus(func(s *Status) { s.UpdateNote = note })
		return
	}
	e.setStatus(func(s *Status) { s.UpdateNote = "update to " + u.Version + " applied" })
}

func (l *loop) stopTimer() {
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
}

// stopRound cancels the running round and waits until its state's process
// group is gone.
func (l *loop) stopRound() {
	if l.cur == nil {
		return
	}
	l.cur.cancel()
	<-l.cur.done
	l.cur = nil
}

func (l *loop) roundEnded(out outcome) {
	e := l.e
	switch out {
	case roundSucceeded:
		e.setStatus(func(s *Status) { s.RoundsSucceeded++ })
		l.restarted = false
		l.applyUpdate()
		l.wait("delay", e.opts.RoundDelay)
	case roundFailed:
		e.setStatus(func(s *Status) { s.RoundsFailed++ })
		l.applyUpdate()
		if !l.restarted {
			e.log.Info("state failed; restarting the round from the first state")
			l.restarted = true
			l.startRound()
			return
		}
		e.log.Warn("state failed again in the restarted round; pausing before the next round", "retry_delay", e.opts.RetryDelay)
		l.restarted = false
		l.wait("retry-delay", e.opts.RetryDelay)
	}
}

func (l *loop) wait(phase string, d time.Duration) {
	l.stopTimer()
	l.timer = l.e.opts.Clock.NewTimer(d)
	at := l.e.opts.Clock.Now().Add(d)
	l.e.setStatus(func(s *Status) { s.Phase = phase; s.NextRoundAt = at; s.StateIndex = -1; s.StateID = "" })
}

func (l *loop) startRound() {
	e := l.e
	l.round++
	ctx, cancel := context.WithCancel(l.ctx)
	run := &roundRun{cancel: cancel, done: make(chan outcome, 1)}
	l.cur = run
	states := l.rec.States
	module := l.rec.Module
	round := l.round
	e.setStatus(func(s *Status) { s.Phase = "running"; s.Round = round; s.NextRoundAt = time.Time{} })
	if ra, ok := e.opts.Executor.(RoundAware); ok {
		ra.BeginRound(module)
	}
	go func() {
		defer cancel()
		run.done <- e.runRound(ctx, states)
	}()
}

// runRound executes states in order; it runs on its own goroutine.
func (e *Engine) runRound(ctx context.Context, states []protocol.RecipeState) outcome {
	for i, st := range states {
		if ctx.Err() != nil {
			return roundStopped
		}
		e.setStatus(func(s *Status) { s.StateIndex = i; s.StateID = st.ID })
		var res state.Result
		switch st.Module {
		case ModuleComment:
			res = state.Result{OK: true, Comment: "skipped: comment"}
		case ModuleWait:
			if !e.waitFor(ctx, st.ID) {
				return roundStopped
			}
			res = state.Result{OK: true, Comment: "wait released by the backend"}
		default:
			res = e.execute(ctx, st)
			if ctx.Err() != nil {
				// Preempted or shutting down: the result is not reported.
				return roundStopped
			}
		}
		e.report(st.ID, res)
		if !res.OK {
			return roundFailed
		}
	}
	e.setStatus(func(s *Status) { s.StateIndex = -1; s.StateID = "" })
	return roundSucceeded
}

func (e *Engine) execute(ctx context.Context, st protocol.RecipeState) state.Result {
	sctx := ctx
	if e.opts.StateTimeout > 0 {
		var cancel context.CancelFunc
		sctx, cancel = context.WithTimeout(ctx, e.opts.StateTimeout)
		defer cancel()
	}
	res := e.opts.Executor.Execute(sctx, state.Request{
		RecipeVersion: e.version.Load(),
		StateID:       st.ID,
		Module:        st.Module,
		Parameter:     st.Parameter,
	})
	if ctx.Err() == nil && errors.Is(sctx.Err(), context.DeadlineExceeded) {
		res.OK = false
		res.Comment = fmt.Sprintf("state timed out after %s ([agent] state_timeout)", e.opts.StateTimeout)
	}
	return res
}

// waitFor blocks until the wait state id is released or ctx is done.
func (e *Engine) waitFor(ctx context.Context, id string) bool {
	defer func() {
		e.wmu.Lock()
		e.waitingOn = ""
		e.wmu.Unlock()
	}()
	for {
		e.wmu.Lock()
		ok := e.satisfied[id]
		ch := e.waitChanged
		if !ok {
			e.waitingOn = id
		}
		e.wmu.Unlock()
		if ok {
			return true
		}
		e.setStatus(func(s *Status) { s.Phase = "waiting" })
		select {
		case <-ch:
			e.setStatus(func(s *Status) { s.Phase = "running" })
		case <-ctx.Done():
			return false
		}
	}
}

func (e *Engine) report(stateID string, res state.Result) {
	res.Comment = truncate(res.Comment, e.opts.OutputLimit)
	res.Stdout = truncate(res.Stdout, e.opts.OutputLimit)
	now := e.opts.Clock.Now()
	e.setStatus(func(s *Status) {
		s.LastResults[stateID] = StateResult{OK: res.OK, Comment: res.Comment, At: now}
	})
	e.opts.Link.Report(e.version.Load(), stateID, res)
}

// truncate keeps at most limit bytes of s (on a rune boundary) and says how
// much was cut.
func truncate(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	cut := limit
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s\n[… truncated %d bytes]", s[:cut], len(s)-cut)
}
