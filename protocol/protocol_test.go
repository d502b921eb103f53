package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// sharedRecipes are the 79 real recipes of ../shared/recipes (beside the
// repository, as on CI).
func sharedRecipes(tb testing.TB) map[string][]byte {
	tb.Helper()
	dir := filepath.Join("..", "testdata", "recipes")
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil || len(paths) == 0 {
		tb.Fatalf("no recipes in %s (testdata/recipes holds the project's copy): %v", dir, err)
	}
	out := make(map[string][]byte, len(paths))
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			tb.Fatal(err)
		}
		out[filepath.Base(p)] = data
	}
	return out
}

func TestSharedRecipesDecodeAndRoundTrip(t *testing.T) {
	recipes := sharedRecipes(t)
	if len(recipes) < 79 {
		t.Errorf("found %d recipes, want at least 79", len(recipes))
	}
	for name, data := range recipes {
		t.Run(name, func(t *testing.T) {
			m, err := Decode(data)
			if err != nil {
				t.Fatal(err)
			}
			r, ok := m.(*RecipeMetadata)
			if !ok {
				t.Fatalf("decoded %T", m)
			}
			if r.RecipeVersion <= 0 || len(r.States) == 0 {
				t.Errorf("version %d, %d states", r.RecipeVersion, len(r.States))
			}
			for i, s := range r.States {
				if s.ID == "" || s.Module == "" || !json.Valid(s.Parameter) || s.Parameter[0] != '{' {
					t.Errorf("state %d: %+v", i, s)
				}
			}
			assertRoundTrip(t, m)
		})
	}
}

// assertRoundTrip checks decode(encode(m)) == m.
func assertRoundTrip(t *testing.T, m Message) {
	t.Helper()
	frame, err := Encode(m)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	back, err := Decode(frame)
	if err != nil {
		t.Fatalf("decode of our own frame: %v\n%s", err, frame)
	}
	if !reflect.DeepEqual(back, m) {
		t.Fatalf("round trip differs:\n got %#v\nwant %#v\nframe %s", back, m, frame)
	}
}

func str(s string) *string { return &s }

func TestEveryMessageRoundTrips(t *testing.T) {
	id := Identity{InstanceID: "i-0abc", AppID: "app-123", AgentVersion: "2.1", ProtocolVersion: 1, InstanceToken: "secret", InitErrors: str("a; b")}
	msgs := []Message{
		&Handshake{id},
		&Handshake{Identity{InstanceID: "i-1", AppID: "a", AgentVersion: "2.1", ProtocolVersion: 1, InstanceToken: "t"}},
		&Test{id},
		&StateLog{InstanceID: "i-0abc", AppID: "app-123", RecipeVersion: 7, StateID: "state-1", Result: true, Comment: str("ok <&>"), Stdout: nil},
		&StateLog{InstanceID: "i-0abc", AppID: "app-123", RecipeVersion: 7, StateID: "state-1"},
		&WaitQuery{InstanceID: "i-0abc", AppID: "app-123", RecipeVersion: 7},
		&AppNotReady{},
		&RecipeMetadata{RecipeVersion: 3},
		&RecipeMetadata{RecipeVersion: 3, States: []RecipeState{}},
		&RecipeMetadata{RecipeVersion: 3, Module: &ModuleSource{Repo: "https://x/y.git", Tag: "develop"},
			States: []RecipeState{{ID: "s1", Module: "linux.cmd", Parameter: json.RawMessage(`{"cmd":"echo <hi> && true"}`)}}},
		&StatePush{RecipeVersion: 7, StateID: "state-2"},
		&WaitList{RecipeVersion: 7, Waited: []WaitEntry{{InstanceID: "i-0abc", StateID: "state-2"}}},
		&WaitList{RecipeVersion: 7, Waited: []WaitEntry{}},
		&AgentUpdate{Version: "2.2", URL: "https://s3.amazonaws.com/opsagent/2.2/opsagent.tgz"},
		&AgentUpdate{Version: "2.2"},
		&TestAns{Result: true},
		&TestAns{Result: false, Error: str("bad token")},
	}
	for _, m := range msgs {
		t.Run(m.MessageCode(), func(t *testing.T) { assertRoundTrip(t, m) })
	}
}

func TestEncodeEmitsBothIDSpellings(t *testing.T) {
	for _, m := range []Message{
		&StateLog{RecipeVersion: 1, StateID: "s-9"},
		&StatePush{RecipeVersion: 1, StateID: "s-9"},
	} {
		frame, _ := Encode(m)
		var obj map[string]any
		if err := json.Unmarshal(frame, &obj); err != nil {
			t.Fatal(err)
		}
		if obj["id"] != "s-9" || obj["stateid"] != "s-9" || obj["code"] != m.MessageCode() {
			t.Errorf("%s frame %s", m.MessageCode(), frame)
		}
	}
	frame, _ := Encode(&StateLog{RecipeVersion: 1, StateID: "s"})
	if !bytes.Contains(frame, []byte(`"state_comment":null`)) || !bytes.Contains(frame, []byte(`"state_stdout":null`)) {
		t.Errorf("absent comment/stdout must be null: %s", frame)
	}
	frame, _ = Encode(&Handshake{Identity{InstanceID: "i"}})
	if !bytes.Contains(frame, []byte(`"init_errors":null`)) {
		t.Errorf("init_errors must be null when there are none: %s", frame)
	}
	if _, err := Encode(nil); err == nil {
		t.Error("Encode(nil) succeeded")
	}
}

func TestDecodeAcceptsBothSpellings(t *testing.T) {
	for _, frame := range []string{
		`{"code":"State","recipe_version":7,"id":"state-2"}`,
		`{"code":"State","recipe_version":7,"stateid":"state-2"}`,
		`{"code":"State","recipe_version":7,"id":"state-2","stateid":"state-2"}`,
	} {
		m, err := Decode([]byte(frame))
		if err != nil {
			t.Fatalf("%s: %v", frame, err)
		}
		if p := m.(*StatePush); p.StateID != "state-2" || p.RecipeVersion != 7 {
			t.Errorf("%s → %+v", frame, p)
		}
	}
	m, err := Decode([]byte(`{"code":"RecipeMetadata","recipe_version":2,"state":[{"stateid":"a","module":"meta.comment"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	r := m.(*RecipeMetadata)
	if r.States[0].ID != "a" || string(r.States[0].Parameter) != "{}" {
		t.Errorf("state = %+v", r.States[0])
	}
	m, _ = Decode([]byte(`{"code":"RecipeMetadata","recipe_version":2}`))
	if !m.(*RecipeMetadata).VersionOnly() {
		t.Error("a recipe without state must be version-only")
	}
	m, _ = Decode([]byte(`{"code":"RecipeMetadata","recipe_version":2,"state":[]}`))
	if m.(*RecipeMetadata).VersionOnly() {
		t.Error("an empty state list is a recipe with no states, not version-only")
	}
	// Unknown fields are tolerated (forward compatibility).
	if _, err := Decode([]byte(`{"code":"AgentUpdate","version":"2.2","extra":{"x":1}}`)); err != nil {
		t.Error(err)
	}
}

func TestDecodeRejects(t *testing.T) {
	cases := []struct {
		name, frame string
		field       string // the field the error must name ("" = frame level)
		want        string
	}{
		{"not json", `hello`, "", "not a JSON object"},
		{"array", `[1,2]`, "", "not a JSON object"},
		{"empty", ``, "", "not a JSON object"},
		{"truncated", `{"code":"State"`, "", "not valid JSON"},
		{"no code", `{"id":"x"}`, "code", "missing"},
		{"code number", `{"code":7}`, "code", "must be a string"},
		{"code empty", `{"code":""}`, "code", "must not be empty"},
		{"unknown code", `{"code":"Reboot"}`, "", "unknown message code"},
		{"bad utf8", "{\"code\":\"State\",\"id\":\"\xff\"}", "", "UTF-8"},
		{"recipe no version", `{"code":"RecipeMetadata","state":[]}`, "recipe_version", "missing"},
		{"recipe zero version", `{"code":"RecipeMetadata","recipe_version":0}`, "recipe_version", "positive"},
		{"recipe negative version", `{"code":"RecipeMetadata","recipe_version":-3}`, "recipe_version", "positive"},
		{"recipe string version", `{"code":"RecipeMetadata","recipe_version":"7"}`, "recipe_version", "must be"},
		{"recipe fractional version", `{"code":"RecipeMetadata","recipe_version":1.5}`, "recipe_version", "must be"},
		{"recipe state not list", `{"code":"RecipeMetadata","recipe_version":1,"state":{}}`, "state", "must be"},
		{"recipe null state entry", `{"code":"RecipeMetadata","recipe_version":1,"state":[null]}`, "state[0]", "null"},
		{"recipe state no id", `{"code":"RecipeMetadata","recipe_version":1,"state":[{"module":"linux.cmd"}]}`, "state[0].id", "missing"},
		{"recipe state empty id", `{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"","module":"linux.cmd"}]}`, "state[0].id", "empty"},
		{"recipe ids disagree", `{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"a","stateid":"b","module":"x"}]}`, "state[0].id", "disagrees"},
		{"recipe state no module", `{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"a"}]}`, "state[0].module", "missing"},
		{"recipe module number", `{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"a","module":5}]}`, "module", "must be"},
		{"recipe parameter list", `{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"a","module":"x","parameter":[1]}]}`, "state[0].parameter", "must be an object"},
		{"recipe module no repo", `{"code":"RecipeMetadata","recipe_version":1,"module":{"tag":"v1"}}`, "module.repo", "missing"},
		{"recipe module empty tag", `{"code":"RecipeMetadata","recipe_version":1,"module":{"repo":"r","tag":""}}`, "module.tag", "empty"},
		{"state no id", `{"code":"State","recipe_version":1}`, "id", "missing"},
		{"state bad version", `{"code":"State","recipe_version":0,"id":"a"}`, "recipe_version", "positive"},
		{"waitlist bad entry", `{"code":"WaitList","recipe_version":1,"waited":[{"instance_id":"i"}]}`, "waited[0].state_id", "missing"},
		{"waitlist null entry", `{"code":"WaitList","recipe_version":1,"waited":[null]}`, "waited[0]", "null"},
		{"update no version", `{"code":"AgentUpdate","url":"https://x"}`, "version", "missing"},
		{"update version number", `{"code":"AgentUpdate","version":2.2}`, "version", "must be"},
		{"testans no result", `{"code":"TestAns"}`, "result", "missing"},
		{"statelog no result", `{"code":"StateLog","instance_id":"i","app_id":"a","recipe_version":1,"id":"s"}`, "state_result", "missing"},
		{"handshake bad protocol", `{"code":"Handshake","instance_id":"i","app_id":"a","agent_version":"2","protocol_version":0,"instance_token":"t"}`, "protocol_version", "positive"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Decode([]byte(tc.frame))
			if err == nil {
				t.Fatalf("accepted %s as %#v", tc.frame, m)
			}
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error %T %v is not a *protocol.Error", err, err)
			}
			if tc.field != "" && !strings.Contains(pe.Field, tc.field) {
				t.Errorf("field = %q, want %q (%v)", pe.Field, tc.field, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q lacks %q", err, tc.want)
			}
		})
	}
}

func TestDecodeSizeLimit(t *testing.T) {
	big := append([]byte(`{"code":"AgentUpdate","version":"`), bytes.Repeat([]byte("9"), 100)...)
	big = append(big, `"}`...)
	_, err := DecodeLimit(big, 64)
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "64-byte limit") {
		t.Errorf("oversize frame: %v", err)
	}
	if _, err := DecodeLimit(big, 0); err != nil {
		t.Errorf("no limit: %v", err)
	}
	// The default limit is checked before parsing: a 16 MiB + 1 frame of
	// garbage is refused as too large, not as bad JSON.
	huge := bytes.Repeat([]byte("x"), DefaultMaxFrame+1)
	if _, err := Decode(huge); !errors.Is(err, ErrTooLarge) {
		t.Errorf("16 MiB+1: %v", err)
	}
	_, err = Decode([]byte(`{"code":"Nope"}`))
	if !errors.Is(err, ErrUnknownCode) {
		t.Errorf("unknown code does not wrap ErrUnknownCode: %v", err)
	}
	// A 1 MiB code is quoted in 64 bytes: errors are logged.
	_, err = Decode([]byte(`{"code":"` + strings.Repeat("é", 1<<19) + `"}`))
	if msg := err.Error(); len(msg) > 200 || !strings.Contains(msg, "…(1048576 bytes)") {
		t.Errorf("the error quotes %d bytes of the code: %.300s", len(msg), msg)
	}
}

func FuzzDecode(f *testing.F) {
	for _, data := range sharedRecipes(f) {
		f.Add(data)
	}
	for _, s := range []string{
		`{"code":"Handshake","instance_id":"i","app_id":"a","agent_version":"2.1","protocol_version":1,"instance_token":"t","init_errors":"x"}`,
		`{"code":"Handshake","instance_id":"i","app_id":"a","agent_version":"2.1","instance_token":"t","enrollment_secret":"e"}`,
		`{"code":"StateLog","instance_id":"i","app_id":"a","recipe_version":7,"id":"s","stateid":"s","state_result":true,"state_comment":null,"state_stdout":"out"}`,
		`{"code":"WaitQuery","instance_id":"i","app_id":"a","recipe_version":7}`,
		`{"code":"Test"}`, `{"code":"AppNotReady"}`,
		`{"code":"State","recipe_version":7,"stateid":"s"}`,
		`{"code":"WaitList","recipe_version":7,"waited":[{"instance_id":"i","state_id":"s"}]}`,
		`{"code":"AgentUpdate","version":"2.2","url":""}`,
		`{"code":"TestAns","result":false,"error":"e"}`,
		`{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"a","module":"m","parameter":{"k":"\u003c\ud800"}}]}`,
		`{"code":"RecipeMetadata","recipe_version":9223372036854775807}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Decode(data)
		if err != nil {
			return
		}
		// Anything accepted must encode, and decode back to the same value.
		frame, err := Encode(m)
		if err != nil {
			t.Fatalf("accepted %q but cannot encode it: %v", data, err)
		}
		back, err := Decode(frame)
		if err != nil {
			t.Fatalf("our encoding of %q is refused: %v\n%s", data, err, frame)
		}
		if !reflect.DeepEqual(back, m) {
			t.Fatalf("round trip of %q differs:\n%#v\n%#v", data, back, m)
		}
	})
}

func TestDecodeRecipe(t *testing.T) {
	body := `{"module":{"repo":"https://example.com/s.git","tag":"v1"},"state":[{"id":"a","module":"linux.cmd","parameter":{"cmd":"true"}}]}`
	m, err := DecodeRecipe([]byte(body))
	if err != nil || m.RecipeVersion != 1 || len(m.States) != 1 || m.Module.Tag != "v1" {
		t.Fatalf("body: %+v %v", m, err)
	}
	frame := `{"code":"RecipeMetadata","recipe_version":7,"state":[{"id":"a","module":"meta.comment","parameter":{}}]}`
	if m, err = DecodeRecipe([]byte(frame)); err != nil || m.RecipeVersion != 7 {
		t.Fatalf("frame: %+v %v", m, err)
	}
	for _, bad := range []string{`[]`, `{}`, `{"state":[{"id":"a","module":"Bad Module"}]}`, `{"code":"WaitList","waits":[]}`, `{"state":[]} trailing`} {
		if _, err := DecodeRecipe([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}
