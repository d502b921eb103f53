package archive

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mholt/archives"
)

// file is one entry of a test archive: a directory (name ends in "/"),
// a symlink (link set) or a file.
type file struct {
	name, body, link string
	mode             fs.FileMode
}

// tarOf is the tar stream of files, compressed as f says.
func tarOf(t testing.TB, f Format, files ...file) []byte {
	t.Helper()
	var hdrs []*tar.Header
	var bodies [][]byte
	for _, fl := range files {
		h := &tar.Header{Name: fl.name, Mode: int64(fl.mode)}
		switch {
		case strings.HasSuffix(fl.name, "/"):
			h.Typeflag = tar.TypeDir
		case fl.link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, fl.link
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(fl.body))
		}
		hdrs = append(hdrs, h)
		bodies = append(bodies, []byte(fl.body))
	}
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for i, h := range hdrs {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write(bodies[i])
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if f == Tar {
		return raw.Bytes()
	}
	var c archives.Compressor
	switch f {
	case TarGz:
		c = archives.Gz{}
	case TarBz2:
		c = archives.Bz2{}
	case TarXz:
		c = archives.Xz{}
	}
	var out bytes.Buffer
	w, err := c.OpenWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(raw.Bytes()); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// zipOf is a zip archive of files, with Unix modes.
func zipOf(t testing.TB, files ...file) []byte {
	t.Helper()
	var out bytes.Buffer
	zw := zip.NewWriter(&out)
	for _, fl := range files {
		h := &zip.FileHeader{Name: fl.name, Method: zip.Deflate}
		body := fl.body
		switch {
		case strings.HasSuffix(fl.name, "/"):
			h.SetMode(fs.ModeDir | fl.mode)
		case fl.link != "":
			h.SetMode(fs.ModeSymlink | 0o777)
			body = fl.link
		default:
			h.SetMode(fl.mode)
		}
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, body)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func archiveOf(t testing.TB, f Format, files ...file) []byte {
	if f == Zip {
		return zipOf(t, files...)
	}
	return tarOf(t, f, files...)
}

var allFormats = []Format{Tar, TarGz, TarBz2, TarXz, Zip}

// snapshot describes every path under dir (type, mode, content or link
// target, inode): equal snapshots mean nothing was touched.
func snapshot(t testing.TB, dir string) map[string]string {
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
		rel, _ := filepath.Rel(dir, p)
		desc := fmt.Sprintf("%v ino=%d", fi.Mode(), fi.Sys().(*syscall.Stat_t).Ino)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			desc += " -> " + target
		case fi.Mode().IsRegular():
			data, _ := os.ReadFile(p)
			desc += " " + string(data)
		}
		out[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func assertSame(t testing.TB, before, after map[string]string) {
	t.Helper()
	for p, d := range before {
		if after[p] != d {
			t.Errorf("%s changed: %q, was %q", p, after[p], d)
		}
	}
	for p, d := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s appeared: %q", p, d)
		}
	}
}

func extractInto(t testing.TB, data []byte, dest string, lim Limits) (Extracted, error) {
	t.Helper()
	f, err := Detect(bytes.NewReader(data))
	if err != nil {
		return Extracted{}, err
	}
	return ExtractInto(context.Background(), bytes.NewReader(data), f, dest, lim)
}

func TestExtractIntoEveryFormat(t *testing.T) {
	files := []file{
		{name: "app/", mode: 0o755},
		{name: "app/bin/run.sh", body: "#!/bin/sh\necho hi\n", mode: 0o755},
		{name: "app/README", body: "read me", mode: 0o644},
		{name: "app/current", link: "bin"},
		{name: "top.txt", body: "top", mode: 0o600},
	}
	for _, f := range allFormats {
		t.Run(string(f), func(t *testing.T) {
			data := archiveOf(t, f, files...)
			if got, err := Detect(bytes.NewReader(data)); err != nil || got != f {
				t.Fatalf("Detect = %q %v, want %q", got, err, f)
			}
			dest := t.TempDir()
			ex, err := ExtractInto(context.Background(), bytes.NewReader(data), f, dest, DefaultLimits())
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(ex.Top, []string{"app", "top.txt"}) || ex.Entries != len(files) || ex.Replaced != 0 {
				t.Errorf("extracted %+v", ex)
			}
			wantMode := map[string]fs.FileMode{"app/bin/run.sh": 0o755, "app/README": 0o644, "top.txt": 0o600}
			if f == Zip {
				wantMode["top.txt"] = 0o644 // zip modes are normalised
			}
			for name, mode := range wantMode {
				fi, err := os.Stat(filepath.Join(dest, name))
				if err != nil || fi.Mode().Perm() != mode {
					t.Errorf("%s: %v %v, want mode %v", name, fi.Mode(), err, mode)
				}
			}
			if data, _ := os.ReadFile(filepath.Join(dest, "app/bin/run.sh")); string(data) != "#!/bin/sh\necho hi\n" {
				t.Errorf("run.sh = %q", data)
			}
			if l, _ := os.Readlink(filepath.Join(dest, "app/current")); l != "bin" {
				t.Errorf("app/current -> %q", l)
			}
			if left, _ := filepath.Glob(filepath.Join(dest, ".opsagent-*")); len(left) > 0 {
				t.Errorf("working directories left: %v", left)
			}
		})
	}
}

// An archive is merged into a directory that already holds files, as tar
// does: its files replace theirs, its directories merge, and what it does
// not name stays.
func TestExtractIntoMerges(t *testing.T) {
	for _, f := range allFormats {
		t.Run(string(f), func(t *testing.T) {
			dest := t.TempDir()
			mustWrite(t, filepath.Join(dest, "keep.txt"), "mine")
			mustWrite(t, filepath.Join(dest, "app/conf"), "old conf")
			mustWrite(t, filepath.Join(dest, "app/local"), "local")
			if err := os.Symlink("conf", filepath.Join(dest, "app/link")); err != nil {
				t.Fatal(err)
			}
			data := archiveOf(t, f,
				file{name: "app/conf", body: "new conf", mode: 0o644},
				file{name: "app/link", body: "now a file", mode: 0o644},
				file{name: "app/sub/x", body: "x", mode: 0o644})
			ex, err := extractInto(t, data, dest, DefaultLimits())
			if err != nil {
				t.Fatal(err)
			}
			if ex.Replaced != 2 || !slices.Equal(ex.Top, []string{"app"}) {
				t.Errorf("extracted %+v, want 2 replaced and top [app]", ex)
			}
			for name, want := range map[string]string{"keep.txt": "mine", "app/conf": "new conf", "app/local": "local", "app/link": "now a file", "app/sub/x": "x"} {
				fi, err := os.Lstat(filepath.Join(dest, name))
				data, _ := os.ReadFile(filepath.Join(dest, name))
				if err != nil || !fi.Mode().IsRegular() || string(data) != want {
					t.Errorf("%s: %q %v, want the file %q", name, data, err, want)
				}
			}
			if left, _ := filepath.Glob(filepath.Join(dest, ".opsagent-*")); len(left) > 0 {
				t.Errorf("working directories left: %v", left)
			}
		})
	}
}

func mustWrite(t testing.TB, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// A path that is a directory on one side and not on the other fails the
// whole extraction before anything moves: no directory of dest is
// replaced, and nothing is written through a symlink of dest.
func TestExtractIntoConflictsChangeNothing(t *testing.T) {
	outside := t.TempDir()
	cases := map[string]struct {
		prepare func(dest string)
		files   []file
		want    string
	}{
		"archive directory over a file": {
			prepare: func(dest string) { mustWrite(t, filepath.Join(dest, "a"), "file") },
			files:   []file{{name: "ok", body: "1", mode: 0o644}, {name: "a/b", body: "2", mode: 0o644}},
			want:    "holds a file",
		},
		"archive file over a directory": {
			prepare: func(dest string) { mustWrite(t, filepath.Join(dest, "a/keep"), "k") },
			files:   []file{{name: "ok", body: "1", mode: 0o644}, {name: "a", body: "2", mode: 0o644}},
			want:    "holds a directory",
		},
		"through a symlink of dest": {
			prepare: func(dest string) {
				if err := os.Symlink(outside, filepath.Join(dest, "lib")); err != nil {
					t.Fatal(err)
				}
			},
			files: []file{{name: "ok", body: "1", mode: 0o644}, {name: "lib/evil", body: "2", mode: 0o644}},
			want:  "holds a symlink",
		},
		"reserved name": {
			prepare: func(string) {},
			files:   []file{{name: ".opsagent-backup-x/f", body: "1", mode: 0o644}},
			want:    "reserved",
		},
	}
	for name, c := range cases {
		for _, f := range []Format{TarGz, Zip} {
			t.Run(name+"/"+string(f), func(t *testing.T) {
				dest := t.TempDir()
				c.prepare(dest)
				before := snapshot(t, dest)
				_, err := extractInto(t, archiveOf(t, f, c.files...), dest, DefaultLimits())
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("err = %v, want one saying %q", err, c.want)
				}
				assertSame(t, before, snapshot(t, dest))
				if entries, _ := os.ReadDir(outside); len(entries) > 0 {
					t.Fatalf("written outside: %v", entries)
				}
			})
		}
	}
}

// Hostile archives are refused in every format, and dest is untouched.
func TestExtractIntoRefusesHostileArchives(t *testing.T) {
	lim := Limits{MaxEntries: 64, MaxFileSize: 1 << 20, MaxTotalSize: 4 << 20}
	cases := map[string][]file{
		"absolute path":          {{name: "/etc/passwd", body: "x", mode: 0o644}},
		`".." path segment`:      {{name: "a/../../escape", body: "x", mode: 0o644}},
		"leaves the destination": {{name: "link", link: "../../outside"}},
		"leaves":                 {{name: "etc", link: "/etc"}},
		"goes through the symlink": {
			{name: "in/", mode: 0o755}, {name: "up", link: "in"}, {name: "up/f", body: "x", mode: 0o644}},
	}
	for rule, files := range cases {
		for _, f := range allFormats {
			t.Run(rule+"/"+string(f), func(t *testing.T) {
				parent := t.TempDir()
				dest := filepath.Join(parent, "dest")
				mustWrite(t, filepath.Join(dest, "keep"), "k")
				before := snapshot(t, parent)
				_, err := extractInto(t, archiveOf(t, f, files...), dest, lim)
				var ae *Error
				if !errors.As(err, &ae) || !strings.Contains(err.Error(), rule) {
					t.Fatalf("err = %v, want an *Error naming %q", err, rule)
				}
				assertSame(t, before, snapshot(t, parent))
			})
		}
	}
	// Special files, and sizes over the limits.
	t.Run("device", func(t *testing.T) {
		dest := t.TempDir()
		data := tarGz(t, &tar.Header{Name: "dev", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3})
		if _, err := extractInto(t, data, dest, lim); err == nil || !strings.Contains(err.Error(), "device files are not allowed") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("zip over the file limit", func(t *testing.T) {
		dest := t.TempDir()
		data := zipOf(t, file{name: "big", body: strings.Repeat("0", 2<<20), mode: 0o644})
		if _, err := extractInto(t, data, dest, lim); err == nil || !strings.Contains(err.Error(), "per-file limit") {
			t.Fatalf("err = %v", err)
		}
		assertSame(t, map[string]string{".": snapshot(t, dest)["."]}, snapshot(t, dest))
	})
}

// A zip entry whose header understates its size (to slip past the
// limits) is refused, and nothing is extracted.
func TestExtractIntoZipSizeMustMatch(t *testing.T) {
	body := []byte(strings.Repeat("A", 1000))
	var out bytes.Buffer
	zw := zip.NewWriter(&out)
	h := &zip.FileHeader{Name: "liar", Method: zip.Store, CRC32: crc32.ChecksumIEEE(body), CompressedSize64: uint64(len(body)), UncompressedSize64: 10}
	h.SetMode(0o644)
	w, err := zw.CreateRaw(h)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(body)
	zw.Close()
	dest := t.TempDir()
	before := snapshot(t, dest)
	if _, err := extractInto(t, out.Bytes(), dest, DefaultLimits()); err == nil {
		t.Fatal("a zip entry longer than its header says was extracted")
	}
	assertSame(t, before, snapshot(t, dest))
}

// failAfter is a context whose Err starts failing after n calls: it
// stops an extraction at every point in turn.
type failAfter struct {
	context.Context
	n, calls atomic.Int64
}

func (c *failAfter) Err() error {
	if c.calls.Add(1) > c.n.Load() {
		return context.Canceled
	}
	return nil
}

func (c *failAfter) Done() <-chan struct{}       { return nil }
func (c *failAfter) Deadline() (time.Time, bool) { return time.Time{}, false }

// Interrupted anywhere, an extraction into a directory that holds files
// leaves it either as it was or fully extracted, with no working
// directory left behind.
func TestExtractIntoIsAllOrNothingAtEveryStep(t *testing.T) {
	files := []file{
		{name: "a/", mode: 0o755},
		{name: "a/one", body: "1 new", mode: 0o644},
		{name: "a/new/deep", body: "deep", mode: 0o644},
		{name: "b", body: "b new", mode: 0o644},
		{name: "c/d", body: "d", mode: 0o644},
	}
	for _, f := range []Format{TarGz, Zip} {
		t.Run(string(f), func(t *testing.T) {
			data := archiveOf(t, f, files...)
			prepare := func() string {
				dest := t.TempDir()
				mustWrite(t, filepath.Join(dest, "a/one"), "1 old")
				mustWrite(t, filepath.Join(dest, "b"), "b old")
				mustWrite(t, filepath.Join(dest, "other"), "o")
				return dest
			}
			// A complete run tells how many checks there are, and the result.
			ref := prepare()
			counter := &failAfter{Context: context.Background()}
			counter.n.Store(1 << 40)
			if _, err := ExtractInto(counter, bytes.NewReader(data), f, ref, DefaultLimits()); err != nil {
				t.Fatal(err)
			}
			done := contents(t, ref)
			total := counter.calls.Load()
			completed := 0
			for n := int64(0); n <= total; n++ {
				dest := prepare()
				before := contents(t, dest)
				ctx := &failAfter{Context: context.Background()}
				ctx.n.Store(n)
				_, err := ExtractInto(ctx, bytes.NewReader(data), f, dest, DefaultLimits())
				after := contents(t, dest)
				switch {
				case err == nil:
					completed++
					if !mapsEqual(after, done) {
						t.Fatalf("stopped after %d checks: succeeded with %v, want %v", n, after, done)
					}
				case !mapsEqual(after, before):
					t.Fatalf("stopped after %d checks (%v): dest is %v, was %v", n, err, after, before)
				}
			}
			t.Logf("%d interruption points", total+1)
			if completed != 1 {
				t.Errorf("%d of %d interruptions completed, want only the last", completed, total+1)
			}
		})
	}
}

// contents maps each path under dir to its content ("dir" for a
// directory), working directories included so that a leftover shows.
func contents(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			out[rel] = "dir"
			return nil
		}
		data, _ := os.ReadFile(p)
		out[rel] = string(data)
		return nil
	})
	return out
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestDetectRefusesOtherFiles(t *testing.T) {
	for name, data := range map[string][]byte{"empty": nil, "text": []byte("hello, this is not an archive"), "7z": []byte("7z\xbc\xaf\x27\x1c\x00\x04")} {
		if f, err := Detect(bytes.NewReader(data)); err == nil {
			t.Errorf("%s detected as %q", name, f)
		}
	}
}
