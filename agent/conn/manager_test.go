package conn

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/agent/outbox"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/testutil/syncbuf"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
)

const testToken = "s3cr3t-token-never-logged"

// fakeBackend accepts agent connections and hands each to the test.
type fakeBackend struct {
	down  atomic.Bool // refuse connections (503) while set
	srv   *httptest.Server
	conns chan *backendConn
}

type backendConn struct {
	ws        *websocket.Conn
	handshake *protocol.Handshake
}

func newFakeBackend(t *testing.T, tlsServer bool) *fakeBackend {
	t.Helper()
	fb := &fakeBackend{conns: make(chan *backendConn, 16)}
	up := websocket.Upgrader{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if fb.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		_, data, err := ws.ReadMessage()
		if err != nil {
			ws.Close()
			return
		}
		m, err := protocol.Decode(data)
		hs, ok := m.(*protocol.Handshake)
		if err != nil || !ok {
			t.Errorf("first frame is not a Handshake: %s (%v)", data, err)
			ws.Close()
			return
		}
		fb.conns <- &backendConn{ws: ws, handshake: hs}
	})
	if tlsServer {
		fb.srv = httptest.NewTLSServer(h)
	} else {
		fb.srv = httptest.NewServer(h)
	}
	t.Cleanup(fb.srv.Close)
	return fb
}

func (fb *fakeBackend) url() string {
	return "ws" + strings.TrimPrefix(fb.srv.URL, "http") + "/agent/"
}

func (fb *fakeBackend) accept(t *testing.T) *backendConn {
	t.Helper()
	select {
	case c := <-fb.conns:
		t.Cleanup(func() { c.ws.Close() })
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not connect")
		return nil
	}
}

// next reads the next data frame, answering nothing.
func (c *backendConn) next(t *testing.T) protocol.Message {
	t.Helper()
	_ = c.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, data, err := c.ws.ReadMessage()
	if err != nil {
		t.Fatalf("backend read: %v", err)
	}
	m, err := protocol.Decode(data)
	if err != nil {
		t.Fatalf("agent sent a bad frame %s: %v", data, err)
	}
	return m
}

func (c *backendConn) send(t *testing.T, m protocol.Message) {
	t.Helper()
	frame, err := protocol.Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.ws.WriteMessage(websocket.TextMessage, frame); err != nil {
		t.Fatalf("backend write: %v", err)
	}
}

type recorder struct {
	mu        sync.Mutex
	msgs      []protocol.Message
	connected atomic.Int32
	got       chan protocol.Message
}

func newRecorder() *recorder { return &recorder{got: make(chan protocol.Message, 64)} }

func (r *recorder) Deliver(_ context.Context, m protocol.Message) {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
	r.got <- m
}
func (r *recorder) Connected() { r.connected.Add(1) }

type harness struct {
	m        *Manager
	rec      *recorder
	logs     *syncbuf.Buffer
	refresh  atomic.Int32
	cancel   context.CancelFunc
	done     chan struct{}
	identity Identity
}

func startManager(t *testing.T, url string, tweak func(*Options)) *harness {
	t.Helper()
	h := &harness{rec: newRecorder(), logs: &syncbuf.Buffer{}, done: make(chan struct{}),
		identity: Identity{InstanceID: "i-0abc", AppID: "app-123", AgentVersion: "2.1", Token: testToken, InitErrors: []string{"a", "b"}}}
	opts := Options{
		URL: url,
		Identity: func(_ context.Context, refresh bool) (Identity, error) {
			if refresh {
				h.refresh.Add(1)
			}
			return h.identity, nil
		},
		Handler:          h.rec,
		Logger:           slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		AckWait:          50 * time.Millisecond, // the fake backend speaks protocol 1
		BackoffMin:       10 * time.Millisecond,
		BackoffMax:       50 * time.Millisecond,
		AppNotReadyDelay: 20 * time.Millisecond,
	}
	if tweak != nil {
		tweak(&opts)
	}
	h.m = New(opts)
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { defer close(h.done); _ = h.m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-h.done
		if strings.Contains(h.logs.String(), testToken) {
			t.Errorf("the instance token appears in the log:\n%s", h.logs.String())
		}
	})
	return h
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	wait.Eventually(t, what, f)
}

// A changed ws_uri reaches the connection without a SIGHUP: the link to the
// old backend is closed and the agent handshakes with the new one, without
// waiting for a backoff.
func TestSetURLMovesToTheNewBackend(t *testing.T) {
	a, b := newFakeBackend(t, false), newFakeBackend(t, false)
	h := startManager(t, a.url(), func(o *Options) { o.BackoffMin, o.BackoffMax = time.Hour, time.Hour })
	ca := a.accept(t)
	h.m.SetURL(b.url())
	cb := b.accept(t)
	if cb.handshake.InstanceID == "" {
		t.Fatal("no Handshake at the new backend")
	}
	_ = ca.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := ca.ws.ReadMessage(); err == nil {
		t.Fatal("the old link is still open")
	}
	eventually(t, "status naming the new backend", func() bool { return h.m.Status().Backend == Redact(b.url()) })
	// A URL the config rule refuses is reported, not dialled.
	h.m.SetURL("wss://user:pw@example.invalid/agent/")
	eventually(t, "the refusal in the status", func() bool {
		return strings.Contains(h.m.Status().LastError, "user name or password")
	})
}

func TestHandshakeFields(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), nil)
	c := fb.accept(t)
	want := protocol.Identity{InstanceID: "i-0abc", AppID: "app-123", AgentVersion: "2.1", ProtocolVersion: 2, InstanceToken: testToken, LogStream: h.m.out.Stream()}
	got := c.handshake.Identity
	if got.InitErrors == nil || *got.InitErrors != "a; b" {
		t.Errorf("init_errors = %v, want \"a; b\"", got.InitErrors)
	}
	got.InitErrors = nil
	if got != want {
		t.Errorf("handshake %+v, want %+v", got, want)
	}
	eventually(t, "Connected callback", func() bool { return h.rec.connected.Load() == 1 })
	eventually(t, "status connected", func() bool { return h.m.Status().Connected })
}

func TestStateLogsSurviveReconnectInOrder(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), nil)
	c := fb.accept(t)
	h.m.Report(7, "s-1", state.Result{OK: true, Comment: "one"})
	if m := c.next(t).(*protocol.StateLog); m.StateID != "s-1" || !m.Result || *m.Comment != "one" || m.Stdout != nil || m.InstanceID != "i-0abc" {
		t.Fatalf("first StateLog %+v", m)
	}
	// The backend goes away; logs produced meanwhile wait in the outbox.
	fb.down.Store(true)
	c.ws.Close()
	eventually(t, "disconnect noticed", func() bool { return !h.m.Status().Connected })
	for i := 2; i <= 5; i++ {
		h.m.Report(7, "s-"+string(rune('0'+i)), state.Result{OK: i%2 == 0, Stdout: "out"})
	}
	if d := h.m.Status().Outbox.Depth; d != 4 {
		t.Errorf("outbox depth %d while down, want 4", d)
	}
	fb.down.Store(false)
	c2 := fb.accept(t)
	for i := 2; i <= 5; i++ {
		m := c2.next(t).(*protocol.StateLog)
		if m.StateID != "s-"+string(rune('0'+i)) || m.RecipeVersion != 7 {
			t.Fatalf("after reconnect got %+v, want s-%d", m, i)
		}
	}
	eventually(t, "an empty outbox after the flush", func() bool { return h.m.Status().Outbox.Depth == 0 })
}

func TestOutboxBoundAndSupersede(t *testing.T) {
	// Nothing listens: everything stays queued.
	h := startManager(t, "ws://127.0.0.1:1/agent/", func(o *Options) {
		o.Outbox = outbox.Open(outbox.Options{MaxEntries: 3, Logger: o.Logger})
	})
	for i := 1; i <= 5; i++ {
		h.m.Report(int64(i), "s", state.Result{OK: true})
	}
	st := h.m.Status()
	if st.Outbox.Depth != 3 || st.Outbox.Dropped != 2 {
		t.Fatalf("depth %d dropped %d, want 3 and 2", st.Outbox.Depth, st.Outbox.Dropped)
	}
	if !strings.Contains(h.logs.String(), "oldest StateLogs dropped") {
		t.Error("no warning for a dropped StateLog")
	}
	h.m.Supersede(5)
	if d := h.m.Status().Outbox.Depth; d != 1 {
		t.Fatalf("after Supersede(5) depth %d, want 1", d)
	}
	e, _ := h.m.out.After(0)
	if e.Log.RecipeVersion != 5 {
		t.Errorf("kept version %d", e.Log.RecipeVersion)
	}
	eventually(t, "connect error recorded", func() bool {
		return strings.Contains(h.m.Status().LastError, "connect ws://127.0.0.1:1/agent/")
	})
}

func TestBadFramesIgnoredConnectionStays(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), nil)
	c := fb.accept(t)
	for _, bad := range []string{`not json`, `{"code":"Nope"}`, `{"code":"RecipeMetadata","recipe_version":-1}`, `{"code":"StateLog"}`} {
		if err := c.ws.WriteMessage(websocket.TextMessage, []byte(bad)); err != nil {
			t.Fatal(err)
		}
	}
	_ = c.ws.WriteMessage(websocket.BinaryMessage, []byte{1, 2, 3})
	c.send(t, &protocol.RecipeMetadata{RecipeVersion: 3, States: []protocol.RecipeState{}})
	select {
	case m := <-h.rec.got:
		if r, ok := m.(*protocol.RecipeMetadata); !ok || r.RecipeVersion != 3 {
			t.Fatalf("delivered %#v", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the valid recipe after bad frames was not delivered")
	}
	if n := h.m.Status().DroppedFrames; n != 5 {
		t.Errorf("dropped frames %d, want 5", n)
	}
	// Same connection: a StateLog still arrives on it.
	h.m.Report(3, "x", state.Result{OK: true})
	if m := c.next(t).(*protocol.StateLog); m.StateID != "x" {
		t.Errorf("got %+v", m)
	}
	if !strings.Contains(h.logs.String(), "field recipe_version") {
		t.Errorf("the log does not say which field was wrong:\n%s", h.logs.String())
	}
}

func TestOversizeFrameDropsConnection(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), func(o *Options) { o.MaxFrame = 1024 })
	c := fb.accept(t)
	big := `{"code":"AgentUpdate","version":"` + strings.Repeat("9", 2048) + `"}`
	_ = c.ws.WriteMessage(websocket.TextMessage, []byte(big))
	c2 := fb.accept(t) // the agent reconnected
	c2.send(t, &protocol.AgentUpdate{Version: "2.2"})
	select {
	case m := <-h.rec.got:
		if u, ok := m.(*protocol.AgentUpdate); !ok || u.Version != "2.2" {
			t.Fatalf("delivered %#v", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing delivered after reconnect")
	}
	if !strings.Contains(h.logs.String(), "larger than 1024 bytes") {
		t.Errorf("log does not explain the drop:\n%s", h.logs.String())
	}
}

func TestHalfOpenConnectionDetected(t *testing.T) {
	fb := newFakeBackend(t, false)
	startManager(t, fb.url(), func(o *Options) {
		o.PingInterval = 20 * time.Millisecond
		o.DeadAfter = 150 * time.Millisecond
	})
	fb.accept(t) // never reads again: pings go unanswered
	fb.accept(t) // so the agent gives up on it and connects anew
}

func TestAppNotReadyRefreshesIdentity(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), nil)
	c := fb.accept(t)
	c.send(t, &protocol.AppNotReady{})
	_ = c.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err := c.ws.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.CloseNormalClosure {
		t.Errorf("after AppNotReady the backend saw %v, want a normal close", err)
	}
	c2 := fb.accept(t)
	if h.refresh.Load() != 1 {
		t.Errorf("identity refreshed %d times, want 1", h.refresh.Load())
	}
	if c2.handshake.AppID != "app-123" {
		t.Errorf("second handshake %+v", c2.handshake)
	}
}

func TestTestIsAnswered(t *testing.T) {
	fb := newFakeBackend(t, false)
	startManager(t, fb.url(), nil)
	c := fb.accept(t)
	c.send(t, &protocol.Test{})
	m, ok := c.next(t).(*protocol.Test)
	if !ok || m.InstanceID != "i-0abc" || m.ProtocolVersion != 2 {
		t.Fatalf("answer %#v", m)
	}
}

func TestWaitQueryAfterHandshake(t *testing.T) {
	fb := newFakeBackend(t, false)
	fb.down.Store(true)
	h := startManager(t, fb.url(), nil)
	h.m.QueryWaits(9) // while disconnected: remembered
	eventually(t, "a failed attempt", func() bool { return strings.Contains(h.m.Status().LastError, "503") })
	fb.down.Store(false)
	c := fb.accept(t)
	if q, ok := c.next(t).(*protocol.WaitQuery); !ok || q.RecipeVersion != 9 || q.InstanceID != "i-0abc" || q.AppID != "app-123" {
		t.Fatalf("got %#v", q)
	}
}

func TestCleanCloseOnCancel(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), nil)
	c := fb.accept(t)
	h.cancel()
	_ = c.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err := c.ws.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.CloseNormalClosure {
		t.Fatalf("backend saw %v, want a normal close frame", err)
	}
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestPolicyViolationExplained(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), nil)
	c := fb.accept(t)
	_ = c.ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.ClosePolicyViolation, "token mismatch"))
	eventually(t, "error recorded", func() bool { return strings.Contains(h.m.Status().LastError, "token mismatch") })
	if !strings.Contains(h.m.Status().LastError, "check the instance token") {
		t.Errorf("last error %q", h.m.Status().LastError)
	}
}

func TestTLSWithCAFile(t *testing.T) {
	fb := newFakeBackend(t, true)
	// Without the CA the certificate is refused.
	h := startManager(t, fb.url(), nil)
	eventually(t, "TLS failure", func() bool { return strings.Contains(h.m.Status().LastError, "certificate") })
	h.cancel()
	<-h.done

	ca := filepath.Join(t.TempDir(), "ca.pem")
	cert := fb.srv.Certificate()
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	startManager(t, fb.url(), func(o *Options) { o.CAFile = ca })
	if c := fb.accept(t); c.handshake.InstanceID != "i-0abc" {
		t.Fatal("no handshake over TLS")
	}
	bad := filepath.Join(t.TempDir(), "bad.pem")
	_ = os.WriteFile(bad, []byte("nothing"), 0o600)
	h = startManager(t, fb.url(), func(o *Options) { o.CAFile = bad })
	eventually(t, "bad CA file reported", func() bool {
		return strings.Contains(h.m.Status().LastError, "[network] ca_file "+bad+": no PEM certificate")
	})
}

func TestBackoff(t *testing.T) {
	min, max := time.Second, 60*time.Second
	for n, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, 60 * time.Second, 60 * time.Second} {
		if got := Backoff(n, min, max, 0.999999999); got < want-time.Millisecond || got > want {
			t.Errorf("Backoff(%d, r≈1) = %v, want ≈%v", n, got, want)
		}
	}
	if got := Backoff(3, min, max, 0.5); got != 4*time.Second {
		t.Errorf("Backoff(3, 0.5) = %v, want 4s (full jitter)", got)
	}
	if got := Backoff(0, min, max, 0); got != 100*time.Millisecond {
		t.Errorf("Backoff floor = %v", got)
	}
	if got := Backoff(1000, min, max, 0.5); got != 30*time.Second {
		t.Errorf("huge attempt = %v", got)
	}
}

func TestCheckURL(t *testing.T) {
	for raw, want := range map[string]string{
		"wss://api.example.com/agent/": "",
		"ws://127.0.0.1:8963/agent/":   "",
		"http://api.example.com/":      "expected a wss or ws URL",
		"wss:///agent/":                "expected a URL such as wss://host/path",
		"wss://u:p@h/":                 "user name or password",
		"wss://h/%zz":                  "expected a URL such as wss://host/path",
	} {
		err := checkURL(raw)
		if (err == nil) != (want == "") || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("checkURL(%q) = %v, want %q", raw, err, want)
		}
		if err != nil && strings.Contains(err.Error(), ":p@") {
			t.Errorf("checkURL leaks the password: %v", err)
		}
	}
}

func TestRedact(t *testing.T) {
	if got := Redact("wss://user:pw@api.example.com/agent/?token=x#f"); got != "wss://api.example.com/agent/" {
		t.Errorf("Redact = %q", got)
	}
}

func TestTokenNeverLogged(t *testing.T) {
	fb := newFakeBackend(t, false)
	// The token also sits in the URL's user info (refused) or query, as a
	// careless config might have it; it must reach neither log nor status.
	url := strings.Replace(fb.url(), "ws://", "ws://u:"+testToken+"@", 1)
	h := startManager(t, url, nil)
	eventually(t, "URL refused", func() bool { return strings.Contains(h.m.Status().LastError, "user name or password") })
	h.cancel()
	<-h.done
	logs := h.logs.String()
	h = startManager(t, fb.url()+"?t="+testToken, nil)
	c := fb.accept(t)
	c.send(t, &protocol.Test{})
	if _, ok := c.next(t).(*protocol.Test); !ok {
		t.Fatal("no Test answer")
	}
	msg := "bad token"
	c.send(t, &protocol.TestAns{Result: false, Error: &msg})
	c.send(t, &protocol.AppNotReady{})
	c2 := fb.accept(t)
	_ = c2.ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.ClosePolicyViolation, "token mismatch"))
	fb.accept(t)
	h.cancel()
	<-h.done
	logs += h.logs.String()
	if !strings.Contains(logs, "Handshake sent") || !strings.Contains(logs, "bad token") {
		t.Fatalf("the log lacks the expected lines:\n%s", logs)
	}
	if strings.Contains(logs, testToken) || strings.Contains(fmt.Sprint(h.m.Status()), testToken) {
		t.Errorf("the token leaked:\n%s", logs)
	}
}

// Protocol 2: a backend that answers the Handshake with a StateLogAck gets
// StateLogs with seq, acknowledges them, and after a reconnect receives
// again exactly those it had not acknowledged, in order.
func TestProtocol2AcknowledgedAndResent(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), func(o *Options) { o.AckWait = time.Minute })
	c := fb.accept(t)
	if c.handshake.ProtocolVersion != 2 || c.handshake.LogStream == "" {
		t.Fatalf("handshake %+v", c.handshake.Identity)
	}
	stream := c.handshake.LogStream
	for i := 1; i <= 3; i++ {
		h.m.Report(7, fmt.Sprintf("s-%d", i), state.Result{OK: true})
	}
	// Nothing is sent before the backend has said which protocol it speaks.
	_ = c.ws.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, data, err := c.ws.ReadMessage(); err == nil {
		t.Fatalf("a frame before the backend's first answer: %s", data)
	}
	c.ws.Close()
	c = fb.accept(t)
	c.send(t, &protocol.StateLogAck{LogStream: stream, Seq: 0})
	for i := 1; i <= 3; i++ {
		m := c.next(t).(*protocol.StateLog)
		if m.Seq != int64(i) || m.StateID != fmt.Sprintf("s-%d", i) {
			t.Fatalf("got seq %d %s, want %d", m.Seq, m.StateID, i)
		}
	}
	c.send(t, &protocol.StateLogAck{LogStream: stream, Seq: 2})
	eventually(t, "seq 1-2 acknowledged", func() bool { return h.m.Status().Outbox.Depth == 1 })
	// A reconnect: the backend says it has 2; 3 comes again, then 4.
	c.ws.Close()
	h.m.Report(7, "s-4", state.Result{OK: true})
	c = fb.accept(t)
	c.send(t, &protocol.StateLogAck{LogStream: stream, Seq: 2})
	for _, want := range []int64{3, 4} {
		if m := c.next(t).(*protocol.StateLog); m.Seq != want {
			t.Fatalf("after reconnect seq %d, want %d", m.Seq, want)
		}
	}
	// Acknowledgements for another stream or beyond what was sent are
	// ignored as bad frames.
	c.send(t, &protocol.StateLogAck{LogStream: "someone-else", Seq: 4})
	c.send(t, &protocol.StateLogAck{LogStream: stream, Seq: 99})
	eventually(t, "two bad frames", func() bool { return h.m.Status().DroppedFrames == 2 })
	if d := h.m.Status().Outbox.Depth; d != 2 {
		t.Fatalf("depth %d, want 2 (3 and 4 unacknowledged)", d)
	}
	c.send(t, &protocol.StateLogAck{LogStream: stream, Seq: 4})
	eventually(t, "everything acknowledged", func() bool { return h.m.Status().Outbox.Depth == 0 })
	if h.m.Status().Protocol != 2 {
		t.Errorf("status protocol %d", h.m.Status().Protocol)
	}
}

// A backend whose first frame is not a StateLogAck speaks protocol 1:
// StateLogs carry no seq and leave the outbox once written.
func TestProtocol1WhenTheFirstFrameIsNotAnAck(t *testing.T) {
	fb := newFakeBackend(t, false)
	h := startManager(t, fb.url(), func(o *Options) { o.AckWait = time.Minute })
	c := fb.accept(t)
	c.send(t, &protocol.RecipeMetadata{RecipeVersion: 1, States: []protocol.RecipeState{}})
	h.m.Report(1, "a", state.Result{OK: true})
	if m := c.next(t).(*protocol.StateLog); m.Seq != 0 || m.StateID != "a" {
		t.Fatalf("protocol 1 StateLog %+v", m)
	}
	eventually(t, "the written StateLog gone", func() bool { return h.m.Status().Outbox.Depth == 0 })
	if h.m.Status().Protocol != 1 {
		t.Errorf("status protocol %d", h.m.Status().Protocol)
	}
}

// FuzzBackoff checks the invariants: never negative, never above max, never
// below the floor, whatever the attempt number and random draw.
func FuzzBackoff(f *testing.F) {
	f.Add(0, int64(time.Second), int64(time.Minute), 0.0)
	f.Add(5, int64(time.Second), int64(time.Minute), 0.5)
	f.Add(1<<30, int64(time.Millisecond), int64(time.Hour), 0.999)
	f.Add(-3, int64(time.Second), int64(time.Minute), 0.7)
	f.Fuzz(func(t *testing.T, n int, min, max int64, r float64) {
		if min <= 0 || max < min || r < 0 || r >= 1 || n < 0 {
			t.Skip()
		}
		d := Backoff(n, time.Duration(min), time.Duration(max), r)
		if d < time.Duration(min)/10 || d > time.Duration(max) {
			t.Fatalf("Backoff(%d, %d, %d, %v) = %d", n, min, max, r, d)
		}
	})
}

// BenchmarkStateLogFlush measures how fast a queued backlog reaches a
// loopback backend (go test -bench StateLogFlush ./agent/conn/).
func BenchmarkStateLogFlush(b *testing.B) {
	up := websocket.Upgrader{}
	got := make(chan int, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		n := -1 // the Handshake
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
			if n++; n == b.N {
				got <- n
			}
		}
	}))
	defer srv.Close()
	m := New(Options{
		URL:     "ws" + strings.TrimPrefix(srv.URL, "http") + "/",
		Outbox:  outbox.Open(outbox.Options{MaxEntries: b.N + 1}),
		AckWait: time.Millisecond,
		Identity: func(context.Context, bool) (Identity, error) {
			return Identity{InstanceID: "i-1", AppID: "a", AgentVersion: "1", Token: "t"}, nil
		},
	})
	res := state.Result{OK: true, Comment: "done", Stdout: strings.Repeat("x", 256)}
	for i := 0; i < b.N; i++ {
		m.Report(1, "s", res)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.ResetTimer()
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	<-got
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "statelogs/s")
	cancel()
	<-done
}

// init_errors in a Handshake stay small whatever the errors: each is cut
// to 1 KiB and all together to 4 KiB, on rune boundaries, saying so.
func TestInitErrorsBounded(t *testing.T) {
	long := strings.Repeat("é", 100<<10) // a whole compat.txt quoted
	id := Identity{InstanceID: "i-1", AppID: "a", InitErrors: []string{"short one", long, long, long, long, long, "last"}}
	got := *id.wire("s").InitErrors
	if len(got) > maxInitErrors || !utf8.ValidString(got) {
		t.Fatalf("init_errors is %d bytes (valid UTF-8: %v)", len(got), utf8.ValidString(got))
	}
	if !strings.HasPrefix(got, "short one; éé") || !strings.Contains(got, "more bytes)") {
		t.Errorf("init_errors %.200q…", got)
	}
	if first := strings.Split(got, "; ")[1]; len(first) > maxInitError {
		t.Errorf("one error takes %d bytes", len(first))
	}
	small := Identity{InitErrors: []string{"a", "b"}}
	if s := *small.wire("s").InitErrors; s != "a; b" {
		t.Errorf("small errors changed: %q", s)
	}
}
