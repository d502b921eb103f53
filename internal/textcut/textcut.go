// Package textcut cuts text to a size without splitting a UTF-8
// character: what every bounded log line, comment and close reason needs.
// Each caller says in its own words that it cut. Printable makes text
// from elsewhere safe to print on a terminal.
package textcut

import "unicode/utf8"

// Prefix is the longest prefix of s of at most n bytes that ends on a
// character boundary (s itself when it fits; "" when n <= 0).
func Prefix(s string, n int) string {
	if len(s) <= n {
		return s
	}
	if n <= 0 {
		return ""
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Suffix is the longest suffix of s of at most n bytes that starts on a
// character boundary (s itself when it fits; "" when n <= 0): the end of
// a tool's output, where the reason for a failure usually is.
func Suffix(s string, n int) string {
	if len(s) <= n {
		return s
	}
	if n <= 0 {
		return ""
	}
	i := len(s) - n
	for i < len(s) && !utf8.RuneStart(s[i]) {
		i++
	}
	return s[i:]
}
