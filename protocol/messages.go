// Package protocol is the wire contract between the agent and its backend
// (spec/protocol.md, version 1, and PROTOCOL-2.md beside this file, which
// adds acknowledged StateLogs): one JSON object per WebSocket text frame,
// named by its "code" field. It decodes and validates frames, accepting the
// two spellings the 2014 agent and the public document disagree on ("id" and
// "stateid"), and encodes messages, emitting both spellings where the spec
// says so. Standard library only.
package protocol

import "encoding/json"

// Version is the highest protocol version this package speaks. Version 2
// (PROTOCOL-2.md) adds StateLog seq, Handshake log_stream and the
// backend's StateLogAck; everything of version 1 is unchanged.
const Version = 2

// DefaultMaxFrame is the largest frame Decode accepts (16 MiB).
const DefaultMaxFrame = 16 << 20

// Message codes.
const (
	CodeHandshake      = "Handshake"
	CodeStateLog       = "StateLog"
	CodeWaitQuery      = "WaitQuery"
	CodeTest           = "Test"
	CodeAppNotReady    = "AppNotReady"
	CodeRecipeMetadata = "RecipeMetadata"
	CodeState          = "State"
	CodeWaitList       = "WaitList"
	CodeAgentUpdate    = "AgentUpdate"
	CodeTestAns        = "TestAns"
	CodeStateLogAck    = "StateLogAck"
)

// Message is any protocol message.
type Message interface {
	// MessageCode is the value of the frame's "code" field.
	MessageCode() string
}

// Identity is what the agent says about itself in Handshake and Test.
type Identity struct {
	InstanceID      string `json:"instance_id"`
	AppID           string `json:"app_id"`
	AgentVersion    string `json:"agent_version"`
	ProtocolVersion int    `json:"protocol_version"`
	InstanceToken   string `json:"instance_token"`
	// InitErrors is nil, or the problems met while preparing joined by "; ".
	InitErrors *string `json:"init_errors"`
	// EnrollmentSecret is the app's enrollment secret ([userdata]
	// enroll_secret). A backend may require it on the first Handshake of an
	// instance id, before it trusts that instance's token; it is omitted
	// when empty, as backends that predate it do not expect it.
	EnrollmentSecret string `json:"enrollment_secret,omitempty"`
	// LogStream names the agent's StateLog sequence (protocol 2): seq
	// numbers are unique within it. An agent whose counter was lost (its
	// state directory wiped) starts a new stream at seq 1. Omitted when
	// empty (protocol 1).
	LogStream string `json:"log_stream,omitempty"`
}

// Handshake is sent by the agent on every (re)connect, before anything else.
type Handshake struct{ Identity }

// Test is sent by the backend to ask for the agent's identity (all fields
// empty), and by the agent as the answer (fields filled).
type Test struct{ Identity }

// StateLog reports one executed state.
type StateLog struct {
	InstanceID    string
	AppID         string
	RecipeVersion int64
	StateID       string // sent as both "id" and "stateid"
	Result        bool
	Comment       *string
	Stdout        *string
	// Seq is the StateLog's number in the agent's log stream (protocol
	// 2), from 1, increasing; 0 (omitted) from a protocol-1 agent.
	Seq int64
}

// StateLogAck tells a protocol-2 agent that every StateLog of its stream
// with seq <= Seq is stored durably (protocol 2, backend to agent). It is
// the backend's first frame after a protocol-2 Handshake, and follows each
// batch of StateLogs it stores.
type StateLogAck struct {
	LogStream string `json:"log_stream"`
	Seq       int64  `json:"seq"`
}

// WaitQuery asks the backend which waits of the current recipe are done.
type WaitQuery struct {
	InstanceID    string `json:"instance_id"`
	AppID         string `json:"app_id"`
	RecipeVersion int64  `json:"recipe_version"`
}

// AppNotReady tells the agent to refresh its identity and handshake later.
type AppNotReady struct{}

// ModuleSource names the states repository (the Salt fork) and its tag.
type ModuleSource struct {
	Repo string `json:"repo"`
	Tag  string `json:"tag"`
}

// RecipeState is one state of a recipe.
type RecipeState struct {
	ID        string // "id", or "stateid" in the public document
	Module    string
	Parameter json.RawMessage // always a JSON object
}

// RecipeMetadata pushes a recipe.
type RecipeMetadata struct {
	RecipeVersion int64
	// Module is nil when the backend did not name a states repository.
	Module *ModuleSource
	// States is nil when the frame had no "state" field (a version-only
	// push), and non-nil (possibly empty) otherwise.
	States []RecipeState
}

// VersionOnly reports whether the push only bumps the version.
func (r *RecipeMetadata) VersionOnly() bool { return r.States == nil }

// StatePush tells the agent that one of its meta.wait states may proceed.
type StatePush struct {
	RecipeVersion int64
	StateID       string // "id", or "stateid"
}

// WaitEntry is one finished wait in a WaitList.
type WaitEntry struct {
	InstanceID string `json:"instance_id"`
	StateID    string `json:"state_id"`
}

// WaitList answers a WaitQuery.
type WaitList struct {
	RecipeVersion int64       `json:"recipe_version"`
	Waited        []WaitEntry `json:"waited"`
}

// AgentUpdate asks the agent to update itself to Version.
type AgentUpdate struct {
	Version string `json:"version"`
	// URL of opsagent.tgz; empty means <base_remote>/<version>/opsagent.tgz.
	URL string `json:"url,omitempty"`
}

// TestAns is the backend's verdict on a Test answer.
type TestAns struct {
	Result bool    `json:"result"`
	Error  *string `json:"error"`
}

func (*Handshake) MessageCode() string      { return CodeHandshake }
func (*Test) MessageCode() string           { return CodeTest }
func (*StateLog) MessageCode() string       { return CodeStateLog }
func (*WaitQuery) MessageCode() string      { return CodeWaitQuery }
func (*AppNotReady) MessageCode() string    { return CodeAppNotReady }
func (*RecipeMetadata) MessageCode() string { return CodeRecipeMetadata }
func (*StatePush) MessageCode() string      { return CodeState }
func (*WaitList) MessageCode() string       { return CodeWaitList }
func (*AgentUpdate) MessageCode() string    { return CodeAgentUpdate }
func (*TestAns) MessageCode() string        { return CodeTestAns }
func (*StateLogAck) MessageCode() string    { return CodeStateLogAck }
