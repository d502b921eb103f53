package archive

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/mholt/archives"
)

// Format is an archive format ExtractInto reads.
type Format string

// The formats ExtractInto reads: tar, plain or compressed with gzip,
// bzip2 or xz, and zip.
const (
	Tar    Format = "tar"
	TarGz  Format = "tar.gz"
	TarBz2 Format = "tar.bz2"
	TarXz  Format = "tar.xz"
	Zip    Format = "zip"
)

// sniffLen is how much of a file Detect reads: a tar header block.
const sniffLen = 512

// Detect tells the format of an archive from its first bytes, not from
// its name: a URL's name may carry a query string, or lie. A compressed
// stream is taken for a compressed tar; whether it holds one is found out
// when it is read.
func Detect(r io.ReaderAt) (Format, error) {
	head := make([]byte, sniffLen)
	n, err := r.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("archive: reading the start of the file: %w", err)
	}
	head = head[:n]
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		return TarGz, nil
	case bytes.HasPrefix(head, []byte("BZh")):
		return TarBz2, nil
	case bytes.HasPrefix(head, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		return TarXz, nil
	case bytes.HasPrefix(head, []byte("PK\x03\x04")), bytes.HasPrefix(head, []byte("PK\x05\x06")):
		return Zip, nil
	case len(head) >= 263 && bytes.Equal(head[257:262], []byte("ustar")):
		return Tar, nil
	}
	return "", &Error{Rule: "not an archive this agent reads (tar, tar.gz, tar.bz2, tar.xz or zip, told by the file's first bytes)"}
}

// decompressor opens the decompressed stream of a compressed tar format
// (nil for a plain tar), and names the compression for messages.
func decompressor(f Format) (name string, open func(io.Reader) (io.ReadCloser, error), err error) {
	switch f {
	case TarGz:
		return "gzip", archives.Gz{}.OpenReader, nil
	case TarBz2:
		return "bzip2", archives.Bz2{}.OpenReader, nil
	case TarXz:
		return "xz", archives.Xz{}.OpenReader, nil
	case Tar:
		return "tar", nil, nil
	}
	return "", nil, fmt.Errorf("archive: format %q is not a tar format", f)
}
