package textcut

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestPrefix(t *testing.T) {
	for _, tc := range []struct {
		s    string
		n    int
		want string
	}{
		{"hello", 10, "hello"},
		{"hello", 5, "hello"},
		{"hello", 3, "hel"},
		{"héllo", 2, "h"}, // é is two bytes: not split
		{"héllo", 3, "hé"},
		{"日本", 4, "日"},
		{"abc", 0, ""},
		{"abc", -1, ""},
		{"\xff\xfe", 1, "\xff"}, // invalid bytes are their own characters
	} {
		if got := Prefix(tc.s, tc.n); got != tc.want {
			t.Errorf("Prefix(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
}

func FuzzPrefix(f *testing.F) {
	f.Add("héllo wörld", 4)
	f.Add(strings.Repeat("日", 10), 7)
	f.Fuzz(func(t *testing.T, s string, n int) {
		p := Prefix(s, n)
		if !strings.HasPrefix(s, p) || len(p) > max(n, 0) && p != s {
			t.Fatalf("Prefix(%q, %d) = %q", s, n, p)
		}
		if utf8.ValidString(s) && !utf8.ValidString(p) {
			t.Fatalf("Prefix(%q, %d) = %q splits a character", s, n, p)
		}
	})
}

func TestSuffix(t *testing.T) {
	for _, tc := range []struct {
		s    string
		n    int
		want string
	}{
		{"hello", 10, "hello"},
		{"hello", 3, "llo"},
		{"héllo", 4, "llo"}, // é is two bytes: not split
		{"héllo", 5, "éllo"},
		{"日本", 4, "本"},
		{"abc", 0, ""},
		{"abc", -1, ""},
	} {
		if got := Suffix(tc.s, tc.n); got != tc.want {
			t.Errorf("Suffix(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
}

func TestPrintable(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"plain text, café 日本\ttab", "plain text, café 日本\ttab"},
		{"\x1b]0;owned\x07title", `\x1b]0;owned\x07title`},
		{"red \x1b[31mRED\x1b[0m", `red \x1b[31mRED\x1b[0m`},
		{"two\nlines\r", `two\nlines\r`},
		{"c1 \u009b2J csi", `c1 \u009b2J csi`},
		{"del\x7f", `del\x7f`},
		{"bad \xff\xfe bytes", `bad \xff\xfe bytes`},
		{"bidi \u202egnp.exe\u202c", `bidi \u202egnp.exe\u202c`},
		{"isolate \u2066x\u2069", `isolate \u2066x\u2069`},
		{"", ""},
	} {
		if got := Printable(tc.in); got != tc.want {
			t.Errorf("Printable(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func FuzzSuffix(f *testing.F) {
	f.Add("héllo wörld", 4)
	f.Add(strings.Repeat("日", 10), 7)
	f.Fuzz(func(t *testing.T, s string, n int) {
		p := Suffix(s, n)
		if !strings.HasSuffix(s, p) || len(p) > max(n, 0) && p != s {
			t.Fatalf("Suffix(%q, %d) = %q", s, n, p)
		}
		if utf8.ValidString(s) && !utf8.ValidString(p) {
			t.Fatalf("Suffix(%q, %d) = %q splits a character", s, n, p)
		}
	})
}

func FuzzPrintable(f *testing.F) {
	f.Add("\x1b[2J\u009b\u202e\xff ok")
	f.Fuzz(func(t *testing.T, s string) {
		p := Printable(s)
		if !utf8.ValidString(p) {
			t.Fatalf("Printable(%q) = %q is not UTF-8", s, p)
		}
		for _, r := range p {
			if r != '\t' && !printable(r) {
				t.Fatalf("Printable(%q) = %q keeps %U", s, p, r)
			}
		}
	})
}
