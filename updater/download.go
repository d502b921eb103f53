package updater

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/updatephase"
)

// The stall rule: an attempt is aborted when fewer than StallMinBytes
// arrive in a StallWindow (waiting for the connection and the response
// headers included), and the next attempt resumes with a Range request.
// A download is bounded by its progress, not by a flat time: a slow but
// steady link (1 KiB/s still passes) finishes however long it takes, in
// the background, while a connection that hangs is dropped within a
// minute. 32 KiB in 30 s is far below any link that can fetch a release at
// all (a 30 MiB tarball at that rate takes eight hours), and far above the
// nothing that a hung connection, a dead proxy or a server that stopped
// sending delivers. Constants rather than config keys: nothing on an
// instance needs another value; tests set the Options.
const (
	DefaultStallWindow   = 30 * time.Second
	DefaultStallMinBytes = 32 << 10
)

// maxRetryDelay caps the doubling pause between attempts.
const maxRetryDelay = 30 * time.Second

// errStalled is the cause of an attempt aborted by the stall rule.
type errStalled struct {
	window time.Duration
	min    int64
}

func (e *errStalled) Error() string {
	return fmt.Sprintf("stalled: fewer than %d bytes arrived in %v", e.min, e.window)
}

// fetchSpec is one file to download.
type fetchSpec struct {
	url, path, version string
	what               string // names it in errors: "opsagent.tgz", "the signature"
	limit              int64  // refuse more than this many bytes; never read more than limit+1
	progress           bool   // report progress (the tarball, not its signature)
	// resume keeps a partial file left by an earlier run (a kill, a
	// shutdown) when it was fetched from the same url.
	resume bool
}

// partialMeta is kept beside a partial download (path+".part") so that a
// later run resumes it only from the same url, and only while the server
// says it is the same file (If-Range with its validator).
type partialMeta struct {
	URL       string `json:"url"`
	Validator string `json:"validator,omitempty"` // a strong ETag, or Last-Modified
	Size      int64  `json:"size,omitempty"`      // the whole file's, when the server said (0: unknown)
}

func metaPath(path string) string { return path + ".part" }

// removePartial forgets a download: the file and its meta.
func removePartial(path string) {
	_ = os.Remove(path)
	_ = os.Remove(metaPath(path))
}

// download fetches s.url into s.path (a file the caller removes). Each
// attempt appends to what the file holds with a Range request, and is
// aborted by the stall rule; the pause between attempts doubles (30 s at
// most). It gives up after Options.Retries attempts in a row that added
// nothing; an attempt that made progress resets the count, so a download
// that keeps moving is never given up. Cancelled (a shutdown, a newer
// update), it returns ctx's error and keeps the partial file for resuming.
func (u *Updater) download(ctx context.Context, s fetchSpec) error {
	meta := u.startPartial(s)
	var lastErr error
	delay := u.opts.RetryDelay
	fruitless := 0
	for attempt := 1; ; attempt++ {
		before := fileSize(s.path)
		done, err := u.fetch(ctx, s, &meta)
		if done {
			return nil // the meta stays with the file: the caller removes both (removePartial)
		}
		var perm *permanent
		if errors.As(err, &perm) {
			removePartial(s.path)
			return perm.err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		lastErr = err
		have := fileSize(s.path)
		if have > before {
			fruitless, delay = 0, u.opts.RetryDelay
		} else {
			fruitless++
		}
		if fruitless >= u.opts.Retries {
			removePartial(s.path)
			return refuse("update to %s: download of %s failed after %d attempts in a row that got nothing more (%d bytes in hand): %v", s.version, s.url, fruitless, have, lastErr)
		}
		reason := fmt.Sprintf("attempt %d: %v; resuming at byte %d in %v", attempt, err, have, delay)
		u.log.Warn("update: download interrupted; resuming", "url", s.url, "attempt", attempt, "have", have, "err", err, "in", delay)
		if s.progress {
			total := meta.Size
			if total <= 0 {
				total = -1
			}
			u.report(Step{Phase: updatephase.Downloading, Version: s.version, Bytes: have, Total: total, Reason: reason})
		}
		t := u.opts.Clock.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C():
		}
		delay = min(delay*2, maxRetryDelay)
	}
}

// startPartial keeps a partial file from an earlier run when s may
// resume it (same url), and removes it otherwise; it returns the meta to
// resume with (zero: start afresh).
func (u *Updater) startPartial(s fetchSpec) partialMeta {
	if s.resume {
		var m partialMeta
		data, err := fsutil.ReadFixedFile(metaPath(s.path), 64<<10)
		if err == nil && json.Unmarshal(data, &m) == nil && m.URL == s.url {
			if have := fileSize(s.path); have > 0 {
				u.log.Info("update: resuming the download left by an earlier run", "url", s.url, "have", have)
				return m
			}
		}
	}
	removePartial(s.path)
	return partialMeta{}
}

func fileSize(path string) int64 {
	st, err := os.Lstat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

// permanent marks an error that retrying does not fix (404, too large).
type permanent struct{ err error }

func (p *permanent) Error() string { return p.err.Error() }

// fetch makes one attempt, appending to what path already holds; meta is
// the partial file's origin, which an answer from the start renews.
func (u *Updater) fetch(ctx context.Context, s fetchSpec, meta *partialMeta) (bool, error) {
	// Never through a link planted at the download's name: it would have
	// the release written wherever it points.
	f, err := fsutil.AppendFixedFile(s.path, 0o600)
	if err != nil {
		return false, &permanent{fmt.Errorf("update to %s: %w", s.version, err)}
	}
	defer f.Close()
	have, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return false, err
	}
	if have > s.limit {
		_ = f.Truncate(0)
		return false, fmt.Errorf("the partial file held more than the %d-byte limit; starting afresh", s.limit)
	}
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var got atomic.Int64
	stopWatch := u.watchStall(actx, cancel, &got)
	defer stopWatch()
	stalled := func(err error) error {
		if cause := context.Cause(actx); ctx.Err() == nil && cause != nil && !errors.Is(cause, context.Canceled) {
			return cause
		}
		return err
	}

	req, err := http.NewRequestWithContext(actx, http.MethodGet, s.url, nil)
	if err != nil {
		return false, &permanent{refuse("update to %s: url %q: %v", s.version, s.url, err)}
	}
	if have > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
		if meta.Validator != "" {
			req.Header.Set("If-Range", meta.Validator)
		}
	}
	resp, err := u.opts.HTTPClient.Do(req)
	if err != nil {
		return false, stalled(err)
	}
	defer resp.Body.Close()
	total := int64(-1)
	switch {
	case resp.StatusCode == http.StatusPartialContent && have > 0:
		start, size, ok := contentRange(resp.Header.Get("Content-Range"))
		if !ok || start != have {
			// Not the rest of our file: start afresh next time.
			_ = f.Truncate(0)
			return false, fmt.Errorf("asked for bytes %d- and got Content-Range %q", have, resp.Header.Get("Content-Range"))
		}
		total = size
		if total < 0 && resp.ContentLength >= 0 {
			total = have + resp.ContentLength
		}
		meta.Size = max(total, 0)
	case resp.StatusCode == http.StatusOK:
		if have > 0 { // the server ignored the Range, or the file changed (If-Range): start over
			if err := f.Truncate(0); err != nil {
				return false, err
			}
			have = 0
		}
		total = resp.ContentLength
		// Written before any byte of the body: a kill from here on leaves a
		// partial file that the next run knows the origin of.
		*meta = partialMeta{URL: s.url, Validator: validator(resp.Header), Size: max(total, 0)}
		data, _ := json.Marshal(meta)
		if err := fsutil.WriteFileAtomic(metaPath(s.path), data, 0o600); err != nil {
			return false, &permanent{fmt.Errorf("update to %s: %w", s.version, err)}
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && have > 0:
		return true, nil // we already have it all
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		return false, &permanent{refuse("update to %s: %s: HTTP %s (is the version published?)", s.version, s.url, resp.Status)}
	default:
		return false, fmt.Errorf("HTTP %s", resp.Status)
	}
	if total > s.limit {
		return false, &permanent{refuse("update to %s refused: %s (%s) is %d bytes, over the %d-byte limit", s.version, s.what, s.url, total, s.limit)}
	}
	w := io.Writer(f)
	if s.progress {
		pw := &progressWriter{w: f, u: u, version: s.version, done: have, total: total}
		pw.report()
		w = pw
	}
	// Never read more than the limit + 1 byte, whatever the server sends
	// or claims: an endless body is cut at the limit.
	n, err := io.Copy(w, &countingReader{r: io.LimitReader(resp.Body, s.limit-have+1), n: &got})
	if have+n > s.limit {
		return false, &permanent{refuse("update to %s refused: %s (%s) is over the %d-byte limit", s.version, s.what, s.url, s.limit)}
	}
	if err != nil {
		return false, stalled(err)
	}
	if total >= 0 && have+n < total {
		return false, fmt.Errorf("cut short at %d of %d bytes", have+n, total)
	}
	return true, nil
}

// watchStall applies the stall rule to one attempt: every StallWindow it
// cancels the attempt (cause errStalled) unless StallMinBytes more have
// arrived in got. stop ends the watch and waits for it.
func (u *Updater) watchStall(ctx context.Context, cancel context.CancelCauseFunc, got *atomic.Int64) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	window, minBytes := u.opts.StallWindow, u.opts.StallMinBytes
	go func() {
		defer close(finished)
		var last int64
		for {
			t := u.opts.Clock.NewTimer(window)
			select {
			case <-done:
				t.Stop()
				return
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C():
			}
			n := got.Load()
			if n-last < minBytes {
				cancel(&errStalled{window: window, min: minBytes})
				return
			}
			last = n
		}
	}()
	return func() { close(done); <-finished }
}

// contentRange parses "bytes START-END/SIZE" (SIZE may be "*": -1).
func contentRange(h string) (start, size int64, ok bool) {
	rest, found := strings.CutPrefix(h, "bytes ")
	if !found {
		return 0, 0, false
	}
	span, sz, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	first, _, found := strings.Cut(span, "-")
	if !found {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(first, 10, 64)
	if err != nil || start < 0 {
		return 0, 0, false
	}
	size = -1
	if sz != "*" {
		if size, err = strconv.ParseInt(sz, 10, 64); err != nil {
			return 0, 0, false
		}
	}
	return start, size, true
}

// validator is what If-Range may name: a strong ETag, else Last-Modified
// (a weak ETag cannot be used with If-Range).
func validator(h http.Header) string {
	if etag := h.Get("ETag"); etag != "" && !strings.HasPrefix(etag, "W/") {
		return etag
	}
	return h.Get("Last-Modified")
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// progressWriter reports download progress, at most every 64 KiB.
type progressWriter struct {
	w            io.Writer
	u            *Updater
	version      string
	done, total  int64
	lastReported int64
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if p.done-p.lastReported >= 64<<10 || p.done == p.total {
		p.report()
	}
	return n, err
}

func (p *progressWriter) report() {
	p.lastReported = p.done
	p.u.report(Step{Phase: updatephase.Downloading, Version: p.version, Bytes: p.done, Total: p.total})
}
