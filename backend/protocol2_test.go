package backend

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/visualops/opsagent/protocol"
)

// connect2 handshakes as a protocol-2 agent naming log stream stream.
func (e *env) connect2(instance, app, token, stream string) *agent {
	e.t.Helper()
	a := e.dial()
	id := identity(instance, app, tok(token), "2.2", e.secret(app))
	id.ProtocolVersion, id.LogStream = 2, stream
	a.send(&protocol.Handshake{Identity: id})
	return a
}

// expectAck reads the next frame, which must be a StateLogAck for stream.
func (a *agent) expectAck(stream string) int64 {
	a.t.Helper()
	m := a.expect()
	ack, ok := m.(*protocol.StateLogAck)
	if !ok {
		a.t.Fatalf("got %#v, want a StateLogAck", m)
	}
	if ack.LogStream != stream {
		a.t.Fatalf("StateLogAck for stream %q, want %q", ack.LogStream, stream)
	}
	return ack.Seq
}

// stateLog is a StateLog of app1's recipe numbered seq (0: protocol 1).
func stateLog(instance string, seq int64) *protocol.StateLog {
	comment := fmt.Sprintf("state %d done", seq)
	return &protocol.StateLog{InstanceID: instance, AppID: "app1", RecipeVersion: 1, StateID: fmt.Sprintf("s%d", seq), Result: true, Comment: &comment, Seq: seq}
}

// sendLogs sends StateLogs numbered from..to, in order.
func (a *agent) sendLogs(instance string, from, to int64) {
	a.t.Helper()
	for seq := from; seq <= to; seq++ {
		a.send(stateLog(instance, seq))
	}
}

// waitAck reads acknowledgements until one covers seq, and returns how
// many came. Each must name stream and none may go back or beyond seq.
func (a *agent) waitAck(stream string, seq int64) int {
	a.t.Helper()
	var last int64
	for n := 1; ; n++ {
		got := a.expectAck(stream)
		if got < last || got > seq {
			a.t.Fatalf("StateLogAck %d after %d, waiting for %d", got, last, seq)
		}
		if got == seq {
			return n
		}
		last = got
	}
}

// getJSON decodes GET path into v.
func (e *env) getJSON(path string, v any) {
	e.t.Helper()
	resp, err := http.DefaultClient.Do(e.request("GET", path, ""))
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		e.t.Fatalf("GET %s: %d %s", path, resp.StatusCode, data)
	}
	if err := json.Unmarshal(data, v); err != nil {
		e.t.Fatalf("GET %s: %v", path, err)
	}
}

// logPage is one GET /api/apps/{app}/logs answer.
type logPage struct {
	Logs []LogEntry `json:"logs"`
	Next int64      `json:"next"`
}

// storedLogs pages through an app's StateLogs, checking that seqs grow.
func (e *env) storedLogs(app string, pageSize int) []LogEntry {
	e.t.Helper()
	var all []LogEntry
	var after int64
	for {
		var p logPage
		e.getJSON(fmt.Sprintf("/api/apps/%s/logs?after=%d&limit=%d", app, after, pageSize), &p)
		if len(p.Logs) == 0 {
			return all
		}
		for _, l := range p.Logs {
			if l.Seq <= after {
				e.t.Fatalf("seq %d served after %d", l.Seq, after)
			}
			after = l.Seq
		}
		if p.Next != after {
			e.t.Fatalf("next %d, want %d", p.Next, after)
		}
		all = append(all, p.Logs...)
	}
}

// instance is one decoded row of GET /api/apps/{app}/instances.
func (e *env) instance(app, id string) Instance {
	e.t.Helper()
	var out struct{ Instances []Instance }
	e.getJSON("/api/apps/"+app+"/instances", &out)
	for _, in := range out.Instances {
		if in.InstanceID == id {
			return in
		}
	}
	e.t.Fatalf("instance %s not listed", id)
	return Instance{}
}

// agentSeqs lists the agent seqs of an instance's stored StateLogs.
func agentSeqs(logs []LogEntry, instance, stream string) []int64 {
	var out []int64
	for _, l := range logs {
		if l.InstanceID == instance && l.LogStream == stream {
			out = append(out, l.AgentSeq)
		}
	}
	return out
}

func seqRange(from, to int64) []int64 {
	var out []int64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

func TestProtocol2AckFirstThenAcks(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	if seq := a.expectAck("s1"); seq != 0 {
		t.Fatalf("first StateLogAck %d, want 0 for a new stream", seq)
	}
	a.expectRecipe() // after the ack, as PROTOCOL-2.md requires
	a.sendLogs("i-1", 1, 5)
	a.waitAck("s1", 5)
	logs := e.storedLogs("app1", 1000)
	if got := agentSeqs(logs, "i-1", "s1"); fmt.Sprint(got) != fmt.Sprint(seqRange(1, 5)) || len(logs) != 5 {
		t.Fatalf("stored agent seqs %v of %d logs, want 1..5", got, len(logs))
	}
	in := e.instance("app1", "i-1")
	if in.StateLogs != 5 || in.LogStreams["s1"] != 5 || in.LastStateLog == nil || in.LastStateLog.AgentSeq != 5 || in.LastReceivedAt == nil {
		t.Fatalf("instance summary %+v", in)
	}
}

func TestProtocol2ReconnectDeduplicates(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, dir, nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.sendLogs("i-1", 1, 5)
	a.waitAck("s1", 5)
	a.ws.Close()

	b := e.connect2("i-1", "app1", "tok", "s1")
	if seq := b.expectAck("s1"); seq != 5 {
		t.Fatalf("reconnect: first StateLogAck %d, want 5", seq)
	}
	b.expectRecipe()
	b.sendLogs("i-1", 3, 7) // 3..5 again, as an agent whose acks were lost
	b.waitAck("s1", 7)
	if got := agentSeqs(e.storedLogs("app1", 2), "i-1", "s1"); fmt.Sprint(got) != fmt.Sprint(seqRange(1, 7)) {
		t.Fatalf("stored agent seqs %v, want 1..7 once each", got)
	}
	// A stream of its own starts from nothing.
	if seq := e.connect2("i-1", "app1", "tok", "s2").expectAck("s2"); seq != 0 {
		t.Fatalf("new stream: first StateLogAck %d, want 0", seq)
	}
	// The highs come back after a restart.
	e.srv.CloseAgents()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	e2 := newEnv(t, dir, nil)
	if seq := e2.connect2("i-1", "app1", "tok", "s1").expectAck("s1"); seq != 7 {
		t.Fatalf("after restart: first StateLogAck %d, want 7", seq)
	}
}

func TestProtocol2GapAccepted(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.send(stateLog("i-1", 1))
	a.send(stateLog("i-1", 4)) // the agent's outbox dropped 2 and 3
	a.waitAck("s1", 4)
	if got := agentSeqs(e.storedLogs("app1", 100), "i-1", "s1"); fmt.Sprint(got) != "[1 4]" {
		t.Fatalf("stored %v, want [1 4]", got)
	}
}

func TestProtocol1AgentGetsNoAck(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	old := e.connect("i-1", "app1", "tok", "2.1") // protocol 1
	old.expectRecipe()
	// A protocol-1 Handshake naming a stream is still protocol 1.
	mixed := e.dial()
	id := identity("i-2", "app1", tok("tok2"), "2.1", e.secret("app1"))
	id.LogStream = "x"
	mixed.send(&protocol.Handshake{Identity: id})
	mixed.expectRecipe()
	old.send(stateLog("i-1", 0))
	old.send(stateLog("i-1", 0))
	mixed.send(stateLog("i-2", 9)) // a seq without a stream: kept, never acknowledged
	eventually(t, "three StateLogs stored", func() bool { return len(e.storedLogs("app1", 100)) == 3 })
	// The writer handles batches in order: once a later protocol-2 agent
	// is acknowledged, any ack for the first batch would already be queued.
	p2 := e.connect2("i-3", "app1", "tok3", "s")
	p2.expectAck("s")
	p2.expectRecipe()
	p2.send(stateLog("i-3", 1))
	p2.waitAck("s", 1)
	for _, a := range []*agent{old, mixed} {
		a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "x"}})
		if m := a.expect(); m.MessageCode() != protocol.CodeTestAns {
			t.Fatalf("protocol-1 agent got %#v, want nothing but the TestAns", m)
		}
	}
	if got := fmt.Sprint(agentSeqs(e.storedLogs("app1", 100), "i-1", ""), agentSeqs(e.storedLogs("app1", 100), "i-2", "")); got != "[0 0] [9]" {
		t.Fatalf("protocol-1 StateLogs stored with agent seqs %s, want [0 0] [9] and no stream", got)
	}
}

func TestAcksNameOnlyTheirStream(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	const n = 300
	var wg sync.WaitGroup
	for i := range 3 {
		inst, stream := fmt.Sprintf("i-%d", i), fmt.Sprintf("stream-%d", i)
		a := e.connect2(inst, "app1", "tok"+inst, stream)
		a.expectAck(stream)
		a.expectRecipe()
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.sendLogs(inst, 1, n)
		}()
		defer func() { a.waitAck(stream, n) }() // fails on another stream's ack
	}
	wg.Wait()
}

func TestStateLogAckComesBeforeAnyOtherFrame(t *testing.T) {
	// Even with an update and released waits queued for the instance, the
	// ack is first.
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect2("i-1", "app1", "tok", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.ws.Close()
	e.api("POST", "/api/apps/app1/waits", `{"instance_id":"i-1","state_id":"w1"}`)
	e.api("POST", "/api/apps/app1/update", `{"version":"9.9"}`)
	b := e.connect2("i-1", "app1", "tok", "s1")
	b.expectAck("s1")
	var codes []string
	for range 3 {
		codes = append(codes, b.expect().MessageCode())
	}
	if got := strings.Join(codes, ","); got != "RecipeMetadata,State,AgentUpdate" {
		t.Fatalf("after the ack: %s", got)
	}
}
