package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A link planted at a fixed path is refused by name, never followed: the
// file it points to is neither created, nor appended to, nor truncated.
func TestFixedWritesRefuseLinks(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "dangling")
	if err := os.Symlink(filepath.Join(dir, "new-victim"), dangling); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{link, dangling} {
		if f, err := AppendFixedFile(p, 0o600); err == nil || !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), p) {
			f.Close()
			t.Errorf("AppendFixedFile(%s): err = %v, want a refusal naming it", p, err)
		}
		if f, err := CreateFixedFile(p, 0o600); err == nil || !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), "symbolic link") {
			f.Close()
			t.Errorf("CreateFixedFile(%s): err = %v, want a refusal naming the link", p, err)
		}
		if err := EnsureDir(p, 0o700); err == nil || !errors.Is(err, ErrNotDirectory) || !strings.Contains(err.Error(), p) {
			t.Errorf("EnsureDir(%s): err = %v, want a refusal naming it", p, err)
		}
	}
	if data, _ := os.ReadFile(victim); string(data) != "precious" {
		t.Errorf("the link's target was written: %q", data)
	}
	if _, err := os.Lstat(filepath.Join(dir, "new-victim")); err == nil {
		t.Error("a dangling link's target was created")
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := AppendFixedFile(fifo, 0o600); err == nil || !strings.Contains(err.Error(), "named pipe") {
		f.Close()
		t.Errorf("AppendFixedFile(fifo): err = %v", err)
	}
	// The ordinary cases.
	p := filepath.Join(dir, "sub", "d")
	if err := EnsureDir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := EnsureDir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := CreateFixedFile(filepath.Join(p, "f"), 0o640)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("one")
	f.Close()
	f, err = AppendFixedFile(filepath.Join(p, "f"), 0o640)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("two")
	f.Close()
	if data, _ := os.ReadFile(filepath.Join(p, "f")); string(data) != "onetwo" {
		t.Errorf("got %q", data)
	}
	f, err = CreateFixedFile(filepath.Join(p, "f"), 0o640)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if st, _ := os.Stat(filepath.Join(p, "f")); st.Size() != 0 || st.Mode().Perm() != 0o640 {
		t.Errorf("CreateFixedFile over a file: size %d, mode %v", st.Size(), st.Mode())
	}
}
