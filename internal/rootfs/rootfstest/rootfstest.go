// Package rootfstest plants the symlinks an attacker (or an earlier state)
// could leave inside a root and keeps a sentinel directory outside it, so
// tests can prove that no operation through those links touches anything
// outside the root.
package rootfstest

import (
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// Layout is a root and, beside it, a sentinel directory outside it.
type Layout struct {
	Root    string // the root directory (host path)
	Outside string // the sentinel directory (host path), outside Root
	// Links are instance paths of planted symlinks whose text points
	// outside the root (see Plant), in a stable order.
	Links []string
	want  map[string]string
}

// Plant makes base/root and the sentinel base/outside, and plants inside
// the root symlinks whose targets, read as host paths, lead into the
// sentinel (every absolute target is a temporary path, so even code that
// resolved them on the host would touch only test files):
//
//	/abs      -> <outside>             absolute, used as a parent component
//	/rel      -> ../outside            relative, climbs out of the root
//	/deeprel  -> ../../…/<outside>     relative, climbs to the host's /
//	/absfile  -> <outside>/secret      absolute, as a final component
//	/relfile  -> ../outside/secret     relative, as a final component
//	/dangling -> <outside>/new         absolute, final, target missing
//	/chain1   -> chain2, /chain2 -> rel    a chain ending in /rel
//	/tree/{a/, out -> <outside>, outrel -> ../../outside, f}
//
// The sentinel holds secret (0640), sub/ (0750) with sub/inner (0600) and
// outlink -> secret; Check proves it unchanged.
func Plant(t testing.TB) *Layout {
	t.Helper()
	base := t.TempDir()
	l := &Layout{Root: filepath.Join(base, "root"), Outside: filepath.Join(base, "outside")}
	mustMkdir(t, l.Outside, 0o755)
	mustWrite(t, filepath.Join(l.Outside, "secret"), "keep", 0o640)
	mustMkdir(t, filepath.Join(l.Outside, "sub"), 0o750)
	mustWrite(t, filepath.Join(l.Outside, "sub", "inner"), "inner", 0o600)
	mustLink(t, "secret", filepath.Join(l.Outside, "outlink"))
	mustMkdir(t, l.Root, 0o755)
	mustMkdir(t, filepath.Join(l.Root, "tree", "a"), 0o755)
	mustWrite(t, filepath.Join(l.Root, "tree", "f"), "f", 0o644)
	links := map[string]string{
		"/abs":         l.Outside,
		"/rel":         "../outside",
		"/deeprel":     strings.Repeat("../", 32) + strings.TrimPrefix(l.Outside, "/"),
		"/absfile":     filepath.Join(l.Outside, "secret"),
		"/relfile":     "../outside/secret",
		"/dangling":    filepath.Join(l.Outside, "new"),
		"/chain1":      "chain2",
		"/chain2":      "rel",
		"/tree/out":    l.Outside,
		"/tree/outrel": "../../outside",
	}
	for _, p := range slices.Sorted(maps.Keys(links)) {
		mustLink(t, links[p], filepath.Join(l.Root, p))
		l.Links = append(l.Links, p)
	}
	l.want = Snapshot(t, l.Outside)
	return l
}

// Check fails the test if anything in the sentinel changed: names,
// contents, link targets, modes or owners.
func (l *Layout) Check(t testing.TB) {
	t.Helper()
	got := Snapshot(t, l.Outside)
	for p, w := range l.want {
		if got[p] != w {
			t.Errorf("outside the root, %s changed: was %s, now %q", p, w, got[p])
		}
	}
	for p, g := range got {
		if _, ok := l.want[p]; !ok {
			t.Errorf("outside the root, %s appeared: %s", p, g)
		}
	}
}

// Snapshot describes every entry below dir (not following links).
func Snapshot(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		desc := fmt.Sprintf("mode=%v uid=%d gid=%d", fi.Mode(), st.Uid, st.Gid)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += " -> " + target
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" content=%q", data)
		}
		out[p] = desc
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot %s: %v", dir, err)
	}
	return out
}

func mustMkdir(t testing.TB, p string, perm fs.FileMode) {
	t.Helper()
	if err := os.MkdirAll(p, perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, perm); err != nil {
		t.Fatal(err)
	}
}

func mustWrite(t testing.TB, p, content string, perm fs.FileMode) {
	t.Helper()
	if err := os.WriteFile(p, []byte(content), perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, perm); err != nil {
		t.Fatal(err)
	}
}

func mustLink(t testing.TB, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}
