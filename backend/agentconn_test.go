package backend

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

// logBuffer collects a Server's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// count is the number of lines containing s.
func (l *logBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range strings.Split(l.buf.String(), "\n") {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// eventually polls cond (the backend reacts on its own goroutines).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: still not true after 5 s", what)
}

func TestChattySocketWithoutHandshakeIsClosed(t *testing.T) {
	// DeadAfter is far away: only the handshake deadline can close it.
	e := newEnv(t, "", func(o *Options) { o.HandshakeTimeout = 200 * time.Millisecond; o.DeadAfter = time.Hour })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.dial()
	closed := make(chan error, 1)
	go func() {
		_, _, err := a.ws.ReadMessage()
		closed <- err
	}()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	frames := [][]byte{[]byte("garbage"), []byte(`{"code":"WaitQuery","instance_id":"i-1","app_id":"app1","recipe_version":1}`)}
	for i := 0; ; i++ {
		select {
		case err := <-closed:
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.ClosePolicyViolation || !strings.Contains(ce.Text, "no Handshake within") {
				t.Fatalf("closed with %v, want 1008 naming the missing Handshake", err)
			}
			return
		case <-tick.C:
			if i == 500 {
				t.Fatal("a socket that never handshakes stayed open through 500 frames")
			}
			_ = a.ws.WriteMessage(websocket.TextMessage, frames[i%2])
		}
	}
}

func TestAppNotReadySocketOutlivesTheHandshakeTimeout(t *testing.T) {
	// The agent retries its Handshake on the same socket after AppNotReady;
	// the handshake deadline must not cut it off meanwhile.
	e := newEnv(t, "", func(o *Options) { o.HandshakeTimeout = 100 * time.Millisecond })
	a := e.connect("i-1", "later", "tok", "2.1")
	if _, ok := a.expect().(*protocol.AppNotReady); !ok {
		t.Fatal("want AppNotReady")
	}
	// Wait for the deadline to pass by watching a socket that never
	// handshakes get closed; ours must still answer afterwards.
	idle := e.dial()
	if _, err := idle.next(); err == nil {
		t.Fatal("idle socket not closed")
	}
	e.api("PUT", "/api/apps/later/recipe", recipeJSON)
	a.send(&protocol.Handshake{Identity: identity("i-1", "later", tok("tok"), "2.1", e.secret("later"))})
	a.expectRecipe()
}

func TestSecondHandshakeOnOneSocket(t *testing.T) {
	e := newEnv(t, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	secret := e.secret("app1")
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	// The same identity again is ignored: no second recipe, still served.
	a.send(&protocol.Handshake{Identity: identity("i-1", "app1", tok("tok"), "2.1", secret)})
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if ans, ok := a.expect().(*protocol.TestAns); !ok || !ans.Result {
		t.Fatalf("after a repeated Handshake: %#v", ans)
	}
	// Another identity ends the connection, and neither identity stays
	// listed as connected.
	a.send(&protocol.Handshake{Identity: identity("i-2", "app1", tok("tok2"), "2.1", secret)})
	a.expectClose(websocket.ClosePolicyViolation, "one connection serves one instance")
	eventually(t, "i-1 shown as disconnected", func() bool {
		got := e.instances("app1")
		return !got["i-1"] && !got["i-2"]
	})
	// The same for another app.
	e.api("PUT", "/api/apps/app2/recipe", recipeJSON)
	b := e.connect("i-1", "app1", "tok", "2.1")
	b.expectRecipe()
	b.send(&protocol.Handshake{Identity: identity("i-1", "app2", tok("tok"), "2.1", e.secret("app2"))})
	b.expectClose(websocket.ClosePolicyViolation, "one connection serves one instance")
	eventually(t, "no instance shown as connected", func() bool {
		return !e.instances("app1")["i-1"] && !e.instances("app2")["i-1"]
	})
}

func TestBadFramesLoggedRateLimited(t *testing.T) {
	var logs logBuffer
	e := newEnv(t, "", func(o *Options) { o.Logger = logs.logger(); o.badFrameEvery = time.Hour })
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	a := e.connect("i-1", "app1", "tok", "2.1")
	a.expectRecipe()
	for range 20 {
		_ = a.ws.WriteMessage(websocket.TextMessage, []byte("garbage"))
		a.send(&protocol.AppNotReady{}) // a backend-to-agent message
	}
	// Frames are handled in order: once the Test is answered, all 40 bad
	// frames have been seen.
	a.send(&protocol.Test{Identity: protocol.Identity{InstanceID: "i-1", AppID: "app1"}})
	if _, ok := a.expect().(*protocol.TestAns); !ok {
		t.Fatal("connection did not survive bad frames")
	}
	if n := logs.count("level=WARN"); n != 1 {
		t.Errorf("%d warnings for 40 bad frames, want 1:\n%s", n, logs.String())
	}
	a.ws.Close()
	eventually(t, "the suppressed count logged at disconnect", func() bool { return logs.count("suppressed=39") == 1 })
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{every: 10 * time.Second}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	steps := []struct {
		at         time.Duration
		ok         bool
		suppressed int
	}{{0, true, 0}, {time.Second, false, 0}, {9 * time.Second, false, 0}, {10 * time.Second, true, 2}, {11 * time.Second, false, 0}, {time.Minute, true, 1}}
	for _, s := range steps {
		ok, n := l.allow(t0.Add(s.at))
		if ok != s.ok || n != s.suppressed {
			t.Errorf("at %v: allow = %v, %d; want %v, %d", s.at, ok, n, s.ok, s.suppressed)
		}
	}
}
