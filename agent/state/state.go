// Package state defines the seam between the round engine and whatever
// executes one configuration state (the native Go modules, the Salt bridge,
// or a scripted fake in tests).
package state

import (
	"context"
	"encoding/json"
)

// Request is one state to execute.
type Request struct {
	RecipeVersion int64
	StateID       string
	Module        string          // e.g. "linux.cmd"
	Parameter     json.RawMessage // the state's parameter object, as pushed
	// Test asks for check mode (Salt's test=True): report what the state
	// would change, and change nothing.
	Test bool
}

// Result is what a StateLog reports about one executed state.
type Result struct {
	OK      bool
	Comment string
	Stdout  string
	// Changed says the state changed something (in check mode: would
	// have). It is not sent to the backend, whose StateLog has no such
	// field; `opsagent apply` and the tests read it.
	Changed bool
}

// Executor runs states. Execute must return promptly once ctx is done,
// having stopped everything it started (a whole process group); the engine
// then discards the result.
type Executor interface {
	Execute(ctx context.Context, req Request) Result
}

// ExecutorFunc adapts a function to Executor.
type ExecutorFunc func(ctx context.Context, req Request) Result

// Execute calls f.
func (f ExecutorFunc) Execute(ctx context.Context, req Request) Result { return f(ctx, req) }

// Failed is a failed Result with the given comment.
func Failed(comment string) Result { return Result{Comment: comment} }
