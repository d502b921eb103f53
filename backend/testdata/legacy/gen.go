//go:build ignore

// gen writes a data directory with a backend of the file store era, for
// the import tests (TestImportLegacyDataDir). It was run once per
// version, and its output committed:
//
//	git archive <commit> | tar -x -C /tmp/src && (cd /tmp/src && go build -o /tmp/opsagent-<commit> ./cmd/opsagent)
//	go run backend/testdata/legacy/gen.go -bin /tmp/opsagent-<commit> -out backend/testdata/legacy/<commit>
//
// with b3d6a06 (the data directory issue 23 names) and 84b2210 (the last
// file store, with revocations and the API token). The directory holds an
// app "legacy" at recipe version 2 whose StateLog segments were partly
// deleted by retention (its first kept seq is well above 1, and
// streams.json remembers the highs of the StateLogs deleted), a
// protocol-2 instance i-1 (stream s1, agent seqs 1..60), a protocol-1
// instance i-2, an instance i-3 revoked when the version supports it, a
// wait released for i-1, an update offer, and an app "empty" with a recipe
// and no StateLogs. expect.json says what the import must keep.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

const apiToken = "legacy-fixture-api-token-0123456789abcdef"

func main() {
	bin := flag.String("bin", "", "the opsagent binary of the old version")
	out := flag.String("out", "", "the data directory to write (must not exist)")
	flag.Parse()
	if err := run(*bin, *out); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run(bin, out string) error {
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("%s exists", out)
	}
	addrFile := filepath.Join(os.TempDir(), fmt.Sprintf("legacy-addr-%d", os.Getpid()))
	defer os.Remove(addrFile)
	cmd := exec.Command(bin, "backend", "--listen", "127.0.0.1:0", "--data", out, "--addr-file", addrFile,
		"--open-enrollment", "--log-segment-size", "4KiB", "--log-retention-size", "24KiB")
	cmd.Env = append(os.Environ(), "OPSAGENT_API_TOKEN="+apiToken)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer cmd.Process.Kill()
	var addr string
	for deadline := time.Now().Add(30 * time.Second); addr == ""; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("the backend did not start")
		}
		data, _ := os.ReadFile(addrFile)
		addr = strings.TrimSpace(string(data))
	}
	api := func(method, path, body string) (int, string) {
		req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+apiToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(data)
	}
	recipe := `{"module":{"repo":"https://example.com/states.git","tag":"v1"},"state":[
	  {"id":"s1","module":"linux.cmd","parameter":{"cmd":"true"}},
	  {"id":"w1","module":"meta.wait","parameter":{}}]}`
	for range 2 {
		if code, body := api("PUT", "/api/apps/legacy/recipe", recipe); code != 200 {
			return fmt.Errorf("PUT recipe: %d %s", code, body)
		}
	}
	if code, body := api("PUT", "/api/apps/empty/recipe", `{"state":[]}`); code != 200 {
		return fmt.Errorf("PUT recipe: %d %s", code, body)
	}
	// i-1: protocol 2, stream s1, 60 StateLogs of ~500 bytes: segments of
	// 4 KiB, 24 KiB kept.
	if err := agent(addr, "i-1", "tok-i-1-0123456789abcdef", 2, "s1", 1, 60); err != nil {
		return err
	}
	if err := agent(addr, "i-2", "tok-i-2-0123456789abcdef", 1, "", 1, 3); err != nil {
		return err
	}
	if err := agent(addr, "i-3", "tok-i-3-0123456789abcdef", 2, "s3", 1, 5); err != nil {
		return err
	}
	if err := agent(addr, "i-1", "tok-i-1-0123456789abcdef", 2, "s1", 61, 62); err != nil {
		return err
	}
	revoked := false
	if code, _ := api("DELETE", "/api/apps/legacy/instances/i-3", ""); code == 200 {
		revoked = true
	}
	if code, body := api("POST", "/api/apps/legacy/waits", `{"instance_id":"i-1","state_id":"w1"}`); code != 200 {
		return fmt.Errorf("POST waits: %d %s", code, body)
	}
	if code, body := api("POST", "/api/apps/legacy/update", `{"version":"9.9.9","url":"https://example.com/9.9.9/opsagent.tgz"}`); code != 200 {
		return fmt.Errorf("POST update: %d %s", code, body)
	}
	_, logs := api("GET", "/api/apps/legacy/logs?limit=10000", "")
	_, secret := api("GET", "/api/apps/legacy/enrollment", "")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("the backend's exit: %w", err)
	}
	var page struct {
		Logs []json.RawMessage `json:"logs"`
	}
	if err := json.Unmarshal([]byte(logs), &page); err != nil {
		return err
	}
	var sec struct {
		Secret string `json:"enrollment_secret"`
	}
	_ = json.Unmarshal([]byte(secret), &sec)
	expect, _ := json.MarshalIndent(map[string]any{"logs": page.Logs, "revoked": revoked, "enrollment_secret": sec.Secret}, "", " ")
	// Not in the data directory: beside it.
	if err := os.WriteFile(out+".expect.json", expect, 0o644); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(out, "lock"))
	return nil
}

// agent connects an instance, sends StateLogs from..to and waits for the
// acknowledgement of the last (protocol 2) or a round trip (protocol 1).
func agent(addr, instance, token string, protocolVersion int, stream string, from, to int64) error {
	ws, _, err := websocket.DefaultDialer.Dial("ws://"+addr+"/agent/", nil)
	if err != nil {
		return err
	}
	defer ws.Close()
	send := func(m protocol.Message) error {
		data, err := protocol.Encode(m)
		if err != nil {
			return err
		}
		return ws.WriteMessage(websocket.TextMessage, data)
	}
	id := protocol.Identity{InstanceID: instance, AppID: "legacy", AgentVersion: "2.1.0", ProtocolVersion: protocolVersion, InstanceToken: token, LogStream: stream}
	if err := send(&protocol.Handshake{Identity: id}); err != nil {
		return err
	}
	stdout := strings.Repeat("x", 400)
	for seq := from; seq <= to; seq++ {
		comment := fmt.Sprintf("%s state %d done", instance, seq)
		m := &protocol.StateLog{InstanceID: instance, AppID: "legacy", RecipeVersion: 2, StateID: "s1", Result: seq%7 != 0, Comment: &comment, Stdout: &stdout}
		if protocolVersion >= 2 {
			m.Seq = seq
		}
		if err := send(m); err != nil {
			return err
		}
	}
	if err := send(&protocol.Test{Identity: protocol.Identity{InstanceID: instance, AppID: "legacy"}}); err != nil {
		return err
	}
	for {
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, data, err := ws.ReadMessage()
		if err != nil {
			return fmt.Errorf("%s: %w", instance, err)
		}
		m, err := protocol.Decode(data)
		if err != nil {
			continue
		}
		if ack, ok := m.(*protocol.StateLogAck); ok && protocolVersion >= 2 && ack.Seq == to {
			return nil // stored durably
		}
		if _, ok := m.(*protocol.TestAns); ok && protocolVersion < 2 {
			time.Sleep(300 * time.Millisecond) // handed over; its writer stores it within milliseconds
			return nil
		}
	}
}
