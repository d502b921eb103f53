package fsutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestRootPathNeverEscapes(t *testing.T) {
	dir := t.TempDir()
	r, err := NewRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"/etc/opsagent.conf":          filepath.Join(dir, "etc/opsagent.conf"),
		"etc/opsagent.conf":           filepath.Join(dir, "etc/opsagent.conf"),
		"/../../etc/passwd":           filepath.Join(dir, "etc/passwd"),
		"/var/lib/../../../../tmp/x":  filepath.Join(dir, "tmp/x"),
		"/":                           dir,
		"":                            dir,
		"/opt/visualops//bin/./agent": filepath.Join(dir, "opt/visualops/bin/agent"),
	}
	for in, want := range cases {
		if got := r.Path(in); got != want {
			t.Errorf("Path(%q) = %q, want %q", in, got, want)
		}
	}
	if r.IsHost() {
		t.Error("a temp root claims to be the host")
	}
	host, _ := NewRoot("")
	if !host.IsHost() || host.Path("/etc/x") != "/etc/x" {
		t.Errorf("host root: %q", host.Path("/etc/x"))
	}
	var zero Root
	if zero.Dir() != "/" {
		t.Errorf("zero Root dir = %q", zero.Dir())
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "recipe.json")
	if err := WriteFileAtomic(p, []byte("one"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(p, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	if string(data) != "two" || st.Mode().Perm() != 0o600 {
		t.Errorf("content %q mode %v", data, st.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temp files left: %d entries", len(entries))
	}
	err := WriteFileAtomic(filepath.Join(dir, "missing", "x"), []byte("x"), 0o600)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "missing", "x")) {
		t.Errorf("error does not name the path: %v", err)
	}
}

// Concurrent writers never leave a torn file: every read sees one whole
// version.
func TestWriteFileAtomicConcurrentReaders(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	a, b := strings.Repeat("a", 1<<16), strings.Repeat("b", 1<<16)
	if err := WriteFileAtomic(p, []byte(a), 0o600); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 50; i++ {
			s := a
			if i%2 == 1 {
				s = b
			}
			if err := WriteFileAtomic(p, []byte(s), 0o600); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := 0; i < 200; i++ {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if s := string(data); s != a && s != b {
			t.Fatalf("torn read of %d bytes", len(data))
		}
	}
	wg.Wait()
}

func TestLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	if _, held, err := HolderPID(p); held || err != nil {
		t.Fatalf("no lock file: held=%v err=%v", held, err)
	}
	l, err := Lock(p)
	if err != nil {
		t.Fatal(err)
	}
	pid, held, err := HolderPID(p)
	if err != nil || !held || pid != os.Getpid() {
		t.Errorf("HolderPID = %d %v %v", pid, held, err)
	}
	_, err = Lock(p)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Lock: %v", err)
	}
	want := fmt.Sprintf("already running as pid %d", os.Getpid())
	if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), p) {
		t.Errorf("error %q lacks %q and the path", err, want)
	}
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := l.Unlock(); err != nil {
		t.Errorf("second Unlock: %v", err)
	}
	if _, held, _ := HolderPID(p); held {
		t.Error("lock still held after Unlock")
	}
	l2, err := Lock(p)
	if err != nil {
		t.Fatalf("relock after unlock: %v", err)
	}
	_ = l2.Unlock()
	if _, err := Lock(filepath.Join(p, "sub", "lock")); err == nil {
		t.Error("lock in a missing directory succeeded")
	}
}
