package protocol

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// Encode renders a message as one frame. It emits both "id" and "stateid"
// for StateLog and State, so that backends reading either spelling work.
func Encode(m Message) ([]byte, error) {
	var v any
	switch m := m.(type) {
	case *Handshake:
		v = struct {
			Code string `json:"code"`
			Identity
		}{CodeHandshake, m.Identity}
	case *Test:
		v = struct {
			Code string `json:"code"`
			Identity
		}{CodeTest, m.Identity}
	case *StateLog:
		v = struct {
			Code          string  `json:"code"`
			InstanceID    string  `json:"instance_id"`
			AppID         string  `json:"app_id"`
			RecipeVersion int64   `json:"recipe_version"`
			ID            string  `json:"id"`
			StateID       string  `json:"stateid"`
			Result        bool    `json:"state_result"`
			Comment       *string `json:"state_comment"`
			Stdout        *string `json:"state_stdout"`
			Seq           int64   `json:"seq,omitempty"`
		}{CodeStateLog, m.InstanceID, m.AppID, m.RecipeVersion, m.StateID, m.StateID, m.Result, m.Comment, m.Stdout, m.Seq}
	case *WaitQuery:
		v = struct {
			Code string `json:"code"`
			*WaitQuery
		}{CodeWaitQuery, m}
	case *AppNotReady:
		v = struct {
			Code string `json:"code"`
		}{CodeAppNotReady}
	case *RecipeMetadata:
		type state struct {
			ID        string          `json:"id"`
			Module    string          `json:"module"`
			Parameter json.RawMessage `json:"parameter"`
		}
		var states *[]state
		if m.States != nil {
			list := make([]state, len(m.States))
			for i, s := range m.States {
				p := s.Parameter
				if len(p) == 0 {
					p = json.RawMessage("{}")
				}
				list[i] = state{s.ID, s.Module, p}
			}
			states = &list
		}
		v = struct {
			Code          string        `json:"code"`
			RecipeVersion int64         `json:"recipe_version"`
			Module        *ModuleSource `json:"module,omitempty"`
			State         *[]state      `json:"state,omitempty"`
		}{CodeRecipeMetadata, m.RecipeVersion, m.Module, states}
	case *StatePush:
		v = struct {
			Code          string `json:"code"`
			RecipeVersion int64  `json:"recipe_version"`
			ID            string `json:"id"`
			StateID       string `json:"stateid"`
		}{CodeState, m.RecipeVersion, m.StateID, m.StateID}
	case *WaitList:
		waited := m.Waited
		if waited == nil {
			waited = []WaitEntry{}
		}
		v = struct {
			Code          string      `json:"code"`
			RecipeVersion int64       `json:"recipe_version"`
			Waited        []WaitEntry `json:"waited"`
		}{CodeWaitList, m.RecipeVersion, waited}
	case *AgentUpdate:
		v = struct {
			Code string `json:"code"`
			*AgentUpdate
		}{CodeAgentUpdate, m}
	case *StateLogAck:
		v = struct {
			Code string `json:"code"`
			*StateLogAck
		}{CodeStateLogAck, m}
	case *TestAns:
		v = struct {
			Code string `json:"code"`
			*TestAns
		}{CodeTestAns, m}
	default:
		return nil, fmt.Errorf("protocol: cannot encode %T", m)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	// Parameters are user data (shell commands, file contents): keep <, >
	// and & as they are rather than \u003c-escaped.
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("protocol: encode %s: %w", m.MessageCode(), err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
