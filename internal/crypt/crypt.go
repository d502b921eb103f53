// Package crypt implements the crypt(3) password hashes that Linux
// shadow files hold and the agent must produce or check: SHA-512 crypt
// ($6$) and SHA-256 crypt ($5$), from Ulrich Drepper's specification
// "Unix crypt using SHA-256 and SHA-512" (the one glibc and libxcrypt
// follow), and the FreeBSD MD5 crypt ($1$) of Poul-Henning Kamp.
//
// The agent hashes a plaintext password only with SHA-512 (the strongest
// of the three that every libc of the supported distributions verifies);
// SHA-256 and MD5 are there to verify hashes already in a shadow file,
// so that a password that has not changed is not hashed again. Other
// methods (yescrypt, bcrypt, DES) cannot be verified here: Verify says
// so with ErrUnsupported.
package crypt

import (
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash"
	"strconv"
	"strings"
)

// alphabet is crypt(3)'s base-64 alphabet (not RFC 4648's).
const alphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// The SHA-crypt parameters of the specification.
const (
	// DefaultRounds is used when a setting names no rounds; the hash then
	// carries no "rounds=" field.
	DefaultRounds = 5000
	MinRounds     = 1000
	MaxRounds     = 999999999
	maxSHASalt    = 16
	maxMD5Salt    = 8
	roundsPrefix  = "rounds="
)

// ErrUnsupported is a hash whose method this package cannot verify.
var ErrUnsupported = errors.New("crypt: unsupported hash method")

// SHA512 is crypt(3) with the $6$ method: password hashed with salt (at
// most 16 bytes are used, up to the first '$') and rounds (0: the
// default, written without a rounds field; otherwise clamped to
// MinRounds..MaxRounds and written, as glibc does). Its cost grows with
// the square of the password's length (the specification hashes the
// password repeated as many times as it is long): callers bound it.
func SHA512(password, salt string, rounds int) string {
	return shaCrypt(sha512.New, "$6$", sha512Perm[:], password, salt, rounds)
}

// SHA256 is crypt(3) with the $5$ method (see SHA512).
func SHA256(password, salt string, rounds int) string {
	return shaCrypt(sha256.New, "$5$", sha256Perm[:], password, salt, rounds)
}

// NewSHA512 hashes password with SHA-512 crypt, a fresh random 16-byte
// salt and the default rounds: the form useradd and chpasswd write.
func NewSHA512(password string) (string, error) {
	salt, err := NewSalt(maxSHASalt)
	if err != nil {
		return "", err
	}
	return SHA512(password, salt, 0), nil
}

// NewSalt returns n random characters of the crypt alphabet.
func NewSalt(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("crypt: random salt: %w", err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)] // 256 = 4·64: no bias
	}
	return string(b), nil
}

// Crypt is crypt(3) for the methods of this package: setting is a hash
// or its prefix ("$6$salt", "$6$rounds=10000$salt$…", "$1$salt$…").
func Crypt(password, setting string) (string, error) {
	switch {
	case strings.HasPrefix(setting, "$6$"), strings.HasPrefix(setting, "$5$"):
		rounds, salt, err := shaSetting(setting[3:])
		if err != nil {
			return "", err
		}
		if setting[1] == '6' {
			return SHA512(password, salt, rounds), nil
		}
		return SHA256(password, salt, rounds), nil
	case strings.HasPrefix(setting, "$1$"):
		return MD5(password, saltField(setting[3:], maxMD5Salt)), nil
	}
	return "", ErrUnsupported
}

// Verify reports whether password hashes to hash, comparing in constant
// time. Hashes of methods other than $1$, $5$ and $6$ (yescrypt "$y$",
// bcrypt "$2b$", DES, locked "!…" forms) give ErrUnsupported.
func Verify(hash, password string) (bool, error) {
	got, err := Crypt(password, hash)
	if err != nil {
		return false, err
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(hash)) == 1, nil
}

// shaSetting reads "[rounds=N$]salt[$…]" of a SHA-crypt setting.
func shaSetting(s string) (rounds int, salt string, err error) {
	if rest, ok := strings.CutPrefix(s, roundsPrefix); ok {
		digits, after, found := strings.Cut(rest, "$")
		n, perr := strconv.ParseUint(digits, 10, 64)
		if !found || perr != nil || digits == "" {
			return 0, "", fmt.Errorf("crypt: bad rounds field in %q", s)
		}
		rounds = int(min(n, MaxRounds))
		if rounds < MinRounds {
			rounds = MinRounds
		}
		s = after
	}
	return rounds, saltField(s, maxSHASalt), nil
}

// saltField is the salt of a setting: up to the first '$', at most max
// bytes.
func saltField(s string, max int) string {
	if i := strings.IndexByte(s, '$'); i >= 0 {
		s = s[:i]
	}
	if len(s) > max {
		s = s[:max]
	}
	return s
}

// shaCrypt is the algorithm of the specification, steps numbered as
// there.
func shaCrypt(newHash func() hash.Hash, magic string, perm []byte, password, salt string, rounds int) string {
	custom := rounds != 0
	switch {
	case !custom:
		rounds = DefaultRounds
	case rounds < MinRounds:
		rounds = MinRounds
	case rounds > MaxRounds:
		rounds = MaxRounds
	}
	salt = saltField(salt, maxSHASalt)
	p, s := []byte(password), []byte(salt)

	// Steps 4-8: digest B = H(P S P).
	b := newHash()
	b.Write(p)
	b.Write(s)
	b.Write(p)
	sumB := b.Sum(nil)
	size := len(sumB)

	// Steps 1-3, 9-12: digest A = H(P S, B repeated over len(P), then
	// for each bit of len(P) from the lowest: B for 1, P for 0).
	a := newHash()
	a.Write(p)
	a.Write(s)
	for n := len(p); n > 0; n -= size {
		a.Write(sumB[:min(n, size)])
	}
	for n := len(p); n > 0; n >>= 1 {
		if n&1 != 0 {
			a.Write(sumB)
		} else {
			a.Write(p)
		}
	}
	sumA := a.Sum(nil)

	// Steps 13-16: the byte sequence P = H(P repeated len(P) times),
	// repeated to len(P) bytes.
	dp := newHash()
	for range len(p) {
		dp.Write(p)
	}
	pSeq := repeat(dp.Sum(nil), len(p))

	// Steps 17-20: the byte sequence S = H(S repeated 16 + A[0] times),
	// repeated to len(S) bytes.
	ds := newHash()
	for range 16 + int(sumA[0]) {
		ds.Write(s)
	}
	sSeq := repeat(ds.Sum(nil), len(s))

	// Step 21: the rounds.
	c := sumA
	h := newHash()
	for i := range rounds {
		h.Reset()
		if i&1 != 0 {
			h.Write(pSeq)
		} else {
			h.Write(c)
		}
		if i%3 != 0 {
			h.Write(sSeq)
		}
		if i%7 != 0 {
			h.Write(pSeq)
		}
		if i&1 != 0 {
			h.Write(c)
		} else {
			h.Write(pSeq)
		}
		c = h.Sum(c[:0])
	}

	// Step 22: the output string.
	var out strings.Builder
	out.WriteString(magic)
	if custom {
		out.WriteString(roundsPrefix + strconv.Itoa(rounds) + "$")
	}
	out.WriteString(salt)
	out.WriteByte('$')
	encodePerm(&out, c, perm)
	return out.String()
}

// repeat is the first n bytes of d repeated.
func repeat(d []byte, n int) []byte {
	out := make([]byte, 0, n)
	for len(out) < n {
		out = append(out, d[:min(len(d), n-len(out))]...)
	}
	return out
}

// The byte order of the output encodings: groups of three bytes (the
// first one the most significant), each written as four characters; the
// last group is shorter and marked by its length in the table.
var (
	sha512Perm = [...]byte{
		0, 21, 42, 22, 43, 1, 44, 2, 23, 3, 24, 45, 25, 46, 4, 47, 5, 26, 6, 27, 48,
		28, 49, 7, 50, 8, 29, 9, 30, 51, 31, 52, 10, 53, 11, 32, 12, 33, 54, 34, 55, 13,
		56, 14, 35, 15, 36, 57, 37, 58, 16, 59, 17, 38, 18, 39, 60, 40, 61, 19, 62, 20, 41,
		63, // one byte left: 2 characters
	}
	sha256Perm = [...]byte{
		0, 10, 20, 21, 1, 11, 12, 22, 2, 3, 13, 23, 24, 4, 14, 15, 25, 5, 6, 16, 26,
		27, 7, 17, 18, 28, 8, 9, 19, 29,
		31, 30, // two bytes left: 3 characters (the first one is the more significant)
	}
	md5Perm = [...]byte{0, 6, 12, 1, 7, 13, 2, 8, 14, 3, 9, 15, 4, 10, 5, 11}
)

// encodePerm writes sum in the order perm: full groups of three bytes as
// four characters, then a tail of one byte (two characters) or two bytes
// (three characters).
func encodePerm(out *strings.Builder, sum []byte, perm []byte) {
	i := 0
	for ; i+3 <= len(perm); i += 3 {
		w := uint(sum[perm[i]])<<16 | uint(sum[perm[i+1]])<<8 | uint(sum[perm[i+2]])
		put64(out, w, 4)
	}
	switch len(perm) - i {
	case 1:
		put64(out, uint(sum[perm[i]]), 2)
	case 2:
		put64(out, uint(sum[perm[i]])<<8|uint(sum[perm[i+1]]), 3)
	}
}

// put64 writes the n low 6-bit groups of w, least significant first.
func put64(out *strings.Builder, w uint, n int) {
	for range n {
		out.WriteByte(alphabet[w&0x3f])
		w >>= 6
	}
}

// MD5 is crypt(3) with the $1$ method (FreeBSD's md5crypt): salt is at
// most 8 bytes, up to the first '$'.
func MD5(password, salt string) string {
	salt = saltField(salt, maxMD5Salt)
	p, s := []byte(password), []byte(salt)
	const magic = "$1$"

	alt := md5.New()
	alt.Write(p)
	alt.Write(s)
	alt.Write(p)
	final := alt.Sum(nil)

	ctx := md5.New()
	ctx.Write(p)
	ctx.Write([]byte(magic))
	ctx.Write(s)
	for n := len(p); n > 0; n -= md5.Size {
		ctx.Write(final[:min(n, md5.Size)])
	}
	// The original clears final and then, for each bit of len(P), adds
	// its first byte (now zero) or the password's first byte.
	for n := len(p); n > 0; n >>= 1 {
		if n&1 != 0 {
			ctx.Write([]byte{0})
		} else {
			ctx.Write(p[:1])
		}
	}
	final = ctx.Sum(nil)

	h := md5.New()
	for i := range 1000 {
		h.Reset()
		if i&1 != 0 {
			h.Write(p)
		} else {
			h.Write(final)
		}
		if i%3 != 0 {
			h.Write(s)
		}
		if i%7 != 0 {
			h.Write(p)
		}
		if i&1 != 0 {
			h.Write(final)
		} else {
			h.Write(p)
		}
		final = h.Sum(final[:0])
	}

	var out strings.Builder
	out.WriteString(magic)
	out.WriteString(salt)
	out.WriteByte('$')
	for i := 0; i+3 <= 15; i += 3 {
		w := uint(final[md5Perm[i]])<<16 | uint(final[md5Perm[i+1]])<<8 | uint(final[md5Perm[i+2]])
		put64(&out, w, 4)
	}
	put64(&out, uint(final[md5Perm[15]]), 2)
	return out.String()
}

// IsHash reports whether s has the shape of a crypt(3) hash, or of a
// shadow password field that locks the account, so that a user module
// can take it as given instead of hashing it: "$id$…" (any method:
// $1$, $5$, $6$, $y$, $2b$, …), a 13-character traditional DES hash,
// or "!" / "*" / "!!" alone or in front of a hash. A value with ':' or a
// line break is never one (it would break the shadow file's format).
func IsHash(s string) bool {
	if s == "" {
		return false
	}
	rest := strings.TrimLeft(s, "!")
	switch {
	case rest == "" || rest == "*":
		return true
	case strings.HasPrefix(rest, "$"):
		fields := strings.Split(rest[1:], "$")
		if len(fields) < 3 || fields[0] == "" || fields[len(fields)-1] == "" {
			return false
		}
		return onlyIn(fields[0], "abcdefghijklmnopqrstuvwxyz0123456789") && onlyIn(rest[1:], alphabet+"$=,")
	}
	return len(rest) == 13 && onlyIn(rest, alphabet)
}

func onlyIn(s, set string) bool {
	for i := 0; i < len(s); i++ {
		if strings.IndexByte(set, s[i]) < 0 {
			return false
		}
	}
	return true
}
