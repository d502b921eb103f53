package textcut

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Printable returns s with everything a terminal could act on made
// visible instead: control characters (C0 including ESC, DEL, C1 such as
// CSI U+009B), the bidirectional overrides and isolates that reorder what
// is shown (U+202A–U+202E, U+2066–U+2069, U+200E/U+200F, U+061C), and bytes
// that are not UTF-8 are written as Go escapes (\x1b, \u202e). Text from
// elsewhere (a backend's close reason, a release server's status line, a
// state's output, a config value) goes through it before it is printed, so
// that it cannot move the cursor, retitle the window, hide itself or run
// a terminal's escape-triggered features. A tab is kept; a newline is
// escaped, since every printer prints one value per line.
func Printable(s string) string {
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || !printable(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 16)
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case printable(r):
			b.WriteString(s[i : i+size])
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r < 0x80:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			fmt.Fprintf(&b, `\u%04x`, r)
		}
		i += size
	}
	return b.String()
}

// printable reports whether r is shown as itself and cannot change what
// the terminal shows around it.
func printable(r rune) bool {
	switch {
	case r == '\t':
		return true
	case unicode.IsControl(r): // C0, DEL, C1
		return false
	case r == 0x061c || r == 0x200e || r == 0x200f || r >= 0x202a && r <= 0x202e || r >= 0x2066 && r <= 0x2069:
		return false
	}
	return true
}
