// Package archive creates reproducible .tar.gz files and extracts untrusted
// ones safely, on mholt/archives.
//
// Extraction refuses absolute paths, ".." segments, hard links, device and
// fifo entries, duplicate entries, entries whose path goes through a symlink,
// and any symlink whose target, resolved through the links the archive has
// already made, leaves the destination. It caps the entry count, each file's
// size, the total, and the decompressed stream itself (so a gzip bomb fails
// fast), and requires a complete tar stream and an intact gzip stream with
// nothing after it. Extract works in a temporary sibling directory that is
// renamed into place only on success, and writes through an os.Root as a
// second line of defence.
package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"path"
	"sort"
	"strings"
	"time"

	"archive/tar"

	"github.com/mholt/archives"
)

// Entry is one file to put in an archive.
type Entry struct {
	Name string      // slash-separated path inside the archive
	Mode fs.FileMode // permission bits (0755, 0644); fs.ModeDir for directories
	Data []byte
}

// Create writes a gzip-compressed tar of entries to w. Entries are sorted
// by name, every mtime is mtime, owners are 0/0 with no names, and the
// gzip header carries no name or time: the same inputs always give the
// same bytes.
func Create(ctx context.Context, w io.Writer, entries []Entry, mtime time.Time) error {
	sorted := append([]Entry(nil), entries...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	files := make([]archives.FileInfo, 0, len(sorted))
	for _, e := range sorted {
		if err := checkName(e.Name); err != nil {
			return fmt.Errorf("archive: entry %q: %w", e.Name, err)
		}
		info := entryInfo{name: path.Base(e.Name), mode: e.Mode, size: int64(len(e.Data)), mtime: mtime.UTC().Truncate(time.Second)}
		data := e.Data
		files = append(files, archives.FileInfo{
			FileInfo:      info,
			NameInArchive: e.Name,
			Open:          func() (fs.File, error) { return &memFile{info: info, r: strings.NewReader(string(data))}, nil },
		})
	}
	format := archives.CompressedArchive{
		Compression: archives.Gz{CompressionLevel: 9},
		Archival:    archives.Tar{Format: tar.FormatPAX, NumericUIDGID: true},
	}
	if err := format.Archive(ctx, w, files); err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	return nil
}

type entryInfo struct {
	name  string
	mode  fs.FileMode
	size  int64
	mtime time.Time
}

func (i entryInfo) Name() string       { return i.name }
func (i entryInfo) Size() int64        { return i.size }
func (i entryInfo) Mode() fs.FileMode  { return i.mode }
func (i entryInfo) ModTime() time.Time { return i.mtime }
func (i entryInfo) IsDir() bool        { return i.mode.IsDir() }
func (i entryInfo) Sys() any           { return nil }

type memFile struct {
	info entryInfo
	r    *strings.Reader
}

func (f *memFile) Stat() (fs.FileInfo, error) { return f.info, nil }
func (f *memFile) Read(p []byte) (int, error) { return f.r.Read(p) }
func (f *memFile) Close() error               { return nil }

// Limits bound what Extract and ExtractFile accept. A zero or negative
// field takes its DefaultLimits value.
//
// The decompressed stream may hold MaxTotalSize bytes of file content plus
// headerAllowance bytes of tar headers and padding for each of MaxEntries
// entries (and one more for the end of the archive); a stream that grows
// past that is refused as a decompression bomb, and so is a compressed
// stream much longer than that (a run of empty gzip members).
type Limits struct {
	MaxEntries   int
	MaxFileSize  int64
	MaxTotalSize int64
}

// headerAllowance is the tar overhead allowed per entry: its header block,
// body padding and PAX or GNU long-name records, generously.
const headerAllowance = 16 << 10

// DefaultLimits suit a release tarball (two ~10 MiB binaries and a few
// small files).
func DefaultLimits() Limits {
	return Limits{MaxEntries: 64, MaxFileSize: 128 << 20, MaxTotalSize: 256 << 20}
}

// orDefault fills zero or negative fields from DefaultLimits, so that a
// caller who sets one field does not silently get a zero cap on the others.
func (l Limits) orDefault() Limits {
	d := DefaultLimits()
	if l.MaxEntries <= 0 {
		l.MaxEntries = d.MaxEntries
	}
	if l.MaxFileSize <= 0 {
		l.MaxFileSize = d.MaxFileSize
	}
	if l.MaxTotalSize <= 0 {
		l.MaxTotalSize = d.MaxTotalSize
	}
	return l
}

// streamCap is how many decompressed bytes the limits allow in all,
// saturating rather than overflowing for huge limits.
func (l Limits) streamCap() int64 {
	perEntries := (math.MaxInt64 - l.MaxTotalSize) / headerAllowance
	if int64(l.MaxEntries) >= perEntries {
		return math.MaxInt64
	}
	return l.MaxTotalSize + (int64(l.MaxEntries)+1)*headerAllowance
}

// inputCap is how many compressed bytes the limits allow: streamCap and
// the little that deflate's stored blocks and gzip framing add to
// incompressible data.
func (l Limits) inputCap() int64 {
	c := l.streamCap()
	if c > math.MaxInt64/2 {
		return math.MaxInt64
	}
	return c + c/64 + 64<<10
}

// Error is a refused archive: it names the entry (empty when the fault is
// in the stream as a whole, such as a decompression bomb) and the rule.
type Error struct {
	Entry string
	Rule  string
}

func (e *Error) Error() string {
	if e.Entry == "" {
		return "archive refused: " + e.Rule
	}
	return fmt.Sprintf("archive entry %q refused: %s", e.Entry, e.Rule)
}

// ErrNotFound is returned (wrapped) by ExtractFile when the archive is
// sound but holds no entry of the requested name.
var ErrNotFound = errors.New("no such file in the archive")

// checkName refuses names that could land outside the destination.
func checkName(name string) error {
	switch {
	case name == "" || cleanName(name) == ".":
		return errors.New("empty name")
	case strings.HasPrefix(name, "/") || strings.HasPrefix(name, `\`):
		return errors.New("absolute path")
	case strings.ContainsRune(name, 0):
		return errors.New("NUL in name")
	}
	for _, seg := range strings.Split(strings.ReplaceAll(name, `\`, "/"), "/") {
		if seg == ".." {
			return errors.New(`".." path segment`)
		}
	}
	return nil
}

// cleanName is the slash-separated, cleaned form of an entry name that
// passed checkName: backslashes count as separators, as some Windows tools
// write them.
func cleanName(name string) string {
	return path.Clean(strings.ReplaceAll(name, `\`, "/"))
}
