package archive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var epoch = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestCreateIsReproducibleAndExtracts(t *testing.T) {
	entries := []Entry{
		{Name: "VERSION", Mode: 0o644, Data: []byte("2.1\n")},
		{Name: "opsagent-linux-amd64", Mode: 0o755, Data: bytes.Repeat([]byte{0x7f, 'E', 'L', 'F'}, 1000)},
		{Name: "docs", Mode: fs.ModeDir | 0o755},
		{Name: "docs/userdata.sh", Mode: 0o755, Data: []byte("#!/bin/bash\n")},
	}
	var a, b bytes.Buffer
	if err := Create(context.Background(), &a, entries, epoch); err != nil {
		t.Fatal(err)
	}
	// Same entries in another order, later: the same bytes.
	rev := []Entry{entries[3], entries[1], entries[0], entries[2]}
	if err := Create(context.Background(), &b, rev, epoch.Add(500*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(a.Bytes()) != sha256.Sum256(b.Bytes()) {
		t.Fatal("two builds of the same entries differ")
	}
	// Headers: sorted, fixed mtime, owner 0/0 without names.
	gz, _ := gzip.NewReader(bytes.NewReader(a.Bytes()))
	tr := tar.NewReader(gz)
	var names []string
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
		if !h.ModTime.Equal(epoch) || h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: header %+v", h.Name, h)
		}
	}
	if strings.Join(names, ",") != "VERSION,docs,docs/userdata.sh,opsagent-linux-amd64" {
		t.Errorf("entries %v", names)
	}
	dest := t.TempDir()
	if err := Extract(context.Background(), bytes.NewReader(a.Bytes()), dest, DefaultLimits()); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dest, "opsagent-linux-amd64"))
	if err != nil || st.Mode().Perm() != 0o755 || st.Size() != 4000 {
		t.Errorf("binary %v %v", st, err)
	}
	var out bytes.Buffer
	if err := ExtractFile(context.Background(), bytes.NewReader(a.Bytes()), "VERSION", &out, Limits{}); err != nil || out.String() != "2.1\n" {
		t.Errorf("ExtractFile: %q %v", out.String(), err)
	}
	if err := ExtractFile(context.Background(), bytes.NewReader(a.Bytes()), "missing", &out, Limits{}); err == nil {
		t.Error("ExtractFile of a missing name succeeded")
	}
	for _, bad := range []string{"../x", "", ".", "./", "./.", `.\`} {
		if err := Create(context.Background(), &a, []Entry{{Name: bad}}, epoch); err == nil {
			t.Errorf("Create accepted %q", bad)
		}
	}
}

// tarGz builds an archive from raw headers, hostile ones included.
func tarGz(t testing.TB, hdrs ...*tar.Header) []byte {
	t.Helper()
	return gzipOf(t, tarOnly(t, hdrs...))
}

// tarOnly is the uncompressed tar stream of hdrs. A regular file without
// a size gets its name's length of "x"s as body.
func tarOnly(t testing.TB, hdrs ...*tar.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range hdrs {
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(h.Name))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write(bytes.Repeat([]byte("x"), int(h.Size)))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// gzipOf compresses raw in one gzip member.
func gzipOf(t testing.TB, raw []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(raw); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func reg(name string) *tar.Header { return &tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644} }

func hostile(t testing.TB) map[string][]byte {
	many := make([]*tar.Header, 70)
	for i := range many {
		many[i] = reg("f" + string(rune('a'+i%26)) + string(rune('a'+i/26)))
	}
	return map[string][]byte{
		"absolute path":     tarGz(t, reg("/etc/passwd")),
		`".." path segment`: tarGz(t, reg("a/../../escape")),
		"leaves the destination": tarGz(t,
			&tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "../../outside"}),
		"absolute path \"/etc\" leaves": tarGz(t,
			&tar.Header{Name: "etc", Typeflag: tar.TypeSymlink, Linkname: "/etc"}),
		"hard links are not allowed":   tarGz(t, reg("a"), &tar.Header{Name: "b", Typeflag: tar.TypeLink, Linkname: "a"}),
		"device files are not allowed": tarGz(t, &tar.Header{Name: "dev", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}),
		"fifos are not allowed":        tarGz(t, &tar.Header{Name: "pipe", Typeflag: tar.TypeFifo}),
		"empty name":                   tarGz(t, reg("./.")),
		"more than 64 entries":         tarGz(t, many...),
		"per-file limit":               tarGz(t, &tar.Header{Name: "big", Typeflag: tar.TypeReg, Mode: 0o644, Size: 2 << 20}),
	}
}

func TestExtractRefusesHostileArchives(t *testing.T) {
	lim := Limits{MaxEntries: 64, MaxFileSize: 1 << 20, MaxTotalSize: 4 << 20}
	for rule, data := range hostile(t) {
		t.Run(rule, func(t *testing.T) {
			parent, dest, before := emptyDest(t)
			err := Extract(context.Background(), bytes.NewReader(data), dest, lim)
			var ae *Error
			if !errors.As(err, &ae) || !strings.Contains(err.Error(), rule) {
				t.Fatalf("err = %v, want an *Error naming %q", err, rule)
			}
			if ae.Entry == "" {
				t.Error("error does not name the entry")
			}
			assertUntouched(t, parent, dest, before)
			// ExtractFile reads every entry and so refuses the same archives.
			if err := ExtractFile(context.Background(), bytes.NewReader(data), "VERSION", io.Discard, lim); !errors.As(err, &ae) {
				t.Errorf("ExtractFile: err = %v, want an *Error", err)
			}
		})
	}
}

func TestTotalLimit(t *testing.T) {
	data := tarGz(t, &tar.Header{Name: "a", Typeflag: tar.TypeReg, Mode: 0o644, Size: 600},
		&tar.Header{Name: "b", Typeflag: tar.TypeReg, Mode: 0o644, Size: 600})
	err := Extract(context.Background(), bytes.NewReader(data), t.TempDir(), Limits{MaxEntries: 10, MaxFileSize: 1000, MaxTotalSize: 1000})
	if err == nil || !strings.Contains(err.Error(), `"b"`) || !strings.Contains(err.Error(), "total limit") {
		t.Fatalf("err = %v", err)
	}
}

// A destination that already holds something, even a planted symlink, is
// refused before any work, so nothing can be redirected through it.
func TestExistingSymlinkCannotRedirectWrites(t *testing.T) {
	parent := t.TempDir()
	dest := filepath.Join(parent, "dest")
	outside := filepath.Join(parent, "outside")
	os.Mkdir(dest, 0o755)
	os.Mkdir(outside, 0o755)
	if err := os.Symlink(outside, filepath.Join(dest, "sub")); err != nil {
		t.Fatal(err)
	}
	err := Extract(context.Background(), bytes.NewReader(tarGz(t, reg("sub/pwned"))), dest, DefaultLimits())
	if err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("err = %v, want a refusal of the non-empty destination", err)
	}
	if _, err := os.Stat(filepath.Join(outside, "pwned")); err == nil {
		t.Fatal("file written outside the destination")
	}
}

func TestInsideSymlinkAllowed(t *testing.T) {
	dest := t.TempDir()
	data := tarGz(t, reg("bin/real"), &tar.Header{Name: "bin/alias", Typeflag: tar.TypeSymlink, Linkname: "real"})
	if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.Readlink(filepath.Join(dest, "bin/alias")); got != "real" {
		t.Errorf("link -> %q", got)
	}
}

func TestNotAnArchive(t *testing.T) {
	err := Extract(context.Background(), strings.NewReader("this is not gzip"), t.TempDir(), DefaultLimits())
	if err == nil || !strings.Contains(err.Error(), "archive") {
		t.Fatalf("err = %v", err)
	}
}
