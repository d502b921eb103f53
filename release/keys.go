// Package release builds, signs and publishes opsagent.tgz
// (spec/install-update.md, "Release tarball"): reproducible multi-arch
// tarballs with a SHA-256 file and a minisign signature that `minisign -V`
// accepts, uploaded to any S3-compatible store with latest.json written
// last.
package release

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/fsutil"
)

// Key file names, as minisign names them.
const (
	PublicKeyFile = "minisign.pub"
	SecretKeyFile = "minisign.key"
)

// Keygen writes a new minisign Ed25519 key pair into dir: minisign.pub
// (0644) and minisign.key (0600), the secret key encrypted with passphrase
// unless unencrypted. It refuses to overwrite an existing key. It returns
// the public key in the one-line form used in [userdata] pubkey.
func Keygen(dir, passphrase string, unencrypted bool) (string, error) {
	if !unencrypted && passphrase == "" {
		return "", errors.New("release keygen: an empty passphrase would leave the secret key unprotected; give one, or pass --unencrypted for a CI key")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("release keygen: %w", err)
	}
	secretPath, publicPath := filepath.Join(dir, SecretKeyFile), filepath.Join(dir, PublicKeyFile)
	for _, p := range []string{secretPath, publicPath} {
		if _, err := os.Stat(p); err == nil {
			return "", fmt.Errorf("release keygen: %s exists; move it away first (a lost release key cannot be replaced on running instances)", p)
		}
	}
	pub, priv, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		return "", fmt.Errorf("release keygen: %w", err)
	}
	var secret []byte
	if unencrypted {
		secret, err = priv.MarshalText()
	} else {
		secret, err = minisign.EncryptKey(passphrase, priv)
	}
	if err != nil {
		return "", fmt.Errorf("release keygen: %w", err)
	}
	public, _ := pub.MarshalText()
	if err := fsutil.WriteFileAtomic(secretPath, append(secret, '\n'), 0o600); err != nil {
		return "", fmt.Errorf("release keygen: %w", err)
	}
	if err := fsutil.WriteFileAtomic(publicPath, append(public, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("release keygen: %w", err)
	}
	return pub.String(), nil
}

// LoadSecretKey reads a minisign secret key, decrypting it with
// passphrase when it is encrypted.
func LoadSecretKey(path, passphrase string) (minisign.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return minisign.PrivateKey{}, fmt.Errorf("signing key %s: %w", path, err)
	}
	if minisign.IsEncrypted(data) {
		if passphrase == "" {
			return minisign.PrivateKey{}, fmt.Errorf("signing key %s is encrypted: set OPSAGENT_SIGNING_PASSPHRASE", path)
		}
		key, err := minisign.DecryptKey(passphrase, data)
		if err != nil {
			return minisign.PrivateKey{}, fmt.Errorf("signing key %s: wrong passphrase or damaged key: %w", path, err)
		}
		return key, nil
	}
	var key minisign.PrivateKey
	if err := key.UnmarshalText(data); err != nil {
		return minisign.PrivateKey{}, fmt.Errorf("signing key %s: %w", path, err)
	}
	return key, nil
}

// ParsePublicKey reads a public key given as the base64 line ([userdata]
// pubkey) or as a whole minisign.pub file.
func ParsePublicKey(text string) (minisign.PublicKey, error) {
	var pub minisign.PublicKey
	text = strings.TrimSpace(text)
	if !strings.Contains(text, "\n") {
		text = "untrusted comment: minisign public key\n" + text
	}
	if err := pub.UnmarshalText([]byte(text)); err != nil {
		return pub, fmt.Errorf("minisign public key: %w (expected the base64 line of minisign.pub)", err)
	}
	return pub, nil
}

// Sign returns a prehashed minisign signature of data (the default of
// minisign ≥ 0.8). The trusted comment is fixed by the caller so that a
// rebuild signs identically.
func Sign(key minisign.PrivateKey, data []byte, trustedComment string) []byte {
	r := minisign.NewReader(bytes.NewReader(data))
	_, _ = io.Copy(io.Discard, r)
	return r.SignWithComments(key, trustedComment, "signature from opsagent release")
}

// Verify checks a minisign signature (prehashed or legacy) of data.
func Verify(pub minisign.PublicKey, data, signature []byte) error {
	r := minisign.NewReader(bytes.NewReader(data))
	_, _ = io.Copy(io.Discard, r)
	if r.Verify(pub, signature) || minisign.Verify(pub, data, signature) {
		return nil
	}
	return errors.New("minisign signature does not match: the file was altered or signed with another key")
}
