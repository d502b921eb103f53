package dist

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/fsutil"
)

// Key file names, as minisign names them.
const (
	PublicKeyFile = "minisign.pub"
	SecretKeyFile = "minisign.key"
)

// maxKeyFileSize bounds a key file read: a minisign key is under 400
// bytes, so anything larger is the wrong file given to --key.
const maxKeyFileSize = 16 << 10

// releasePubKey is the release public key (the base64 line of
// minisign.pub) compiled in by release.Build through EmbedKeyFlag. It is
// the only package variable: the linker writes it, nothing else does.
var releasePubKey string

// EmbeddedPublicKey returns the release public key compiled into this
// binary, or "" for a binary built without a signing key (go build, tests).
// The updater trusts it next to [userdata] pubkey, so an agent can verify
// its next release without any configuration.
func EmbeddedPublicKey() string { return strings.TrimSpace(releasePubKey) }

// EmbedKeyFlag returns the -ldflags item that makes pub the
// EmbeddedPublicKey of the binary being linked. The symbol is derived from
// this package's import path so that moving the package cannot silently
// turn the flag into a no-op (the linker ignores -X for unknown symbols).
func EmbedKeyFlag(pub minisign.PublicKey) string {
	return "-X " + reflect.TypeFor[Verifier]().PkgPath() + ".releasePubKey=" + pub.String()
}

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
	secret, err := marshalSecretKey(priv, passphrase, unencrypted)
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

func marshalSecretKey(priv minisign.PrivateKey, passphrase string, unencrypted bool) ([]byte, error) {
	if unencrypted {
		return priv.MarshalText()
	}
	return minisign.EncryptKey(passphrase, priv)
}

// IsEncryptedKeyFile reports whether path holds a passphrase-protected
// minisign secret key, so that a caller asks for a passphrase only when one
// is needed. It decodes the key rather than searching its text: minisign
// writes "encrypted secret key" in the comment of unencrypted keys too. A
// file that is no minisign secret key at all is an error.
func IsEncryptedKeyFile(path string) (bool, error) {
	data, err := fsutil.ReadFileLimit(path, maxKeyFileSize)
	if err != nil {
		return false, fmt.Errorf("signing key %s: %w", path, err)
	}
	if minisign.IsEncrypted(data) {
		return true, nil
	}
	var key minisign.PrivateKey
	if err := key.UnmarshalText(data); err != nil {
		return false, notASecretKey(path, err)
	}
	return false, nil
}

// LoadSecretKey reads a minisign secret key, decrypting it with
// passphrase when it is encrypted.
func LoadSecretKey(path, passphrase string) (minisign.PrivateKey, error) {
	data, err := fsutil.ReadFileLimit(path, maxKeyFileSize)
	if err != nil {
		return minisign.PrivateKey{}, fmt.Errorf("signing key %s: %w", path, err)
	}
	if minisign.IsEncrypted(data) {
		return decryptSecretKey(path, passphrase, data)
	}
	var key minisign.PrivateKey
	if err := key.UnmarshalText(data); err != nil {
		return minisign.PrivateKey{}, notASecretKey(path, err)
	}
	return key, nil
}

func decryptSecretKey(path, passphrase string, data []byte) (minisign.PrivateKey, error) {
	if passphrase == "" {
		return minisign.PrivateKey{}, fmt.Errorf("signing key %s is encrypted: set OPSAGENT_SIGNING_PASSPHRASE", path)
	}
	key, err := minisign.DecryptKey(passphrase, data)
	if err != nil {
		return minisign.PrivateKey{}, fmt.Errorf("signing key %s: wrong passphrase or damaged key: %w", path, err)
	}
	return key, nil
}

func notASecretKey(path string, err error) error {
	return fmt.Errorf("signing key %s: not a minisign secret key (%w): give the %s written by 'opsagent release keygen' or 'minisign -G'", path, err, SecretKeyFile)
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

// PublicKeyOf returns the public half of a secret key, so that a build can
// embed the key that verifies what it signs.
func PublicKeyOf(key minisign.PrivateKey) minisign.PublicKey {
	return key.Public().(minisign.PublicKey)
}

// KeyID renders a key id the way minisign prints it (upper-case hex with
// no leading zeros: its printf is "%" PRIX64), so that ids in our errors
// can be compared with the comment line of minisign.pub. One key in
// sixteen has an id that starts with a zero digit.
func KeyID(id uint64) string { return fmt.Sprintf("%X", id) }
