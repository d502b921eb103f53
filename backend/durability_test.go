package backend

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// helperDirEnv makes the test binary run TestHelperBackendProcess as a
// backend serving that data directory, for the kill -9 test.
const helperDirEnv = "OPSAGENT_TEST_BACKEND_DATA"

// TestHelperBackendProcess is not a test: it is the backend process that
// TestKillNineKeepsAckedStateLogs starts from this binary and kills. It
// writes its address to <data>/addr and serves until killed.
func TestHelperBackendProcess(t *testing.T) {
	dir := os.Getenv(helperDirEnv)
	if dir == "" {
		t.Skip("runs only as the child process of TestKillNineKeepsAckedStateLogs")
	}
	srv, err := New(Options{DataDir: dir, OpenEnrollment: true})
	if err != nil {
		t.Fatal(err)
	}
	err = srv.ListenAndServe(context.Background(), "127.0.0.1:0", func(a net.Addr) {
		if err := fsutil.WriteFileAtomic(filepath.Join(dir, "addr"), []byte(a.String()), 0o600); err != nil {
			t.Error(err)
		}
	})
	t.Fatal("the helper backend stopped serving:", err)
}

// startHelperBackend runs the helper backend on dir and returns its
// process and address.
func startHelperBackend(t *testing.T, dir string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperBackendProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperDirEnv+"="+dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("helper backend output:\n%s", out.String())
		}
	})
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if data, err := os.ReadFile(filepath.Join(dir, "addr")); err == nil {
			return cmd, string(data)
		}
	}
	t.Fatal("the helper backend did not start listening within 60 s")
	return nil, ""
}

// TestKillNineKeepsAckedStateLogs is the durability guarantee: a backend
// process SIGKILLed while an agent streams StateLogs has stored every one
// it acknowledged, and a restart says so in its first StateLogAck.
func TestKillNineKeepsAckedStateLogs(t *testing.T) {
	dir := t.TempDir()
	setup := newEnv(t, dir, nil)
	setup.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	setup.stop()

	cmd, addr := startHelperBackend(t, dir)
	ws, _, err := websocket.DefaultDialer.Dial("ws://"+addr+"/agent/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	a := &agent{t: t, ws: ws}
	id := identity("i-1", "app1", tok("tok"), "2.2", "")
	id.ProtocolVersion, id.LogStream = 2, "s1"
	a.send(&protocol.Handshake{Identity: id})
	if seq := a.expectAck("s1"); seq != 0 {
		t.Fatalf("first StateLogAck %d", seq)
	}
	a.expectRecipe()

	var acked atomic.Int64
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			m, err := a.next()
			if err != nil {
				return
			}
			if ack, ok := m.(*protocol.StateLogAck); ok && ack.LogStream == "s1" {
				acked.Store(max(acked.Load(), ack.Seq))
			}
		}
	}()
	go func() {
		big := strings.Repeat("o", 2000)
		for seq := int64(1); ; seq++ {
			m := stateLog("i-1", seq)
			m.Stdout = &big
			frame, _ := protocol.Encode(m)
			if ws.WriteMessage(websocket.TextMessage, frame) != nil {
				return
			}
		}
	}()
	for deadline := time.Now().Add(60 * time.Second); acked.Load() < 2000; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d StateLogs acknowledged within 60 s", acked.Load())
		}
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL: no flush, no shutdown
		t.Fatal(err)
	}
	_ = cmd.Wait()
	<-readerDone // every ack the backend sent before dying has been read
	high := acked.Load()

	e := newEnv(t, dir, nil)
	got := agentSeqs(e.storedLogs("app1", 10000), "i-1", "s1")
	if int64(len(got)) < high {
		t.Fatalf("%d StateLogs acknowledged before the kill, %d stored after it", high, len(got))
	}
	for i, seq := range got {
		if seq != int64(i+1) {
			t.Fatalf("stored agent seq %d at position %d: lost or duplicated StateLogs", seq, i)
		}
	}
	if seq := e.connect2("i-1", "app1", "tok", "s1").expectAck("s1"); seq < high || seq != int64(len(got)) {
		t.Fatalf("after restart: first StateLogAck %d; %d were acknowledged and %d are stored", seq, high, len(got))
	}
	t.Logf("killed after %d acknowledged StateLogs; %d found stored", high, len(got))
}

// TestShutdownStoresWhatWasHandedOver sends StateLogs and cancels
// ListenAndServe at once: every StateLog the connection read before the
// shutdown is stored, and its stream's high-water mark written, before it
// returns.
func TestShutdownStoresWhatWasHandedOver(t *testing.T) {
	dir := t.TempDir()
	setup := newEnv(t, dir, nil)
	setup.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	setup.stop()

	srv, err := New(Options{DataDir: dir, OpenEnrollment: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addrc, done := make(chan net.Addr, 1), make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, "127.0.0.1:0", func(a net.Addr) { addrc <- a }) }()
	ws, _, err := websocket.DefaultDialer.Dial("ws://"+(<-addrc).String()+"/agent/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	a := &agent{t: t, ws: ws}
	id := identity("i-1", "app1", tok("tok"), "2.2", "")
	id.ProtocolVersion, id.LogStream = 2, "s1"
	a.send(&protocol.Handshake{Identity: id})
	a.expectAck("s1")
	a.expectRecipe()
	a.sendLogs("i-1", 1, 200)
	// Frames are handled in order: once the Test is answered, all of them
	// are with the stream's writer.
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	for m := a.expect(); m.MessageCode() != protocol.CodeTestAns; m = a.expect() {
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, dir, nil)
	if got := agentSeqs(e.storedLogs("app1", 1000), "i-1", "s1"); !slices.Equal(got, seqRange(1, 200)) {
		t.Fatalf("stored after shutdown: %v, want 1..200", got)
	}
	if in := e.instance("app1", "i-1"); in.LogStreams["s1"] != 200 {
		t.Fatalf("stream high after shutdown: %v, want 200", in.LogStreams)
	}
}
