// Package rounds is the recipe engine of spec/rounds.md: it applies the
// pushed recipe in rounds, state after state, forever; reports each state;
// restarts a round on failure and backs off when the failure repeats; holds
// meta.wait states until the backend releases them; and lets a new recipe,
// an update or a shutdown interrupt it at once.
package rounds

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/protocol"
	"github.com/visualops/opsagent/updater"
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

// Updater applies a self-update in two steps. Prepare downloads,
// verifies and readies u; the engine runs it on a goroutine of its own, so
// that recipes, waits and timers are handled while a slow release server
// trickles, and cancels its ctx when a newer update replaces it or the
// engine stops. It returns the Prepared update, or an error when the
// update was refused or failed, leaving the running binary as it was.
type Updater interface {
	Prepare(ctx context.Context, u protocol.AgentUpdate) (Prepared, error)
}

// Prepared is an update ready to be swapped in. The engine calls Install
// between rounds only (it is quick); it returns a Restart when the new
// binary is in place and the agent must re-execute it, or an error when
// the swap failed (the running binary unchanged). Install never exits or
// execs itself: the engine returns the Restart from Run so that `opsagent
// run` unwinds cleanly (close frame, status, outbox) and re-executes as its
// very last step. Discard drops an update that will not be installed.
type Prepared interface {
	Install() (*updater.Restart, error)
	Discard()
}

// RefusedStateID is the state id of the StateLog that tells the backend a
// recipe was refused (unknown module name, bad id): a failed StateLog with
// the refused recipe_version and the reason as comment. "@" cannot start a
// state id of the IDE's (it marks references such as "@{web.state.1}").
const RefusedStateID = "@recipe"

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
	// CurrentVersion is the running version: a persisted pending update
	// for it (the one that just restarted into it) is done.
	CurrentVersion string
	// InstanceID returns this instance's id, to pick our entries out of a
	// WaitList (a function: the id may become known after the engine starts).
	InstanceID func() string

	RoundDelay   time.Duration // pause after a successful round ([salt] delay)
	RetryDelay   time.Duration // pause after a round ceased on a repeated failure
	StateTimeout time.Duration // 0: none
	OutputLimit  int           // bytes kept of a comment or stdout; 0: 64 KiB

	// DefaultModule is the states repository from the config, used when a
	// recipe names none. The engine reads it once; later recipes that name
	// one are remembered by the engine itself.
	DefaultModule *protocol.ModuleSource
	// OnModuleChange is called when a recipe names another states
	// repository or tag, so that the caller writes it back to the config.
	OnModuleChange func(protocol.ModuleSource)
}

// Status is a snapshot of what the engine is doing.
type Status struct {
	RecipeVersion   int64                  `json:"recipe_version"`
	States          int                    `json:"states"`
	Phase           string                 `json:"phase"` // idle, running, waiting (a meta.wait), delay, retry-delay, restarting (to a new version), stopped
	Round           int64                  `json:"round"`
	StateIndex      int                    `json:"state_index"` // 0-based; -1 when no state runs
	StateID         string                 `json:"state_id,omitempty"`
	WaitingOn       string                 `json:"waiting_on,omitempty"`
	NextRoundAt     time.Time              `json:"next_round_at,omitzero"`
	LastResults     map[string]StateResult `json:"last_results,omitempty"`
	PendingUpdate   string                 `json:"pending_update,omitempty"`
	UpdateStage     string                 `json:"update_stage,omitempty"` // of the pending update: held, preparing, ready
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

// DeliverUpdateByHand hands the engine an update a person asked for on the
// instance (`opsagent update`). Unlike an AgentUpdate, it always starts a
// fresh preparation, even of the version already being prepared: the
// person's permissions (--force, …) are taken when a preparation starts.
func (e *Engine) DeliverUpdateByHand(ctx context.Context, u protocol.AgentUpdate) {
	select {
	case e.events <- updateByHand{u}:
	case <-ctx.Done():
	}
}

// updateByHand is DeliverUpdateByHand's event; it never goes on the wire.
type updateByHand struct{ u protocol.AgentUpdate }

func (updateByHand) MessageCode() string { return "update-by-hand" }

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
