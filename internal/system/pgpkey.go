package system

import (
	"bytes"
	"crypto/sha1" // OpenPGP v4 fingerprints are SHA-1 by definition (RFC 4880 12.2)
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// PGPKey is one OpenPGP primary public key, as rpm and apt name it.
//
// Only what identifies a key is read: the packet framing and the bytes of
// each primary key packet, whatever its algorithm (a key id is a hash of
// the packet, so no algorithm has to be understood), which is why no
// OpenPGP library is used here.
type PGPKey struct {
	Fingerprint string // 40 upper-case hex digits (v4)
	KeyID       string // the fingerprint's last 16 hex digits
}

// RPMVersion is the version of the gpg-pubkey pseudo-package rpm makes
// when it imports the key: the key id's last 8 hex digits, lower case.
func (k PGPKey) RPMVersion() string { return strings.ToLower(k.KeyID[len(k.KeyID)-8:]) }

// Packet tags (RFC 4880 4.3).
const (
	pgpTagPublicKey = 6
)

// ParsePGPPublicKeys returns the primary keys of an OpenPGP public key
// file, ASCII-armoured (one or more blocks) or binary. Subkeys, user ids
// and signatures are skipped. Keys other than version 4 (v3 keys, which
// rpm refuses, and v5/v6) are an error naming the version.
func ParsePGPPublicKeys(data []byte) ([]PGPKey, error) {
	var binaries [][]byte
	if bytes.Contains(data, []byte("-----BEGIN PGP ")) {
		blocks, err := dearmor(data)
		if err != nil {
			return nil, err
		}
		binaries = blocks
	} else {
		binaries = [][]byte{data}
	}
	var keys []PGPKey
	for _, b := range binaries {
		for len(b) > 0 {
			tag, body, rest, err := nextPacket(b)
			if err != nil {
				return nil, err
			}
			b = rest
			if tag != pgpTagPublicKey {
				continue
			}
			if len(body) == 0 || body[0] != 4 {
				v := 0
				if len(body) > 0 {
					v = int(body[0])
				}
				return nil, fmt.Errorf("OpenPGP key of version %d: only version 4 keys are supported", v)
			}
			if len(body) > 0xffff {
				return nil, errors.New("OpenPGP key packet too large")
			}
			h := sha1.New()
			h.Write([]byte{0x99, byte(len(body) >> 8), byte(len(body))})
			h.Write(body)
			fpr := strings.ToUpper(hex.EncodeToString(h.Sum(nil)))
			keys = append(keys, PGPKey{Fingerprint: fpr, KeyID: fpr[len(fpr)-16:]})
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("no OpenPGP public key in it")
	}
	return keys, nil
}

// nextPacket splits the first packet off b (RFC 4880 4.2: old and new
// formats; partial lengths, which keys never use, are refused).
func nextPacket(b []byte) (tag int, body, rest []byte, err error) {
	bad := func(why string) (int, []byte, []byte, error) {
		return 0, nil, nil, fmt.Errorf("not an OpenPGP key file (%s)", why)
	}
	if len(b) < 2 || b[0]&0x80 == 0 {
		return bad("no packet header")
	}
	var n, hdr int
	if b[0]&0x40 == 0 { // old format
		tag = int(b[0]>>2) & 0x0f
		switch b[0] & 3 {
		case 0:
			n, hdr = int(b[1]), 2
		case 1:
			if len(b) < 3 {
				return bad("short header")
			}
			n, hdr = int(b[1])<<8|int(b[2]), 3
		case 2:
			if len(b) < 5 {
				return bad("short header")
			}
			n, hdr = int(b[1])<<24|int(b[2])<<16|int(b[3])<<8|int(b[4]), 5
		default:
			return bad("indeterminate length")
		}
	} else { // new format
		tag = int(b[0] & 0x3f)
		switch l := int(b[1]); {
		case l < 192:
			n, hdr = l, 2
		case l < 224:
			if len(b) < 3 {
				return bad("short header")
			}
			n, hdr = (l-192)<<8+int(b[2])+192, 3
		case l == 255:
			if len(b) < 6 {
				return bad("short header")
			}
			n, hdr = int(b[2])<<24|int(b[3])<<16|int(b[4])<<8|int(b[5]), 6
		default:
			return bad("partial length")
		}
	}
	if n < 0 || hdr+n > len(b) {
		return bad("truncated packet")
	}
	return tag, b[hdr : hdr+n], b[hdr+n:], nil
}

// dearmor decodes every ASCII-armoured block of data (RFC 4880 6.2):
// armour headers up to a blank line, base64 lines, an optional "=" CRC-24
// line, which is checked.
func dearmor(data []byte) ([][]byte, error) {
	var blocks [][]byte
	lines := strings.Split(strings.ReplaceAll(string(data), "\r\n", "\n"), "\n")
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(strings.TrimSpace(lines[i]), "-----BEGIN PGP ") {
			continue
		}
		i++
		// Armour headers ("Version: …") until the blank line.
		for j := i; j < len(lines); j++ {
			l := strings.TrimSpace(lines[j])
			if l == "" {
				i = j + 1
				break
			}
			if !strings.Contains(l, ": ") {
				break // no headers and no blank line: the data starts here
			}
		}
		var b64, crc string
		ended := false
		for ; i < len(lines); i++ {
			l := strings.TrimSpace(lines[i])
			switch {
			case strings.HasPrefix(l, "-----END PGP "):
				ended = true
			case strings.HasPrefix(l, "=") && len(l) == 5:
				crc = l[1:]
				continue
			default:
				b64 += l
				continue
			}
			break
		}
		if !ended {
			return nil, errors.New("not an OpenPGP key file (armour block without its END line)")
		}
		raw, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, fmt.Errorf("not an OpenPGP key file (bad base64 in the armour: %v)", err)
		}
		if crc != "" {
			want, err := base64.StdEncoding.DecodeString(crc)
			if err != nil || len(want) != 3 {
				return nil, errors.New("not an OpenPGP key file (bad armour checksum line)")
			}
			got := crc24(raw)
			if byte(got>>16) != want[0] || byte(got>>8) != want[1] || byte(got) != want[2] {
				return nil, errors.New("OpenPGP armour checksum mismatch: the key file is damaged")
			}
		}
		blocks = append(blocks, raw)
	}
	if len(blocks) == 0 {
		return nil, errors.New("not an OpenPGP key file (no armour block)")
	}
	return blocks, nil
}

// crc24 is the armour checksum (RFC 4880 6.1).
func crc24(data []byte) uint32 {
	crc := uint32(0xB704CE)
	for _, b := range data {
		crc ^= uint32(b) << 16
		for range 8 {
			crc <<= 1
			if crc&0x1000000 != 0 {
				crc ^= 0x1864CFB
			}
		}
	}
	return crc & 0xFFFFFF
}
