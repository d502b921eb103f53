package system_test

import (
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/testutil/rpmrepo"
)

// TestParsePGPPublicKeys reads keys gpg made, armoured and binary, and
// finds gpg's own fingerprint; two keys in one file are both found.
func TestParsePGPPublicKeys(t *testing.T) {
	a := rpmrepo.NewKey(t, "opsagent test a <a@example.invalid>")
	b := rpmrepo.NewKey(t, "opsagent test b <b@example.invalid>")
	for name, data := range map[string][]byte{"armoured": a.Public, "binary": a.PublicBinary} {
		keys, err := system.ParsePGPPublicKeys(data)
		if err != nil || len(keys) != 1 || keys[0].Fingerprint != a.Fingerprint {
			t.Fatalf("%s: %+v %v, want %s", name, keys, err, a.Fingerprint)
		}
		if got, want := keys[0].RPMVersion(), strings.ToLower(a.Fingerprint[32:]); got != want {
			t.Fatalf("rpm version %s, want %s", got, want)
		}
	}
	keys, err := system.ParsePGPPublicKeys(append(append([]byte{}, a.Public...), b.Public...))
	if err != nil || len(keys) != 2 || keys[1].Fingerprint != b.Fingerprint {
		t.Fatalf("two keys: %+v %v", keys, err)
	}
	damaged := []byte(strings.Replace(string(a.Public), "m", "n", 1))
	if _, err := system.ParsePGPPublicKeys(damaged); err == nil {
		t.Fatal("a damaged armour was read")
	}
	for _, junk := range []string{"", "hello", "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n"} {
		if _, err := system.ParsePGPPublicKeys([]byte(junk)); err == nil {
			t.Fatalf("%q read as a key", junk)
		}
	}
}

// FuzzParsePGPPublicKeys: any input is read or refused, never a panic,
// and a key found has a well-formed fingerprint.
func FuzzParsePGPPublicKeys(f *testing.F) {
	f.Add([]byte("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQENBGsRNE4BCACgB4Wm\n=AAAA\n-----END PGP PUBLIC KEY BLOCK-----\n"))
	f.Add([]byte{0x99, 0x00, 0x03, 0x04, 0x01, 0x02})
	f.Add([]byte{0xc6, 0xff, 0x00, 0x00, 0x00, 0x01, 0x04})
	f.Fuzz(func(t *testing.T, data []byte) {
		keys, err := system.ParsePGPPublicKeys(data)
		if err == nil && len(keys) == 0 {
			t.Fatal("no error and no key")
		}
		for _, k := range keys {
			if len(k.Fingerprint) != 40 || len(k.RPMVersion()) != 8 {
				t.Fatalf("key %+v", k)
			}
		}
	})
}
