package dist

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// printEmbeddedKeyEnv makes the test binary print EmbeddedPublicKey and
// exit, so TestEmbedKeyFlag can link one with EmbedKeyFlag and ask it.
const printEmbeddedKeyEnv = "OPSAGENT_DIST_TEST_PRINT_EMBEDDED_KEY"

func TestMain(m *testing.M) {
	if os.Getenv(printEmbeddedKeyEnv) == "1" {
		fmt.Println(EmbeddedPublicKey())
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestKeygenEncryptedAndRefusals(t *testing.T) {
	dir := t.TempDir()
	if _, err := Keygen(dir, "", false); err == nil {
		t.Error("empty passphrase accepted for an encrypted key")
	}
	pub, err := Keygen(dir, "correct horse", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Keygen(dir, "x", true); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("overwrote a key: %v", err)
	}
	secret := filepath.Join(dir, SecretKeyFile)
	if st, _ := os.Stat(secret); st.Mode().Perm() != 0o600 {
		t.Errorf("secret key mode %v", st.Mode())
	}
	if enc, err := IsEncryptedKeyFile(secret); err != nil || !enc {
		t.Errorf("IsEncryptedKeyFile(encrypted key) = %v, %v; want true", enc, err)
	}
	if _, err := LoadSecretKey(secret, ""); err == nil || !strings.Contains(err.Error(), "OPSAGENT_SIGNING_PASSPHRASE") {
		t.Errorf("no passphrase: %v", err)
	}
	if _, err := LoadSecretKey(secret, "wrong"); err == nil || !strings.Contains(err.Error(), "wrong passphrase") {
		t.Errorf("wrong passphrase: %v", err)
	}
	key, err := LoadSecretKey(secret, "correct horse")
	if err != nil {
		t.Fatal(err)
	}
	pk, _ := ParsePublicKey(pub)
	if !PublicKeyOf(key).Equal(pk) {
		t.Error("PublicKeyOf(secret) is not the public key Keygen returned")
	}
	if err := Verify(pk, []byte("msg"), Sign(key, []byte("msg"), "t")); err != nil {
		t.Fatal(err)
	}
	whole, _ := os.ReadFile(filepath.Join(dir, PublicKeyFile))
	if pk2, err := ParsePublicKey(string(whole)); err != nil || !pk2.Equal(pk) {
		t.Errorf("minisign.pub file form: %v", err)
	}
	if _, err := ParsePublicKey("not a key"); err == nil {
		t.Error("garbage public key accepted")
	}
}

// TestIsEncryptedKeyFile: an unencrypted key says "encrypted" in its
// comment line (minisign's own wording), so only decoding tells them apart.
func TestIsEncryptedKeyFile(t *testing.T) {
	dir := t.TempDir()
	if _, err := Keygen(dir, "", true); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, SecretKeyFile)
	if data, _ := os.ReadFile(plain); !strings.Contains(string(data), "encrypted") {
		t.Fatalf("expected the unencrypted key's comment to say 'encrypted':\n%s", data)
	}
	if enc, err := IsEncryptedKeyFile(plain); err != nil || enc {
		t.Errorf("unencrypted key: %v, %v; want false, nil", enc, err)
	}
	garbage := filepath.Join(dir, "garbage.key")
	if err := os.WriteFile(garbage, []byte("untrusted comment: minisign encrypted secret key\nnot base64 at all\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := IsEncryptedKeyFile(garbage); err == nil || !strings.Contains(err.Error(), garbage) || !strings.Contains(err.Error(), "not a minisign secret key") {
		t.Errorf("garbage key: %v", err)
	}
	public := filepath.Join(dir, PublicKeyFile) // the classic mix-up
	if _, err := IsEncryptedKeyFile(public); err == nil || !strings.Contains(err.Error(), "not a minisign secret key") {
		t.Errorf("public key given as secret key: %v", err)
	}
	if _, err := LoadSecretKey(public, ""); err == nil || !strings.Contains(err.Error(), "not a minisign secret key") {
		t.Errorf("LoadSecretKey(public key): %v", err)
	}
	missing := filepath.Join(dir, "nope.key")
	if _, err := IsEncryptedKeyFile(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing key: %v", err)
	}
}

// TestIsEncryptedKeyFileMinisignTool reads keys written by minisign itself.
func TestIsEncryptedKeyFileMinisignTool(t *testing.T) {
	mini := minisignTool(t)
	dir := t.TempDir()
	sec, pub := filepath.Join(dir, "m.key"), filepath.Join(dir, "m.pub")
	run(t, mini, "-G", "-W", "-s", sec, "-p", pub)
	if enc, err := IsEncryptedKeyFile(sec); err != nil || enc {
		t.Errorf("minisign -G -W key: %v, %v; want false, nil", enc, err)
	}
	key, err := LoadSecretKey(sec, "")
	if err != nil {
		t.Fatal(err)
	}
	text, _ := os.ReadFile(pub)
	pk, err := ParsePublicKey(string(text))
	if err != nil || !PublicKeyOf(key).Equal(pk) {
		t.Errorf("minisign's key pair does not match: %v", err)
	}
}

// TestEmbedKeyFlag links this package's test binary with EmbedKeyFlag and
// asks it for its key: the flag names the real symbol (the linker would
// ignore a wrong one silently).
func TestEmbedKeyFlag(t *testing.T) {
	if testing.Short() {
		t.Skip("links a test binary")
	}
	if EmbeddedPublicKey() != "" {
		t.Fatalf("a plain test build has an embedded key %q", EmbeddedPublicKey())
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command")
	}
	k := newKey(t)
	bin := filepath.Join(t.TempDir(), "dist.test")
	run(t, gobin, "test", "-c", "-o", bin, "-ldflags", EmbedKeyFlag(k.pub), ".")
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), printEmbeddedKeyEnv+"=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != k.pub.String() {
		t.Errorf("embedded key %q, want %q", got, k.pub.String())
	}
}

func TestKeyIDMatchesMinisign(t *testing.T) {
	mini := minisignTool(t)
	dir := t.TempDir()
	pub := filepath.Join(dir, "m.pub")
	run(t, mini, "-G", "-W", "-s", filepath.Join(dir, "m.key"), "-p", pub)
	text, _ := os.ReadFile(pub)
	pk, err := ParsePublicKey(string(text))
	if err != nil {
		t.Fatal(err)
	}
	// minisign.pub: "untrusted comment: minisign public key <ID>".
	first, _, _ := strings.Cut(string(text), "\n")
	if want := first[strings.LastIndex(first, " ")+1:]; KeyID(pk.ID()) != want {
		t.Errorf("KeyID %s, minisign says %s", KeyID(pk.ID()), want)
	}
}

func minisignTool(t *testing.T) string {
	t.Helper()
	mini, err := exec.LookPath("minisign")
	if err != nil {
		t.Skip("minisign not installed")
	}
	return mini
}

// run runs a command and fails the test with its output when it fails.
func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func TestKeyIDHasNoLeadingZeros(t *testing.T) {
	for id, want := range map[uint64]string{0x042395613E70D6AE: "42395613E70D6AE", 0xA0: "A0", 0xFFFFFFFFFFFFFFFF: "FFFFFFFFFFFFFFFF"} {
		if got := KeyID(id); got != want {
			t.Errorf("KeyID(%#x) = %s, want %s (as minisign prints it)", id, got, want)
		}
	}
}
