package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/visualops/opsagent/internal/textcut"
)

// Error is a frame that cannot be accepted. It names the message code (when
// known) and the field at fault.
type Error struct {
	Code    string // message code, "" when the frame has none
	Field   string // offending field, "" for frame-level problems
	Problem string
	kind    error // ErrUnknownCode, ErrTooLarge or nil
}

// Unwrap lets callers test for ErrUnknownCode and ErrTooLarge.
func (e *Error) Unwrap() error { return e.kind }

func (e *Error) Error() string {
	msg := "protocol: "
	if e.Code != "" {
		msg += clip(e.Code) + ": "
	}
	if e.Field != "" {
		msg += "field " + e.Field + ": "
	}
	return msg + e.Problem
}

// maxQuoted bounds what an error quotes of a frame (a code, an id): a
// hostile frame must not turn into a megabyte log line.
const maxQuoted = 64

// clip keeps the first maxQuoted bytes of s, on a rune boundary.
func clip(s string) string {
	if len(s) <= maxQuoted {
		return s
	}
	return fmt.Sprintf("%s…(%d bytes)", textcut.Prefix(s, maxQuoted), len(s))
}

// ErrUnknownCode is wrapped by the error for a frame whose code this version
// does not know; callers may log such frames more quietly.
var ErrUnknownCode = errors.New("unknown message code")

// ErrTooLarge is wrapped by the error for a frame over the size limit.
var ErrTooLarge = errors.New("frame too large")

// Decode parses and validates one frame, rejecting frames over
// DefaultMaxFrame before parsing them.
func Decode(frame []byte) (Message, error) { return DecodeLimit(frame, DefaultMaxFrame) }

// DecodeLimit is Decode with an explicit size limit in bytes (<= 0: none).
func DecodeLimit(frame []byte, maxBytes int) (Message, error) {
	if maxBytes > 0 && len(frame) > maxBytes {
		return nil, &Error{Problem: fmt.Sprintf("frame of %d bytes exceeds the %d-byte limit", len(frame), maxBytes), kind: ErrTooLarge}
	}
	if !utf8.Valid(frame) {
		return nil, &Error{Problem: "frame is not valid UTF-8"}
	}
	trimmed := bytes.TrimSpace(frame)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return nil, &Error{Problem: "frame is not a JSON object"}
	}
	var head struct {
		Code *json.RawMessage `json:"code"`
	}
	if err := json.Unmarshal(trimmed, &head); err != nil {
		return nil, &Error{Problem: "frame is not valid JSON: " + jsonProblem(err)}
	}
	if head.Code == nil {
		return nil, &Error{Field: "code", Problem: "missing"}
	}
	var code string
	if err := json.Unmarshal(*head.Code, &code); err != nil {
		return nil, &Error{Field: "code", Problem: "must be a string"}
	}
	d := decoder{code: code}
	switch code {
	case CodeHandshake:
		return d.handshake(trimmed)
	case CodeTest:
		return d.test(trimmed)
	case CodeStateLog:
		return d.stateLog(trimmed)
	case CodeWaitQuery:
		return d.waitQuery(trimmed)
	case CodeAppNotReady:
		return &AppNotReady{}, nil
	case CodeRecipeMetadata:
		return d.recipe(trimmed)
	case CodeState:
		return d.statePush(trimmed)
	case CodeWaitList:
		return d.waitList(trimmed)
	case CodeAgentUpdate:
		return d.agentUpdate(trimmed)
	case CodeTestAns:
		return d.testAns(trimmed)
	case CodeStateLogAck:
		return d.stateLogAck(trimmed)
	}
	if code == "" {
		return nil, &Error{Field: "code", Problem: "must not be empty"}
	}
	return nil, &Error{Code: code, Problem: "unknown message code", kind: ErrUnknownCode}
}

type decoder struct{ code string }

func (d decoder) fail(field, problem string) error {
	return &Error{Code: d.code, Field: field, Problem: problem}
}

// unmarshal decodes into a wire struct, turning JSON type errors into errors
// that name the field.
func (d decoder) unmarshal(data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return d.fail(te.Field, fmt.Sprintf("must be %s, got %s", jsonKind(te.Type.Kind().String()), te.Value))
		}
		return d.fail("", "invalid JSON: "+jsonProblem(err))
	}
	return nil
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "a string"
	case "int", "int64", "int32":
		return "an integer"
	case "bool":
		return "a boolean"
	case "slice":
		return "a list"
	case "struct", "map":
		return "an object"
	}
	return goKind
}

func jsonProblem(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("%s at byte %d", se.Error(), se.Offset)
	}
	return err.Error()
}

func (d decoder) requireString(field string, v *string) (string, error) {
	if v == nil {
		return "", d.fail(field, "missing")
	}
	if *v == "" {
		return "", d.fail(field, "must not be empty")
	}
	return *v, nil
}

func (d decoder) requireVersion(field string, v *int64) (int64, error) {
	if v == nil {
		return 0, d.fail(field, "missing")
	}
	if *v <= 0 {
		return 0, d.fail(field, fmt.Sprintf("must be a positive integer, got %d", *v))
	}
	return *v, nil
}

// stateID accepts "id" and "stateid"; when both are present they must agree.
func (d decoder) stateID(prefix string, id, stateid *string) (string, error) {
	switch {
	case id != nil && stateid != nil && *id != *stateid:
		return "", d.fail(prefix+"id", fmt.Sprintf("%q disagrees with stateid %q", clip(*id), clip(*stateid)))
	case id != nil:
		return d.requireString(prefix+"id", id)
	case stateid != nil:
		return d.requireString(prefix+"stateid", stateid)
	}
	return "", d.fail(prefix+"id", "missing (neither id nor stateid is set)")
}

type wireIdentity struct {
	InstanceID      *string `json:"instance_id"`
	AppID           *string `json:"app_id"`
	AgentVersion    *string `json:"agent_version"`
	ProtocolVersion *int    `json:"protocol_version"`
	InstanceToken   *string `json:"instance_token"`
	InitErrors      *string `json:"init_errors"`
	// EnrollmentSecret is optional: agents and backends from before it
	// existed neither send nor expect it.
	EnrollmentSecret *string `json:"enrollment_secret"`
	LogStream        *string `json:"log_stream"`
}

func (w wireIdentity) lenient() Identity {
	id := Identity{InitErrors: w.InitErrors}
	id.InstanceID = deref(w.InstanceID)
	id.AppID = deref(w.AppID)
	id.AgentVersion = deref(w.AgentVersion)
	id.InstanceToken = deref(w.InstanceToken)
	id.EnrollmentSecret = deref(w.EnrollmentSecret)
	id.LogStream = deref(w.LogStream)
	if w.ProtocolVersion != nil {
		id.ProtocolVersion = *w.ProtocolVersion
	}
	return id
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (d decoder) handshake(data []byte) (Message, error) {
	var w wireIdentity
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	for _, f := range []struct {
		name string
		v    *string
	}{{"instance_id", w.InstanceID}, {"app_id", w.AppID}, {"agent_version", w.AgentVersion}} {
		if _, err := d.requireString(f.name, f.v); err != nil {
			return nil, err
		}
	}
	// The 2014 agent sent no protocol_version: absent means 1. The token may
	// be empty (the backend decides whether to accept that).
	if w.ProtocolVersion != nil && *w.ProtocolVersion <= 0 {
		return nil, d.fail("protocol_version", fmt.Sprintf("must be a positive integer, got %d", *w.ProtocolVersion))
	}
	if w.LogStream != nil && !validStream(*w.LogStream) {
		return nil, d.fail("log_stream", "must be 1 to 64 letters, digits, '-' or '_'")
	}
	id := w.lenient()
	if id.ProtocolVersion == 0 {
		id.ProtocolVersion = 1
	}
	return &Handshake{Identity: id}, nil
}

func (d decoder) test(data []byte) (Message, error) {
	// Both directions use "Test": the backend's question carries no fields,
	// the agent's answer carries its identity; all fields are optional.
	var w wireIdentity
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	return &Test{Identity: w.lenient()}, nil
}

func (d decoder) stateLog(data []byte) (Message, error) {
	var w struct {
		InstanceID    *string `json:"instance_id"`
		AppID         *string `json:"app_id"`
		RecipeVersion *int64  `json:"recipe_version"`
		ID            *string `json:"id"`
		StateID       *string `json:"stateid"`
		Result        *bool   `json:"state_result"`
		Comment       *string `json:"state_comment"`
		Stdout        *string `json:"state_stdout"`
		Seq           *int64  `json:"seq"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	m := &StateLog{Comment: w.Comment, Stdout: w.Stdout}
	if w.Seq != nil {
		if *w.Seq <= 0 {
			return nil, d.fail("seq", fmt.Sprintf("must be a positive integer, got %d", *w.Seq))
		}
		m.Seq = *w.Seq
	}
	var err error
	if m.InstanceID, err = d.requireString("instance_id", w.InstanceID); err != nil {
		return nil, err
	}
	if m.AppID, err = d.requireString("app_id", w.AppID); err != nil {
		return nil, err
	}
	if m.RecipeVersion, err = d.requireVersion("recipe_version", w.RecipeVersion); err != nil {
		return nil, err
	}
	if m.StateID, err = d.stateID("", w.ID, w.StateID); err != nil {
		return nil, err
	}
	if w.Result == nil {
		return nil, d.fail("state_result", "missing")
	}
	m.Result = *w.Result
	return m, nil
}

func (d decoder) waitQuery(data []byte) (Message, error) {
	var w struct {
		InstanceID    *string `json:"instance_id"`
		AppID         *string `json:"app_id"`
		RecipeVersion *int64  `json:"recipe_version"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	m := &WaitQuery{}
	var err error
	if m.InstanceID, err = d.requireString("instance_id", w.InstanceID); err != nil {
		return nil, err
	}
	if m.AppID, err = d.requireString("app_id", w.AppID); err != nil {
		return nil, err
	}
	if m.RecipeVersion, err = d.requireVersion("recipe_version", w.RecipeVersion); err != nil {
		return nil, err
	}
	return m, nil
}

type wireRecipeState struct {
	ID        *string         `json:"id"`
	StateID   *string         `json:"stateid"`
	Module    *string         `json:"module"`
	Parameter json.RawMessage `json:"parameter"`
}

func (d decoder) recipe(data []byte) (Message, error) {
	var w struct {
		RecipeVersion *int64 `json:"recipe_version"`
		Module        *struct {
			Repo *string `json:"repo"`
			Tag  *string `json:"tag"`
		} `json:"module"`
		State *[]*wireRecipeState `json:"state"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	m := &RecipeMetadata{}
	var err error
	if m.RecipeVersion, err = d.requireVersion("recipe_version", w.RecipeVersion); err != nil {
		return nil, err
	}
	if w.Module != nil {
		src := &ModuleSource{}
		if src.Repo, err = d.requireString("module.repo", w.Module.Repo); err != nil {
			return nil, err
		}
		if src.Tag, err = d.requireString("module.tag", w.Module.Tag); err != nil {
			return nil, err
		}
		m.Module = src
	}
	if w.State == nil {
		return m, nil
	}
	m.States = make([]RecipeState, 0, len(*w.State))
	// Ids need not be unique: real recipes repeat them (the IDE copied
	// states), so a repeated id is accepted.
	for i, ws := range *w.State {
		prefix := fmt.Sprintf("state[%d].", i)
		if ws == nil {
			return nil, d.fail(fmt.Sprintf("state[%d]", i), "must be an object, got null")
		}
		var st RecipeState
		if st.ID, err = d.stateID(prefix, ws.ID, ws.StateID); err != nil {
			return nil, err
		}
		if st.Module, err = d.requireString(prefix+"module", ws.Module); err != nil {
			return nil, err
		}
		if st.Parameter, err = d.parameter(prefix+"parameter", ws.Parameter); err != nil {
			return nil, err
		}
		m.States = append(m.States, st)
	}
	return m, nil
}

// parameter returns the compacted object; absent or null means {}.
func (d decoder) parameter(field string, raw json.RawMessage) (json.RawMessage, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return json.RawMessage("{}"), nil
	}
	if raw[0] != '{' {
		return nil, d.fail(field, "must be an object")
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return nil, d.fail(field, "invalid JSON: "+jsonProblem(err))
	}
	return json.RawMessage(buf.Bytes()), nil
}

func (d decoder) statePush(data []byte) (Message, error) {
	var w struct {
		RecipeVersion *int64  `json:"recipe_version"`
		ID            *string `json:"id"`
		StateID       *string `json:"stateid"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	m := &StatePush{}
	var err error
	if m.RecipeVersion, err = d.requireVersion("recipe_version", w.RecipeVersion); err != nil {
		return nil, err
	}
	if m.StateID, err = d.stateID("", w.ID, w.StateID); err != nil {
		return nil, err
	}
	return m, nil
}

func (d decoder) waitList(data []byte) (Message, error) {
	var w struct {
		RecipeVersion *int64 `json:"recipe_version"`
		Waited        *[]*struct {
			InstanceID *string `json:"instance_id"`
			StateID    *string `json:"state_id"`
		} `json:"waited"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	m := &WaitList{}
	var err error
	if m.RecipeVersion, err = d.requireVersion("recipe_version", w.RecipeVersion); err != nil {
		return nil, err
	}
	if w.Waited == nil {
		m.Waited = []WaitEntry{}
		return m, nil
	}
	m.Waited = make([]WaitEntry, 0, len(*w.Waited))
	for i, e := range *w.Waited {
		prefix := fmt.Sprintf("waited[%d]", i)
		if e == nil {
			return nil, d.fail(prefix, "must be an object, got null")
		}
		var we WaitEntry
		if we.InstanceID, err = d.requireString(prefix+".instance_id", e.InstanceID); err != nil {
			return nil, err
		}
		if we.StateID, err = d.requireString(prefix+".state_id", e.StateID); err != nil {
			return nil, err
		}
		m.Waited = append(m.Waited, we)
	}
	return m, nil
}

func (d decoder) agentUpdate(data []byte) (Message, error) {
	var w struct {
		Version *string `json:"version"`
		URL     *string `json:"url"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	m := &AgentUpdate{URL: deref(w.URL)}
	var err error
	if m.Version, err = d.requireString("version", w.Version); err != nil {
		return nil, err
	}
	return m, nil
}

func (d decoder) testAns(data []byte) (Message, error) {
	var w struct {
		Result *bool   `json:"result"`
		Error  *string `json:"error"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	if w.Result == nil {
		return nil, d.fail("result", "missing")
	}
	return &TestAns{Result: *w.Result, Error: w.Error}, nil
}

func (d decoder) stateLogAck(data []byte) (Message, error) {
	var w struct {
		LogStream *string `json:"log_stream"`
		Seq       *int64  `json:"seq"`
	}
	if err := d.unmarshal(data, &w); err != nil {
		return nil, err
	}
	if w.LogStream == nil {
		return nil, d.fail("log_stream", "missing")
	}
	if !validStream(*w.LogStream) {
		return nil, d.fail("log_stream", "must be 1 to 64 letters, digits, '-' or '_'")
	}
	if w.Seq == nil {
		return nil, d.fail("seq", "missing")
	}
	if *w.Seq < 0 {
		return nil, d.fail("seq", fmt.Sprintf("must not be negative, got %d", *w.Seq))
	}
	return &StateLogAck{LogStream: *w.LogStream, Seq: *w.Seq}, nil
}

// validStream reports whether s can name a log stream.
func validStream(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}
