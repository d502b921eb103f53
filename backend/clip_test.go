package backend

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestClip(t *testing.T) {
	cases := []struct{ in, want string }{
		{"", ""},
		{"i-1", "i-1"},
		{strings.Repeat("a", 64), strings.Repeat("a", 64)},
		{strings.Repeat("a", 65), strings.Repeat("a", 64) + "…(65 bytes)"},
		{strings.Repeat("a", 1<<20), strings.Repeat("a", 64) + "…(1048576 bytes)"},
		// 3-byte characters: 64 is not a boundary, 63 is.
		{strings.Repeat("€", 30), strings.Repeat("€", 21) + "…(90 bytes)"},
		// 4-byte characters after one byte: the cut is at 61.
		{"x" + strings.Repeat("🙂", 20), "x" + strings.Repeat("🙂", 15) + "…(81 bytes)"},
	}
	for _, c := range cases {
		got := clip(c.in)
		if got != c.want {
			t.Errorf("clip(%.20q… %d bytes) = %q, want %q", c.in, len(c.in), got, c.want)
		}
		if !utf8.ValidString(got) {
			t.Errorf("clip(%.20q…) split a character: %q", c.in, got)
		}
	}
}
