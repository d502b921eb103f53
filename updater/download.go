package updater

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

// download fetches url into path (a file the caller removes), resuming a
// partial file with a Range request on each retry, with exponential
// backoff, and refusing more than MaxDownload bytes. progress reports the
// bytes as they come (the tarball; not its signature).
func (u *Updater) download(ctx context.Context, url, path, version string, progress bool) error {
	_ = os.Remove(path) // a leftover from an earlier attempt is not trusted
	var lastErr error
	delay := u.opts.RetryDelay
	for attempt := 1; attempt <= u.opts.Retries; attempt++ {
		done, err := u.fetch(ctx, url, path, version, progress)
		if done {
			return nil
		}
		var perm *permanent
		if errors.As(err, &perm) {
			return perm.err
		}
		lastErr = err
		if ctx.Err() != nil {
			return ctx.Err()
		}
		u.log.Warn("update: download interrupted; resuming", "url", url, "attempt", attempt, "err", err, "in", delay)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(delay*2, 30*time.Second)
	}
	return refuse("update to %s: download of %s failed after %d attempts: %v", version, url, u.opts.Retries, lastErr)
}

// permanent marks an error that retrying does not fix (404, too large).
type permanent struct{ err error }

func (p *permanent) Error() string { return p.err.Error() }

// fetch makes one attempt, appending to what path already holds.
func (u *Updater) fetch(ctx context.Context, url, path, version string, progress bool) (bool, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return false, &permanent{fmt.Errorf("update to %s: %w", version, err)}
	}
	defer f.Close()
	have, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return false, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, &permanent{refuse("update to %s: url %q: %v", version, url, err)}
	}
	if have > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
	}
	resp, err := u.opts.HTTPClient.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	total := int64(-1)
	switch {
	case resp.StatusCode == http.StatusPartialContent && have > 0:
		if resp.ContentLength >= 0 {
			total = have + resp.ContentLength
		}
	case resp.StatusCode == http.StatusOK:
		if have > 0 { // the server ignored the Range: start over
			if err := f.Truncate(0); err != nil {
				return false, err
			}
			have = 0
		}
		total = resp.ContentLength
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && have > 0:
		return true, nil // we already have it all
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		return false, &permanent{refuse("update to %s: %s: HTTP %s (is the version published?)", version, url, resp.Status)}
	default:
		return false, fmt.Errorf("HTTP %s", resp.Status)
	}
	if total > u.opts.MaxDownload {
		return false, &permanent{refuse("update to %s refused: %s is %d bytes, over the %d-byte limit", version, url, total, u.opts.MaxDownload)}
	}
	w := io.Writer(f)
	if progress {
		w = &progressWriter{w: f, u: u, version: version, done: have, total: total}
	}
	n, err := io.Copy(w, io.LimitReader(resp.Body, u.opts.MaxDownload-have+1))
	if have+n > u.opts.MaxDownload {
		return false, &permanent{refuse("update to %s refused: %s is over the %d-byte limit", version, url, u.opts.MaxDownload)}
	}
	if err != nil {
		return false, err
	}
	if total >= 0 && have+n < total {
		return false, fmt.Errorf("cut short at %d of %d bytes", have+n, total)
	}
	return true, nil
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
		p.lastReported = p.done
		p.u.opts.OnStep(Step{Phase: "downloading", Version: p.version, Bytes: p.done, Total: p.total})
	}
	return n, err
}
