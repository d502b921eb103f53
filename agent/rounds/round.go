package rounds

import (
	"context"
	"errors"
	"fmt"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

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
	keep := textcut.Prefix(s, limit)
	return fmt.Sprintf("%s\n[… truncated %d bytes]", keep, len(s)-len(keep))
}
