package crypt

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"
)

// specVectors are the test vectors of Drepper's "Unix crypt using
// SHA-256 and SHA-512" (the setting, the key, the expected hash).
var specVectors = []struct{ setting, key, want string }{
	{"$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"},
	{"$5$rounds=10000$saltstringsaltstring", "Hello world!", "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"},
	{"$5$rounds=5000$toolongsaltstring", "This is just a test", "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"},
	{"$5$rounds=1400$anotherlongsaltstring", "a very much longer text to encrypt.  This one even stretches over morethan one line.", "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"},
	{"$5$rounds=77777$short", "we have a short salt string but not a short password", "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/"},
	{"$5$rounds=123456$asaltof16chars..", "a short string", "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"},
	{"$5$rounds=10$roundstoolow", "the minimum number is still observed", "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"},
	{"$6$saltstring", "Hello world!", "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"},
	{"$6$rounds=10000$saltstringsaltstring", "Hello world!", "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."},
	{"$6$rounds=5000$toolongsaltstring", "This is just a test", "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"},
	{"$6$rounds=1400$anotherlongsaltstring", "a very much longer text to encrypt.  This one even stretches over morethan one line.", "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"},
	{"$6$rounds=77777$short", "we have a short salt string but not a short password", "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0"},
	{"$6$rounds=123456$asaltof16chars..", "a short string", "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1"},
	{"$6$rounds=10$roundstoolow", "the minimum number is still observed", "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX."},
	// md5crypt has no published vectors; these are glibc's and OpenSSL's
	// (openssl passwd -1 -salt saltsalt password).
	{"$1$saltsalt", "password", "$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/"},
	{"$1$saltsaltTOOLONG$x", "password", "$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/"},
}

func TestSpecVectors(t *testing.T) {
	for _, v := range specVectors {
		got, err := Crypt(v.key, v.setting)
		if err != nil || got != v.want {
			t.Errorf("Crypt(%q, %q) = %q, %v\n want %q", v.key, v.setting, got, err, v.want)
		}
		ok, err := Verify(v.want, v.key)
		if err != nil || !ok {
			t.Errorf("Verify(%q, %q) = %v, %v", v.want, v.key, ok, err)
		}
		if ok, _ := Verify(v.want, v.key+"x"); ok {
			t.Errorf("Verify(%q) accepts a wrong password", v.want)
		}
	}
}

func TestVerifyUnsupported(t *testing.T) {
	for _, h := range []string{
		"$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7", // yescrypt
		"$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",              // bcrypt
		"abJnggxhB/yWI",                    // DES
		"!$6$saltstring$svn8UoSVapNtMuq1u", // locked
		"!", "*", "",
	} {
		if ok, err := Verify(h, "Hello world!"); ok || !errors.Is(err, ErrUnsupported) {
			t.Errorf("Verify(%q) = %v, %v; want ErrUnsupported", h, ok, err)
		}
	}
	if _, err := Crypt("x", "$6$rounds=abc$salt"); err == nil {
		t.Error("a bad rounds field was accepted")
	}
}

func TestNewSHA512(t *testing.T) {
	a, err := NewSHA512("instant")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewSHA512("instant")
	if a == b {
		t.Fatal("two hashes of one password share a salt")
	}
	if !strings.HasPrefix(a, "$6$") || len(a) != 3+16+1+86 || !IsHash(a) {
		t.Fatalf("hash %q", a)
	}
	if ok, err := Verify(a, "instant"); !ok || err != nil {
		t.Fatalf("Verify of a new hash: %v %v", ok, err)
	}
}

func TestIsHash(t *testing.T) {
	yes := []string{
		"$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
		"$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
		"$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/",
		"$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
		"$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",
		"abJnggxhB/yWI", "!", "!!", "*", "!*", "!$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/",
	}
	no := []string{"", "instant", "Hello world!", "$6$", "$6$salt", "$6$salt$", "$$salt$x",
		"$6$salt$has:colon", "$6$salt$has\nline", "$6$sa lt$x", "abJnggxhB/yW", "abJnggxhB/yWIx", "$X$salt$x"}
	for _, s := range yes {
		if !IsHash(s) {
			t.Errorf("IsHash(%q) = false", s)
		}
	}
	for _, s := range no {
		if IsHash(s) {
			t.Errorf("IsHash(%q) = true", s)
		}
	}
}

// libcCrypt starts one process that runs the system's crypt(3) (perl's
// crypt, else python3's crypt module) over hex-encoded key/setting
// lines, so that any bytes can be tried.
func libcCrypt(t *testing.T, pairs [][2]string) []string {
	t.Helper()
	var cmd *exec.Cmd
	if _, err := exec.LookPath("perl"); err == nil {
		cmd = exec.Command("perl", "-ne", `chomp; my ($k,$s)=split / /; print crypt(pack("H*",$k), pack("H*",$s)), "\n"`)
	} else if _, err := exec.LookPath("python3"); err == nil {
		cmd = exec.Command("python3", "-W", "ignore", "-c", `
import sys, crypt
for line in sys.stdin:
    k, s = line.split()
    print(crypt.crypt(bytes.fromhex(k).decode("latin-1"), bytes.fromhex(s).decode("latin-1")))`)
	} else {
		t.Skip("neither perl nor python3: no system crypt(3) to compare with")
	}
	var in strings.Builder
	for _, p := range pairs {
		fmt.Fprintf(&in, "%s %s\n", hex.EncodeToString([]byte(p[0])), hex.EncodeToString([]byte(p[1])))
	}
	cmd.Stdin = strings.NewReader(in.String())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v", cmd.Path, err)
	}
	var got []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		got = append(got, sc.Text())
	}
	if len(got) != len(pairs) {
		t.Fatalf("system crypt gave %d lines for %d inputs", len(got), len(pairs))
	}
	return got
}

// TestAgainstLibc compares with the machine's own crypt(3) on random
// keys (ASCII and not, empty, longer than a digest) and salts: the
// hashes this package writes are the ones the system's login verifies.
// (libxcrypt refuses rounds below 1000 where the specification clamps,
// so rounds here are at least 1000.)
func TestAgainstLibc(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var pairs [][2]string
	randBytes := func(n int, printable bool) string {
		b := make([]byte, n)
		for i := range b {
			if printable {
				b[i] = byte(32 + r.IntN(95))
			} else {
				b[i] = byte(1 + r.IntN(255)) // no NUL: C strings end there
			}
		}
		return string(b)
	}
	for i := range 240 {
		key := randBytes(r.IntN(150), i%3 != 0)
		salt := randBytes(r.IntN(20), true)
		salt = strings.Map(func(c rune) rune {
			if strings.ContainsRune(alphabet, c) {
				return c
			}
			return '.'
		}, salt)
		var setting string
		switch i % 4 {
		case 0:
			setting = "$6$" + salt
		case 1:
			setting = fmt.Sprintf("$6$rounds=%d$%s", 1000+r.IntN(3000), salt)
		case 2:
			setting = fmt.Sprintf("$5$rounds=%d$%s", 1000+r.IntN(3000), salt)
		case 3:
			setting = "$1$" + salt
		}
		pairs = append(pairs, [2]string{key, setting})
	}
	want := libcCrypt(t, pairs)
	for i, p := range pairs {
		if !strings.HasPrefix(want[i], "$") {
			t.Fatalf("system crypt refused %q: %q", p[1], want[i])
		}
		got, err := Crypt(p[0], p[1])
		if err != nil || got != want[i] {
			t.Errorf("Crypt(%q, %q) = %q, %v\n system crypt: %q", p[0], p[1], got, err, want[i])
		}
	}
}

// FuzzCrypt: any key and salt hash without panicking, to a string that
// verifies with that key only and that IsHash recognises.
func FuzzCrypt(f *testing.F) {
	for _, v := range specVectors {
		f.Add(v.key, v.setting)
	}
	f.Add("", "$6$")
	f.Add("\xff\x00x", "$1$$$")
	f.Fuzz(func(t *testing.T, key, setting string) {
		if len(key) > 1024 {
			return // SHA-crypt's cost grows with the square of the key's length
		}
		if len(setting) > 3 && (setting[:3] == "$5$" || setting[:3] == "$6$") {
			if rounds, _, err := shaSetting(setting[3:]); err == nil && rounds > 5000 {
				return // up to 999999999 rounds: too slow here
			}
		}
		got, err := Crypt(key, setting)
		if err != nil {
			return
		}
		if ok, err := Verify(got, key); !ok || err != nil {
			t.Fatalf("Verify(Crypt(%q, %q) = %q) = %v, %v", key, setting, got, ok, err)
		}
		if ok, _ := Verify(got, key+"\x01"); ok {
			t.Fatalf("%q verifies another key", got)
		}
		if strings.ContainsAny(got, ":\n") {
			t.Fatalf("%q would break a shadow line", got)
		}
	})
}

// FuzzVerify: whatever a shadow file holds, Verify neither panics nor
// accepts a key for a hash that is not one of its methods.
func FuzzVerify(f *testing.F) {
	for _, v := range specVectors {
		f.Add(v.want, v.key)
	}
	f.Add("$6$rounds=", "x")
	f.Add("!", "")
	f.Fuzz(func(t *testing.T, hash, key string) {
		if strings.Contains(hash, "rounds=") || len(key) > 1024 {
			return // up to 999999999 rounds, or a long key: too slow
		}
		ok, err := Verify(hash, key)
		if ok && err != nil {
			t.Fatal("ok with an error")
		}
		if ok && !(strings.HasPrefix(hash, "$1$") || strings.HasPrefix(hash, "$5$") || strings.HasPrefix(hash, "$6$")) {
			t.Fatalf("Verify(%q) accepted", hash)
		}
		_ = IsHash(hash)
	})
}
