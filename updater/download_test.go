package updater

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/internal/updatephase"
)

// bigRelease is a release of version padded with 512 KiB of random bytes
// (which gzip cannot shrink), so that a download has a middle to stall in.
func bigRelease(t *testing.T, version string, k key) (tgz, sig []byte) {
	t.Helper()
	pad := make([]byte, 512<<10)
	if _, err := rand.Read(pad); err != nil {
		t.Fatal(err)
	}
	return release(t, version, k,
		archive.Entry{Name: "VERSION", Mode: 0o644, Data: []byte(version + "\n")},
		archive.Entry{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: fakeBinary(version)},
		archive.Entry{Name: "pad", Mode: 0o644, Data: pad},
	)
}

// tarballLog records, for each request of the tarball, its Range and
// If-Range headers and how many body bytes the server wrote.
type tarballLog struct {
	mu   sync.Mutex
	reqs []tarballReq
}

type tarballReq struct {
	rangeHdr, ifRange string
	sent              *atomic.Int64
}

func (l *tarballLog) add(r *http.Request) *atomic.Int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := &atomic.Int64{}
	l.reqs = append(l.reqs, tarballReq{rangeHdr: r.Header.Get("Range"), ifRange: r.Header.Get("If-Range"), sent: n})
	return n
}

func (l *tarballLog) all() []tarballReq {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]tarballReq(nil), l.reqs...)
}

// countingWriter counts what a handler writes into n.
type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// stallAfter writes the first n bytes of data as a 200 with the full
// Content-Length, flushes them, and then sends nothing more until the
// client goes away: a server (or proxy) that hangs in the middle.
func stallAfter(w http.ResponseWriter, r *http.Request, data []byte, n int, sent *atomic.Int64) {
	w.Header().Set("Content-Length", fmt.Sprint(len(data)))
	w.Header().Set("Last-Modified", time.Unix(0, 0).UTC().Format(http.TimeFormat))
	w.WriteHeader(http.StatusOK)
	m, _ := w.Write(data[:n])
	sent.Add(int64(m))
	w.(http.Flusher).Flush()
	<-r.Context().Done()
}

// serve answers with data as a file server does (Range, If-Range against
// Last-Modified), counting the body bytes.
func serve(w http.ResponseWriter, r *http.Request, data []byte, sent *atomic.Int64) {
	http.ServeContent(countingWriter{w, sent}, r, "f", time.Unix(0, 0), bytes.NewReader(data))
}

func partialPath(r *rig) string {
	return filepath.Join(r.layout.DownloadDir(), dist.TarballName+".unverified")
}

// A server that stops sending in the middle: the attempt is aborted by
// the stall rule (fewer than StallMinBytes in a StallWindow), not by a
// flat timeout, and the next attempt asks for the rest with a Range
// request; no byte is transferred twice. The stall windows and the pause
// between attempts run on a fake clock, so the test moves time itself.
func TestStalledAttemptAbortedThenResumedWithRange(t *testing.T) {
	r := newRig(t)
	tgz, sig := bigRelease(t, "2.0.0", r.key)
	r.b.put("2.0.0", tgz, sig)
	const first = 64 << 10
	var log tarballLog
	r.b.hook = func(w http.ResponseWriter, req *http.Request) bool {
		if !strings.HasSuffix(req.URL.Path, ".tgz") {
			return false
		}
		sent := log.add(req)
		if len(log.all()) == 1 {
			stallAfter(w, req, tgz, first, sent)
		} else {
			serve(w, req, tgz, sent)
		}
		return true
	}
	clk := clock.NewFake(time.Unix(1767225600, 0))
	u := r.updater(func(o *Options) {
		o.Clock, o.StallWindow, o.StallMinBytes, o.RetryDelay = clk, 30*time.Second, 32<<10, 2*time.Second
	})
	done := make(chan error, 1)
	go func() { _, err := u.Do(context.Background(), Request{Version: "2.0.0"}); done <- err }()

	wait.Eventually(t, "the first 64 KiB on disk", func() bool { return fileSize(partialPath(r)) == first })
	advance := func(want time.Duration) {
		t.Helper()
		stop := make(chan struct{})
		defer time.AfterFunc(wait.Timeout, func() { close(stop) }).Stop()
		d, ok := clk.WaitForTimer(stop)
		if !ok || d != want {
			t.Fatalf("timer %v armed, want %v", d, want)
		}
		clk.Advance(d)
	}
	advance(30 * time.Second) // 64 KiB in the first window: enough
	advance(30 * time.Second) // nothing in the second: aborted
	advance(2 * time.Second)  // the pause before the next attempt
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	reqs := log.all()
	if len(reqs) != 2 {
		t.Fatalf("%d requests of the tarball, want 2", len(reqs))
	}
	if want := fmt.Sprintf("bytes=%d-", first); reqs[1].rangeHdr != want {
		t.Errorf("the retry sent Range %q, want %q", reqs[1].rangeHdr, want)
	}
	if reqs[1].ifRange == "" {
		t.Error("the retry sent no If-Range: a changed file would be spliced onto the old part")
	}
	if got := reqs[0].sent.Load() + reqs[1].sent.Load(); got != int64(len(tgz)) || reqs[1].sent.Load() != int64(len(tgz)-first) {
		t.Errorf("sent %d + %d bytes for a %d-byte tarball: some were transferred twice", reqs[0].sent.Load(), reqs[1].sent.Load(), len(tgz))
	}
	var reason string
	var total int64
	r.mu.Lock()
	for _, s := range r.steps {
		if s.Phase == updatephase.Downloading && s.Reason != "" {
			reason, total = s.Reason, s.Total
		}
	}
	r.mu.Unlock()
	if total != int64(len(tgz)) {
		t.Errorf("the interrupted attempt reported a total of %d bytes, want %d", total, len(tgz))
	}
	if !strings.Contains(reason, "stalled: fewer than 32768 bytes arrived in 30s") || !strings.Contains(reason, fmt.Sprintf("resuming at byte %d", first)) {
		t.Errorf("the interrupted attempt was reported as %q", reason)
	}
	t.Logf("attempt 1: %d bytes then a stall; attempt 2: Range %s, %d bytes", reqs[0].sent.Load(), reqs[1].rangeHdr, reqs[1].sent.Load())
}

// A connection dropped in the middle resumes with Range; a server that
// ignores Range sends it all again, and the download still completes.
func TestDroppedConnectionResumes(t *testing.T) {
	for _, honour := range []bool{true, false} {
		t.Run(fmt.Sprintf("server honours Range %v", honour), func(t *testing.T) {
			r := newRig(t)
			tgz, sig := bigRelease(t, "2.0.0", r.key)
			r.b.put("2.0.0", tgz, sig)
			const cut = 100 << 10
			var log tarballLog
			r.b.hook = func(w http.ResponseWriter, req *http.Request) bool {
				if !strings.HasSuffix(req.URL.Path, ".tgz") {
					return false
				}
				sent := log.add(req)
				switch {
				case len(log.all()) == 1:
					dropAfter(t, w, tgz, cut, sent)
				case honour:
					serve(w, req, tgz, sent)
				default:
					req.Header.Del("Range")
					serve(w, req, tgz, sent)
				}
				return true
			}
			if _, err := r.updater(nil).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
				t.Fatal(err)
			}
			reqs := log.all()
			if len(reqs) != 2 {
				t.Fatalf("%d requests, want 2", len(reqs))
			}
			have := reqs[0].sent.Load()
			if want := fmt.Sprintf("bytes=%d-", have); reqs[1].rangeHdr != want {
				t.Errorf("the retry sent Range %q, want %q", reqs[1].rangeHdr, want)
			}
			want := int64(len(tgz)) - have
			if !honour {
				want = int64(len(tgz))
			}
			if got := reqs[1].sent.Load(); got != want {
				t.Errorf("the retry transferred %d bytes, want %d", got, want)
			}
		})
	}
}

// dropAfter sends the headers and the first n bytes of data, then closes
// the connection.
func dropAfter(t *testing.T, w http.ResponseWriter, data []byte, n int, sent *atomic.Int64) {
	conn, buf, err := w.(http.Hijacker).Hijack()
	if err != nil {
		t.Error(err)
		return
	}
	defer conn.Close()
	fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nLast-Modified: %s\r\n\r\n", len(data), time.Unix(0, 0).UTC().Format(http.TimeFormat))
	m, _ := buf.Write(data[:n])
	sent.Add(int64(m))
	_ = buf.Flush()
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

// Stopped in the middle (a shutdown; a kill leaves the same), the partial
// download stays with its origin, and the next run resumes it with Range
// and If-Range. A partial download of another url is not resumed.
func TestPartialDownloadResumedByTheNextRun(t *testing.T) {
	r := newRig(t)
	tgz, sig := bigRelease(t, "2.0.0", r.key)
	r.b.put("2.0.0", tgz, sig)
	const first = 200 << 10
	var log tarballLog
	r.b.hook = func(w http.ResponseWriter, req *http.Request) bool {
		if !strings.HasSuffix(req.URL.Path, ".tgz") {
			return false
		}
		sent := log.add(req)
		if len(log.all()) == 1 {
			stallAfter(w, req, tgz, first, sent)
		} else {
			serve(w, req, tgz, sent)
		}
		return true
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := r.updater(nil).Prepare(ctx, Request{Version: "2.0.0"}); done <- err }()
	wait.Eventually(t, "the first part on disk", func() bool { return fileSize(partialPath(r)) == first })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Prepare: %v", err)
	}
	if got := fileSize(partialPath(r)); got != first {
		t.Fatalf("the partial download holds %d bytes after the stop, want %d kept", got, first)
	}
	if _, err := r.updater(nil).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
		t.Fatal(err)
	}
	reqs := log.all()
	if len(reqs) != 2 || reqs[1].rangeHdr != fmt.Sprintf("bytes=%d-", first) || reqs[1].ifRange == "" {
		t.Fatalf("requests %+v, want the second to resume at %d with If-Range", reqs, first)
	}
	if got := reqs[1].sent.Load(); got != int64(len(tgz)-first) {
		t.Errorf("the next run transferred %d bytes, want the %d missing", got, len(tgz)-first)
	}
	if _, err := os.Stat(partialPath(r) + ".part"); err == nil {
		t.Error("the partial download's meta was left behind")
	}

	// A partial file of another url (the config's base_remote changed) is
	// thrown away, not spliced.
	r2 := newRig(t)
	r2.publish("2.0.0", "2.0.0", r2.key)
	if err := os.MkdirAll(r2.layout.DownloadDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(partialPath(r2), []byte("junk of another release"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(partialPath(r2)+".part", []byte(`{"url":"http://127.0.0.1:1/elsewhere.tgz"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r2.updater(nil).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
		t.Fatalf("with a partial file of another url: %v", err)
	}
	if r2.b.ranged.Load() != 0 {
		t.Error("a partial file of another url was resumed")
	}
}

// bodyCounter counts the body bytes the updater reads of URLs ending in
// suffix.
type bodyCounter struct {
	suffix string
	n      atomic.Int64
}

func (c *bodyCounter) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err == nil && strings.HasSuffix(req.URL.Path, c.suffix) {
		resp.Body = &countedBody{ReadCloser: resp.Body, n: &c.n}
	}
	return resp, err
}

type countedBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// A .minisig is capped while it downloads: from a server that sends an
// endless one, the updater reads at most the cap + 1 byte and refuses.
func TestEndlessSignatureCappedWhileDownloading(t *testing.T) {
	r := newRig(t)
	tgz, _ := release(t, "2.0.0", r.key)
	r.b.put("2.0.0", tgz, nil)
	r.b.hook = func(w http.ResponseWriter, req *http.Request) bool {
		if !strings.HasSuffix(req.URL.Path, ".minisig") {
			return false
		}
		chunk := bytes.Repeat([]byte("untrusted comment: "), 200)
		for req.Context().Err() == nil {
			if _, err := w.Write(chunk); err != nil {
				return true
			}
		}
		return true
	}
	counter := &bodyCounter{suffix: ".minisig"}
	_, err := r.updater(func(o *Options) {
		o.HTTPClient = &http.Client{Transport: counter}
		o.MaxDownload = 1 << 20 // the tarball's cap, far above the signature's
	}).Do(context.Background(), Request{Version: "2.0.0"})
	var refusal *Refusal
	if !errors.As(err, &refusal) || !strings.Contains(err.Error(), "signature") || !strings.Contains(err.Error(), fmt.Sprintf("over the %d-byte limit", dist.MaxSignatureSize)) {
		t.Fatalf("err = %v, want a refusal naming the signature's limit", err)
	}
	if got := counter.n.Load(); got > dist.MaxSignatureSize+1 {
		t.Errorf("read %d bytes of the endless signature, want at most %d", got, dist.MaxSignatureSize+1)
	}
	t.Logf("read %d bytes of the endless signature", counter.n.Load())
	r.unchanged()
}

// A malformed [userdata] pubkey is skipped: the release key compiled into
// the binary still verifies the update. With no other key, the refusal
// names the bad one.
func TestMalformedConfiguredKeySkipped(t *testing.T) {
	r := newRig(t)
	r.src.TrustedKeys = []string{"RWQ-this-is-not-a-key"}
	r.publish("2.0.0", "2.0.0", r.key)
	if _, err := r.updater(func(o *Options) { o.EmbeddedKey = r.key.pub }).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
		t.Fatalf("with a malformed pubkey and a good embedded key: %v", err)
	}

	r2 := newRig(t)
	r2.src.TrustedKeys = []string{"RWQ-this-is-not-a-key"}
	r2.publish("2.0.0", "2.0.0", r2.key)
	_, err := r2.updater(nil).Do(context.Background(), Request{Version: "2.0.0"})
	var refusal *Refusal
	if !errors.As(err, &refusal) || !strings.Contains(err.Error(), "[userdata] pubkey") || !strings.Contains(err.Error(), "RWQ-this-is-not-a-key") {
		t.Fatalf("err = %v, want a refusal naming the malformed pubkey", err)
	}
	r2.unchanged()
}
