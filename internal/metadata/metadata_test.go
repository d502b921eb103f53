package metadata

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeIMDS emulates a metadata service in one of several modes.
type fakeIMDS struct {
	mode      string // "v2only", "v1only", "openstack", "failing", "slow", "flaky"
	userdata  string
	tokenPuts atomic.Int32
	gets      atomic.Int32
	mu        sync.Mutex
	seen      []string // "METHOD path token"
	delay     time.Duration
	failFirst int32
}

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	tok := r.Header.Get("X-aws-ec2-metadata-token")
	f.mu.Lock()
	f.seen = append(f.seen, r.Method+" "+r.URL.Path+" "+tok)
	f.mu.Unlock()
	if f.delay > 0 {
		select {
		case <-time.After(f.delay):
		case <-r.Context().Done():
			return
		}
	}
	if r.Method == http.MethodGet {
		if n := f.gets.Add(1); n <= f.failFirst {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
	}
	switch f.mode {
	case "failing":
		http.Error(w, "boom", http.StatusInternalServerError)
		return
	case "openstack":
		switch r.URL.Path {
		case "/openstack/latest/meta_data.json":
			w.Write([]byte(`{"uuid": "d8e02d56-2648-49a3-bf97-6be8f1204f38", "name": "vm"}`))
		case "/openstack/latest/user_data":
			w.Write([]byte(f.userdata))
		default:
			http.NotFound(w, r)
		}
		return
	}
	if r.URL.Path == "/latest/api/token" {
		if f.mode == "v1only" {
			http.Error(w, "no such thing", http.StatusForbidden)
			return
		}
		if r.Method != http.MethodPut || r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "bad token request", http.StatusBadRequest)
			return
		}
		f.tokenPuts.Add(1)
		w.Write([]byte("TOKEN-1"))
		return
	}
	if f.mode == "v2only" && tok != "TOKEN-1" {
		http.Error(w, "token required", http.StatusUnauthorized)
		return
	}
	switch r.URL.Path {
	case "/latest/meta-data/instance-id":
		w.Write([]byte("i-0abc123\n"))
	case "/latest/user-data":
		if f.userdata == "" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(f.userdata))
	default:
		http.NotFound(w, r)
	}
}

func newClient(t *testing.T, f *fakeIMDS, opts Options) *Client {
	t.Helper()
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	opts.BaseURL = srv.URL + "/"
	if opts.Backoff == 0 {
		opts.Backoff = time.Millisecond
	}
	return New(opts)
}

const userdataScript = `#!/bin/bash
# VisualOps agent bootstrap
WS_URI=wss://api.example.com/agent/
APP_ID="app-123"
export VERSION='2.1'
export BASE_REMOTE=https://s3.amazonaws.com/opsagent   # where releases live
PUBKEY=RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3
curl -sSL $BASE_REMOTE/$VERSION/userdata.sh | bash
`

func TestIMDSv2(t *testing.T) {
	f := &fakeIMDS{mode: "v2only", userdata: userdataScript}
	c := newClient(t, f, Options{})
	id, err := c.InstanceID(context.Background())
	if err != nil || id != "i-0abc123" {
		t.Fatalf("InstanceID = %q, %v", id, err)
	}
	ud, err := c.UserData(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(ud), "app-123") {
		t.Errorf("userdata %q", ud)
	}
	if n := f.tokenPuts.Load(); n != 1 {
		t.Errorf("token requested %d times, want 1 (cached)", n)
	}
}

func TestIMDSv2TokenRenewedWhenExpired(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	var mu sync.Mutex
	f := &fakeIMDS{mode: "v2only"}
	c := newClient(t, f, Options{TokenTTL: 2 * time.Minute, Now: func() time.Time { mu.Lock(); defer mu.Unlock(); return now }})
	if _, err := c.InstanceID(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(90 * time.Second) // past TTL minus the one-minute margin
	mu.Unlock()
	if _, err := c.InstanceID(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := f.tokenPuts.Load(); n != 2 {
		t.Errorf("token requested %d times, want 2", n)
	}
}

func TestIMDSv1Fallback(t *testing.T) {
	f := &fakeIMDS{mode: "v1only", userdata: userdataScript}
	c := newClient(t, f, Options{})
	id, err := c.InstanceID(context.Background())
	if err != nil || id != "i-0abc123" {
		t.Fatalf("InstanceID = %q, %v", id, err)
	}
	if _, err := c.UserData(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	puts := 0
	for _, s := range f.seen {
		if strings.HasPrefix(s, "PUT") {
			puts++
		}
		if strings.HasPrefix(s, "GET") && !strings.HasSuffix(s, " ") {
			t.Errorf("IMDSv1 request carried a token: %q", s)
		}
	}
	if puts != 1 {
		t.Errorf("token tried %d times, want once then remembered", puts)
	}
}

func TestOpenStack(t *testing.T) {
	f := &fakeIMDS{mode: "openstack", userdata: "APP_ID=os-app\n"}
	c := newClient(t, f, Options{})
	id, err := c.InstanceID(context.Background())
	if err != nil || id != "d8e02d56-2648-49a3-bf97-6be8f1204f38" {
		t.Fatalf("InstanceID = %q, %v", id, err)
	}
	ud, err := c.UserData(context.Background())
	if err != nil || !strings.Contains(string(ud), "os-app") {
		t.Fatalf("UserData = %q, %v", ud, err)
	}
}

func TestNotFoundIsNotRetried(t *testing.T) {
	f := &fakeIMDS{mode: "v1only"} // no userdata → 404 on both clouds
	c := newClient(t, f, Options{Attempts: 5})
	_, err := c.UserData(context.Background())
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	if n := f.gets.Load(); n != 2 {
		t.Errorf("%d GETs, want 2 (one per cloud, no retries on 404)", n)
	}
}

func TestFailingServiceRetriesThenNamesTheFix(t *testing.T) {
	f := &fakeIMDS{mode: "failing"}
	c := newClient(t, f, Options{Attempts: 3})
	_, err := c.InstanceID(context.Background())
	if err == nil {
		t.Fatal("no error from a failing service")
	}
	for _, want := range []string{"HTTP 500", "after 3 attempts", "[network] instance_id"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	// 3 EC2 attempts + 3 OpenStack attempts.
	if n := f.gets.Load(); n != 6 {
		t.Errorf("%d GETs, want 6", n)
	}
}

func TestTransientErrorsRecover(t *testing.T) {
	f := &fakeIMDS{mode: "v1only", failFirst: 2}
	c := newClient(t, f, Options{Attempts: 3})
	id, err := c.InstanceID(context.Background())
	if err != nil || id != "i-0abc123" {
		t.Fatalf("InstanceID = %q, %v", id, err)
	}
}

func TestSlowServiceTimesOut(t *testing.T) {
	f := &fakeIMDS{mode: "v1only", delay: 5 * time.Second}
	c := newClient(t, f, Options{Timeout: 50 * time.Millisecond, Attempts: 2})
	_, err := c.InstanceID(context.Background())
	if err == nil || !strings.Contains(err.Error(), "timed out after 50ms") {
		t.Fatalf("err = %v, want a timeout", err)
	}
}

func TestContextCancellation(t *testing.T) {
	f := &fakeIMDS{mode: "v1only", delay: 5 * time.Second}
	c := newClient(t, f, Options{Timeout: time.Minute, Attempts: 10, Backoff: time.Minute})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	_, err := c.InstanceID(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestUnreachableService(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // nothing listens there any more
	c := New(Options{BaseURL: url, Attempts: 2, Backoff: time.Millisecond})
	_, err := c.InstanceID(context.Background())
	if err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("err = %v", err)
	}
}
