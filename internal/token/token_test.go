package token

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	st, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

// A token file others can read is tightened through the descriptor it
// was checked and read with: a link put at its name in between (here
// while the warning is given) is never chmodded through.
func TestEnsureTightensTheFileItChecked(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "opsagent.token")
	if err := os.WriteFile(path, []byte("0123456789abcdef\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("someone else's\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var warned string
	tok, err := Ensure(path, func(msg string) {
		warned = msg
		// The swap an attacker would race for.
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(victim, path); err != nil {
			t.Fatal(err)
		}
	})
	if m := mode(t, victim); m != 0o644 {
		t.Errorf("the file a link put at the token's name points to was chmodded to %04o", m)
	}
	if err != nil || tok != "0123456789abcdef" {
		t.Errorf("Ensure = %q, %v; want the token it checked", tok, err)
	}
	if !strings.Contains(warned, "mode 0644") || !strings.Contains(warned, "mode set to 0400") {
		t.Errorf("warning %q", warned)
	}
}

// A token file that is a link, or has another name (a hard link), is
// refused with its name; what it shares an inode with, or points to, is
// neither chmodded nor read as the token.
func TestEnsureRefusesLinks(t *testing.T) {
	for _, kind := range []string{"symlink", "hard link"} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			victim := filepath.Join(dir, "victim")
			if err := os.WriteFile(victim, []byte("someone else's\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "opsagent.token")
			link := os.Symlink
			if kind == "hard link" {
				link = os.Link
			}
			if err := link(victim, path); err != nil {
				t.Fatal(err)
			}
			tok, err := Ensure(path, func(string) {})
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "remove it") {
				t.Errorf("Ensure = %q, %v; want a refusal naming %s", tok, err, path)
			}
			if m := mode(t, victim); m != 0o644 {
				t.Errorf("the linked file was chmodded to %04o", m)
			}
		})
	}
}

// The ordinary cases: created when missing or empty, kept when right.
func TestEnsure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "etc", "opsagent.token")
	tok, err := Ensure(path, func(m string) { t.Errorf("warned: %s", m) })
	if err != nil || len(tok) != 2*Bytes {
		t.Fatalf("Ensure on nothing = %q, %v", tok, err)
	}
	if m := mode(t, path); m != Mode {
		t.Errorf("mode %04o", m)
	}
	again, err := Ensure(path, func(m string) { t.Errorf("warned: %s", m) })
	if err != nil || again != tok {
		t.Errorf("Ensure again = %q, %v; want %q", again, err, tok)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, Mode); err != nil {
		t.Fatal(err)
	}
	if fresh, err := Ensure(path, func(string) {}); err != nil || len(fresh) != 2*Bytes || fresh == tok {
		t.Errorf("Ensure on an empty file = %q, %v", fresh, err)
	}
}
