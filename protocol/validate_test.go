package protocol

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestValidateRecipeAcceptsSharedRecipes(t *testing.T) {
	for name, data := range sharedRecipes(t) {
		m, err := Decode(data)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := ValidateRecipe(m.(*RecipeMetadata)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, ok := range []*RecipeMetadata{
		{RecipeVersion: 1},                          // version-only push
		{RecipeVersion: 1, States: []RecipeState{}}, // no states
		{RecipeVersion: 1, States: []RecipeState{{ID: strings.Repeat("é", MaxStateIDBytes/2), Module: "linux.apt.package"}}},
		{RecipeVersion: 1, States: []RecipeState{{ID: "s", Module: "common.git-repo.latest"}}},
		// As deep as allowed; brackets inside strings do not count.
		{RecipeVersion: 1, States: []RecipeState{{ID: "d", Module: "meta.comment", Parameter: json.RawMessage(
			`{"comment":` + strings.Repeat("[", MaxParameterDepth-1) + `"[[[\\\"{{"` + strings.Repeat("]", MaxParameterDepth-1) + `}`)}}},
	} {
		if err := ValidateRecipe(ok); err != nil {
			t.Errorf("%+v refused: %v", ok, err)
		}
	}
}

func TestValidateRecipeRefusesAndNamesTheField(t *testing.T) {
	state := func(id, module string) []RecipeState {
		return []RecipeState{{ID: "ok", Module: "linux.cmd"}, {ID: id, Module: module, Parameter: json.RawMessage(`{}`)}}
	}
	src := func(repo, tag string) *ModuleSource { return &ModuleSource{Repo: repo, Tag: tag} }
	cases := []struct {
		name  string
		m     *RecipeMetadata
		field string
		want  string
	}{
		{"nil", nil, "", "no recipe"},
		{"version", &RecipeMetadata{}, "recipe_version", "positive"},
		{"module no dot", &RecipeMetadata{RecipeVersion: 1, States: state("s", "linux")}, "state[1].module", "not a module name"},
		{"module upper", &RecipeMetadata{RecipeVersion: 1, States: state("s", "Linux.cmd")}, "state[1].module", "not a module name"},
		{"module path", &RecipeMetadata{RecipeVersion: 1, States: state("s", "linux/../cmd")}, "state[1].module", "not a module name"},
		{"module space", &RecipeMetadata{RecipeVersion: 1, States: state("s", "linux.cmd ;rm")}, "state[1].module", "not a module name"},
		{"module long", &RecipeMetadata{RecipeVersion: 1, States: state("s", "a."+strings.Repeat("b", MaxModuleNameBytes))}, "state[1].module", "more than the 128"},
		{"id empty", &RecipeMetadata{RecipeVersion: 1, States: state("", "linux.cmd")}, "state[1].id", "empty"},
		{"id long", &RecipeMetadata{RecipeVersion: 1, States: state(strings.Repeat("x", MaxStateIDBytes+1), "linux.cmd")}, "state[1].id", "more than the 256"},
		{"id newline", &RecipeMetadata{RecipeVersion: 1, States: state("a\nb", "linux.cmd")}, "state[1].id", "control character"},
		{"id nul", &RecipeMetadata{RecipeVersion: 1, States: state("a\x00", "linux.cmd")}, "state[1].id", "control character"},
		{"id C1", &RecipeMetadata{RecipeVersion: 1, States: state("a\u0085", "linux.cmd")}, "state[1].id", "control character"},
		{"id utf8", &RecipeMetadata{RecipeVersion: 1, States: state("a\xff", "linux.cmd")}, "state[1].id", "UTF-8"},
		{"too many", &RecipeMetadata{RecipeVersion: 1, States: make([]RecipeState, MaxRecipeStates+1)}, "state", "10001 states"},
		{"repo empty", &RecipeMetadata{RecipeVersion: 1, Module: src("", "v1")}, "module.repo", "empty"},
		{"repo option", &RecipeMetadata{RecipeVersion: 1, Module: src("--upload-pack=x", "v1")}, "module.repo", "'-'"},
		{"repo long", &RecipeMetadata{RecipeVersion: 1, Module: src(strings.Repeat("r", MaxModuleRepoBytes+1), "v1")}, "module.repo", "more than"},
		{"tag option", &RecipeMetadata{RecipeVersion: 1, Module: src("https://x/y.git", "-c")}, "module.tag", "'-'"},
		{"tag control", &RecipeMetadata{RecipeVersion: 1, Module: src("https://x/y.git", "v1\r")}, "module.tag", "control character"},
		{"deep parameter", &RecipeMetadata{RecipeVersion: 1, States: []RecipeState{{ID: "d", Module: "meta.comment",
			Parameter: json.RawMessage(`{"comment":` + strings.Repeat("[", MaxParameterDepth) + strings.Repeat("]", MaxParameterDepth) + `}`)}}},
			"state[0].parameter", "65 levels deep"},
		{"tag long", &RecipeMetadata{RecipeVersion: 1, Module: src("https://x/y.git", strings.Repeat("t", MaxModuleTagBytes+1))}, "module.tag", "more than"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateRecipe(tc.m)
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("got %v, want a *protocol.Error", err)
			}
			if pe.Field != tc.field || pe.Code != CodeRecipeMetadata || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got field %q: %v; want field %q containing %q", pe.Field, err, tc.field, tc.want)
			}
		})
	}
}

func TestHandshakeEnrollmentSecret(t *testing.T) {
	id := Identity{InstanceID: "i-1", AppID: "a", AgentVersion: "2.1", ProtocolVersion: 1, InstanceToken: "t", EnrollmentSecret: "s3cret"}
	frame, _ := Encode(&Handshake{id})
	if !strings.Contains(string(frame), `"enrollment_secret":"s3cret"`) {
		t.Errorf("secret not sent: %s", frame)
	}
	assertRoundTrip(t, &Handshake{id})
	// Absent when empty, so that older backends see the frame they know;
	// a frame without it (older agents) still decodes.
	id.EnrollmentSecret = ""
	frame, _ = Encode(&Handshake{id})
	if strings.Contains(string(frame), "enrollment_secret") {
		t.Errorf("empty secret sent: %s", frame)
	}
	m, err := Decode([]byte(`{"code":"Handshake","instance_id":"i","app_id":"a","agent_version":"2","instance_token":"t"}`))
	if err != nil || m.(*Handshake).EnrollmentSecret != "" {
		t.Errorf("handshake without a secret: %v %+v", err, m)
	}
	if _, err := Decode([]byte(`{"code":"Handshake","instance_id":"i","app_id":"a","agent_version":"2","enrollment_secret":7}`)); err == nil || !strings.Contains(err.Error(), "enrollment_secret") {
		t.Errorf("numeric secret: %v", err)
	}
}
