package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
)

// DecodeRecipe reads a recipe written by hand or saved from the backend:
// a whole RecipeMetadata frame ({"code": "RecipeMetadata", …}), or the
// body the backend's API takes ({"module": {…}, "state": […]}, with an
// optional recipe_version, 1 when absent). Either way it is decoded and
// validated exactly as the agent would decode and validate it pushed.
func DecodeRecipe(data []byte) (*RecipeMetadata, error) {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, &Error{Problem: "a recipe must be one JSON object: " + err.Error()}
	}
	if _, ok := probe["code"]; !ok {
		probe["code"], _ = json.Marshal(CodeRecipeMetadata)
		if _, ok := probe["recipe_version"]; !ok {
			probe["recipe_version"] = json.RawMessage("1")
		}
		data, _ = json.Marshal(probe)
	}
	if _, ok := probe["state"]; !ok {
		return nil, &Error{Code: CodeRecipeMetadata, Field: "state", Problem: "missing (a list of {\"id\", \"module\", \"parameter\"})"}
	}
	msg, err := Decode(bytes.TrimSpace(data))
	if err != nil {
		return nil, err
	}
	m, ok := msg.(*RecipeMetadata)
	if !ok {
		return nil, errors.New("protocol: not a recipe (code " + msg.MessageCode() + ")")
	}
	if err := ValidateRecipe(m); err != nil {
		return nil, err
	}
	return m, nil
}
