package archive

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/mholt/archives"
)

// maxPathLen is Linux's PATH_MAX less the terminating NUL.
const maxPathLen = 4095

// entryFunc receives each accepted entry: its cleaned name, its header and
// its body (empty for anything but a regular file).
type entryFunc func(name string, hdr *tar.Header, body io.Reader) error

// walk checks every entry of the .tar.gz in r against the rules and limits,
// hands the acceptable ones to fn, and then reads the stream to its end, so
// that a truncated, padded-out or tampered stream is an error even after
// the last entry.
func walk(ctx context.Context, r io.Reader, lim Limits, fn entryFunc) error {
	return walkTar(ctx, r, TarGz, lim, fn)
}

// walkTar is walk for any tar format: plain, or compressed with gzip,
// bzip2 or xz.
func walkTar(ctx context.Context, r io.Reader, f Format, lim Limits, fn entryFunc) error {
	lim = lim.orDefault()
	s, dec, err := open(ctx, r, f, lim)
	if err != nil {
		return err
	}
	defer dec.Close()
	c := &checker{lim: lim, tree: newTree()}
	err = archives.Tar{}.Extract(ctx, s, func(_ context.Context, fi archives.FileInfo) error {
		hdr, ok := fi.Header.(*tar.Header)
		if !ok {
			return &Error{fi.NameInArchive, "not a tar entry"}
		}
		return c.entry(hdr, fi.Open, fn)
	})
	if err == nil {
		err = finish(s)
	}
	return classify(err)
}

// open stacks the capped compressed input, the decompressor and the
// capped decompressed stream. The compressed side is capped too because
// empty gzip members decompress to nothing: only their own size bounds a
// stream made of them. A plain tar is the input itself, capped.
func open(ctx context.Context, r io.Reader, f Format, lim Limits) (*capped, io.Closer, error) {
	name, decompress, err := decompressor(f)
	if err != nil {
		return nil, nil, err
	}
	if decompress == nil {
		s := &capped{ctx: ctx, r: r, max: lim.streamCap(),
			over: func() error {
				return &Error{Rule: fmt.Sprintf("the tar stream is over %d bytes, more than the %d-byte total limit (Limits.MaxTotalSize) and tar overhead allow", lim.streamCap(), lim.MaxTotalSize)}
			},
			wrap: func(err error) error { return &inputError{err} }}
		return s, io.NopCloser(nil), nil
	}
	in := &capped{ctx: ctx, r: r, max: lim.inputCap(),
		over: func() error {
			return &Error{Rule: fmt.Sprintf("the compressed stream is over %d bytes, more than Limits.MaxTotalSize (%d bytes) can need: not a release archive, or one needing a larger Limits.MaxTotalSize", lim.inputCap(), lim.MaxTotalSize)}
		},
		wrap: func(err error) error { return &inputError{err} }}
	dec, err := decompress(in)
	if err != nil {
		if isOurs(err) {
			return nil, nil, classify(err)
		}
		if f == TarGz {
			return nil, nil, fmt.Errorf("archive: not a gzip stream (%w); pass a .tar.gz such as opsagent.tgz", err)
		}
		return nil, nil, fmt.Errorf("archive: not a %s stream (%w); the file is corrupt or not a %s", name, err, f)
	}
	s := &capped{ctx: ctx, r: dec, max: lim.streamCap(),
		over: func() error {
			return &Error{Rule: fmt.Sprintf("the %s stream expands past %d bytes, more than the %d-byte total limit (Limits.MaxTotalSize) and tar overhead allow: a decompression bomb, or an archive needing a larger Limits.MaxTotalSize", name, lim.streamCap(), lim.MaxTotalSize)}
		},
		wrap: func(err error) error { return &streamError{name, err} }}
	return s, dec, nil
}

// checker holds what the rules need to remember across entries.
type checker struct {
	lim     Limits
	tree    *tree
	entries int
	total   int64
}

// entry checks one entry and, if it passes, hands it to fn with the body
// openBody gives (a regular file's; other entries have none).
func (c *checker) entry(hdr *tar.Header, openBody func() (fs.File, error), fn entryFunc) error {
	name, err := c.check(hdr)
	if err != nil {
		return err
	}
	var body io.Reader = bytes.NewReader(nil)
	var rc fs.File
	if hdr.Typeflag == tar.TypeReg {
		rc, err = openBody()
		if err != nil {
			return err
		}
		defer rc.Close()
		body = io.LimitReader(rc, hdr.Size)
	}
	if err := fn(name, hdr, body); err != nil {
		return &callerError{err}
	}
	if rc != nil {
		// Read the body to its end: a zip entry's reader then checks
		// that it ends where its header says, and its CRC.
		if _, err := io.Copy(io.Discard, rc); err != nil {
			return err
		}
	}
	return nil
}

// check applies the rules and limits to hdr and returns its cleaned name.
func (c *checker) check(hdr *tar.Header) (string, error) {
	c.entries++
	if c.entries > c.lim.MaxEntries {
		return "", &Error{hdr.Name, fmt.Sprintf("more than %d entries (Limits.MaxEntries)", c.lim.MaxEntries)}
	}
	if err := checkName(hdr.Name); err != nil {
		return "", &Error{hdr.Name, err.Error()}
	}
	// Longer paths cannot be made on Linux anyway, and bounding them keeps
	// the checks below linear.
	if len(hdr.Name) > maxPathLen || len(hdr.Linkname) > maxPathLen {
		return "", &Error{hdr.Name, fmt.Sprintf("name or link target longer than %d bytes", maxPathLen)}
	}
	kind, err := kindOf(hdr.Typeflag)
	if err != nil {
		return "", &Error{hdr.Name, err.Error()}
	}
	if kind == fileNode {
		if err := c.count(hdr); err != nil {
			return "", err
		}
	}
	name := cleanName(hdr.Name)
	if err := c.tree.add(name, kind, hdr.Linkname); err != nil {
		return "", &Error{hdr.Name, err.Error()}
	}
	return name, nil
}

// count applies the size limits to a regular file. Other entries carry no
// body whatever their header says, so their Size is not counted.
func (c *checker) count(hdr *tar.Header) error {
	if hdr.Size > c.lim.MaxFileSize {
		return &Error{hdr.Name, fmt.Sprintf("%d bytes is over the %d-byte per-file limit (Limits.MaxFileSize)", hdr.Size, c.lim.MaxFileSize)}
	}
	c.total += hdr.Size
	if c.total > c.lim.MaxTotalSize {
		return &Error{hdr.Name, fmt.Sprintf("archive content over the %d-byte total limit (Limits.MaxTotalSize)", c.lim.MaxTotalSize)}
	}
	return nil
}

// kindOf maps a tar entry type to what the extraction makes of it, refusing
// the types that have no place in a release archive.
func kindOf(flag byte) (nodeKind, error) {
	switch flag {
	case tar.TypeReg: // the reader already maps the old TypeRegA
		return fileNode, nil
	case tar.TypeDir:
		return dirNode, nil
	case tar.TypeSymlink:
		return linkNode, nil
	case tar.TypeLink:
		return 0, errors.New("hard links are not allowed")
	case tar.TypeChar, tar.TypeBlock:
		return 0, errors.New("device files are not allowed")
	case tar.TypeFifo:
		return 0, errors.New("fifos are not allowed")
	default:
		return 0, fmt.Errorf("entry type %q is not allowed", flag)
	}
}

// capped counts what it reads and refuses to hand out more than max bytes,
// whatever part of the format they belong to (a bomb can hide in padding
// after the end marker or in header records as well as in a body). It
// honours ctx between reads, wraps read errors so that classify can tell
// where they came from, and notes a bare EOF so that finish can tell a tar
// stream cut off at an entry boundary.
type capped struct {
	ctx     context.Context
	r       io.Reader
	max     int64
	over    func() error      // the error once past max
	wrap    func(error) error // what a read error becomes
	n       int64
	bareEOF bool
}

func (c *capped) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	if c.n > c.max {
		return 0, c.over()
	}
	if room := c.max - c.n; int64(len(p)) > room {
		p = p[:room+1] // one byte past the cap shows the stream goes on
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	c.bareEOF = n == 0 && err == io.EOF
	if c.n > c.max {
		return 0, c.over()
	}
	if err != nil && err != io.EOF && !isOurs(err) {
		return n, c.wrap(err)
	}
	return n, err
}

// isOurs tells errors that already say where they came from.
func isOurs(err error) bool {
	var (
		ae *Error
		ie *inputError
	)
	return errors.As(err, &ae) || errors.As(err, &ie) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// finish checks what follows the tar stream s: the tar reader must have
// stopped at the end-of-archive marker rather than at a bare EOF, only zero
// padding may follow it, and reading to EOF makes the gzip reader verify
// its checksum and refuse trailing garbage.
func finish(s *capped) error {
	if s.bareEOF {
		return &Error{Rule: "the tar stream ends without its end-of-archive marker: the archive is truncated; fetch it again"}
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := s.Read(buf)
		if !allZero(buf[:n]) {
			return &Error{Rule: "data after the tar end-of-archive marker: a second archive hidden in the stream, or a corrupt one"}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// inputError is a failure of the caller's reader.
type inputError struct{ err error }

func (e *inputError) Error() string { return e.err.Error() }
func (e *inputError) Unwrap() error { return e.err }

// streamError is a failure of the decompressed stream under the tar
// reader; name is the compression ("gzip").
type streamError struct {
	name string
	err  error
}

func (e *streamError) Error() string { return e.name + " stream: " + e.err.Error() }
func (e *streamError) Unwrap() error { return e.err }

// callerError is a failure of the entryFunc (writing to disk or to w),
// kept apart so that it is not reported as a corrupt archive.
type callerError struct{ err error }

func (e *callerError) Error() string { return e.err.Error() }
func (e *callerError) Unwrap() error { return e.err }

// classify turns what walk met into the error its callers return: an
// *Error as it is, everything else wrapped with what to do about it.
func classify(err error) error {
	var (
		ae *Error
		ie *inputError
		se *streamError
		ce *callerError
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &ie):
		return fmt.Errorf("archive: reading the archive: %w", ie.err)
	case errors.As(err, &se):
		return fmt.Errorf("archive: %w; the file is corrupt, truncated or has trailing data: fetch it again", se)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("archive: extraction stopped: %w", err)
	case errors.As(err, &ce):
		return fmt.Errorf("archive: %w", ce.err)
	default:
		return fmt.Errorf("archive: reading the tar stream: %w; the file is corrupt or not a .tar.gz: fetch it again", err)
	}
}
