// Package archive creates reproducible .tar.gz files and extracts untrusted
// ones safely, on mholt/archives. Extraction refuses absolute paths, ".."
// segments, links that leave the destination, hard links and device or
// fifo entries; caps the entry count, each file's size and the total; and
// writes through an os.Root, so that even a symlink already inside the
// destination cannot redirect a write outside it.
package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
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

// Limits bound what Extract accepts.
type Limits struct {
	MaxEntries   int
	MaxFileSize  int64
	MaxTotalSize int64
}

// DefaultLimits suit a release tarball (two ~10 MiB binaries and a few
// small files).
func DefaultLimits() Limits {
	return Limits{MaxEntries: 64, MaxFileSize: 128 << 20, MaxTotalSize: 256 << 20}
}

// Error is a refused entry: it names the entry and the rule.
type Error struct {
	Entry string
	Rule  string
}

func (e *Error) Error() string { return fmt.Sprintf("archive entry %q refused: %s", e.Entry, e.Rule) }

// checkName refuses names that could land outside the destination.
func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == "./":
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

// Extract unpacks a .tar.gz from r into dest (which must exist).
func Extract(ctx context.Context, r io.Reader, dest string, lim Limits) error {
	root, err := os.OpenRoot(dest)
	if err != nil {
		return fmt.Errorf("archive: destination %s: %w", dest, err)
	}
	defer root.Close()
	return walk(ctx, r, lim, func(name string, hdr *tar.Header, body io.Reader) error {
		switch hdr.Typeflag {
		case tar.TypeDir:
			return root.MkdirAll(name, 0o755)
		case tar.TypeSymlink:
			if dir := path.Dir(name); dir != "." {
				if err := root.MkdirAll(dir, 0o755); err != nil {
					return err
				}
			}
			_ = root.Remove(name)
			return root.Symlink(hdr.Linkname, name)
		default: // regular
			if dir := path.Dir(name); dir != "." {
				if err := root.MkdirAll(dir, 0o755); err != nil {
					return err
				}
			}
			f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fs.FileMode(hdr.Mode)&0o777)
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, body); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			// O_CREATE does not change the mode of a file that existed.
			return root.Chmod(name, fs.FileMode(hdr.Mode)&0o777)
		}
	})
}

// ExtractFile copies the regular file called name out of a .tar.gz into w,
// applying the same rules to every entry it reads. It fails when the
// archive has no such file.
func ExtractFile(ctx context.Context, r io.Reader, name string, w io.Writer, lim Limits) error {
	found := false
	err := walk(ctx, r, lim, func(n string, hdr *tar.Header, body io.Reader) error {
		if n != path.Clean(name) || hdr.Typeflag != tar.TypeReg {
			return nil
		}
		found = true
		_, err := io.Copy(w, body)
		return err
	})
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("archive: no file %q in the archive", name)
	}
	return nil
}

// walk checks every entry against the rules and limits and hands the
// acceptable ones to fn with a size-capped body.
func walk(ctx context.Context, r io.Reader, lim Limits, fn func(name string, hdr *tar.Header, body io.Reader) error) error {
	if lim == (Limits{}) {
		lim = DefaultLimits()
	}
	format := archives.CompressedArchive{Compression: archives.Gz{}, Extraction: archives.Tar{}}
	entries := 0
	var total int64
	err := format.Extract(ctx, r, func(ctx context.Context, f archives.FileInfo) error {
		hdr, ok := f.Header.(*tar.Header)
		if !ok {
			return &Error{f.NameInArchive, "not a tar entry"}
		}
		entries++
		if entries > lim.MaxEntries {
			return &Error{hdr.Name, fmt.Sprintf("more than %d entries", lim.MaxEntries)}
		}
		if err := checkName(hdr.Name); err != nil {
			return &Error{hdr.Name, err.Error()}
		}
		name := path.Clean(strings.ReplaceAll(hdr.Name, `\`, "/"))
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeDir: // the reader already maps the old TypeRegA
		case tar.TypeSymlink:
			if err := checkLink(name, hdr.Linkname); err != nil {
				return &Error{hdr.Name, err.Error()}
			}
		case tar.TypeLink:
			return &Error{hdr.Name, "hard links are not allowed"}
		case tar.TypeChar, tar.TypeBlock:
			return &Error{hdr.Name, "device files are not allowed"}
		case tar.TypeFifo:
			return &Error{hdr.Name, "fifos are not allowed"}
		default:
			return &Error{hdr.Name, fmt.Sprintf("entry type %q is not allowed", hdr.Typeflag)}
		}
		if hdr.Size > lim.MaxFileSize {
			return &Error{hdr.Name, fmt.Sprintf("%d bytes is over the %d-byte per-file limit", hdr.Size, lim.MaxFileSize)}
		}
		total += hdr.Size
		if total > lim.MaxTotalSize {
			return &Error{hdr.Name, fmt.Sprintf("archive content over the %d-byte total limit", lim.MaxTotalSize)}
		}
		var body io.Reader = eofReader{}
		if hdr.Typeflag == tar.TypeReg {
			rc, err := f.Open()
			if err != nil {
				return err
			}
			defer rc.Close()
			body = io.LimitReader(rc, hdr.Size)
		}
		return fn(name, hdr, body)
	})
	if err != nil {
		var ae *Error
		if errors.As(err, &ae) {
			return ae
		}
		return fmt.Errorf("archive: %w", err)
	}
	return nil
}

// checkLink refuses a symlink whose target leaves the destination.
func checkLink(name, target string) error {
	if target == "" {
		return errors.New("symlink with an empty target")
	}
	if strings.HasPrefix(target, "/") {
		return fmt.Errorf("symlink to the absolute path %q leaves the destination", target)
	}
	resolved := path.Join(path.Dir(name), target)
	if resolved == ".." || strings.HasPrefix(resolved, "../") {
		return fmt.Errorf("symlink to %q leaves the destination", target)
	}
	return nil
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
