package agent

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/token"
)

func identityRig(t *testing.T, metadataURL, conf string) (*identity, string, *config.Owner) {
	t.Helper()
	dir := t.TempDir()
	root, _ := fsutil.NewRoot(dir)
	os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
	if metadataURL != "" {
		conf += "\n[network]\nmetadata = " + metadataURL + "\n"
	}
	p := filepath.Join(dir, "etc/opsagent.conf")
	if err := os.WriteFile(p, []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(p)
	if err != nil {
		t.Fatal(err)
	}
	owner := config.NewOwner(cfg)
	return newIdentity(config.NewLayout(root, p, cfg), owner, slog.New(slog.DiscardHandler)), dir, owner
}

func metadataServer(t *testing.T, userdata string) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/latest/api/token":
			w.Write([]byte("tok"))
		case "/latest/meta-data/instance-id":
			w.Write([]byte("i-0meta"))
		case "/latest/user-data":
			w.Write([]byte(userdata))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestUserdataWrittenBackAndAppChangeReplacesToken(t *testing.T) {
	srv := metadataServer(t, "WS_URI=wss://new.example.com/agent/\nAPP_ID=app-new\nVERSION=2.2\n")
	id, dir, _ := identityRig(t, srv.URL, "; keep me\n[userdata]\nws_uri = wss://old.example.com/agent/\napp_id = app-old\n")
	tok1, err := id.Token()
	if err != nil || len(tok1) != 2*token.Bytes {
		t.Fatalf("token %q %v", tok1, err)
	}
	iid, err := id.InstanceID(context.Background())
	if err != nil || iid != "i-0meta" {
		t.Fatalf("instance id %q %v", iid, err)
	}
	if err := id.RefreshUserdata(context.Background()); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(filepath.Join(dir, "etc/opsagent.conf"))
	for _, want := range []string{"wss://new.example.com/agent/", "app-new", "2.2", "keep me"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("config lacks %q:\n%s", want, data)
		}
	}
	tok2, _ := id.Token()
	if tok2 == tok1 || id.owner.Current().Userdata.AppID != "app-new" {
		t.Errorf("app id change must replace the token (%q → %q)", tok1, tok2)
	}
	// Nothing changed: nothing rewritten, token kept.
	if err := id.RefreshUserdata(context.Background()); err != nil {
		t.Fatal(err)
	}
	if tok3, _ := id.Token(); tok3 != tok2 {
		t.Error("token replaced without an app change")
	}
}

func TestUserdataInvalidValuesNotApplied(t *testing.T) {
	srv := metadataServer(t, "WS_URI=http://not-a-websocket/\n")
	id, dir, _ := identityRig(t, srv.URL, "[userdata]\nws_uri = wss://ok.example.com/agent/\napp_id = a\n")
	err := id.RefreshUserdata(context.Background())
	if err == nil || !strings.Contains(err.Error(), "ws_uri") {
		t.Fatalf("err = %v", err)
	}
	data, _ := os.ReadFile(filepath.Join(dir, "etc/opsagent.conf"))
	if !strings.Contains(string(data), "wss://ok.example.com/agent/") {
		t.Errorf("config changed:\n%s", data)
	}
}

// A self-updated instance (config at 2.3.0) keeps its version when the
// userdata still names the 2.2 it was booted with.
func TestUserdataDoesNotDowngradeTheVersion(t *testing.T) {
	srv := metadataServer(t, "WS_URI=wss://ok.example.com/agent/\nAPP_ID=a\nVERSION=2.2\n")
	id, dir, _ := identityRig(t, srv.URL, "[userdata]\nws_uri = wss://ok.example.com/agent/\napp_id = a\nversion = 2.3.0\n")
	if err := id.RefreshUserdata(context.Background()); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(filepath.Join(dir, "etc/opsagent.conf")); !strings.Contains(string(data), "2.3.0") {
		t.Errorf("version lowered by the userdata:\n%s", data)
	}
}

func TestMachineIDFallback(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	id, dir, _ := identityRig(t, dead.URL, "[userdata]\nws_uri = ws://x/agent/\napp_id = a\n")
	id.meta = nil
	id.instanceID = ""
	// No metadata at all and no machine-id: a clear error.
	id.meta = newIdentity(id.layout, id.owner, id.log).meta
	if _, err := id.InstanceID(context.Background()); err == nil || !strings.Contains(err.Error(), "instance_id") {
		t.Fatalf("err = %v", err)
	}
	os.WriteFile(filepath.Join(dir, "etc/machine-id"), []byte("0123456789abcdef\n"), 0o444)
	iid, err := id.InstanceID(context.Background())
	if err != nil || iid != "0123456789abcdef" {
		t.Fatalf("machine-id fallback: %q %v", iid, err)
	}
}

func TestConfiguredInstanceIDSkipsMetadata(t *testing.T) {
	id, _, _ := identityRig(t, "", "[userdata]\nws_uri = ws://x/agent/\napp_id = a\n[network]\ninstance_id = i-fixed\n")
	if id.meta != nil {
		t.Error("metadata client created although instance_id is set")
	}
	if iid, err := id.InstanceID(context.Background()); err != nil || iid != "i-fixed" {
		t.Fatalf("%q %v", iid, err)
	}
	if err := id.RefreshUserdata(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A world-readable token is tightened to 0400; a directory in its place
// is a clear error.
func TestTokenFilePapercuts(t *testing.T) {
	id, dir, _ := identityRig(t, "", "[userdata]\nws_uri = ws://x/agent/\napp_id = a\n[network]\ninstance_id = i-1\n")
	p := filepath.Join(dir, "etc/opsagent.token")
	if err := os.WriteFile(p, []byte("abcdefabcdefabcdefabcdef\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tok, err := id.Token()
	if err != nil || tok != "abcdefabcdefabcdefabcdef" {
		t.Fatalf("%q %v", tok, err)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o400 {
		t.Errorf("mode %v, want 0400", st.Mode().Perm())
	}
	os.Remove(p)
	os.Mkdir(p, 0o755)
	if _, err := id.Token(); err == nil || !strings.Contains(err.Error(), "not a regular file") || !strings.Contains(err.Error(), "remove it") {
		t.Fatalf("directory in place of the token: %v", err)
	}
}

// TestMachineIDFIFOFailsAtOnce: a FIFO at /etc/machine-id (read when there
// is no metadata) blocked the Handshake's identity for good, and with it
// SIGTERM; it is refused at once.
func TestMachineIDFIFOFailsAtOnce(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	id, dir, _ := identityRig(t, dead.URL, "[userdata]\nws_uri = ws://x/agent/\napp_id = a\n")
	p := filepath.Join(dir, "etc/machine-id")
	if err := syscall.Mkfifo(p, 0o444); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := id.InstanceID(context.Background()); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "named pipe (FIFO)") {
			t.Errorf("err = %v", err)
		}
	case <-time.After(30 * time.Second):
		if w, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close() // releases the blocked reader
		}
		t.Fatal("the instance id blocked on a FIFO at /etc/machine-id")
	}
}
