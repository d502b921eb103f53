package archive

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// fuzzLimits are small, so that each run stays fast.
var fuzzLimits = Limits{MaxEntries: 16, MaxFileSize: 1 << 16, MaxTotalSize: 1 << 18}

// FuzzExtract checks the invariant: whatever the bytes, after Extract
// nothing exists beside dest; on failure dest is the same empty directory
// as before; on success every link in it, resolved on disk, stays inside.
// ExtractFile, which applies the same rules without writing, must not
// refuse an archive that Extract accepted.
//
// An input that does not start with the gzip magic is taken as a raw tar
// stream and gzipped first: mutated deflate data rarely decompresses, so
// this is what lets the fuzzer reach the tar, name and link rules. The
// seeds under testdata/fuzz/FuzzExtract hold one archive per hostile shape
// (see TestSeedCorpus).
func FuzzExtract(f *testing.F) {
	for _, data := range hostile(f) {
		f.Add(data)
	}
	for _, c := range linkChains {
		f.Add(tarGz(f, c.hdrs()...))
		f.Add(tarOnly(f, c.hdrs()...))
	}
	var good bytes.Buffer
	Create(context.Background(), &good, []Entry{{Name: "a/b", Mode: 0o644, Data: []byte("x")}}, epoch)
	f.Add(good.Bytes())
	for _, data := range corruptStreams(f) {
		f.Add(data)
	}
	f.Add(gzipOf(f, make([]byte, 2<<20))) // a small bomb: over fuzzLimits' stream cap
	f.Add(tarOnly(f, reg("bin/real"), link("bin/alias", "real"), reg("bin/alias")))
	f.Add(tarOnly(f, reg("bin/real"), link("bin/alias", "real"), dir("sub/deeper"), link("d", "sub/deeper"), link("e", "d/../x")))
	f.Fuzz(func(t *testing.T, data []byte) {
		data = fuzzInput(t, data)
		parent, dest, before := emptyDest(t)
		err := Extract(context.Background(), bytes.NewReader(data), dest, fuzzLimits)
		if err != nil {
			assertUntouched(t, parent, dest, before)
			return
		}
		assertNothingOutside(t, parent, true)
		assertLinksInside(t, dest)
		fileErr := ExtractFile(context.Background(), bytes.NewReader(data), "no-such-entry", io.Discard, fuzzLimits)
		if !errors.Is(fileErr, ErrNotFound) {
			t.Fatalf("Extract accepted the archive, ExtractFile said %v", fileErr)
		}
	})
}

// fuzzInput gzips data unless it already starts with the gzip magic.
func fuzzInput(t testing.TB, data []byte) []byte {
	if bytes.HasPrefix(data, []byte{0x1f, 0x8b}) {
		return data
	}
	return gzipOf(t, data)
}

// Every seed file named refuse-* is refused and every accept-* accepted,
// so that the corpus keeps exercising the shapes it is named after. Files
// the fuzzer added (named by their hash) carry no such claim: FuzzExtract
// replays them against its invariant.
func TestSeedCorpus(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzExtract", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no seed corpus: %v", err)
	}
	for _, file := range files {
		name := filepath.Base(file)
		t.Run(name, func(t *testing.T) {
			data := fuzzInput(t, readSeed(t, file))
			parent, dest, before := emptyDest(t)
			err := Extract(context.Background(), bytes.NewReader(data), dest, fuzzLimits)
			switch {
			case strings.HasPrefix(name, "refuse-"):
				if err == nil {
					t.Fatal("Extract accepted a hostile seed")
				}
				assertUntouched(t, parent, dest, before)
			case strings.HasPrefix(name, "accept-"):
				if err != nil {
					t.Fatal(err)
				}
				assertLinksInside(t, dest)
			case fuzzerNamed(name):
				t.Skip("found by the fuzzer: FuzzExtract replays it against its invariant")
			default:
				t.Fatalf("seed %s is named neither refuse-* nor accept-* (nor by the fuzzer's hash)", name)
			}
		})
	}
}

// fuzzerNamed reports whether name is a corpus file name the fuzzer chose:
// sixteen hexadecimal digits.
func fuzzerNamed(name string) bool {
	if len(name) != 16 {
		return false
	}
	_, err := strconv.ParseUint(name, 16, 64)
	return err == nil
}

// readSeed decodes a one-value "go test fuzz v1" corpus file.
func readSeed(t *testing.T, file string) []byte {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	header, body, ok := bytes.Cut(raw, []byte("\n"))
	if !ok || string(header) != "go test fuzz v1" {
		t.Fatalf("%s: not a go test fuzz v1 file", file)
	}
	body = bytes.TrimSpace(body)
	if !bytes.HasPrefix(body, []byte("[]byte(")) || !bytes.HasSuffix(body, []byte(")")) {
		t.Fatalf("%s: want one []byte value", file)
	}
	s, err := strconv.Unquote(string(body[len("[]byte(") : len(body)-1]))
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return []byte(s)
}
