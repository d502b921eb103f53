package backend

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
)

// TestAPITokenRequiredOnLoopback: a backend started without a token on a
// loopback address (the documented setup behind a TLS proxy) makes one,
// stores it 0600 in its data directory, keeps it across restarts and
// refuses every API call but healthz without it. The 401 says where the
// token is and how to send it.
func TestAPITokenRequiredOnLoopback(t *testing.T) {
	dir := t.TempDir()
	srv, err := New(Options{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addrc, done := make(chan net.Addr, 1), make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, "127.0.0.1:0", func(a net.Addr) { addrc <- a }) }()
	base := "http://" + (<-addrc).String()
	file := filepath.Join(dir, APITokenFile)
	if srv.APITokenFile() != file {
		t.Fatalf("APITokenFile %q, want %q", srv.APITokenFile(), file)
	}
	st, err := os.Lstat(file)
	if err != nil || st.Mode() != 0o600 {
		t.Fatalf("token file: %v %v, want a regular file of mode 0600", st, err)
	}
	tok := readTokenFile(t, file)
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(tok) {
		t.Fatalf("generated token %q: want 256 random bits in hex", tok)
	}
	call := func(path, auth string) (int, string) {
		req, _ := http.NewRequest("GET", base+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		return status(t, req)
	}
	if code, body := call("/api/apps", ""); code != http.StatusUnauthorized || !strings.Contains(body, file) || !strings.Contains(body, "Authorization: Bearer") {
		t.Errorf("no token on loopback: %d %s, want 401 naming %s and the header", code, body, file)
	}
	if code, body := call("/api/apps", "Bearer "+tok); code != http.StatusOK {
		t.Errorf("with the token: %d %s", code, body)
	}
	if code, body := call("/api/healthz", ""); code != http.StatusOK {
		t.Errorf("healthz: %d %s", code, body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, dir, nil)
	if e.token != tok {
		t.Fatalf("after a restart the token changed: %q, was %q", e.token, tok)
	}
	if code, out := e.api("GET", "/api/apps", ""); code != http.StatusOK {
		t.Fatalf("after a restart, with the token: %d %v", code, out)
	}
}

// TestAPITokenFileMustBeOurs: what stands at <data>/api-token is used only
// when it is a regular file that only its owner can read; anything else
// stops the start with a message naming it, and is left as it was.
func TestAPITokenFileMustBeOurs(t *testing.T) {
	good := strings.Repeat("a1", 20)
	cases := []struct {
		name  string
		make  func(t *testing.T, path string)
		want  string // in the error; "" means accepted
		check func(t *testing.T, path string)
	}{
		{"our file", func(t *testing.T, p string) { write(t, p, good+"\n", 0o600) }, "", nil},
		{"owner read-only", func(t *testing.T, p string) { write(t, p, good, 0o400) }, "", nil},
		{"symlink to a token", func(t *testing.T, p string) {
			target := filepath.Join(t.TempDir(), "elsewhere")
			write(t, target, good, 0o600)
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
		}, "is a symlink", func(t *testing.T, p string) {
			if st, err := os.Lstat(p); err != nil || st.Mode()&os.ModeSymlink == 0 {
				t.Errorf("the symlink was replaced: %v %v", st, err)
			}
		}},
		{"dangling symlink", func(t *testing.T, p string) {
			if err := os.Symlink(filepath.Join(t.TempDir(), "nothing"), p); err != nil {
				t.Fatal(err)
			}
		}, "is a symlink", func(t *testing.T, p string) {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("a file was created through the dangling symlink: %v", err)
			}
		}},
		{"FIFO", func(t *testing.T, p string) {
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "not a regular file", nil},
		{"directory", func(t *testing.T, p string) {
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
		}, "not a regular file", nil},
		{"readable by others", func(t *testing.T, p string) { write(t, p, good, 0o644) }, "chmod 600", func(t *testing.T, p string) {
			if st, _ := os.Stat(p); st.Mode().Perm() != 0o644 {
				t.Errorf("mode changed to %04o", st.Mode().Perm())
			}
		}},
		{"empty", func(t *testing.T, p string) { write(t, p, "", 0o600) }, "at least 16", nil},
		{"short", func(t *testing.T, p string) { write(t, p, "abc\n", 0o600) }, "at least 16", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, APITokenFile)
			c.make(t, path)
			srv, err := New(Options{DataDir: dir})
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				defer srv.Close()
				if !srv.apiAuth.ok("Bearer " + good) {
					t.Error("the token in the file is not the one required")
				}
				return
			}
			if err == nil {
				srv.Close()
				t.Fatalf("started; want an error containing %q", c.want)
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %q: want it to name %s and say %q", err, path, c.want)
			}
			if c.check != nil {
				c.check(t, path)
			}
		})
	}
}

func write(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// TestAPITokenCheck: only "Bearer <the token>" passes; a configured token
// must be long enough to be one.
func TestAPITokenCheck(t *testing.T) {
	const tok = "s3cret-api-token-0123"
	a, file, err := newAPIAuth(context.Background(), t.TempDir(), tok, nil)
	if err != nil || file != "" {
		t.Fatal(err, file)
	}
	for h, want := range map[string]bool{
		"Bearer " + tok: true, "": false, "Bearer": false, "Bearer ": false, tok: false, "bearer " + tok: false,
		"Bearer " + tok + "x": false, "Bearer " + tok[:len(tok)-1]: false, "Bearer  " + tok: false, "Basic " + tok: false,
	} {
		if a.ok(h) != want {
			t.Errorf("Authorization %q: ok = %v", h, !want)
		}
	}
	if _, err := New(Options{DataDir: t.TempDir(), APIToken: "short"}); err == nil || !strings.Contains(err.Error(), "at least 16") {
		t.Errorf("a 5-character token: %v", err)
	}
}
