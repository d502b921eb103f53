package rounds

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/protocol"
	"github.com/visualops/opsagent/updater"
)

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
	prep      *preparation // the pending update, being prepared in the background
	ready     Prepared     // the pending update, prepared: installed when no round runs
	cur       *roundRun
	timer     clock.Timer
	restarted bool // the running round is the immediate restart after a failure
	round     int64
	module    *protocol.ModuleSource // last states repository named (or the config's)
	restart   *updater.Restart       // set when an installed update asks to re-execute
	// holdUpdates: after a start, the resumed recipe's first round ends
	// before a pending update is prepared, so that an instance converges
	// first, whatever the update (or the release server) does.
	holdUpdates bool
}

// preparation is an update being prepared on its own goroutine.
type preparation struct {
	cancel context.CancelFunc
	done   chan preparedUpdate // receives once
}

type preparedUpdate struct {
	p   Prepared
	err error
}

// Run applies recipes until ctx is cancelled (it returns nil, nil) or an
// installed update asks to re-execute the new binary (it returns that
// Restart, with no round running). It resumes the persisted recipe at
// once, before the backend is reachable; a persisted pending update is
// prepared once that recipe's first round has ended.
func (e *Engine) Run(ctx context.Context) (*updater.Restart, error) {
	l := &loop{e: e, ctx: ctx, module: e.opts.DefaultModule}
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
	} else if u != nil && u.Version == e.opts.CurrentVersion {
		e.log.Info("the pending update is the running version; done with it", "version", u.Version)
		l.setPending(nil)
	} else if u != nil && e.opts.Updater == nil {
		l.setPending(nil)
		l.noUpdater(u.Version)
	} else if u != nil {
		l.setPending(u)
	}
	if l.rec != nil && len(l.rec.States) > 0 {
		l.holdUpdates = true
		l.startRound()
		if l.pending != nil {
			e.log.Info("pending update held until the resumed recipe's first round ends", "version", l.pending.Version)
		}
	}
	l.prepareUpdate()
	for {
		if l.restart != nil {
			l.stopTimer()
			e.setStatus(func(s *Status) { s.Phase = "restarting"; s.StateIndex = -1; s.StateID = "" })
			return l.restart, nil
		}
		var doneC <-chan outcome
		if l.cur != nil {
			doneC = l.cur.done
		}
		var timerC <-chan time.Time
		if l.timer != nil {
			timerC = l.timer.C()
		}
		var prepC <-chan preparedUpdate
		if l.prep != nil {
			prepC = l.prep.done
		}
		select {
		case <-ctx.Done():
			l.stopRound()
			l.stopTimer()
			l.dropUpdate() // the pending update stays persisted for the next start
			e.setStatus(func(s *Status) { s.Phase = "stopped"; s.StateIndex = -1; s.StateID = "" })
			return nil, nil
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
		case res := <-prepC:
			l.prep = nil
			l.prepared(res)
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

func (l *loop) handle(m protocol.Message) {
	e := l.e
	switch m := m.(type) {
	case *protocol.RecipeMetadata:
		l.recipe(m)
	case *protocol.StatePush:
		l.release(m.RecipeVersion, []string{m.StateID}, "State")
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
		l.release(m.RecipeVersion, ids, "WaitList")
	case *protocol.AgentUpdate:
		l.update(*m, false)
	case updateByHand:
		l.update(m.u, true)
	}
}

// update makes u the pending update and starts preparing it in the
// background; it is installed once prepared and no round runs. An
// AgentUpdate the same as the pending one (the backend offers it again at
// every Handshake) lets the preparation go on.
func (l *loop) update(u protocol.AgentUpdate, byHand bool) {
	e := l.e
	if e.opts.Updater == nil {
		l.noUpdater(u.Version)
		return
	}
	if !byHand && l.pending != nil && *l.pending == u {
		e.log.Debug("update already pending; its preparation goes on", "version", u.Version)
		return
	}
	if l.pending != nil {
		e.log.Info("update replaces the pending one", "version", u.Version, "replaced", l.pending.Version)
	}
	l.dropUpdate()
	l.setPending(&u)
	l.prepareUpdate()
}

func (l *loop) noUpdater(version string) {
	note := fmt.Sprintf("self-update is not available in this build; update to %s dropped", version)
	l.e.log.Warn(note)
	l.e.setStatus(func(s *Status) { s.UpdateNote = note })
}

func (l *loop) recipe(m *protocol.RecipeMetadata) {
	e := l.e
	if err := protocol.ValidateRecipe(m); err != nil {
		// Tell the backend too: a refusal only in our log is invisible to
		// whoever pushed the recipe.
		e.log.Error("recipe refused; the current recipe continues", "recipe_version", m.RecipeVersion, "problem", err)
		e.opts.Link.Report(m.RecipeVersion, RefusedStateID, state.Failed(fmt.Sprintf("recipe %d refused by the agent; the previous recipe continues: %v", m.RecipeVersion, err)))
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
		module = l.module
	}
	if m.Module != nil && (l.module == nil || *l.module != *m.Module) {
		l.module = m.Module
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
		l.betweenRounds()
		return
	}
	// A new recipe pre-empts a pending update: its round starts now, and
	// the update (still downloading, or ready) is installed when it ends.
	l.startRound()
}

// release marks waits released; via names the message (State pushed at
// release, or the WaitList answering a WaitQuery after a reconnect).
func (l *loop) release(version int64, ids []string, via string) {
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
			e.log.Info("wait released by the backend", "state_id", id, "via", via)
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
	l.e.setStatus(func(s *Status) { s.PendingUpdate = version; s.UpdateStage = "" })
}

func (l *loop) setStage(stage string) {
	l.e.setStatus(func(s *Status) { s.UpdateStage = stage })
}

// prepareUpdate starts preparing the pending update on a goroutine of its
// own (download, verify, extract, smoke-test), unless updates are held or
// it is already being prepared or ready.
func (l *loop) prepareUpdate() {
	e := l.e
	if l.pending == nil || l.prep != nil || l.ready != nil || e.opts.Updater == nil {
		return
	}
	if l.holdUpdates {
		l.setStage("held")
		return
	}
	u := *l.pending
	ctx, cancel := context.WithCancel(l.ctx)
	p := &preparation{cancel: cancel, done: make(chan preparedUpdate, 1)}
	l.prep = p
	l.setStage("preparing")
	e.log.Info("preparing update in the background; it is installed between rounds", "version", u.Version, "url", u.URL)
	go func() {
		defer cancel()
		prep, err := e.opts.Updater.Prepare(ctx, u)
		p.done <- preparedUpdate{p: prep, err: err}
	}()
}

// prepared takes the result of the preparation that just ended.
func (l *loop) prepared(res preparedUpdate) {
	e := l.e
	u := *l.pending
	if l.ctx.Err() != nil {
		// Stopping (the select may pick this before ctx.Done): the pending
		// update stays persisted for the next start.
		if res.p != nil {
			res.p.Discard()
		}
		return
	}
	if res.err != nil {
		l.setPending(nil)
		note := fmt.Sprintf("update to %s refused: %v", u.Version, res.err)
		e.log.Error("update refused; keeping the running version", "version", u.Version, "err", res.err)
		e.setStatus(func(s *Status) { s.UpdateNote = note })
		return
	}
	l.ready = res.p
	l.setStage("ready")
	if l.cur != nil {
		e.log.Info("update ready; installed when the round ends", "version", u.Version)
		return
	}
	l.install()
}

// dropUpdate stops a preparation in progress (waiting until it has let go
// of its files) and discards a prepared update; the pending update itself
// stays.
func (l *loop) dropUpdate() {
	if l.prep != nil {
		l.prep.cancel()
		if res := <-l.prep.done; res.p != nil {
			res.p.Discard()
		}
		l.prep = nil
	}
	if l.ready != nil {
		l.ready.Discard()
		l.ready = nil
	}
}

// betweenRounds is called when no round runs: a held update is prepared
// now, and a prepared one installed.
func (l *loop) betweenRounds() {
	if l.holdUpdates {
		l.holdUpdates = false
		l.prepareUpdate()
	}
	l.install()
}

// install swaps the prepared update in; between rounds only.
func (l *loop) install() {
	e := l.e
	if l.ready == nil {
		return
	}
	p, u := l.ready, *l.pending
	l.ready = nil
	e.log.Info("installing update", "version", u.Version)
	// The pending update stays persisted through a restart into the new
	// version, which drops it (CurrentVersion); killed before that, the
	// agent prepares it again at its next start.
	restart, err := p.Install()
	if restart == nil {
		l.setPending(nil)
	}
	if err != nil {
		note := fmt.Sprintf("update to %s refused: %v", u.Version, err)
		e.log.Error("update failed; keeping the running version", "version", u.Version, "err", err)
		e.setStatus(func(s *Status) { s.UpdateNote = note })
		return
	}
	if restart != nil {
		e.setStatus(func(s *Status) { s.UpdateNote = "update to " + u.Version + " installed; restarting into it" })
		l.restart = restart
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
		if l.betweenRounds(); l.restart != nil {
			return
		}
		l.wait("delay", e.opts.RoundDelay)
	case roundFailed:
		e.setStatus(func(s *Status) { s.RoundsFailed++ })
		if l.betweenRounds(); l.restart != nil {
			return
		}
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
