// Package metadata asks the cloud's instance metadata service who this
// instance is and what its userdata says: EC2 IMDSv2 first (a session token
// from PUT /latest/api/token), IMDSv1 when the token call fails, then
// OpenStack's meta_data.json. Every request has a short timeout and a few
// retries with backoff; "not found" is an answer, not a reason to retry.
package metadata

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// DefaultBaseURL is the link-local metadata address of EC2 and OpenStack.
const DefaultBaseURL = "http://169.254.169.254"

// ErrNotFound is wrapped when the service answers 404: the item does not
// exist (no userdata, or not this cloud).
var ErrNotFound = errors.New("not found")

// Options configures a Client. Zero values take the defaults.
type Options struct {
	BaseURL    string        // default DefaultBaseURL
	HTTPClient *http.Client  // default: a client with no proxy (metadata is link-local)
	Timeout    time.Duration // per request; default 2 s
	Attempts   int           // per request, including the first; default 3
	Backoff    time.Duration // first pause between attempts, doubled each time; default 250 ms
	TokenTTL   time.Duration // IMDSv2 token lifetime; default 6 h
	Logger     *slog.Logger
	Now        func() time.Time // for token expiry; default time.Now
}

// Client talks to one metadata service. It is safe for concurrent use.
type Client struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	token    string
	tokenExp time.Time
	v1       bool // the token call failed: IMDSv1 (or not EC2)
}

// New returns a client.
func New(opts Options) *Client {
	if opts.BaseURL == "" {
		opts.BaseURL = DefaultBaseURL
	}
	opts.BaseURL = strings.TrimRight(opts.BaseURL, "/")
	if opts.HTTPClient == nil {
		// The metadata service is link-local: never go through a proxy.
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.Proxy = nil
		opts.HTTPClient = &http.Client{Transport: tr}
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Second
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 3
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 250 * time.Millisecond
	}
	if opts.TokenTTL <= 0 {
		opts.TokenTTL = 6 * time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Client{opts: opts, log: log}
}

// InstanceID returns the EC2 instance id, else the OpenStack uuid.
func (c *Client) InstanceID(ctx context.Context) (string, error) {
	id, ec2Err := c.ec2(ctx, "/latest/meta-data/instance-id")
	if ec2Err == nil && strings.TrimSpace(string(id)) != "" {
		return strings.TrimSpace(string(id)), nil
	}
	if ctx.Err() != nil {
		return "", ctx.Err()
	}
	uuid, osErr := c.openStackID(ctx)
	if osErr == nil {
		return uuid, nil
	}
	return "", fmt.Errorf("instance id from metadata %s: EC2: %v; OpenStack: %v (set [network] instance_id on hosts without a metadata service)", c.opts.BaseURL, ec2Err, osErr)
}

// UserData returns the raw userdata: EC2's, else OpenStack's. An instance
// without userdata gives an error wrapping ErrNotFound.
func (c *Client) UserData(ctx context.Context) ([]byte, error) {
	data, ec2Err := c.ec2(ctx, "/latest/user-data")
	if ec2Err == nil {
		return data, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	data, osErr := c.get(ctx, "/openstack/latest/user_data", "")
	if osErr == nil {
		return data, nil
	}
	err := fmt.Errorf("userdata from metadata %s: EC2: %v; OpenStack: %v", c.opts.BaseURL, ec2Err, osErr)
	if errors.Is(ec2Err, ErrNotFound) && errors.Is(osErr, ErrNotFound) {
		return nil, fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return nil, err
}

// Get fetches any EC2 metadata path (e.g. /latest/meta-data/placement/region).
func (c *Client) Get(ctx context.Context, path string) ([]byte, error) {
	return c.ec2(ctx, path)
}

func (c *Client) openStackID(ctx context.Context) (string, error) {
	data, err := c.get(ctx, "/openstack/latest/meta_data.json", "")
	if err != nil {
		return "", err
	}
	var doc struct {
		UUID string `json:"uuid"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return "", fmt.Errorf("meta_data.json is not JSON: %w", err)
	}
	if doc.UUID == "" {
		return "", errors.New("meta_data.json has no uuid")
	}
	return doc.UUID, nil
}

// ec2 GETs an EC2 path with an IMDSv2 token when one can be had. When the
// token call fails the client falls back to IMDSv1 and remembers it.
func (c *Client) ec2(ctx context.Context, path string) ([]byte, error) {
	token := c.sessionToken(ctx)
	data, err := c.get(ctx, path, token)
	var se *statusError
	if token != "" && errors.As(err, &se) && se.code == http.StatusUnauthorized {
		// The token expired early (clock skew, service restart): renew once.
		c.mu.Lock()
		c.token = ""
		c.mu.Unlock()
		if token = c.sessionToken(ctx); token != "" {
			data, err = c.get(ctx, path, token)
		}
	}
	return data, err
}

// sessionToken returns a valid IMDSv2 token, or "" for IMDSv1.
func (c *Client) sessionToken(ctx context.Context) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.v1 {
		return ""
	}
	if c.token != "" && c.opts.Now().Before(c.tokenExp) {
		return c.token
	}
	ttl := int(c.opts.TokenTTL / time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.opts.BaseURL+"/latest/api/token", nil)
	if err != nil {
		c.v1 = true
		return ""
	}
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(ttl))
	// One attempt only: a service that does not speak IMDSv2 should not
	// cost us retries before the IMDSv1 fallback.
	body, err := c.do(req)
	if err != nil || len(strings.TrimSpace(string(body))) == 0 {
		c.log.Debug("metadata: IMDSv2 token unavailable, using IMDSv1", "base", c.opts.BaseURL, "err", err)
		if ctx.Err() == nil {
			c.v1 = true
		}
		return ""
	}
	c.token = strings.TrimSpace(string(body))
	// Renew a minute before the service would.
	c.tokenExp = c.opts.Now().Add(c.opts.TokenTTL - time.Minute)
	return c.token
}

// get GETs path with retries on transient failures (network errors,
// timeouts, 5xx, 429). 404 and other 4xx answers are final.
func (c *Client) get(ctx context.Context, path, token string) ([]byte, error) {
	var lastErr error
	pause := c.opts.Backoff
	for attempt := 1; attempt <= c.opts.Attempts; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.opts.BaseURL+path, nil)
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w", path, err)
		}
		if token != "" {
			req.Header.Set("X-aws-ec2-metadata-token", token)
		}
		body, err := c.do(req)
		if err == nil {
			return body, nil
		}
		lastErr = err
		var se *statusError
		if errors.As(err, &se) && !se.transient() {
			return nil, err
		}
		if ctx.Err() != nil || attempt == c.opts.Attempts {
			break
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("GET %s: %w (last error: %v)", path, ctx.Err(), lastErr)
		case <-t.C:
		}
		pause *= 2
	}
	return nil, fmt.Errorf("%w (after %d attempts)", lastErr, c.opts.Attempts)
}

// maxBody bounds what we read from the service (userdata is at most 16 KiB
// on EC2; OpenStack allows more).
const maxBody = 1 << 20

func (c *Client) do(req *http.Request) ([]byte, error) {
	ctx, cancel := context.WithTimeout(req.Context(), c.opts.Timeout)
	defer cancel()
	resp, err := c.opts.HTTPClient.Do(req.WithContext(ctx))
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded && req.Context().Err() == nil {
			return nil, fmt.Errorf("%s %s: timed out after %v", req.Method, req.URL.Path, c.opts.Timeout)
		}
		return nil, fmt.Errorf("%s %s: %w", req.Method, req.URL.Path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading answer: %w", req.Method, req.URL.Path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &statusError{method: req.Method, path: req.URL.Path, code: resp.StatusCode}
	}
	return body, nil
}

type statusError struct {
	method, path string
	code         int
}

func (e *statusError) Error() string {
	return fmt.Sprintf("%s %s: HTTP %d %s", e.method, e.path, e.code, http.StatusText(e.code))
}

func (e *statusError) Unwrap() error {
	if e.code == http.StatusNotFound {
		return ErrNotFound
	}
	return nil
}

func (e *statusError) transient() bool {
	return e.code >= 500 || e.code == http.StatusTooManyRequests
}
