package backend

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

// copyDir copies a fixture data directory, so that the import (which
// writes beside it) leaves testdata as it is.
func copyDir(t *testing.T, from string) string {
	t.Helper()
	to := t.TempDir()
	err := filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o700)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(to, rel), data, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return to
}

// TestImportLegacyDataDir starts the backend on data directories written
// by the file store (b3d6a06's, which issue 23 names, and the last one
// before NATS, with revocations): everything is imported on the first
// start, nothing is lost, and the import runs once. The fixtures were
// written by those versions (testdata/legacy/gen.go says how).
func TestImportLegacyDataDir(t *testing.T) {
	for _, version := range []string{"b3d6a06", "84b2210"} {
		t.Run(version, func(t *testing.T) {
			var expect struct {
				Logs    []LogEntry `json:"logs"`
				Revoked bool       `json:"revoked"`
				Secret  string     `json:"enrollment_secret"`
			}
			data, err := os.ReadFile(filepath.Join("testdata", "legacy", version+".expect.json"))
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(data, &expect); err != nil {
				t.Fatal(err)
			}
			dir := copyDir(t, filepath.Join("testdata", "legacy", version))
			e := newEnv(t, dir, nil)
			checkImported(t, e, expect.Logs, expect.Secret, expect.Revoked)

			// Agents carry on: i-1's token, its stream's high (62, though
			// retention had deleted the StateLogs of some of its seqs before
			// the import), its released wait, the update offer.
			id := identity("i-1", "legacy", "tok-i-1-0123456789abcdef", "2.1.0", "")
			id.ProtocolVersion, id.LogStream = 2, "s1"
			a := e.handshake(id)
			if seq := a.expectAck("s1"); seq != 62 {
				t.Fatalf("i-1's first StateLogAck %d, want 62", seq)
			}
			if r := a.expectRecipe(); r.RecipeVersion != 2 || len(r.States) != 2 || r.Module == nil || r.Module.Tag != "v1" {
				t.Fatalf("imported recipe %+v", r)
			}
			if p, ok := a.expect().(*protocol.StatePush); !ok || p.StateID != "w1" {
				t.Fatalf("want the wait released for i-1 before the import, got %#v", p)
			}
			if u, ok := a.expect().(*protocol.AgentUpdate); !ok || u.Version != "9.9.9" {
				t.Fatalf("want the update offered before the import, got %#v", u)
			}
			for seq := int64(55); seq <= 63; seq++ { // 55..62 stored before the import: duplicates
				m := stateLog("i-1", seq)
				m.AppID = "legacy"
				a.send(m)
			}
			a.waitAck("s1", 63)
			logs := e.storedLogs("legacy", 1000)
			if got := agentSeqs(logs, "i-1", "s1"); got[len(got)-1] != 63 || len(got) != len(agentSeqs(expect.Logs, "i-1", "s1"))+1 {
				t.Fatalf("i-1's StateLogs after sending 55..63 again: %v", got)
			}
			e.handshake(identity("i-1", "legacy", tok("thief"), "2.1.0", expect.Secret)).expectClose(websocket.ClosePolicyViolation, "instance token mismatch")
			if expect.Revoked {
				e.handshake(identity("i-3", "legacy", "tok-i-3-0123456789abcdef", "2.1.0", expect.Secret)).expectClose(websocket.ClosePolicyViolation, "instance revoked")
			}

			// Once only: a restart imports nothing again, even when the
			// old files change.
			var state importState
			data, _ = os.ReadFile(filepath.Join(dir, importMarker))
			if err := json.Unmarshal(data, &state); err != nil || !state.Done || state.Apps != 2 || state.StateLogs != int64(len(expect.Logs)) {
				t.Fatalf("%s: %s %v, want done with 2 apps and %d StateLogs", importMarker, data, err, len(expect.Logs))
			}
			e.stop()
			if err := os.WriteFile(filepath.Join(dir, "apps", "legacy", "app.json"), []byte("{garbage"), 0o600); err != nil {
				t.Fatal(err)
			}
			e = newEnv(t, dir, nil)
			if got := e.storedLogs("legacy", 1000); len(got) != len(logs) {
				t.Fatalf("after a restart %d StateLogs, want %d: imported again?", len(got), len(logs))
			}
		})
	}
}

// checkImported: the apps, the StateLogs (same seqs, same fields), the
// tokens, the secret and the revocations of the fixture.
func checkImported(t *testing.T, e *env, want []LogEntry, secret string, revoked bool) {
	t.Helper()
	_, out := e.api("GET", "/api/apps", "")
	var ids []string
	for _, a := range out["apps"].([]any) {
		ids = append(ids, a.(map[string]any)["app_id"].(string))
	}
	if !slices.Equal(ids, []string{"empty", "legacy"}) {
		t.Fatalf("apps %v, want empty and legacy", out)
	}
	if code, out := e.api("GET", "/api/apps/legacy/recipe", ""); code != 200 || out["recipe_version"] != float64(2) {
		t.Fatalf("recipe: %d %v", code, out)
	}
	got := e.storedLogs("legacy", 7)
	if len(got) != len(want) {
		t.Fatalf("%d StateLogs imported, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Seq != w.Seq || g.AgentSeq != w.AgentSeq || g.InstanceID != w.InstanceID || g.LogStream != w.LogStream || !g.ReceivedAt.Equal(w.ReceivedAt) ||
			g.StateID != w.StateID || g.Result != w.Result || fmt.Sprint(deref(g.Comment), deref(g.Stdout)) != fmt.Sprint(deref(w.Comment), deref(w.Stdout)) {
			t.Fatalf("StateLog %d imported as %+v, was %+v", i, g, w)
		}
	}
	if e.secret("legacy") != secret {
		t.Errorf("the enrollment secret was not kept")
	}
	i1, i3 := e.instance("legacy", "i-1"), e.instance("legacy", "i-3")
	if i1.LogStreams["s1"] != 62 || i3.LogStreams["s3"] != 5 || i1.StateLogs != int64(len(agentSeqs(want, "i-1", "s1"))) {
		t.Errorf("summaries: i-1 %+v, i-3 %+v", i1, i3)
	}
	if (i3.RevokedAt != nil) != revoked {
		t.Errorf("i-3 revoked %v, want %v", i3.RevokedAt, revoked)
	}
}

// writeApp writes an app of the file store: app.json and StateLog lines
// (into logs/<first>.jsonl segments, or the single logs.jsonl of the
// earliest versions).
func writeApp(t *testing.T, dir, app string, version int64, files map[string][]LogEntry) {
	t.Helper()
	appDir := filepath.Join(dir, "apps", app)
	if err := os.MkdirAll(filepath.Join(appDir, "logs"), 0o700); err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(map[string]any{"app_id": app, "recipe_version": version, "state": []any{}})
	if err := os.WriteFile(filepath.Join(appDir, "app.json"), rec, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, entries := range files {
		var lines []string
		for _, e := range entries {
			l, _ := json.Marshal(e)
			lines = append(lines, string(l))
		}
		if err := os.WriteFile(filepath.Join(appDir, name), []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func entries(seqs ...int64) []LogEntry {
	var out []LogEntry
	for _, s := range seqs {
		out = append(out, LogEntry{Seq: s, InstanceID: "i-1", LogStream: "s", AgentSeq: s, RecipeVersion: 1, StateID: fmt.Sprint("s", s), Result: true})
	}
	return out
}

// TestImportKeepsSeqsAcrossSourcesAndGaps: the single logs.jsonl of the
// earliest versions beside the segments it was being moved into (a crash
// mid-migration), torn lines, and seqs the file store never used (a
// failed write): each StateLog is imported once, on its own seq.
func TestImportKeepsSeqsAcrossSourcesAndGaps(t *testing.T) {
	dir := t.TempDir()
	torn := []LogEntry{{Seq: 0}}
	writeApp(t, dir, "app1", 3, map[string][]LogEntry{
		"logs.jsonl":                      entries(1, 2, 3, 4),
		"logs/00000000000000000001.jsonl": append(entries(1, 2, 3), torn...),
		"logs/00000000000000000004.jsonl": entries(4, 5, 8, 9),
	})
	e := newEnv(t, dir, nil)
	logs := e.storedLogs("app1", 2)
	var seqs []int64
	for _, l := range logs {
		seqs = append(seqs, l.Seq)
	}
	if !slices.Equal(seqs, []int64{1, 2, 3, 4, 5, 8, 9}) || !slices.Equal(agentSeqs(logs, "i-1", "s"), seqs) {
		t.Fatalf("imported seqs %v (agent seqs %v), want 1 2 3 4 5 8 9 each once", seqs, agentSeqs(logs, "i-1", "s"))
	}
}

// TestImportResumesAfterAFailure: an app that cannot be imported stops the
// start, naming it, with what was imported kept; once fixed, the next
// start imports the rest and nothing twice.
func TestImportResumesAfterAFailure(t *testing.T) {
	dir := t.TempDir()
	writeApp(t, dir, "a1", 1, map[string][]LogEntry{"logs/00000000000000000001.jsonl": entries(1, 2, 3)})
	writeApp(t, dir, "a2", 1, map[string][]LogEntry{"logs/00000000000000000001.jsonl": entries(1, 2)})
	good, _ := os.ReadFile(filepath.Join(dir, "apps", "a2", "app.json"))
	if err := os.WriteFile(filepath.Join(dir, "apps", "a2", "app.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := New(Options{DataDir: dir})
	if err == nil || !strings.Contains(err.Error(), "app a2") || !strings.Contains(err.Error(), "start again") {
		t.Fatalf("start with an app that does not import: %v, want an error naming a2", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "apps", "a2", "app.json"), good, 0o600); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, dir, nil)
	for app, n := range map[string]int{"a1": 3, "a2": 2} {
		if got := agentSeqs(e.storedLogs(app, 100), "i-1", "s"); len(got) != n {
			t.Errorf("%s: %v, want %d StateLogs once each", app, got, n)
		}
	}
}

// TestImportNeverOverwritesAStoredApp: an app of the data directory that
// is in NATS already (made through another replica) stops the start: it
// is neither overwritten nor merged.
func TestImportNeverOverwritesAStoredApp(t *testing.T) {
	shared := t.TempDir() // the embedded server's, standing in for a cluster
	e := newEnv(t, shared, nil)
	e.api("PUT", "/api/apps/a1/recipe", recipeJSON)
	e.stop()
	writeApp(t, shared, "a1", 7, nil)
	_, err := New(Options{DataDir: shared})
	if err == nil || !strings.Contains(err.Error(), "stored in NATS already") || !strings.Contains(err.Error(), "aside") {
		t.Fatalf("start: %v, want a refusal saying the app is stored already", err)
	}
}
