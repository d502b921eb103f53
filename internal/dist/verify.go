package dist

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/fsutil"
)

// Errors of Verifier, for errors.Is: the updater reports each differently
// (a configuration problem, a broken download, an attack or a key rotation).
var (
	// ErrNoTrustedKey: the verifier has no key, so it can accept nothing.
	ErrNoTrustedKey = errors.New("no trusted release key")
	// ErrMalformedSignature: the .minisig is not a minisign signature.
	ErrMalformedSignature = errors.New("malformed minisign signature")
	// ErrUntrustedKey: the signature names a key we do not trust.
	ErrUntrustedKey = errors.New("signed by an untrusted key")
	// ErrBadSignature: the data or the trusted comment was altered.
	ErrBadSignature = errors.New("signature does not match")
)

const (
	// MaxSignatureSize bounds a .minisig, read or downloaded: a real one
	// is about 300 bytes plus its comments.
	MaxSignatureSize = 16 << 10
	// maxLegacySize bounds the message of a legacy (non-prehashed)
	// signature, which must be held in memory whole to be verified.
	maxLegacySize = 256 << 20
)

// Verifier checks minisign signatures against a fixed set of trusted
// public keys. It accepts a signature when any trusted key verifies it, so
// a fleet can trust the old and the new release key while the key rotates.
type Verifier struct {
	keys []minisign.PublicKey
}

// NewVerifier trusts keys, each given as the base64 line of minisign.pub
// ([userdata] pubkey) or as the whole file. Empty strings are ignored, so a
// caller can pass optional keys as they are (the configured key and
// EmbeddedPublicKey()); duplicates are trusted once.
//
// A key that does not parse is skipped, not fatal: the verifier it returns
// (never nil) trusts every key that parsed, and the error names each one
// that did not (#n counting from 1, abbreviated). A typo in [userdata]
// pubkey must not disable the release key compiled into the binary, the
// one key that can still deliver the fix.
func NewVerifier(keys ...string) (*Verifier, error) {
	v := &Verifier{}
	var bad []error
	for i, text := range keys {
		if strings.TrimSpace(text) == "" {
			continue
		}
		pub, err := ParsePublicKey(text)
		if err != nil {
			bad = append(bad, fmt.Errorf("trusted key #%d (%s): %w", i+1, abbreviate(text), err))
			continue
		}
		v.add(pub)
	}
	return v, errors.Join(bad...)
}

func (v *Verifier) add(pub minisign.PublicKey) {
	for _, k := range v.keys {
		if k.Equal(pub) {
			return
		}
	}
	v.keys = append(v.keys, pub)
}

// abbreviate names a key in an error without echoing a whole file.
func abbreviate(text string) string {
	text = strings.TrimSpace(text)
	if len(text) > 24 {
		text = text[:24] + "…"
	}
	return fmt.Sprintf("%q", text)
}

// Len is the number of distinct trusted keys.
func (v *Verifier) Len() int { return len(v.keys) }

// Verify checks sig, the text of a .minisig, against data.
func (v *Verifier) Verify(data, sig []byte) error {
	return v.verify("data", "signature", sig, bytes.NewReader(data))
}

// VerifyFile checks the signature in sigPath against the file at path. A
// prehashed signature (minisign's default, and Sign's) is checked while
// streaming, so a large tarball is never held in memory.
func (v *Verifier) VerifyFile(path, sigPath string) error {
	if len(v.keys) == 0 {
		return noTrustedKey(path)
	}
	sig, err := readSignature(sigPath)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("verify %s: %w", path, err)
	}
	defer f.Close()
	return v.verify(path, sigPath, sig, f)
}

// readSignature reads a .minisig; one too large to be a signature is
// malformed rather than read without bound.
func readSignature(sigPath string) ([]byte, error) {
	sig, err := fsutil.ReadFileLimit(sigPath, MaxSignatureSize)
	switch {
	case errors.Is(err, fsutil.ErrTooLarge):
		return nil, fmt.Errorf("%s: %w: %w", sigPath, ErrMalformedSignature, err)
	case err != nil:
		return nil, fmt.Errorf("signature %s: %w (download it with the tarball)", sigPath, err)
	}
	return sig, nil
}

// verify is Verify and VerifyFile: dataName and sigName only name things
// in errors.
func (v *Verifier) verify(dataName, sigName string, sigText []byte, data io.Reader) error {
	if len(v.keys) == 0 {
		return noTrustedKey(dataName)
	}
	var s minisign.Signature
	if err := s.UnmarshalText(sigText); err != nil {
		return fmt.Errorf("%s: %w: %w (it must be the .minisig written by 'opsagent release build' or 'minisign -S')", sigName, ErrMalformedSignature, err)
	}
	candidates := v.keysWithID(s.KeyID)
	if len(candidates) == 0 {
		return fmt.Errorf("%s: %w: key id %s is not among the trusted keys (%s); if the release key was rotated, add its public key to [userdata] pubkey", sigName, ErrUntrustedKey, KeyID(s.KeyID), v.ids())
	}
	ok, err := check(s.Algorithm, candidates, sigText, data)
	if err != nil {
		return fmt.Errorf("verify %s: %w", dataName, err)
	}
	if !ok {
		return fmt.Errorf("verify %s against %s: %w: the file was altered, truncated or belongs to another release (download both again)", dataName, sigName, ErrBadSignature)
	}
	return nil
}

func noTrustedKey(dataName string) error {
	return fmt.Errorf("verify %s: %w: set [userdata] pubkey to the base64 line of the release minisign.pub", dataName, ErrNoTrustedKey)
}

// keysWithID returns the trusted keys that claim id. The id in a signature
// is only a hint (it is not signed), so every candidate is still checked.
func (v *Verifier) keysWithID(id uint64) []minisign.PublicKey {
	var out []minisign.PublicKey
	for _, k := range v.keys {
		if k.ID() == id {
			out = append(out, k)
		}
	}
	return out
}

func (v *Verifier) ids() string {
	ids := make([]string, len(v.keys))
	for i, k := range v.keys {
		ids[i] = KeyID(k.ID())
	}
	return strings.Join(ids, ", ")
}

// check reads data once and reports whether any of keys verifies sigText.
func check(algorithm uint16, keys []minisign.PublicKey, sigText []byte, data io.Reader) (bool, error) {
	if algorithm == minisign.HashEdDSA {
		return checkPrehashed(keys, sigText, data)
	}
	return checkLegacy(keys, sigText, data)
}

func checkPrehashed(keys []minisign.PublicKey, sigText []byte, data io.Reader) (bool, error) {
	r := minisign.NewReader(data)
	if _, err := io.Copy(io.Discard, r); err != nil {
		return false, err
	}
	for _, k := range keys {
		if r.Verify(k, sigText) {
			return true, nil
		}
	}
	return false, nil
}

// checkLegacy verifies a non-prehashed signature, which covers the message
// itself and so needs it whole in memory; minisign ≥ 0.8 signs prehashed
// by default and `minisign -S -l` is the only way to get these.
func checkLegacy(keys []minisign.PublicKey, sigText []byte, data io.Reader) (bool, error) {
	msg, err := io.ReadAll(io.LimitReader(data, maxLegacySize+1))
	if err != nil {
		return false, err
	}
	if len(msg) > maxLegacySize {
		return false, fmt.Errorf("a legacy (non-prehashed) signature cannot cover more than %d bytes: sign it again with a prehashed signature (minisign -S without -l, or opsagent release build)", maxLegacySize)
	}
	for _, k := range keys {
		if minisign.Verify(k, msg, sigText) {
			return true, nil
		}
	}
	return false, nil
}

// Sign returns a prehashed minisign signature of data (the default of
// minisign ≥ 0.8). The trusted comment is fixed by the caller so that a
// rebuild signs identically.
func Sign(key minisign.PrivateKey, data []byte, trustedComment string) []byte {
	r := minisign.NewReader(bytes.NewReader(data))
	_, _ = io.Copy(io.Discard, r) // a bytes.Reader cannot fail
	return r.SignWithComments(key, trustedComment, "signature from opsagent release key "+KeyID(key.ID()))
}

// Verify checks a minisign signature (prehashed or legacy) of data against
// one key: a Verifier trusting pub alone.
func Verify(pub minisign.PublicKey, data, sig []byte) error {
	return (&Verifier{keys: []minisign.PublicKey{pub}}).Verify(data, sig)
}
