package rounds

import (
	"context"
	"fmt"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/protocol"
)

// NativeExecutor is an executor that knows which modules it implements.
type NativeExecutor interface {
	state.Executor
	Supports(module string) bool
}

// Router picks the executor of each state according to [agent] engine.
type Router struct {
	Engine config.Engine
	Native NativeExecutor // may be nil
	Salt   state.Executor // nil when the Salt bridge is not installed
}

// Execute routes req to the native executor or the Salt bridge.
func (r *Router) Execute(ctx context.Context, req state.Request) state.Result {
	native := r.Native != nil && r.Native.Supports(req.Module)
	switch r.Engine {
	case config.EngineNative:
		if !native {
			return state.Failed(fmt.Sprintf("module %s is not implemented natively and [agent] engine = native; set engine = auto to run it through the Salt bridge", req.Module))
		}
		return r.Native.Execute(ctx, req)
	case config.EngineSalt:
	default:
		if native {
			return r.Native.Execute(ctx, req)
		}
	}
	if r.Salt == nil {
		return state.Failed(fmt.Sprintf("module %s needs the Salt bridge, which is not installed", req.Module))
	}
	if req.Test {
		// The 2014 adaptor has no check mode to pass test=True through.
		return state.Failed(fmt.Sprintf("module %s runs through the Salt bridge, which has no check mode: nothing was checked", req.Module))
	}
	return r.Salt.Execute(ctx, req)
}

// BeginRound forwards the round start to the Salt executor when it cares.
func (r *Router) BeginRound(module *protocol.ModuleSource) {
	if ra, ok := r.Salt.(RoundAware); ok {
		ra.BeginRound(module)
	}
}
