package archive

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/mholt/archives"
)

// zipSource is what a zip archive is read from: its central directory is
// at the end, so it is read at offsets, not as a stream.
type zipSource interface {
	io.Reader
	io.ReaderAt
	io.Seeker
}

// walkZip checks every entry of the zip archive in r as walkTar checks a
// tar's (names, links, types, sizes, duplicates) and hands the acceptable
// ones to fn. Each body is read to its end through a reader that refuses
// a byte more than the size the entry declares, so that a lying header
// cannot get past the size limits, and the zip reader verifies the CRC.
//
// Zip entries carry permissions only when made on Unix, and then often
// carelessly: files get 0755 when any execute bit is set, else 0644, and
// directories 0755, so that nothing extracted is writable by others.
func walkZip(ctx context.Context, r zipSource, lim Limits, fn entryFunc) error {
	lim = lim.orDefault()
	c := &checker{lim: lim, tree: newTree()}
	err := archives.Zip{}.Extract(ctx, r, func(_ context.Context, fi archives.FileInfo) error {
		hdr, err := zipHeader(fi)
		if err != nil {
			return err
		}
		open := func() (fs.File, error) {
			f, err := fi.Open()
			if err != nil {
				return nil, err
			}
			return &exactFile{File: f, name: fi.NameInArchive, left: hdr.Size}, nil
		}
		return c.entry(hdr, open, fn)
	})
	var ce *callerError
	switch {
	case err == nil:
		return nil
	case isOurs(err), errors.As(err, &ce):
		return classify(err)
	}
	return fmt.Errorf("archive: reading the zip archive: %w; the file is corrupt or not a zip: fetch it again", err)
}

// zipHeader is the tar header walk's rules read for a zip entry.
func zipHeader(fi archives.FileInfo) (*tar.Header, error) {
	mode := fi.Mode()
	hdr := &tar.Header{Name: fi.NameInArchive}
	switch {
	case mode.IsDir():
		hdr.Typeflag, hdr.Mode = tar.TypeDir, 0o755
	case mode&fs.ModeSymlink != 0:
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, fi.LinkTarget
	case mode.IsRegular():
		hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeReg, 0o644, fi.Size()
		if mode&0o111 != 0 {
			hdr.Mode = 0o755
		}
	case mode&(fs.ModeDevice|fs.ModeCharDevice) != 0:
		return nil, &Error{fi.NameInArchive, "device files are not allowed"}
	case mode&fs.ModeNamedPipe != 0:
		return nil, &Error{fi.NameInArchive, "fifos are not allowed"}
	default:
		return nil, &Error{fi.NameInArchive, fmt.Sprintf("entry of mode %v is not allowed", mode)}
	}
	if hdr.Size < 0 {
		return nil, &Error{fi.NameInArchive, "negative size"}
	}
	return hdr, nil
}

// exactFile is a zip entry's body that may not run past the size its
// header declares.
type exactFile struct {
	fs.File
	name string
	left int64
}

func (f *exactFile) Read(p []byte) (int, error) {
	if f.left <= 0 {
		// One more read shows whether the body really ends here (and
		// makes the zip reader check the CRC at its end).
		var one [1]byte
		n, err := f.File.Read(one[:])
		if n > 0 {
			return 0, &Error{f.name, "the body is longer than its header says"}
		}
		if err == nil {
			err = io.EOF
		}
		return 0, err
	}
	if int64(len(p)) > f.left {
		p = p[:f.left]
	}
	n, err := f.File.Read(p)
	f.left -= int64(n)
	if err == io.EOF && f.left > 0 {
		return n, &Error{f.name, "the body is shorter than its header says: the archive is truncated or corrupt"}
	}
	if err == io.EOF {
		err = nil // the next Read checks the end
	}
	return n, err
}
