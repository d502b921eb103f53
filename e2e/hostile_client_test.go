package e2e

// A hostile client against the real `opsagent backend` process: path
// tricks in app ids, oversized bodies, clients that never handshake,
// abandoned connections, a StateLog flood from a forged instance, and the
// API token on every route. Each test starts its own backend, so the
// figures it logs (VmHWM, fd counts) are that backend's alone.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
)

// ---------------------------------------------------------------------------
// Helpers (prefixed hc: other files of this package are edited concurrently).

// hcRoute is one API endpoint as declared in backend/api.go.
type hcRoute struct {
	method, pattern string
	public          bool
}

// hcRoutes reads the route table from backend/api.go (the composite
// literals of apiRoutes), so that a route added there is attacked here
// without editing this file.
func hcRoutes(t testing.TB) []hcRoute {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), filepath.Join("..", "backend", "api.go"), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []hcRoute
	ast.Inspect(f, func(n ast.Node) bool {
		fd, ok := n.(*ast.FuncDecl)
		if !ok || fd.Name.Name != "apiRoutes" {
			return true
		}
		ast.Inspect(fd.Body, func(n ast.Node) bool {
			cl, ok := n.(*ast.CompositeLit)
			if !ok || len(cl.Elts) != 4 {
				return true
			}
			m, ok1 := cl.Elts[0].(*ast.BasicLit)
			p, ok2 := cl.Elts[1].(*ast.BasicLit)
			pub, ok3 := cl.Elts[3].(*ast.Ident)
			if !ok1 || !ok2 || !ok3 || m.Kind != token.STRING || p.Kind != token.STRING {
				return true
			}
			ms, _ := strconv.Unquote(m.Value)
			ps, _ := strconv.Unquote(p.Value)
			out = append(out, hcRoute{ms, ps, pub.Name == "true"})
			return false
		})
		return false
	})
	have := map[string]bool{}
	for _, r := range out {
		have[r.method+" "+r.pattern] = true
	}
	for _, w := range []string{"GET /api/healthz", "GET /api/apps", "PUT /api/apps/{app}/recipe", "GET /api/apps/{app}/recipe",
		"GET /api/apps/{app}/instances", "GET /api/apps/{app}/logs", "POST /api/apps/{app}/waits", "POST /api/apps/{app}/update",
		"GET /api/apps/{app}/enrollment", "POST /api/apps/{app}/enrollment/rotate"} {
		if !have[w] {
			t.Fatalf("route %s not found in backend/api.go apiRoutes (parsed %v)", w, out)
		}
	}
	return out
}

// hcBody is a well-formed body for a route, so that only the thing under
// test (auth, the app id) can make it fail.
func hcBody(rt hcRoute) string {
	switch {
	case rt.method == "PUT" && strings.HasSuffix(rt.pattern, "/recipe"):
		return `{"state":[{"id":"c","module":"meta.comment","parameter":{}}]}`
	case strings.HasSuffix(rt.pattern, "/waits"):
		return `{"instance_id":"i-1","state_id":"w"}`
	case strings.HasSuffix(rt.pattern, "/update"):
		return `{"version":"9.9.9"}`
	case rt.method == "PUT" || rt.method == "POST":
		return `{}`
	}
	return ""
}

type hcResp struct {
	code   int
	header http.Header
	body   []byte
}

// hcRaw sends one HTTP/1.1 request whose target is written verbatim on the
// request line (no client-side cleaning or escaping) on a fresh connection.
func hcRaw(addr, method, target string, hdr []string, body string) (hcResp, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return hcResp{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n", method, target, addr)
	for _, h := range hdr {
		req.WriteString(h + "\r\n")
	}
	if body != "" || method == "PUT" || method == "POST" {
		fmt.Fprintf(&req, "Content-Length: %d\r\n", len(body))
	}
	req.WriteString("\r\n")
	req.WriteString(body)
	// Written aside: a request line over the header limit is answered
	// before it is all sent.
	go func() { _, _ = c.Write(req.Bytes()) }()
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		return hcResp{}, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return hcResp{resp.StatusCode, resp.Header, data}, err
}

// hcCall is an API call (fresh connection, so no idle keep-alive socket is
// left in the backend's fd count); a transport error fails the test.
func hcCall(t testing.TB, addr, method, path, body, apiToken string) (int, map[string]any) {
	t.Helper()
	var hdr []string
	if body != "" {
		hdr = append(hdr, "Content-Type: application/json")
	}
	if apiToken != "" {
		hdr = append(hdr, "Authorization: Bearer "+apiToken)
	}
	r, err := hcRaw(addr, method, path, hdr, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	var m map[string]any
	_ = json.Unmarshal(r.body, &m)
	return r.code, m
}

func hcMust(t testing.TB, addr, method, path, body, apiToken string) map[string]any {
	t.Helper()
	code, m := hcCall(t, addr, method, path, body, apiToken)
	if code != http.StatusOK {
		t.Fatalf("%s %s: %d %v", method, path, code, m)
	}
	return m
}

// hcAlive checks that the backend process still runs and answers healthz.
func hcAlive(t testing.TB, b *backendProc) {
	t.Helper()
	select {
	case <-b.exited:
		t.Fatalf("the backend exited: %s\n%s", b.cmd.ProcessState, b.out.String())
	default:
	}
	if code, _ := hcCall(t, b.addr, "GET", "/api/healthz", "", ""); code != http.StatusOK {
		t.Fatalf("healthz: %d", code)
	}
}

func hcHWM(t testing.TB, b *backendProc) int64 { return procStatus(t, b.cmd.Process.Pid, "VmHWM:") }

func hcFDs(t testing.TB, b *backendProc) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", b.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// hcRaiseNofile lifts the soft RLIMIT_NOFILE to the hard one, as
// BenchmarkFleet does; the backend started afterwards inherits it.
func hcRaiseNofile(t testing.TB) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	return lim.Cur
}

// hcSnapshot lists every path under root with its mode, size and mtime.
func hcSnapshot(t testing.TB, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		out[p] = fmt.Sprintf("%v %d %s", info.Mode(), info.Size(), info.ModTime().Format(time.RFC3339Nano))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func hcDial(addr string) (*websocket.Conn, error) {
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	ws, _, err := d.Dial("ws://"+addr+"/agent/", nil)
	return ws, err
}

func hcFrame(t testing.TB, m protocol.Message) []byte {
	t.Helper()
	f, err := protocol.Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// hcAgent handshakes as an instance and returns the connection once the
// backend has registered it (its first frame arrived).
func hcAgent(t testing.TB, addr, app, instance, stream string) *websocket.Conn {
	t.Helper()
	ws, err := hcDial(addr)
	if err != nil {
		t.Fatal(err)
	}
	id := protocol.Identity{InstanceID: instance, AppID: app, AgentVersion: "2.1.0", ProtocolVersion: 1,
		InstanceToken: "hc-token-of-" + instance}
	if stream != "" {
		id.ProtocolVersion, id.LogStream = 2, stream
	}
	_ = ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, hcFrame(t, &protocol.Handshake{Identity: id})); err != nil {
		t.Fatal(err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := ws.ReadMessage(); err != nil {
		t.Fatalf("handshake as %s/%s: %v", app, instance, err)
	}
	_ = ws.SetReadDeadline(time.Time{})
	return ws
}

func hcInstances(t testing.TB, addr, app, apiToken string) map[string]map[string]any {
	t.Helper()
	out := map[string]map[string]any{}
	list, _ := hcMust(t, addr, "GET", "/api/apps/"+app+"/instances", "", apiToken)["instances"].([]any)
	for _, x := range list {
		m := x.(map[string]any)
		out[m["instance_id"].(string)] = m
	}
	return out
}

// ---------------------------------------------------------------------------
// 1. Path tricks.

// hcTrickyIDs are {app} values as written on the request line.
func hcTrickyIDs(marker string) []string {
	up := func(n int, sep string) string { return strings.Repeat(".."+sep, n) }
	return []string{
		// Dot segments, raw (the router cleans them) and encoded.
		"..", ".", "...", "../" + marker, up(2, "/") + marker, up(8, "/") + marker, up(20, "/") + marker,
		"good/../" + up(2, "/") + marker, "%2e%2e/" + marker,
		"%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e",
		// Encoded slashes and backslashes: one path segment for the router.
		"..%2f" + marker, up(8, "%2f") + marker, up(8, "%2F") + marker, strings.Repeat("%2e%2e%2f", 20) + marker,
		"good%2f..%2f..%2f" + marker, "%2f" + marker, "%2ftmp%2f" + marker, "..%5c..%5c" + marker,
		"%252e%252e%252f" + marker, // double-encoded
		// Overlong and look-alike dots and slashes.
		"%c0%ae%c0%ae%c0%af" + marker, "%ef%bc%8e%ef%bc%8e%ef%bc%8f" + marker, "%e2%80%a4%e2%80%a4%e2%88%95" + marker,
		// NUL, control characters, header injection.
		"%00", "good%00", "a%00b", "%00..%2f" + marker, "a\x00b", "good%0a", "good%0d%0aX-Injected:%201",
		// Names a shell or a path would treat specially.
		"~", "~root", "-rf", ".hidden", "%20good", "good%20", "*", "%2a",
		// Unicode, raw and encoded, and invalid UTF-8.
		"%c3%a9t%c3%a9", "été", "%f0%9f%92%a5", "%ff%fe", "%e2%80%aeevil", "%ef%bb%bfgood",
		// Very long: over the 128-byte limit, and over the 1 MiB header limit.
		strings.Repeat("a", 129), strings.Repeat("a", 4096), strings.Repeat("%2e", 3000), strings.Repeat("a", 2<<20),
	}
}

// TestHostilePathTricks sends every tricky app id to every {app} route of
// the API and to the agent Handshake: each is refused (4xx, or a router
// redirect whose target is refused), and nothing changes on disk, in or
// around the data directory.
func TestHostilePathTricks(t *testing.T) {
	parent := t.TempDir()
	// The data dir is nested so that up to 8 "../" stay inside parent,
	// where the snapshot sees them.
	data := filepath.Join(parent, "d1", "d2", "d3", "d4", "d5", "d6", "data")
	b := startBackend(t, data, "127.0.0.1:0")
	hcMust(t, b.addr, "PUT", "/api/apps/good/recipe", `{"state":[]}`, b.token)
	marker := fmt.Sprintf("hc-pwned-%d", os.Getpid())
	before := hcSnapshot(t, parent)

	var routes []hcRoute
	for _, rt := range hcRoutes(t) {
		if strings.Contains(rt.pattern, "{app}") {
			routes = append(routes, rt)
		}
	}
	ids := hcTrickyIDs(marker)
	counts := map[int]int{}
	redirects := 0
	for _, rt := range routes {
		body := hcBody(rt)
		hdr := []string{"Authorization: Bearer " + b.token} // past auth: the handlers see the ids
		if body != "" {
			hdr = append(hdr, "Content-Type: application/json")
		}
		for _, id := range ids {
			target := strings.Replace(rt.pattern, "{app}", id, 1)
			short := target
			if len(short) > 100 {
				short = short[:100] + "…"
			}
			r, err := hcRaw(b.addr, rt.method, target, hdr, body)
			if err != nil {
				t.Errorf("%s %q: %v", rt.method, short, err)
				continue
			}
			if r.code >= 300 && r.code < 400 {
				// The router cleans dot segments with a redirect; what it
				// points at must be refused too.
				redirects++
				loc := r.header.Get("Location")
				if r2, err := hcRaw(b.addr, rt.method, loc, hdr, body); err != nil || r2.code < 400 || r2.code > 499 {
					t.Errorf("%s %q: redirected to %q, which answered %d %s (err %v)", rt.method, short, loc, r2.code, r2.body, err)
				}
				counts[r.code]++
				continue
			}
			counts[r.code]++
			if r.code < 400 || r.code > 499 {
				t.Errorf("%s %q: %d %s, want 4xx", rt.method, short, r.code, r.body)
			}
		}
	}

	// The agent side: a Handshake naming a tricky app, instance or log
	// stream is never registered. A valid Handshake for an unknown app
	// follows it: AppNotReady means the first was ignored (refused ones
	// close the socket; an accepted one would make the second a "second
	// identity" close).
	type hs struct{ app, inst, stream string }
	var hss []hs
	for _, bad := range []string{"../../" + marker, "..", "%2e%2e", "a/b", "a\\b", "/" + marker, "a\x00b", "good\x00", "été",
		strings.Repeat("a", 129), "good/../good", "good\n"} {
		hss = append(hss, hs{bad, "i-ok", ""}, hs{"good", bad, ""})
	}
	hss = append(hss, hs{"good", "i-ls", "../../" + marker}, hs{"good", "i-ls", "a/b"}, hs{"good", "i-ls", "a\x00"})
	refused, ignored := 0, 0
	for _, h := range hss {
		ws, err := hcDial(b.addr)
		if err != nil {
			t.Fatal(err)
		}
		first, _ := json.Marshal(map[string]any{"code": "Handshake", "instance_id": h.inst, "app_id": h.app, "agent_version": "2.1.0",
			"protocol_version": 2, "instance_token": "hc-token-0123456789", "log_stream": func() any {
				if h.stream == "" {
					return nil
				}
				return h.stream
			}(), "init_errors": nil})
		if h.stream == "" {
			first = bytes.Replace(first, []byte(`,"log_stream":null`), nil, 1)
		}
		probe := hcFrame(t, &protocol.Handshake{Identity: protocol.Identity{InstanceID: "i-probe", AppID: "hc-absent", AgentVersion: "2.1.0",
			ProtocolVersion: 1, InstanceToken: "hc-token-0123456789"}})
		_ = ws.SetReadDeadline(time.Now().Add(20 * time.Second))
		_ = ws.SetWriteDeadline(time.Now().Add(20 * time.Second))
		_ = ws.WriteMessage(websocket.TextMessage, first)
		_ = ws.WriteMessage(websocket.TextMessage, probe)
		_, msg, err := ws.ReadMessage()
		var ce *websocket.CloseError
		switch {
		case err == nil && bytes.Contains(msg, []byte(protocol.CodeAppNotReady)):
			ignored++
		case errors.As(err, &ce) && ce.Code == websocket.ClosePolicyViolation && !strings.Contains(ce.Text, "one connection serves one instance"):
			refused++
		default:
			t.Errorf("Handshake app=%q instance=%q stream=%q: got %q / %v, want it refused or ignored", h.app, h.inst, h.stream, msg, err)
		}
		ws.Close()
	}
	if inst := hcInstances(t, b.addr, "good", b.token); len(inst) != 0 {
		t.Errorf("instances registered by tricky Handshakes: %v", inst)
	}
	hcAlive(t, b)

	after := hcSnapshot(t, parent)
	for p, v := range after {
		if before[p] != v {
			t.Errorf("written during the attack: %s (%s, before %q)", p, v, before[p])
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("removed during the attack: %s", p)
		}
	}
	for _, p := range []string{"/" + marker, filepath.Join(os.TempDir(), marker), filepath.Join(filepath.Dir(parent), marker)} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s exists: a path trick escaped the data dir", p)
		}
	}
	t.Logf("FIGURES path tricks: %d ids x %d routes = %d requests, statuses %v (%d router redirects, all followed to 4xx); %d Handshakes (%d refused, %d ignored); %d paths unchanged; backend VmHWM %d KiB",
		len(ids), len(routes), len(ids)*len(routes), counts, redirects, len(hss), refused, ignored, len(after), hcHWM(t, b))
}

// ---------------------------------------------------------------------------
// 2. Oversized bodies.

// hcStream sends a request whose body is prefix then filler up to total
// bytes (Content-Length or chunked), and reads the answer while still
// sending. sent is how much the kernel accepted before the answer came.
func hcStream(addr, apiToken, method, path string, chunked bool, prefix string, filler []byte, total int64) (code int, sent int64, err error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	head := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAuthorization: Bearer %s\r\n", method, path, addr, apiToken)
	if chunked {
		head += "Transfer-Encoding: chunked\r\n\r\n"
	} else {
		head += fmt.Sprintf("Content-Length: %d\r\n\r\n", total)
	}
	stop := make(chan struct{})
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		w := bufio.NewWriterSize(c, 64<<10)
		if _, err := w.WriteString(head); err != nil {
			return
		}
		block := bytes.Repeat(filler, (64<<10)/len(filler))
		first := append([]byte(prefix), block...)
		for left := total; left > 0; {
			select {
			case <-stop:
				return
			default:
			}
			chunk := block
			if left == total {
				chunk = first
			}
			if int64(len(chunk)) > left {
				chunk = chunk[:left]
			}
			if chunked {
				fmt.Fprintf(w, "%x\r\n", len(chunk))
			}
			if _, err := w.Write(chunk); err != nil {
				return
			}
			if chunked {
				_, _ = w.WriteString("\r\n")
			}
			if err := w.Flush(); err != nil {
				return
			}
			left -= int64(len(chunk))
			n.Add(int64(len(chunk)))
		}
		if chunked {
			_, _ = w.WriteString("0\r\n\r\n")
			_ = w.Flush()
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	sent = n.Load()
	close(stop)
	_ = c.SetWriteDeadline(time.Now()) // unblock a writer stuck on a full socket
	<-done
	if err != nil {
		return 0, sent, err
	}
	resp.Body.Close()
	return resp.StatusCode, sent, nil
}

// TestHostileOversizedBodies streams 100 MiB bodies at every body-reading
// route: each is answered 413 long before the body ends, nothing is stored,
// and the backend's peak memory stays far below the body size.
func TestHostileOversizedBodies(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	hcMust(t, b.addr, "PUT", "/api/apps/big/recipe", `{"state":[{"id":"c","module":"meta.comment","parameter":{}}]}`, b.token)
	hwm0 := hcHWM(t, b)
	const total = 100 << 20
	state := []byte(`{"id":"s","module":"meta.comment","parameter":{"comment":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}},`)
	cases := []struct {
		name, method, path string
		chunked            bool
		prefix             string
		filler             []byte
	}{
		{"recipe, a list of states, Content-Length", "PUT", "/api/apps/big/recipe", false, `{"state":[`, state},
		{"recipe, a list of states, chunked", "PUT", "/api/apps/big/recipe", true, `{"state":[`, state},
		{"recipe, one huge string, chunked", "PUT", "/api/apps/big/recipe", true, `{"state":[{"id":"`, []byte("a")},
		{"recipe, whitespace, Content-Length", "PUT", "/api/apps/big/recipe", false, `{`, []byte(" ")},
		{"recipe of a new app, chunked", "PUT", "/api/apps/newbig/recipe", true, `{"state":[`, state},
		{"waits, huge string", "POST", "/api/apps/big/waits", true, `{"instance_id":"`, []byte("i")},
		{"update, huge string", "POST", "/api/apps/big/update", false, `{"version":"`, []byte("9")},
		{"enrollment rotate, huge string", "POST", "/api/apps/big/enrollment/rotate", true, `{"x":"`, []byte("r")},
	}
	var maxSent int64
	for _, c := range cases {
		code, sent, err := hcStream(b.addr, b.token, c.method, c.path, c.chunked, c.prefix, c.filler, total)
		if err != nil || code != http.StatusRequestEntityTooLarge {
			t.Errorf("%s: %d %v, want 413", c.name, code, err)
		}
		if sent >= total/2 {
			t.Errorf("%s: %d of %d bytes sent before the answer: the backend read the body", c.name, sent, total)
		}
		maxSent = max(maxSent, sent)
	}
	hwmSeq := hcHWM(t, b)

	// The same, 4 at a time.
	const parallel = 4
	var wg sync.WaitGroup
	errs := make(chan string, parallel)
	for i := range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := cases[i%2]
			code, sent, err := hcStream(b.addr, b.token, c.method, c.path, c.chunked, c.prefix, c.filler, total)
			if err != nil || code != http.StatusRequestEntityTooLarge || sent >= total/2 {
				errs <- fmt.Sprintf("parallel %s: %d after %d bytes, %v", c.name, code, sent, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	hwm := hcHWM(t, b)
	hcAlive(t, b)

	if v := hcMust(t, b.addr, "GET", "/api/apps/big/recipe", "", b.token)["recipe_version"]; v != float64(1) {
		t.Errorf("recipe_version %v after refused bodies, want 1", v)
	}
	if code, _ := hcCall(t, b.addr, "GET", "/api/apps/newbig/recipe", "", b.token); code != http.StatusNotFound {
		t.Errorf("app newbig: %d, want 404 (its oversized recipe was refused)", code)
	}
	// Peak memory: at most 8 MiB of body per request, held in a decoder
	// buffer that doubles (16 MiB) plus garbage not yet collected; 20-40 MiB
	// per concurrent request is what this costs. Holding the 100 MiB bodies
	// (400 MiB for the parallel ones) would break this bound.
	if hwm-hwm0 > 192<<10 {
		t.Errorf("backend VmHWM grew by %d KiB (from %d KiB) for 100 MiB bodies, want under 192 MiB", hwm-hwm0, hwm0)
	}
	t.Logf("FIGURES oversized bodies: %d sequential + %d parallel requests of %d MiB each, all 413; at most %d KiB sent before the 413; backend VmHWM %d KiB before, %d after sequential, %d after parallel",
		len(cases), parallel, total>>20, maxSent>>10, hwm0, hwmSeq, hwm)
}

// ---------------------------------------------------------------------------
// 3. Clients that never handshake.

// TestHostileSlowClientsNeverHandshake opens WebSocket connections that
// send nothing, connections that send all kinds of frames but never a
// Handshake, a few that send one near-limit frame, a few whose Handshake
// names an unknown app, plus TCP connections that never finish their HTTP
// request. The backend closes every one of them (WebSockets with 1008 "no
// Handshake within 10s", the near-limit frames at once with 1009, as
// frames before a Handshake are limited to 64 KiB) while healthz keeps
// answering. A socket that keeps sending Handshakes for unknown apps is
// closed after a few AppNotReady answers, and no log line carries a long
// client-supplied id.
func TestHostileSlowClientsNeverHandshake(t *testing.T) {
	hcRaiseNofile(t)
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	hcMust(t, b.addr, "PUT", "/api/apps/slow/recipe", `{"state":[]}`, b.token)
	fd0 := hcFDs(t, b)
	hwm0 := hcHWM(t, b)

	const silentWS, chattyWS, hugeWS, notReadyWS, silentTCP, partialHTTP = 300, 60, 4, 5, 100, 100
	const total = silentWS + chattyWS + hugeWS + notReadyWS + silentTCP + partialHTTP
	// timedOut counts the closes that come with a timeout (all but the
	// huge frames' immediate ones): the slow connections pile up until then.
	var opened, closed, timedOut atomic.Int64
	var mu sync.Mutex
	var problems []string
	problem := func(format string, a ...any) {
		mu.Lock()
		problems = append(problems, fmt.Sprintf(format, a...))
		mu.Unlock()
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()

	// Meanwhile (from before the first hostile connection to after the
	// last is closed), healthz and the app list keep answering.
	var okAllOpen, okTotal, failed atomic.Int64
	var maxLatency atomic.Int64
	probeDone := make(chan struct{})
	go func() {
		defer close(probeDone)
		for i := 0; i < 2000 && closed.Load() < total; i++ {
			begin := time.Now()
			r1, err1 := hcRaw(b.addr, "GET", "/api/healthz", nil, "")
			r2, err2 := hcRaw(b.addr, "GET", "/api/apps", []string{"Authorization: Bearer " + b.token}, "")
			lat := time.Since(begin)
			if err1 != nil || err2 != nil || r1.code != 200 || r2.code != 200 {
				failed.Add(1)
			} else {
				okTotal.Add(1)
				if opened.Load() > 0 && timedOut.Load() == 0 {
					okAllOpen.Add(1)
				}
			}
			if int64(lat) > maxLatency.Load() {
				maxLatency.Store(int64(lat))
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()

	// watchWS reads until the backend closes; it must be the handshake
	// timeout's close (1008), or for a frame over the limit 1009.
	watchWS := func(ws *websocket.Conn, kind string) {
		defer wg.Done()
		defer ws.Close()
		code, reason := websocket.ClosePolicyViolation, "no Handshake within"
		if kind == "huge-frame" {
			code, reason = websocket.CloseMessageTooBig, "before the Handshake are limited to"
		}
		_ = ws.SetReadDeadline(time.Now().Add(60 * time.Second))
		for {
			_, _, err := ws.ReadMessage()
			if err == nil {
				continue
			}
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != code || !strings.Contains(ce.Text, reason) {
				problem("%s WebSocket ended with %v, want close %d '%s …'", kind, err, code, reason)
			}
			if kind != "huge-frame" {
				timedOut.Add(1)
			}
			closed.Add(1)
			return
		}
	}
	watchTCP := func(c net.Conn, kind string) {
		defer wg.Done()
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
		_, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			problem("%s TCP connection still open after 60 s", kind)
		}
		timedOut.Add(1)
		closed.Add(1)
	}
	dialWS := func() *websocket.Conn {
		ws, err := hcDial(b.addr)
		if err != nil {
			t.Fatal(err)
		}
		opened.Add(1)
		return ws
	}

	for range silentWS {
		wg.Add(1)
		go watchWS(dialWS(), "silent")
	}
	chatty := [][]byte{
		hcFrame(t, &protocol.StateLog{InstanceID: "i-x", AppID: "slow", RecipeVersion: 1, StateID: "s", Result: true}),
		[]byte("not json at all"),
		[]byte(`{"code":"WaitQuery","instance_id":"i-x","app_id":"slow","recipe_version":1}`),
		hcFrame(t, &protocol.Test{Identity: protocol.Identity{InstanceID: "i-x", AppID: "slow", AgentVersion: "2.1.0"}}),
		[]byte(`{"code":"Handshake"}`), // undecodable: ignored, not a Handshake
		[]byte(`{"code":"StateLogAck","log_stream":"x","seq":1}`),
		[]byte(`[]`),
	}
	var chattySent atomic.Int64
	for i := range chattyWS {
		ws := dialWS()
		wg.Add(2)
		go watchWS(ws, "chatty")
		go func() {
			defer wg.Done()
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for k := i; ; k++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				var err error
				switch k % 9 {
				case 7:
					err = ws.WriteControl(websocket.PingMessage, []byte("hi"), time.Now().Add(time.Second))
				case 8:
					_ = ws.SetWriteDeadline(time.Now().Add(time.Second))
					err = ws.WriteMessage(websocket.BinaryMessage, []byte{0, 1, 2, 3})
				default:
					_ = ws.SetWriteDeadline(time.Now().Add(time.Second))
					err = ws.WriteMessage(websocket.TextMessage, chatty[k%9])
				}
				if err != nil {
					return
				}
				chattySent.Add(1)
			}
		}()
	}
	// Near the 16 MiB frame limit, before any Handshake: refused at
	// 64 KiB, so that it costs the backend next to nothing.
	huge := hcFrame(t, &protocol.StateLog{InstanceID: "i-x", AppID: "slow", StateID: "s", Comment: func() *string {
		s := strings.Repeat("h", 15<<20)
		return &s
	}()})
	hwmBeforeHuge := hcHWM(t, b)
	for range hugeWS {
		ws := dialWS()
		wg.Add(2)
		go watchWS(ws, "huge-frame")
		go func() {
			defer wg.Done()
			_ = ws.SetWriteDeadline(time.Now().Add(20 * time.Second))
			_ = ws.WriteMessage(websocket.TextMessage, huge)
		}()
	}
	dialTCP := func() net.Conn {
		c, err := net.DialTimeout("tcp", b.addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		opened.Add(1)
		return c
	}
	for range silentTCP {
		wg.Add(1)
		go watchTCP(dialTCP(), "silent")
	}
	for range partialHTTP {
		c := dialTCP()
		wg.Add(2)
		go watchTCP(c, "partial-HTTP")
		go func() {
			defer wg.Done()
			if _, err := fmt.Fprintf(c, "GET /agent/ HTTP/1.1\r\nHost: %s\r\n", b.addr); err != nil {
				return
			}
			for i := 0; ; i++ { // one header line every 200 ms, never the blank line
				select {
				case <-stop:
					return
				case <-time.After(200 * time.Millisecond):
				}
				if _, err := fmt.Fprintf(c, "X-Slow-%d: %d\r\n", i, i); err != nil {
					return
				}
			}
		}()
	}
	unknownApp := func(i int) []byte {
		return hcFrame(t, &protocol.Handshake{Identity: protocol.Identity{InstanceID: "i-nr",
			AppID: fmt.Sprintf("hc-absent-%d", i), AgentVersion: "2.1.0", ProtocolVersion: 1, InstanceToken: "hc-token-0123456789"}})
	}
	// A few whose one Handshake names an app that does not exist: the
	// AppNotReady answer does not extend the handshake deadline.
	for i := range notReadyWS {
		ws := dialWS()
		_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if err := ws.WriteMessage(websocket.TextMessage, unknownApp(i)); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go watchWS(ws, "AppNotReady once")
	}
	// One that keeps sending Handshakes for apps that do not exist, each
	// after the answer to the previous one: after a few AppNotReady the
	// backend closes it (no enrollment is needed for this).
	const nrHandshakes = 1000
	notReady := dialWS()
	defer notReady.Close()
	notReadyAnswers := 0
	var nrEnd error
	for i := range nrHandshakes { // one at a time, each answered
		_ = notReady.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if err := notReady.WriteMessage(websocket.TextMessage, unknownApp(i)); err != nil {
			t.Fatalf("unknown-app Handshake %d: %v", i, err)
		}
		_ = notReady.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, msg, err := notReady.ReadMessage()
		if err != nil {
			nrEnd = err
			break
		}
		if !bytes.Contains(msg, []byte(protocol.CodeAppNotReady)) {
			t.Fatalf("unknown-app Handshake %d: %q, want AppNotReady", i, msg)
		}
		notReadyAnswers++
	}
	if notReadyAnswers < 1 || notReadyAnswers > 10 || !websocket.IsCloseError(nrEnd, websocket.ClosePolicyViolation) || !strings.Contains(nrEnd.Error(), "does not exist") {
		t.Errorf("Handshakes for unknown apps on one socket: %d AppNotReady, then %v; want 1 to 10, then close 1008 'the app does not exist …'", notReadyAnswers, nrEnd)
	}
	notReady.Close()
	// One whose Handshake names a 1 MiB instance id: over the 64 KiB
	// limit of a frame before a Handshake.
	longID := dialWS()
	_ = longID.WriteMessage(websocket.TextMessage, hcFrame(t, &protocol.Handshake{Identity: protocol.Identity{InstanceID: strings.Repeat("L", 1<<20),
		AppID: "slow", AgentVersion: "2.1.0", ProtocolVersion: 1, InstanceToken: "hc-token-0123456789"}}))
	_ = longID.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, _, err := longID.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseMessageTooBig) {
		t.Errorf("Handshake with a 1 MiB instance id: %v, want close 1009", err)
	}
	longID.Close()
	// And one with a 32 KiB instance id: refused (1008), and logged clipped.
	midID := dialWS()
	_ = midID.WriteMessage(websocket.TextMessage, hcFrame(t, &protocol.Handshake{Identity: protocol.Identity{InstanceID: strings.Repeat("M", 32<<10),
		AppID: "slow", AgentVersion: "2.1.0", ProtocolVersion: 1, InstanceToken: "hc-token-0123456789"}}))
	_ = midID.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, _, err := midID.ReadMessage(); !websocket.IsCloseError(err, websocket.ClosePolicyViolation) {
		t.Errorf("Handshake with a 32 KiB instance id: %v, want close 1008", err)
	}
	midID.Close()
	openFDs := hcFDs(t, b)

	wait.EventuallyWithin(t, 45*time.Second, "every never-handshaking connection closed by the backend", func() bool {
		return closed.Load() == total
	})
	<-probeDone
	mu.Lock()
	for _, p := range problems {
		t.Error(p)
	}
	mu.Unlock()
	if failed.Load() > 0 {
		t.Errorf("%d healthz/apps probes failed while slow clients were connected", failed.Load())
	}
	if okAllOpen.Load() < 3 {
		t.Errorf("only %d probes answered while the slow connections were open (before the first timeout closed one), want >= 3", okAllOpen.Load())
	}
	hcAlive(t, b)
	wait.EventuallyWithin(t, 20*time.Second, "backend fds back near baseline", func() bool { return hcFDs(t, b) <= fd0+4 })
	fdEnd, hwmEnd := hcFDs(t, b), hcHWM(t, b)
	b.stop(t, syscall.SIGTERM)
	out := b.out.String()
	nrLines, _ := hcLogLines(out, "Handshake for an unknown app")
	// Refusals are counted and summarised (one line per 10 s), with the
	// last one as a sample, its client strings clipped.
	refused, refusedLen := hcLogLines(out, "connections and calls refused")
	_, longest := hcLogLines(out, "")
	// Memory: reading the huge frames whole cost some 40 MiB each (165 MiB
	// for the 4); refused at 64 KiB they cost next to nothing.
	if hwmEnd-hwmBeforeHuge > 48<<10 {
		t.Errorf("backend VmHWM grew by %d KiB (from %d KiB) after %d unauthenticated %d MiB frames, want under 48 MiB", hwmEnd-hwmBeforeHuge, hwmBeforeHuge, hugeWS, len(huge)>>20)
	}
	if nrLines > notReadyWS+10 {
		t.Errorf("%d log lines about Handshakes for unknown apps, want at most %d", nrLines, notReadyWS+10)
	}
	if refused < 1 || refused > 4 || refusedLen > 1<<10 || longest > 4<<10 || !strings.Contains(out, "by_kind.bad_identity=1") || strings.Contains(out, strings.Repeat("M", 1<<10)) {
		t.Errorf("%d refusal summaries, longest %d bytes; longest line %d bytes; want 1 to 4 summaries (one per 10 s) counting the 32 KiB id's Handshake, never logging it whole, and no line over 4 KiB:\n%s", refused, refusedLen, longest, out)
	}
	t.Logf("FIGURES never-handshake: %d silent WS + %d chatty WS (%d frames/pings sent) + %d WS with one %d MiB frame + %d WS with one unknown-app Handshake + %d silent TCP + %d partial-HTTP = %d connections, all closed by the backend; "+
		"probes %d ok (%d with hostile connections open, before the first timeout), %d failed, max probe latency %v; backend fds %d → %d open → %d after; VmHWM %d KiB before, %d KiB with the small ones open, %d KiB after the %d huge frames; "+
		"a socket sending Handshakes for unknown apps got %d AppNotReady, then %v; %d backend log lines about unknown apps; "+
		"%d refusal summaries (longest %d bytes); longest backend log line %d bytes",
		silentWS, chattyWS, chattySent.Load(), hugeWS, len(huge)>>20, notReadyWS, silentTCP, partialHTTP, total,
		okTotal.Load(), okAllOpen.Load(), failed.Load(), time.Duration(maxLatency.Load()), fd0, openFDs, fdEnd, hwm0, hwmBeforeHuge, hwmEnd, hugeWS,
		notReadyAnswers, nrEnd, nrLines, refused, refusedLen, longest)
}

// hcLogLines counts the lines of out containing s and returns the longest.
func hcLogLines(out, s string) (n, longest int) {
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, s) {
			n++
			longest = max(longest, len(l))
		}
	}
	return n, longest
}

// ---------------------------------------------------------------------------
// 4. Abandoned connections.

// TestHostileAbandonedConnections opens thousands of connections and drops
// them in every way a client can: TCP connect then close (FIN or RST),
// half an HTTP request, a WebSocket upgrade then gone, a registered agent
// then gone. The backend stays up, unregisters the agents, and its fd
// count returns to the baseline.
func TestHostileAbandonedConnections(t *testing.T) {
	hcRaiseNofile(t)
	// No enrollment limit: 500 agents of one app enroll within seconds.
	b := startBackend(t, t.TempDir(), "127.0.0.1:0", "--enroll-limit", "-1")
	hcMust(t, b.addr, "PUT", "/api/apps/aband/recipe", `{"state":[]}`, b.token)
	fd0 := hcFDs(t, b)
	hwm0 := hcHWM(t, b)

	rst := func(c net.Conn) {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		c.Close()
	}
	upgrade := fmt.Sprintf("GET /agent/ HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", b.addr)
	phases := []struct {
		name string
		n    int
		do   func(i int) error
	}{
		{"TCP connect, close", 2000, func(i int) error {
			c, err := net.DialTimeout("tcp", b.addr, 10*time.Second)
			if err != nil {
				return err
			}
			if i%2 == 0 {
				rst(c)
			} else {
				c.Close()
			}
			return nil
		}},
		{"half an HTTP request, close", 1000, func(i int) error {
			c, err := net.DialTimeout("tcp", b.addr, 10*time.Second)
			if err != nil {
				return err
			}
			_, _ = fmt.Fprintf(c, "PUT /api/apps/aband/recipe HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAuthorization: Bearer %s\r\nContent-Length: 100000\r\n\r\n{\"state\":[", b.addr, b.token)
			if i%2 == 0 {
				rst(c)
			} else {
				c.Close()
			}
			return nil
		}},
		{"WebSocket upgrade, vanish", 1500, func(i int) error {
			c, err := net.DialTimeout("tcp", b.addr, 10*time.Second)
			if err != nil {
				return err
			}
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			if _, err := io.WriteString(c, upgrade); err != nil {
				c.Close()
				return err
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || !strings.Contains(line, " 101 ") {
				c.Close()
				return fmt.Errorf("upgrade answered %q %v", line, err)
			}
			if i%2 == 0 {
				rst(c)
			} else {
				c.Close()
			}
			return nil
		}},
		{"registered agent, vanish", 500, func(i int) error {
			ws, err := hcDial(b.addr)
			if err != nil {
				return err
			}
			_ = ws.SetReadDeadline(time.Now().Add(20 * time.Second))
			_ = ws.SetWriteDeadline(time.Now().Add(20 * time.Second))
			hs := &protocol.Handshake{Identity: protocol.Identity{InstanceID: fmt.Sprintf("i-gone-%04d", i), AppID: "aband", AgentVersion: "2.1.0",
				ProtocolVersion: 1, InstanceToken: "hc-token-0123456789"}}
			f, _ := protocol.Encode(hs)
			if err := ws.WriteMessage(websocket.TextMessage, f); err != nil {
				ws.Close()
				return err
			}
			if _, _, err := ws.ReadMessage(); err != nil { // the recipe: registered
				ws.Close()
				return err
			}
			if i%2 == 0 {
				rst(ws.NetConn())
			} else {
				ws.Close()
			}
			return nil
		}},
	}
	var peak atomic.Int64
	sampleStop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if n, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", b.cmd.Process.Pid)); err == nil && int64(len(n)) > peak.Load() {
				peak.Store(int64(len(n)))
			}
			select {
			case <-sampleStop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	totalConns := 0
	var failures atomic.Int64
	var firstErr atomic.Value
	for _, ph := range phases {
		jobs := make(chan int)
		var wg sync.WaitGroup
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range jobs {
					if err := ph.do(i); err != nil {
						failures.Add(1)
						firstErr.CompareAndSwap(nil, fmt.Sprintf("%s #%d: %v", ph.name, i, err))
					}
				}
			}()
		}
		for i := range ph.n {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		totalConns += ph.n
		hcAlive(t, b)
	}
	close(sampleStop)
	<-sampled
	if n := failures.Load(); n > 0 {
		t.Errorf("%d of %d connections failed on the client side; first: %v", n, totalConns, firstErr.Load())
	}
	wait.EventuallyWithin(t, 30*time.Second, "every vanished agent unregistered", func() bool {
		for _, a := range hcMust(t, b.addr, "GET", "/api/apps", "", b.token)["apps"].([]any) {
			if m := a.(map[string]any); m["app_id"] == "aband" {
				return m["connected"] == float64(0)
			}
		}
		return false
	})
	var fdEnd int
	wait.EventuallyWithin(t, 30*time.Second, "backend fds back near baseline", func() bool {
		fdEnd = hcFDs(t, b)
		return fdEnd <= fd0+4
	})
	if n := len(hcInstances(t, b.addr, "aband", b.token)); n != 500 {
		t.Errorf("%d instances enrolled, want 500", n)
	}
	hcAlive(t, b)
	t.Logf("FIGURES abandoned: %d connections (2000 TCP connect/close, 1000 half requests, 1500 WS upgrade then gone, 500 registered agents then gone; half by RST), 32 at a time; backend fds %d baseline, %d peak, %d after; VmHWM %d KiB before, %d KiB after",
		totalConns, fd0, peak.Load(), fdEnd, hwm0, hcHWM(t, b))
}

// ---------------------------------------------------------------------------
// 5. A StateLog flood from one forged instance.

type hcLog struct {
	Seq        int64   `json:"seq"`
	InstanceID string  `json:"instance_id"`
	AgentSeq   int64   `json:"agent_seq"`
	StateID    string  `json:"state_id"`
	Comment    *string `json:"comment"`
	Stdout     *string `json:"stdout"`
}

func hcLogs(t testing.TB, addr, app, apiToken string) []hcLog {
	t.Helper()
	var all []hcLog
	after := int64(0)
	for page := 0; page < 100; page++ {
		r, err := hcRaw(addr, "GET", fmt.Sprintf("/api/apps/%s/logs?after=%d&limit=10000", app, after), []string{"Authorization: Bearer " + apiToken}, "")
		if err != nil || r.code != 200 {
			t.Fatalf("logs of %s after %d: %d %v", app, after, r.code, err)
		}
		var out struct {
			Logs []hcLog `json:"logs"`
			Next int64   `json:"next"`
		}
		if err := json.Unmarshal(r.body, &out); err != nil {
			t.Fatal(err)
		}
		if len(out.Logs) == 0 {
			return all
		}
		all = append(all, out.Logs...)
		after = out.Next
	}
	t.Fatalf("logs of %s: more than 100 pages", app)
	return nil
}

// TestHostileStateLogFlood: an instance enrolled through open enrollment
// sends 50 000 StateLogs as fast as the socket takes them, some with 1 MiB
// of output, with StateLogs claiming another instance or app mixed in.
// Only its own are stored (and acknowledged), the others are dropped (and
// logged rate-limited, their ids clipped), the API answers meanwhile, and
// memory stays bounded, also when a page of fat StateLogs is read.
func TestHostileStateLogFlood(t *testing.T) {
	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	for _, app := range []string{"flood", "other"} {
		hcMust(t, b.addr, "PUT", "/api/apps/"+app+"/recipe", `{"state":[{"id":"s","module":"meta.comment","parameter":{}}]}`, b.token)
	}
	// A legitimate neighbour with 3 StateLogs of its own.
	victim := hcAgent(t, b.addr, "flood", "i-victim", "")
	for i := range 3 {
		_ = victim.WriteMessage(websocket.TextMessage, hcFrame(t, &protocol.StateLog{InstanceID: "i-victim", AppID: "flood", RecipeVersion: 1, StateID: fmt.Sprintf("v%d", i), Result: true}))
	}
	wait.Eventually(t, "the victim's 3 StateLogs", func() bool {
		in := hcInstances(t, b.addr, "flood", b.token)["i-victim"]
		return in != nil && in["state_logs"] == float64(3)
	})
	victim.Close()
	hwm0 := hcHWM(t, b)

	const n, forgedEvery, bigEvery = 50000, 50, 3125 // 1000 forged, 16 with 1 MiB stdout
	ws := hcAgent(t, b.addr, "flood", "i-flood", "hcflood")
	defer ws.Close()
	var acked atomic.Int64
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			_, data, err := ws.ReadMessage()
			if err != nil {
				return
			}
			if m, err := protocol.Decode(data); err == nil {
				if a, ok := m.(*protocol.StateLogAck); ok && a.Seq > acked.Load() {
					acked.Store(a.Seq)
				}
			}
		}
	}()
	forgeries := []struct{ inst, app string }{{"i-victim", "flood"}, {"i-flood", "other"}, {"i-victim", "other"}, {"i-nobody", "hc-absent"}, {"i-nobody", ""}}
	bigOut := strings.Repeat("o", 1<<20)
	comment := "flooding"
	forged, midAPI := 0, 0
	for seq := int64(1); seq <= n; seq++ {
		m := &protocol.StateLog{InstanceID: "i-flood", AppID: "flood", RecipeVersion: 1, StateID: "s", Result: true, Comment: &comment, Seq: seq}
		if seq%bigEvery == 0 {
			m.Stdout = &bigOut
		}
		if err := ws.WriteMessage(websocket.TextMessage, hcFrame(t, m)); err != nil {
			t.Fatalf("StateLog %d: %v", seq, err)
		}
		if seq%forgedEvery == 0 {
			f := forgeries[forged%len(forgeries)]
			forged++
			fm := &protocol.StateLog{InstanceID: f.inst, AppID: f.app, RecipeVersion: 1, StateID: "forged", Result: true}
			if err := ws.WriteMessage(websocket.TextMessage, hcFrame(t, fm)); err != nil {
				t.Fatalf("forged StateLog: %v", err)
			}
		}
		if seq == n/2 {
			// Mid-flood, with the backend busy reading: the API answers.
			hcMust(t, b.addr, "GET", "/api/healthz", "", "")
			hcInstances(t, b.addr, "flood", b.token)
			hcMust(t, b.addr, "GET", "/api/apps/flood/logs?limit=10", "", b.token)
			midAPI = 3
		}
	}
	// Four forged StateLogs whose instance id is 1 MiB long.
	longInst := strings.Repeat("Z", 1<<20)
	for range 4 {
		if err := ws.WriteMessage(websocket.TextMessage, hcFrame(t, &protocol.StateLog{InstanceID: longInst, AppID: "flood", RecipeVersion: 1, StateID: "forged", Result: true})); err != nil {
			t.Fatal(err)
		}
		forged++
	}
	wait.EventuallyWithin(t, 60*time.Second, "every StateLog of the flood acknowledged", func() bool { return acked.Load() == n })
	hwmFlood := hcHWM(t, b)

	inst := hcInstances(t, b.addr, "flood", b.token)
	if len(inst) != 2 || inst["i-flood"]["state_logs"] != float64(n) || inst["i-victim"]["state_logs"] != float64(3) {
		t.Errorf("flood instances = %v, want i-flood with %d StateLogs and i-victim with 3", inst, n)
	}
	if other := hcInstances(t, b.addr, "other", b.token); len(other) != 0 {
		t.Errorf("app other has instances %v, want none", other)
	}
	if logs := hcLogs(t, b.addr, "other", b.token); len(logs) != 0 {
		t.Errorf("app other has %d StateLogs, want none (forged)", len(logs))
	}
	logs := hcLogs(t, b.addr, "flood", b.token)
	per := map[string]int{}
	next := int64(1)
	big := 0
	for _, e := range logs {
		per[e.InstanceID]++
		if e.StateID == "forged" {
			t.Fatalf("a forged StateLog was stored: %+v", e)
		}
		if e.InstanceID == "i-flood" {
			if e.AgentSeq != next {
				t.Fatalf("i-flood StateLog agent_seq %d, want %d (lost or reordered)", e.AgentSeq, next)
			}
			next++
			if e.Stdout != nil {
				big++
				if len(*e.Stdout) > 64<<10 {
					t.Errorf("stored stdout of %d bytes, want at most 64 KiB", len(*e.Stdout))
				}
			}
		}
	}
	if per["i-flood"] != n || per["i-victim"] != 3 || len(per) != 2 || big != n/bigEvery {
		t.Errorf("stored StateLogs per instance %v (%d with stdout), want i-flood %d (%d with stdout), i-victim 3", per, big, n, n/bigEvery)
	}
	hwmRead := hcHWM(t, b)
	hcAlive(t, b)

	// One page of fat StateLogs: 200 entries of 64 KiB comment + 64 KiB
	// stdout (the per-field cap), read back with one GET.
	const fatN = 200
	fat := hcAgent(t, b.addr, "other", "i-fat", "")
	fatOut := strings.Repeat("f", 64<<10)
	for range fatN {
		if err := fat.WriteMessage(websocket.TextMessage, hcFrame(t, &protocol.StateLog{InstanceID: "i-fat", AppID: "other", RecipeVersion: 1,
			StateID: "s", Result: true, Comment: &fatOut, Stdout: &fatOut})); err != nil {
			t.Fatal(err)
		}
	}
	wait.EventuallyWithin(t, 60*time.Second, "the fat StateLogs stored", func() bool {
		return hcInstances(t, b.addr, "other", b.token)["i-fat"]["state_logs"] == float64(fatN)
	})
	fat.Close()
	hwmFat0 := hcHWM(t, b)
	r, err := hcRaw(b.addr, "GET", "/api/apps/other/logs?limit=10000", []string{"Authorization: Bearer " + b.token}, "")
	if err != nil || r.code != 200 {
		t.Fatalf("fat page: %d %v", r.code, err)
	}
	hwmFat := hcHWM(t, b)
	hcAlive(t, b)
	var fatPage struct {
		Logs []hcLog `json:"logs"`
		Next int64   `json:"next"`
		More bool    `json:"more"`
	}
	if err := json.Unmarshal(r.body, &fatPage); err != nil {
		t.Fatal(err)
	}
	// A page is bounded by 4 MiB of StateLogs (about 32 of these), and
	// says that more follow.
	if n := len(fatPage.Logs); n == 0 || n >= fatN || !fatPage.More || fatPage.Next != fatPage.Logs[n-1].Seq {
		t.Errorf("one GET of %d fat StateLogs: %d of them, next %d, more %v; want a partial page with more true", fatN, n, fatPage.Next, fatPage.More)
	}
	// Built whole, the 25 MiB page raised VmHWM by some 130 MiB.
	if hwmFat-hwmFat0 > 64<<10 {
		t.Errorf("one page of fat StateLogs raised VmHWM by %d KiB (from %d KiB), want under 64 MiB", hwmFat-hwmFat0, hwmFat0)
	}
	if got := hcLogs(t, b.addr, "other", b.token); len(got) != fatN {
		t.Errorf("paged %d fat StateLogs, want %d", len(got), fatN)
	}

	// The log lines the forged StateLogs caused (read once the process has
	// exited, so its output is complete).
	b.stop(t, syscall.SIGTERM)
	warnLines, warnLongest := hcLogLines(b.out.String(), "StateLog names another instance or app")
	if hwmFlood-hwm0 > 256<<10 {
		t.Errorf("backend VmHWM grew by %d KiB during the flood, want < 256 MiB", hwmFlood-hwm0)
	}
	// One line per forged StateLog, 1 MiB long for a 1 MiB id, was the
	// defect; the warnings now share the connection's rate limit (one per
	// 10 s) and the ids are clipped.
	if warnLines < 1 || warnLines > forged/10 || warnLongest > 1<<10 {
		t.Errorf("%d forged StateLogs produced %d log lines, the longest %d bytes; want 1 to %d lines, none over 1 KiB", forged, warnLines, warnLongest, forged/10)
	}
	t.Logf("FIGURES flood: %d StateLogs (%d with 1 MiB stdout, stored capped to 64 KiB) + %d forged (%d names) from one socket, all %d acknowledged, %d API calls answered mid-flood; stored: i-flood %d, i-victim %d, other app 0; "+
		"backend VmHWM %d KiB before, %d after the flood, %d after reading it all back; forged StateLogs produced %d backend log lines (longest %d bytes); "+
		"one GET (limit=10000) of %d fat StateLogs answered %d of them (%d KiB of JSON, more %v) and raised VmHWM from %d to %d KiB",
		n, n/bigEvery, forged, len(forgeries), n, midAPI, per["i-flood"], per["i-victim"], hwm0, hwmFlood, hwmRead, warnLines, warnLongest,
		fatN, len(fatPage.Logs), len(r.body)>>10, fatPage.More, hwmFat0, hwmFat)
}

// ---------------------------------------------------------------------------
// 6. The API token on every route.

// TestHostileAPITokenEveryRoute starts a backend with an API token (from
// the environment, then from --api-token-file) and calls every non-public
// route of backend/api.go with no token, wrong tokens and mangled headers:
// each answers 401 and changes nothing. The token then appears neither in
// the backend's output nor in its data files nor in its command line.
func TestHostileAPITokenEveryRoute(t *testing.T) {
	routes := hcRoutes(t)
	for _, mode := range []string{"env", "file"} {
		t.Run(mode, func(t *testing.T) {
			raw := make([]byte, 24)
			_, _ = rand.Read(raw)
			tok := "hc-" + hex.EncodeToString(raw)
			data, dir := t.TempDir(), t.TempDir()
			addrFile := filepath.Join(dir, "addr")
			args := []string{"backend", "--listen", "127.0.0.1:0", "--data", data, "--addr-file", addrFile}
			var env []string
			if mode == "env" {
				env = []string{"OPSAGENT_API_TOKEN=" + tok}
			} else {
				tf := filepath.Join(dir, "token")
				if err := os.WriteFile(tf, []byte(tok+"\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--api-token-file", tf)
			}
			p := startEnv(t, env, args...)
			var addr string
			eventually(t, "backend listening", func() bool {
				b, err := os.ReadFile(addrFile)
				addr = strings.TrimSpace(string(b))
				return err == nil && addr != ""
			})
			b := &backendProc{proc: p, addr: addr, data: data}
			hcMust(t, addr, "PUT", "/api/apps/tok/recipe", `{"state":[{"id":"w","module":"meta.comment","parameter":{}}]}`, tok)

			bad := []struct {
				name string
				hdr  []string
			}{
				{"no Authorization", nil},
				{"empty", []string{"Authorization:"}},
				{"Bearer alone", []string{"Authorization: Bearer"}},
				{"Bearer and a space", []string{"Authorization: Bearer "}},
				{"wrong token", []string{"Authorization: Bearer hc-wrong-token"}},
				{"token plus a byte", []string{"Authorization: Bearer " + tok + "x"}},
				{"token less a byte", []string{"Authorization: Bearer " + tok[:len(tok)-1]}},
				{"token upper-cased", []string{"Authorization: Bearer " + strings.ToUpper(tok)}},
				{"two spaces", []string{"Authorization: Bearer  " + tok}},
				{"lower-case scheme", []string{"Authorization: bearer " + tok}},
				{"Basic", []string{"Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("x:"+tok))}},
				{"Token scheme", []string{"Authorization: Token " + tok}},
				{"bare token", []string{"Authorization: " + tok}},
				{"other header", []string{"X-Api-Token: " + tok, "Cookie: token=" + tok}},
				{"NUL after token", []string{"Authorization: Bearer " + tok + "%00"}},
			}
			calls := 0
			for _, rt := range routes {
				path := strings.Replace(rt.pattern, "{app}", "tok", 1)
				body := hcBody(rt)
				methods := []string{rt.method}
				if rt.method == "GET" {
					methods = append(methods, "HEAD") // a GET pattern also serves HEAD
				}
				for _, method := range methods {
					if rt.public {
						if code, _ := hcCall(t, addr, method, path, "", ""); code != http.StatusOK {
							t.Errorf("public %s %s: %d without a token, want 200", method, path, code)
						}
						continue
					}
					for _, bh := range bad {
						for _, withCT := range []bool{true, false} {
							hdr := append([]string(nil), bh.hdr...)
							if withCT && body != "" {
								hdr = append(hdr, "Content-Type: application/json")
							}
							target := path
							if bh.name == "other header" {
								target += "?access_token=" + tok + "&token=" + tok
							}
							r, err := hcRaw(addr, method, target, hdr, body)
							calls++
							if err != nil || r.code != http.StatusUnauthorized || r.header.Get("WWW-Authenticate") == "" {
								t.Errorf("%s %s with %s (Content-Type %v): %d %s %v, want 401 with WWW-Authenticate", method, path, bh.name, withCT, r.code, r.body, err)
							}
							if bytes.Contains(r.body, []byte(tok)) {
								t.Errorf("%s %s with %s: the answer echoes the token", method, path, bh.name)
							}
						}
					}
					// The right token gets past auth: the route is real.
					hdr := []string{"Authorization: Bearer " + tok}
					if body != "" {
						hdr = append(hdr, "Content-Type: application/json")
					}
					if method != rt.method {
						continue
					}
					// A 404 of the route itself (an instance not enrolled) is
					// past auth; the router's own says "no such endpoint".
					if r, err := hcRaw(addr, method, path+"?hc=probe-done", hdr, body); err != nil || r.code == http.StatusUnauthorized ||
						r.code == http.StatusNotFound && bytes.Contains(r.body, []byte("no such endpoint")) || r.code == http.StatusMethodNotAllowed {
						t.Errorf("%s %s with the token: %d %v", method, path, r.code, err)
					}
				}
			}
			// The authorized probes above changed the recipe (PUT), the
			// waits, the update and the secret: check the refused calls did
			// not, by redoing the state from before on a fresh app instead.
			hcMust(t, addr, "PUT", "/api/apps/tok2/recipe", `{"state":[]}`, tok)
			secret2 := hcMust(t, addr, "GET", "/api/apps/tok2/enrollment", "", tok)["enrollment_secret"]
			// The app as the API shows it (its state is in the backend's NATS).
			app2 := func() string {
				return fmt.Sprint(hcMust(t, addr, "GET", "/api/apps/tok2/recipe", "", tok), hcMust(t, addr, "GET", "/api/apps/tok2/instances", "", tok))
			}
			before := app2()
			for _, rt := range routes {
				if rt.public || rt.method == "GET" {
					continue
				}
				path := strings.Replace(rt.pattern, "{app}", "tok2", 1)
				if code, _ := hcCall(t, addr, rt.method, path, hcBody(rt), ""); code != http.StatusUnauthorized {
					t.Errorf("%s %s without a token: %d", rt.method, path, code)
				}
				calls++
			}
			if s := hcMust(t, addr, "GET", "/api/apps/tok2/enrollment", "", tok)["enrollment_secret"]; s != secret2 {
				t.Error("an unauthenticated rotate changed the enrollment secret")
			}
			if now := app2(); now != before {
				t.Errorf("unauthenticated calls changed the app:\n%s\nwas\n%s", now, before)
			}

			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.cmd.Process.Pid))
			if bytes.Contains(cmdline, []byte(tok)) {
				t.Error("the token is in the backend's command line")
			}
			hwm := hcHWM(t, b)
			p.stop(t, syscall.SIGTERM)
			if strings.Contains(p.out.String(), tok) {
				t.Errorf("the token appears in the backend's output:\n%s", p.out.String())
			}
			files := 0
			_ = filepath.WalkDir(data, func(path string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				files++
				if b, err := os.ReadFile(path); err == nil && bytes.Contains(b, []byte(tok)) {
					t.Errorf("the token is in %s", path)
				}
				return nil
			})
			if b, _ := os.ReadFile(addrFile); bytes.Contains(b, []byte(tok)) {
				t.Error("the token is in the addr file")
			}
			t.Logf("FIGURES token (%s): %d routes, %d refused calls (all 401, none echo the token); token absent from output (%d bytes), %d data files, cmdline; backend VmHWM %d KiB",
				mode, len(routes), calls, p.out.Len(), files, hwm)
		})
	}
}

// TestHostileAPITokenMadeOnLoopback: a backend started with no token, on
// loopback (the setup behind a TLS proxy on the same host), makes one in
// <data>/api-token and prints where it is, never the token; every
// non-public route refuses a call without it, and the 401 says where the
// token is. A restart keeps the token.
func TestHostileAPITokenMadeOnLoopback(t *testing.T) {
	routes := hcRoutes(t)
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	file := filepath.Join(data, "api-token")
	want := "API token: " + file + " (export OPSAGENT_API_TOKEN=$(cat " + file + "))"
	if !strings.Contains(b.out.String(), want) {
		t.Errorf("the backend's output does not say %q:\n%s", want, b.out.String())
	}
	if st, err := os.Stat(file); err != nil || st.Mode().Perm() != 0o600 || len(b.token) != 64 {
		t.Fatalf("token file %v %v, token of %d characters; want mode 0600 and 256 bits in hex", st, err, len(b.token))
	}
	hcMust(t, b.addr, "PUT", "/api/apps/lo/recipe", `{"state":[]}`, b.token)
	for _, rt := range routes {
		path := strings.Replace(rt.pattern, "{app}", "lo", 1)
		code, m := hcCall(t, b.addr, rt.method, path, hcBody(rt), "")
		if rt.public {
			if code != http.StatusOK {
				t.Errorf("public %s %s: %d", rt.method, path, code)
			}
			continue
		}
		if msg, _ := m["error"].(string); code != http.StatusUnauthorized || !strings.Contains(msg, file) {
			t.Errorf("%s %s without the token on loopback: %d %v, want 401 naming %s", rt.method, path, code, m, file)
		}
	}
	b.stop(t, syscall.SIGTERM)
	if strings.Contains(b.out.String(), b.token) {
		t.Errorf("the token appears in the backend's output:\n%s", b.out.String())
	}
	b2 := startBackend(t, data, "127.0.0.1:0")
	if b2.token != b.token {
		t.Error("a restart changed the API token")
	}
	hcMust(t, b2.addr, "GET", "/api/apps/lo/recipe", "", b2.token)
}
