package archive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func link(name, target string) *tar.Header {
	return &tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target}
}

func dir(name string) *tar.Header {
	return &tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755}
}

// linkChains are archives whose every link passes a textual check on its
// own, but where following the links already made leads outside. bad is
// the entry that must be refused and never created.
var linkChains = []struct {
	shape string
	bad   string
	hdrs  func() []*tar.Header
}{
	{"link to a link that climbs with ..", "a/b/l", func() []*tar.Header {
		// a/b/c leads to the root; a/b/l = a/b/c/.. is then above it.
		return []*tar.Header{link("a/b/c", "../.."), link("a/b/l", "c/..")}
	}},
	{"link through a linked directory", "d", func() []*tar.Header {
		return []*tar.Header{link("sub", "."), link("d", "sub/..")}
	}},
	{"absolute target", "abs", func() []*tar.Header {
		return []*tar.Header{reg("ok"), link("abs", "/")}
	}},
	{"textually fine target through an earlier link", "esc", func() []*tar.Header {
		return []*tar.Header{link("deep/er/up", "../.."), link("esc", "deep/er/up/../x")}
	}},
	{"dangling link later filled by a link", "a/b/l", func() []*tar.Header {
		// x is dangling and harmless until a/b/l makes it climb out.
		return []*tar.Header{link("x", "a/b/l/.."), link("a/b/l", "../..")}
	}},
	{"link placed through a linked directory", "a/b/d/l", func() []*tar.Header {
		// a/b/d/l really lives at the root, where ../../x is outside.
		return []*tar.Header{link("a/b/d", "../.."), link("a/b/d/l", "../../x")}
	}},
	{"file written through an archive link", "up/f", func() []*tar.Header {
		return []*tar.Header{dir("in"), link("up", "in"), reg("up/f")}
	}},
	{"link cycle", "b", func() []*tar.Header {
		return []*tar.Header{link("a", "b"), link("b", "a")}
	}},
	{"link replacing an earlier link", "l", func() []*tar.Header {
		return []*tar.Header{link("l", "in"), link("l", "../x")}
	}},
}

func TestSymlinkChainsAreRefused(t *testing.T) {
	for _, c := range linkChains {
		t.Run(c.shape, func(t *testing.T) {
			hdrs := c.hdrs()
			data := tarGz(t, hdrs...)
			// The refused entry, always the last, never reaches the code
			// that creates it; all before it do.
			var made, want []string
			for _, h := range hdrs[:len(hdrs)-1] {
				want = append(want, cleanName(h.Name))
			}
			err := walk(context.Background(), bytes.NewReader(data), DefaultLimits(), func(name string, _ *tar.Header, _ io.Reader) error {
				made = append(made, name)
				return nil
			})
			var ae *Error
			if !errors.As(err, &ae) || ae.Entry != c.bad {
				t.Fatalf("err = %v, want an *Error naming %q", err, c.bad)
			}
			if !slices.Equal(made, want) {
				t.Fatalf("handed over for creation: %q, want %q", made, want)
			}
			parent, dest, before := emptyDest(t)
			if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err == nil {
				t.Fatal("Extract succeeded")
			}
			assertUntouched(t, parent, dest, before)
		})
	}
}

// Links that stay inside, however they get there, still extract.
func TestInsideLinkChainsExtract(t *testing.T) {
	data := tarGz(t,
		reg("bin/real"),
		link("bin/alias", "real"),
		dir("sub/deeper"),
		link("d", "sub/deeper"),
		link("e", "d/../x"),      // d/.. is sub: e -> sub/x, dangling but inside
		link("f", "d/../../bin"), // sub/deeper/../.. is the root
		link("here", "."),
		link("chain", "bin/alias"),
		link("sub/deeper/up", "../../bin/real"),
	)
	parent := t.TempDir()
	dest := filepath.Join(parent, "dest")
	if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err != nil {
		t.Fatal(err)
	}
	assertLinksInside(t, dest)
	assertNothingOutside(t, parent, true)
	got, err := os.ReadFile(filepath.Join(dest, "chain"))
	if err != nil || string(got) != strings.Repeat("x", len("bin/real")) {
		t.Fatalf("chain reads %q, %v", got, err)
	}
	if st, _ := os.Stat(dest); st.Mode().Perm() != 0o755 {
		t.Errorf("new dest has mode %v, want 0755", st.Mode().Perm())
	}
}

// An archive refused after some good entries leaves dest exactly as it
// was and no temporary directory behind, whether dest was absent or an
// empty directory, and whether the fault is a rule or a failed write.
func TestExtractIsAllOrNothing(t *testing.T) {
	long := strings.Repeat("n", 300) // over NAME_MAX: the write fails
	bad := map[string][]byte{
		"escaping link": tarGz(t, reg("VERSION"), dir("docs"), reg("docs/a"), link("docs/l", "../../x")),
		"dotdot":        tarGz(t, reg("VERSION"), reg("docs/a"), reg("docs/../../x")),
		"failed write":  tarGz(t, reg("VERSION"), reg("docs/a"), reg(long)),
		"corrupt gzip":  truncated(t, tarGz(t, reg("VERSION"), reg("docs/a"))),
	}
	for name, data := range bad {
		t.Run(name+"/empty dest", func(t *testing.T) {
			parent, dest, before := emptyDest(t)
			if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err == nil {
				t.Fatal("Extract succeeded")
			}
			assertUntouched(t, parent, dest, before)
		})
		t.Run(name+"/absent dest", func(t *testing.T) {
			parent := t.TempDir()
			dest := filepath.Join(parent, "dest")
			if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err == nil {
				t.Fatal("Extract succeeded")
			}
			assertUntouched(t, parent, dest, nil)
		})
	}
}

// truncated cuts the last 8 bytes (the gzip trailer) off data.
func truncated(t testing.TB, data []byte) []byte {
	t.Helper()
	return data[:len(data)-8]
}

// What Extract requires of dest: absent or an empty directory, which is
// replaced keeping its mode; anything else is refused, untouched, with an
// error that says what to pass instead.
func TestExtractDestination(t *testing.T) {
	data := tarGz(t, reg("VERSION"))
	t.Run("empty directory is replaced", func(t *testing.T) {
		parent, dest, _ := emptyDest(t)
		if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(dest)
		if err != nil || st.Mode().Perm() != 0o750 {
			t.Fatalf("dest %v %v, want mode 0750 kept", st, err)
		}
		if _, err := os.Stat(filepath.Join(dest, "VERSION")); err != nil {
			t.Fatal(err)
		}
		assertNothingOutside(t, parent, true)
	})
	refused := map[string]func(t *testing.T, dest string){
		"not empty": func(t *testing.T, dest string) {
			os.Mkdir(dest, 0o755)
			os.WriteFile(filepath.Join(dest, "keep"), []byte("mine"), 0o644)
		},
		"not a directory": func(t *testing.T, dest string) { os.WriteFile(dest, []byte("mine"), 0o644) },
		"is a symlink": func(t *testing.T, dest string) {
			os.Mkdir(dest+"-real", 0o755)
			os.Symlink(dest+"-real", dest)
		},
	}
	for want, setup := range refused {
		t.Run(want, func(t *testing.T) {
			parent := t.TempDir()
			dest := filepath.Join(parent, "dest")
			setup(t, dest)
			before := listTree(t, parent)
			err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits())
			if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), dest) {
				t.Fatalf("err = %v, want one naming %s and %q", err, dest, want)
			}
			if after := listTree(t, parent); !slices.Equal(before, after) {
				t.Fatalf("parent changed: %v, was %v", after, before)
			}
		})
	}
	t.Run("missing parent", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "no", "dest")
		err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits())
		if err == nil || !strings.Contains(err.Error(), "parent must exist") {
			t.Fatalf("err = %v", err)
		}
	})
}

// listTree lists every path under root with its mode, without following
// links.
func listTree(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err == nil {
			out = append(out, p+" "+info.Mode().String())
		}
		return err
	})
	return out
}

// zeroBomb streams size bytes of zeros through gzip into a pipe, optionally
// after a small valid tar stream, and reports how many zeros it managed to
// write before the reader gave up.
func zeroBomb(t *testing.T, prefix []byte, size int64) (io.Reader, func() int64) {
	t.Helper()
	pr, pw := io.Pipe()
	written := make(chan int64, 1)
	go func() {
		zw, _ := gzip.NewWriterLevel(pw, gzip.BestCompression)
		var n int64
		_, err := zw.Write(prefix)
		chunk := make([]byte, 1<<20)
		for err == nil && n < size {
			var k int
			k, err = zw.Write(chunk)
			n += int64(k)
		}
		if err == nil {
			err = zw.Close()
		}
		pw.CloseWithError(err)
		written <- n
	}()
	t.Cleanup(func() { pr.Close() })
	return pr, func() int64 {
		pr.CloseWithError(errors.New("reader done"))
		return <-written
	}
}

// A gzip stream that expands past the limits is refused after reading
// little more than the limit allows: as zeros that read as an empty tar,
// and as zeros after a valid tar's end marker.
func TestGzipBombFailsFast(t *testing.T) {
	const bombSize = 512 << 20
	lim := Limits{MaxEntries: 8, MaxFileSize: 1 << 20, MaxTotalSize: 1 << 20}
	prefixes := map[string][]byte{
		"bare zeros":        nil,
		"zeros after a tar": tarOnly(t, reg("VERSION")),
	}
	for name, prefix := range prefixes {
		for _, fn := range []string{"Extract", "ExtractFile"} {
			t.Run(name+"/"+fn, func(t *testing.T) {
				t.Parallel()
				r, stop := zeroBomb(t, prefix, bombSize)
				parent, dest, before := emptyDest(t)
				var err error
				if fn == "Extract" {
					err = Extract(context.Background(), r, dest, lim)
				} else {
					err = ExtractFile(context.Background(), r, "VERSION", io.Discard, lim)
				}
				written := stop()
				var ae *Error
				if !errors.As(err, &ae) || !strings.Contains(err.Error(), "Limits.MaxTotalSize") || !strings.Contains(err.Error(), "decompression bomb") {
					t.Fatalf("err = %v, want an *Error naming Limits.MaxTotalSize", err)
				}
				// Fail fast: the gzip reader's read-ahead aside, no more
				// than the limits were decompressed.
				if written > 32<<20 {
					t.Errorf("read %d MiB of the bomb before refusing it", written>>20)
				}
				assertUntouched(t, parent, dest, before)
			})
		}
	}
}

// A stream that is cut, padded with garbage, or missing the tar end marker
// is refused, by Extract and by ExtractFile, even though every entry in it
// is fine; zero padding after the end marker (as GNU tar writes) is not.
func TestCorruptStreams(t *testing.T) {
	for name, data := range corruptStreams(t) {
		t.Run(name, func(t *testing.T) {
			parent, dest, before := emptyDest(t)
			if err := Extract(context.Background(), bytes.NewReader(data), dest, DefaultLimits()); err == nil || !strings.HasPrefix(err.Error(), "archive") {
				t.Fatalf("Extract: err = %v", err)
			}
			assertUntouched(t, parent, dest, before)
			var out bytes.Buffer
			if err := ExtractFile(context.Background(), bytes.NewReader(data), "VERSION", &out, DefaultLimits()); err == nil {
				t.Fatal("ExtractFile succeeded")
			}
		})
	}
	raw := tarOnly(t, reg("VERSION"))
	padded := gzipOf(t, append(raw, make([]byte, 9*512)...))
	if err := Extract(context.Background(), bytes.NewReader(padded), filepath.Join(t.TempDir(), "d"), DefaultLimits()); err != nil {
		t.Fatalf("zero padding after the end marker: %v", err)
	}
}

// corruptStreams are archives whose entries are all fine but whose gzip or
// tar stream is cut, padded with garbage, or missing its end.
func corruptStreams(t testing.TB) map[string][]byte {
	good := tarGz(t, reg("VERSION"), reg("opsagent-linux-amd64"))
	raw := tarOnly(t, reg("VERSION"))
	return map[string][]byte{
		"truncated trailer":         good[:len(good)-1],
		"no trailer":                good[:len(good)-8],
		"cut in the middle":         good[:len(good)/2],
		"trailing garbage":          append(slices.Clone(good), "garbage"...),
		"one trailing byte":         append(slices.Clone(good), 0),
		"second member with data":   append(slices.Clone(good), gzipOf(t, []byte("hidden"))...),
		"bad checksum":              flipCRC(good),
		"tar without end marker":    gzipOf(t, raw[:len(raw)-1024]),
		"tar with one zero block":   gzipOf(t, raw[:len(raw)-512]),
		"data after the end marker": gzipOf(t, append(slices.Clone(raw), tarOnly(t, reg("hidden"))...)),
	}
}

// flipCRC corrupts the gzip trailer's CRC-32.
func flipCRC(data []byte) []byte {
	out := slices.Clone(data)
	out[len(out)-8] ^= 0xff
	return out
}

func TestExtractFileRules(t *testing.T) {
	ctx := context.Background()
	archive := tarGz(t, reg("VERSION"), dir("docs"), link("opsagent-linux-amd64", "VERSION"),
		&tar.Header{Name: "big", Typeflag: tar.TypeReg, Mode: 0o644, Size: 2048})
	small := Limits{MaxFileSize: 1024}
	refused := map[string]string{ // name -> what the error says
		"opsagent-linux-amd64": "symlink",
		"docs":                 "directory",
		"docs/":                "directory",
	}
	for name, want := range refused {
		var ae *Error
		err := ExtractFile(ctx, bytes.NewReader(archive), name, io.Discard, DefaultLimits())
		if !errors.As(err, &ae) || ae.Entry != cleanName(name) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want an *Error naming the entry and %q", name, err, want)
		}
	}
	// The same limits as Extract: big is over the per-file limit, whichever
	// file is asked for.
	for _, name := range []string{"big", "VERSION"} {
		if err := ExtractFile(ctx, bytes.NewReader(archive), name, io.Discard, small); err == nil || !strings.Contains(err.Error(), "per-file limit") {
			t.Errorf("%s with MaxFileSize 1024: err = %v", name, err)
		}
	}
	if err := ExtractFile(ctx, bytes.NewReader(archive), "missing", io.Discard, Limits{}); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"missing"`) {
		t.Errorf("missing: err = %v, want ErrNotFound naming it", err)
	}
	if err := ExtractFile(ctx, bytes.NewReader(archive), "../VERSION", io.Discard, Limits{}); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("../VERSION: err = %v, want a refusal of the name", err)
	}
	// A hostile entry after the wanted file still fails the call.
	late := tarGz(t, reg("VERSION"), link("l", "../../x"))
	var out bytes.Buffer
	if err := ExtractFile(ctx, bytes.NewReader(late), "VERSION", &out, Limits{}); err == nil {
		t.Error("a hostile entry after the wanted file went unnoticed")
	}
}

// Setting one limit leaves the others at their defaults rather than zero.
func TestPartialLimits(t *testing.T) {
	data := tarGz(t, reg("a"), reg("b"))
	if err := Extract(context.Background(), bytes.NewReader(data), filepath.Join(t.TempDir(), "d"), Limits{MaxEntries: 2}); err != nil {
		t.Fatal(err)
	}
	err := Extract(context.Background(), bytes.NewReader(data), filepath.Join(t.TempDir(), "d"), Limits{MaxEntries: 1})
	if err == nil || !strings.Contains(err.Error(), "Limits.MaxEntries") {
		t.Fatalf("err = %v", err)
	}
}

func TestCanceledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	parent, dest, before := emptyDest(t)
	err := Extract(ctx, bytes.NewReader(tarGz(t, reg("a"))), dest, DefaultLimits())
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	assertUntouched(t, parent, dest, before)
}

// Checking links costs bounded work: a long chain, a tangle of long
// dangling targets and an over-long name are refused rather than
// resolved at length.
func TestLinkChecksAreBounded(t *testing.T) {
	chain := []*tar.Header{reg("f")}
	for i := maxLinkHops; i >= 0; i-- { // l00 -> l01 -> ... -> l40 -> f
		next := "f"
		if i < maxLinkHops {
			next = fmt.Sprintf("l%02d", i+1)
		}
		chain = append(chain, link(fmt.Sprintf("l%02d", i), next))
	}
	long := strings.Repeat("a/", maxPathLen/2-len("nowhere/"))
	var tangle []*tar.Header
	for i := range 60 {
		tangle = append(tangle, link(fmt.Sprintf("t%02d", i), "nowhere/"+long))
	}
	cases := map[string]struct {
		data []byte
		want string
	}{
		"41 links in a row":    {tarGz(t, chain...), "more than 40 symlinks"},
		"tangle of long links": {tarGz(t, tangle...), "too tangled"},
		"long name":            {tarGz(t, reg(strings.Repeat("n/", 2048)+"f")), "longer than 4095 bytes"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := Extract(context.Background(), bytes.NewReader(c.data), filepath.Join(t.TempDir(), "d"), Limits{MaxEntries: 100})
			var ae *Error
			if !errors.As(err, &ae) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want an *Error saying %q", err, c.want)
			}
		})
	}
}

// repeat serves data over and over up to size bytes, counting what it
// served.
type repeat struct {
	data      []byte
	size, off int64
}

func (r *repeat) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && r.off < r.size {
		k := copy(p[n:], r.data[r.off%int64(len(r.data)):])
		n += k
		r.off += int64(k)
	}
	return n, nil
}

// Empty gzip members decompress to nothing, so only the compressed side's
// cap stops a long run of them: it is refused after little more than the
// limits allow, not read to its end.
func TestEmptyGzipMembersAreBounded(t *testing.T) {
	lim := Limits{MaxEntries: 8, MaxTotalSize: 1 << 20}
	member := gzipOf(t, nil)
	for name, prefix := range map[string][]byte{"alone": nil, "after an archive": tarGz(t, reg("VERSION"))} {
		t.Run(name, func(t *testing.T) {
			r := &repeat{data: member, size: 256 << 20}
			in := io.MultiReader(bytes.NewReader(prefix), r)
			err := Extract(context.Background(), in, filepath.Join(t.TempDir(), "d"), lim)
			var ae *Error
			if !errors.As(err, &ae) || !strings.Contains(err.Error(), "compressed stream") || !strings.Contains(err.Error(), "Limits.MaxTotalSize") {
				t.Fatalf("err = %v, want an *Error naming the compressed stream and Limits.MaxTotalSize", err)
			}
			if r.off > 4*lim.inputCap() {
				t.Errorf("read %d bytes of empty members, cap %d", r.off, lim.inputCap())
			}
		})
	}
}

// failing is a reader that breaks after its data, as a network might.
type failing struct{ r io.Reader }

func (f failing) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		return n, errors.New("connection reset")
	}
	return n, err
}

// A failing reader is reported as such, not as a corrupt archive.
func TestReaderErrorIsReported(t *testing.T) {
	data := tarGz(t, reg("VERSION"))
	parent, dest, before := emptyDest(t)
	err := Extract(context.Background(), failing{bytes.NewReader(data[:len(data)/2])}, dest, DefaultLimits())
	if err == nil || !strings.Contains(err.Error(), "reading the archive: connection reset") {
		t.Fatalf("err = %v", err)
	}
	assertUntouched(t, parent, dest, before)
}

// Huge limits saturate instead of overflowing into a negative cap.
func TestHugeLimitsSaturate(t *testing.T) {
	for _, lim := range []Limits{
		{MaxEntries: math.MaxInt, MaxFileSize: math.MaxInt64, MaxTotalSize: math.MaxInt64},
		{MaxEntries: math.MaxInt, MaxTotalSize: 1},
		{MaxEntries: 1, MaxTotalSize: math.MaxInt64 - 1},
	} {
		if s, in := lim.streamCap(), lim.inputCap(); s < lim.MaxTotalSize || in < s {
			t.Errorf("%+v: stream cap %d, input cap %d", lim, s, in)
		}
	}
	data := tarGz(t, reg("a"))
	if err := Extract(context.Background(), bytes.NewReader(data), filepath.Join(t.TempDir(), "d"), Limits{MaxEntries: math.MaxInt, MaxFileSize: math.MaxInt64, MaxTotalSize: math.MaxInt64}); err != nil {
		t.Fatal(err)
	}
}

// ExtractFiles takes several files in one pass and stops reading once it
// has them: what follows the last one wanted (here a hostile entry, then
// garbage where the gzip trailer belongs) is never read, while entries
// before it are checked as ever.
func TestExtractFilesStopsAtTheLastWanted(t *testing.T) {
	ctx := context.Background()
	entries := []Entry{{Name: "VERSION", Mode: 0o644, Data: []byte("2.0.0\n")}, {Name: "bin-a", Mode: 0o755, Data: []byte("binary a")}}
	var good bytes.Buffer
	if err := Create(ctx, &good, entries, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	// The same archive with a third, incompressible file, cut in the
	// middle of it: no end marker, no gzip trailer.
	noise := make([]byte, 1<<20)
	_, _ = rand.NewChaCha8([32]byte{}).Read(noise)
	var tail bytes.Buffer
	if err := Create(ctx, &tail, append(entries, Entry{Name: "bin-b", Mode: 0o755, Data: noise}), time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	cut := tail.Bytes()[:len(tail.Bytes())/2]
	var version, bin bytes.Buffer
	if err := ExtractFiles(ctx, bytes.NewReader(cut), map[string]io.Writer{"VERSION": &version, "bin-a": &bin}, Limits{}); err != nil {
		t.Fatalf("ExtractFiles: %v", err)
	}
	if version.String() != "2.0.0\n" || bin.String() != "binary a" {
		t.Errorf("got VERSION %q, bin-a %q", version.String(), bin.String())
	}
	if err := ExtractFile(ctx, bytes.NewReader(cut), "bin-a", io.Discard, Limits{}); err == nil {
		t.Error("ExtractFile read past bin-a and still accepted the cut archive")
	}
	// Missing names are listed; an entry of another kind is refused by name.
	err := ExtractFiles(ctx, bytes.NewReader(good.Bytes()), map[string]io.Writer{"VERSION": io.Discard, "bin-c": io.Discard, "bin-d": io.Discard}, Limits{})
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `["bin-c" "bin-d"]`) {
		t.Errorf("missing: err = %v, want ErrNotFound naming bin-c and bin-d", err)
	}
	linked := tarGz(t, reg("VERSION"), link("bin-a", "VERSION"))
	var ae *Error
	if err := ExtractFiles(ctx, bytes.NewReader(linked), map[string]io.Writer{"bin-a": io.Discard}, Limits{}); !errors.As(err, &ae) || ae.Entry != "bin-a" {
		t.Errorf("a symlink asked for: err = %v, want an *Error naming it", err)
	}
	hostileFirst := tarGz(t, link("l", "../../x"), reg("VERSION"))
	if err := ExtractFiles(ctx, bytes.NewReader(hostileFirst), map[string]io.Writer{"VERSION": io.Discard}, Limits{}); err == nil {
		t.Error("a hostile entry before the wanted file went unnoticed")
	}
}
