package dist

import (
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"aead.dev/minisign"
)

type testKey struct {
	pub  minisign.PublicKey
	priv minisign.PrivateKey
}

func newKey(t *testing.T) testKey {
	t.Helper()
	pub, priv, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return testKey{pub, priv}
}

// pubFile renders the whole minisign.pub text of k.
func (k testKey) pubFile() string {
	text, _ := k.pub.MarshalText()
	return string(text) + "\n"
}

func newVerifier(t *testing.T, keys ...string) *Verifier {
	t.Helper()
	v, err := NewVerifier(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestVerifierTwoKeys(t *testing.T) {
	a, b := newKey(t), newKey(t)
	// b given as a whole minisign.pub, a both ways: one key each.
	v := newVerifier(t, a.pub.String(), "", b.pubFile(), a.pubFile(), "  \n")
	if v.Len() != 2 {
		t.Fatalf("Len %d, want 2 (empty keys ignored, duplicates collapsed)", v.Len())
	}
	data := []byte("release 2.3.1")
	for name, k := range map[string]testKey{"a": a, "b": b} {
		if err := v.Verify(data, Sign(k.priv, data, "version:2.3.1")); err != nil {
			t.Errorf("signed by %s: %v", name, err)
		}
	}
}

// A key that does not parse is named in the error and skipped: the keys
// that parse still verify (a typo in [userdata] pubkey must not disable
// the compiled-in release key).
func TestNewVerifierSkipsGarbageKeepsTheRest(t *testing.T) {
	a := newKey(t)
	v, err := NewVerifier("RWQ-not-a-key", "", a.pub.String())
	if err == nil || !strings.Contains(err.Error(), "#1") || !strings.Contains(err.Error(), "RWQ-not-a-key") {
		t.Fatalf("garbage key: %v (want it named as #1)", err)
	}
	if v == nil || v.Len() != 1 {
		t.Fatalf("verifier %v: want the one good key trusted", v)
	}
	data := []byte("release")
	if err := v.Verify(data, Sign(a.priv, data, "t")); err != nil {
		t.Errorf("the good key no longer verifies: %v", err)
	}
	if v, err := NewVerifier("garbage one", "garbage two"); err == nil || v.Len() != 0 || !strings.Contains(err.Error(), "#2") {
		t.Errorf("two garbage keys: %v, %d keys", err, v.Len())
	}
}

func TestVerifierUntrustedKeyNamesIDs(t *testing.T) {
	a, b, stranger := newKey(t), newKey(t), newKey(t)
	v := newVerifier(t, a.pub.String(), b.pub.String())
	data := []byte("payload")
	err := v.Verify(data, Sign(stranger.priv, data, "t"))
	if !errors.Is(err, ErrUntrustedKey) {
		t.Fatalf("want ErrUntrustedKey, got %v", err)
	}
	for _, id := range []uint64{stranger.pub.ID(), a.pub.ID(), b.pub.ID()} {
		if !strings.Contains(err.Error(), KeyID(id)) {
			t.Errorf("error does not name key id %s: %v", KeyID(id), err)
		}
	}
}

// TestVerifierKeyIDIsOnlyAHint: a signature that claims a trusted key id
// but was made with another key is a bad signature, not an accepted one.
func TestVerifierKeyIDIsOnlyAHint(t *testing.T) {
	a, stranger := newKey(t), newKey(t)
	data := []byte("payload")
	var s minisign.Signature
	if err := s.UnmarshalText(Sign(stranger.priv, data, "t")); err != nil {
		t.Fatal(err)
	}
	s.KeyID = a.pub.ID()
	forged, _ := s.MarshalText()
	if err := newVerifier(t, a.pub.String()).Verify(data, forged); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("want ErrBadSignature, got %v", err)
	}
}

func TestVerifierTampered(t *testing.T) {
	a := newKey(t)
	v := newVerifier(t, a.pub.String())
	data := []byte("the tarball bytes")
	sig := Sign(a.priv, data, "version:2.3.1")
	tampered := append([]byte(nil), data...)
	tampered[3] ^= 1
	if err := v.Verify(tampered, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("altered data: want ErrBadSignature, got %v", err)
	}
	// The trusted comment (it carries the version) is signed too.
	comment := []byte(strings.Replace(string(sig), "version:2.3.1", "version:9.9.9", 1))
	if err := v.Verify(data, comment); !errors.Is(err, ErrBadSignature) {
		t.Errorf("altered trusted comment: want ErrBadSignature, got %v", err)
	}
}

func TestVerifierNoTrustedKey(t *testing.T) {
	v := newVerifier(t, "", " ")
	if v.Len() != 0 {
		t.Fatalf("Len %d", v.Len())
	}
	a := newKey(t)
	err := v.Verify([]byte("x"), Sign(a.priv, []byte("x"), "t"))
	if !errors.Is(err, ErrNoTrustedKey) || !strings.Contains(err.Error(), "[userdata] pubkey") {
		t.Errorf("Verify: %v", err)
	}
	dir := t.TempDir()
	if err := v.VerifyFile(filepath.Join(dir, "f"), filepath.Join(dir, "f.minisig")); !errors.Is(err, ErrNoTrustedKey) {
		t.Errorf("VerifyFile: %v", err)
	}
}

func TestVerifierLegacySignature(t *testing.T) {
	a := newKey(t)
	data := []byte("signed with minisign -S -l")
	legacy := minisign.SignWithComments(a.priv, data, "timestamp:0", "legacy")
	var s minisign.Signature
	if err := s.UnmarshalText(legacy); err != nil || s.Algorithm != minisign.EdDSA {
		t.Fatalf("not a legacy signature: %v", err)
	}
	v := newVerifier(t, a.pub.String())
	if err := v.Verify(data, legacy); err != nil {
		t.Errorf("Verify: %v", err)
	}
	path, sigPath := writeSigned(t, data, legacy)
	if err := v.VerifyFile(path, sigPath); err != nil {
		t.Errorf("VerifyFile: %v", err)
	}
	if err := v.Verify([]byte("other"), legacy); !errors.Is(err, ErrBadSignature) {
		t.Errorf("legacy, altered data: %v", err)
	}
}

func TestVerifierMalformedSignature(t *testing.T) {
	a := newKey(t)
	v := newVerifier(t, a.pub.String())
	data := []byte("x")
	for name, sig := range map[string]string{
		"empty":     "",
		"garbage":   "this is not a signature\n",
		"html":      "<html><body>404 Not Found</body></html>\n",
		"truncated": string(Sign(a.priv, data, "t"))[:120],
	} {
		if err := v.Verify(data, []byte(sig)); !errors.Is(err, ErrMalformedSignature) {
			t.Errorf("%s: want ErrMalformedSignature, got %v", name, err)
		}
	}
	path, sigPath := writeSigned(t, data, []byte("garbage\n"))
	if err := v.VerifyFile(path, sigPath); !errors.Is(err, ErrMalformedSignature) || !strings.Contains(err.Error(), sigPath) {
		t.Errorf("VerifyFile: want ErrMalformedSignature naming %s, got %v", sigPath, err)
	}
	huge := strings.Repeat("x", MaxSignatureSize+1)
	path, sigPath = writeSigned(t, data, []byte(huge))
	if err := v.VerifyFile(path, sigPath); !errors.Is(err, ErrMalformedSignature) {
		t.Errorf("oversized .minisig: %v", err)
	}
}

func TestVerifyFileMissing(t *testing.T) {
	a := newKey(t)
	v := newVerifier(t, a.pub.String())
	path, sigPath := writeSigned(t, []byte("x"), Sign(a.priv, []byte("x"), "t"))
	if err := v.VerifyFile(path, sigPath+".nope"); err == nil || errors.Is(err, ErrMalformedSignature) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing signature: %v", err)
	}
	if err := v.VerifyFile(path+".nope", sigPath); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// TestVerifyFileStreams verifies a 64 MiB file while counting allocations:
// a prehashed signature must not make VerifyFile hold the file in memory.
func TestVerifyFileStreams(t *testing.T) {
	const size = 64 << 20
	a := newKey(t)
	path := filepath.Join(t.TempDir(), TarballName)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil { // sparse: cheap to make
		t.Fatal(err)
	}
	r := minisign.NewReader(f)
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatal(err)
	}
	f.Close()
	sigPath := path + ".minisig"
	if err := os.WriteFile(sigPath, r.SignWithComments(a.priv, "t", "u"), 0o644); err != nil {
		t.Fatal(err)
	}
	v := newVerifier(t, a.pub.String())

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	err = v.VerifyFile(path, sigPath)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size/8 {
		t.Errorf("VerifyFile allocated %d bytes for a %d-byte file: not streaming", alloc, size)
	}
}

func TestVerifyOneKey(t *testing.T) {
	a, b := newKey(t), newKey(t)
	data := []byte("x")
	if err := Verify(a.pub, data, Sign(a.priv, data, "t")); err != nil {
		t.Error(err)
	}
	if err := Verify(a.pub, data, Sign(b.priv, data, "t")); !errors.Is(err, ErrUntrustedKey) {
		t.Errorf("other key: %v", err)
	}
}

// TestSignVerifiedByMinisignTool: what Sign writes, minisign -V accepts,
// as a prehashed signature (-H); and what minisign -S writes, prehashed or
// legacy (-l), a Verifier accepts.
func TestSignVerifiedByMinisignTool(t *testing.T) {
	mini := minisignTool(t)
	dir := t.TempDir()
	pub, err := Keygen(dir, "", true)
	if err != nil {
		t.Fatal(err)
	}
	key, err := LoadSecretKey(filepath.Join(dir, SecretKeyFile), "")
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("opsagent release payload\n")
	path, _ := writeSigned(t, data, Sign(key, data, "timestamp:1767225600\tfile:opsagent.tgz\tversion:2.3.1"))
	pubFile := filepath.Join(dir, PublicKeyFile)
	out := run(t, mini, "-Vm", path, "-p", pubFile)
	if !strings.Contains(string(out), "version:2.3.1") {
		t.Errorf("minisign -V did not show our trusted comment:\n%s", out)
	}
	run(t, mini, "-V", "-H", "-m", path, "-P", pub)

	// The other way round, with a key minisign made.
	sec, mpub := filepath.Join(dir, "m.key"), filepath.Join(dir, "m.pub")
	run(t, mini, "-G", "-W", "-s", sec, "-p", mpub)
	text, _ := os.ReadFile(mpub)
	v := newVerifier(t, pub, string(text))
	for _, legacy := range []bool{false, true} {
		msg := filepath.Join(t.TempDir(), "msg")
		if err := os.WriteFile(msg, data, 0o644); err != nil {
			t.Fatal(err)
		}
		args := []string{"-S", "-W", "-s", sec, "-m", msg}
		if legacy {
			args = append(args, "-l")
		}
		run(t, mini, args...)
		if err := v.VerifyFile(msg, msg+".minisig"); err != nil {
			t.Errorf("minisign -S (legacy %v): %v", legacy, err)
		}
	}
}

// writeSigned writes data and sig side by side in a temporary directory.
func writeSigned(t *testing.T, data, sig []byte) (path, sigPath string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), TarballName)
	sigPath = path + ".minisig"
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sigPath, sig, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, sigPath
}
