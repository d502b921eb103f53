package archive

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// emptyDest makes parent/dest as an empty 0750 directory (not the default
// mode, so that a replaced directory shows) and returns its stat.
func emptyDest(t testing.TB) (parent, dest string, before fs.FileInfo) {
	t.Helper()
	parent = t.TempDir()
	dest = filepath.Join(parent, "dest")
	if err := os.Mkdir(dest, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dest, 0o750); err != nil { // past the umask
		t.Fatal(err)
	}
	before, err := os.Lstat(dest)
	if err != nil {
		t.Fatal(err)
	}
	return parent, dest, before
}

// assertUntouched checks that a failed Extract left parent as it was: dest
// absent if before is nil, else the same empty directory with the same
// mode, and nothing else (no temporary directory) beside it.
func assertUntouched(t testing.TB, parent, dest string, before fs.FileInfo) {
	t.Helper()
	assertNothingOutside(t, parent, before != nil)
	if before == nil {
		return
	}
	st, err := os.Lstat(dest)
	if err != nil {
		t.Fatalf("dest: %v", err)
	}
	if !os.SameFile(before, st) || st.Mode() != before.Mode() {
		t.Fatalf("dest replaced or changed: %v, was %v", st.Mode(), before.Mode())
	}
	if entries, _ := os.ReadDir(dest); len(entries) != 0 {
		t.Fatalf("dest holds %d entries after a failed extraction, first %s", len(entries), entries[0].Name())
	}
}

// assertNothingOutside checks that parent holds dest (if destExists) and
// nothing else.
func assertNothingOutside(t testing.TB, parent string, destExists bool) {
	t.Helper()
	entries, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != "dest" {
			t.Fatalf("extraction left %s outside the destination", e.Name())
		}
	}
	if destExists != (len(entries) == 1) {
		t.Fatalf("dest exists = %v, want %v", len(entries) == 1, destExists)
	}
}

// assertLinksInside walks dest on disk and checks that every symlink in it,
// resolved through the files and links really there, stays inside dest.
// It is an oracle independent of the extractor's in-memory model.
func assertLinksInside(t testing.TB, dest string) {
	t.Helper()
	err := filepath.WalkDir(dest, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink == 0 {
			return err
		}
		rel, _ := filepath.Rel(dest, p)
		if why := diskEscape(dest, rel); why != "" {
			t.Errorf("symlink %s %s", rel, why)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// diskEscape resolves the symlink at rel under dest the way the kernel
// would, reading links from disk, and says why it leaves dest ("" if it
// does not). A missing component counts as a plain directory, so that a
// dangling link is judged by where it would lead.
func diskEscape(dest, rel string) string {
	cur := strings.Split(filepath.Dir(rel), "/")
	if cur[0] == "." {
		cur = nil
	}
	target, err := os.Readlink(filepath.Join(dest, rel))
	if err != nil {
		return err.Error()
	}
	todo := strings.Split(target, "/")
	if strings.HasPrefix(target, "/") {
		return "is absolute"
	}
	for hops := 0; len(todo) > 0; {
		c := todo[0]
		todo = todo[1:]
		switch {
		case c == "" || c == ".":
		case c == "..":
			if len(cur) == 0 {
				return "climbs out of dest"
			}
			cur = cur[:len(cur)-1]
		default:
			next := filepath.Join(dest, filepath.Join(cur...), c)
			st, err := os.Lstat(next)
			if err != nil || st.Mode()&fs.ModeSymlink == 0 {
				cur = append(cur, c)
				continue
			}
			if hops++; hops > 40 {
				return "" // a loop goes nowhere, outside included
			}
			more, _ := os.Readlink(next)
			if strings.HasPrefix(more, "/") {
				return "goes through an absolute link"
			}
			todo = append(strings.Split(more, "/"), todo...)
		}
	}
	return ""
}
