package system

import (
	"strconv"
	"strings"
)

// Package versions are compared the way the package managers compare
// them, never as strings: "1.10" is newer than "1.9", "1.0~rc1" older
// than "1.0". Both algorithms below follow their documentation and
// reference code: deb-version(7) and dpkg's verrevcmp for Debian, and
// rpm's rpmvercmp and EVR comparison for RPM. Tests check them against
// the real `dpkg --compare-versions` and rpm's own rpm.vercmp.

// DebVersion is a Debian version split as deb-version(7) does:
// [epoch:]upstream[-revision].
type DebVersion struct {
	Epoch    int
	Upstream string
	Revision string
	// HasEpoch and HasRevision tell whether the text named them: a
	// requested version without them matches any epoch or revision.
	HasEpoch, HasRevision bool
}

// ParseDebVersion splits a Debian version. It is lenient: text dpkg would
// reject is still split and compared, so that a bad version in a recipe
// simply matches nothing.
func ParseDebVersion(s string) DebVersion {
	s = strings.TrimSpace(s)
	var v DebVersion
	if e, rest, ok := strings.Cut(s, ":"); ok {
		if n, err := strconv.Atoi(e); err == nil && allDigits(e) {
			v.Epoch, v.HasEpoch = n, true
			s = rest
		}
	}
	if i := strings.LastIndexByte(s, '-'); i >= 0 {
		v.Upstream, v.Revision, v.HasRevision = s[:i], s[i+1:], true
	} else {
		v.Upstream = s
	}
	return v
}

// CompareDebVersions compares two Debian versions as dpkg does: <0 when
// a is older than b, 0 when they are equal, >0 when a is newer.
func CompareDebVersions(a, b string) int {
	return compareDeb(ParseDebVersion(a), ParseDebVersion(b))
}

func compareDeb(a, b DebVersion) int {
	if a.Epoch != b.Epoch {
		return sign(a.Epoch - b.Epoch)
	}
	if c := verrevcmp(a.Upstream, b.Upstream); c != 0 {
		return c
	}
	return verrevcmp(a.Revision, b.Revision)
}

// DebVersionMatches reports whether installed is the version requested:
// equal as dpkg compares, where a requested version that names no epoch
// matches any epoch (as apt's pkg=version does) and one that names no
// revision matches any revision of that upstream version ("1.0" is
// satisfied by 1.0-1 and 1.0-3).
func DebVersionMatches(requested, installed string) bool {
	r, i := ParseDebVersion(requested), ParseDebVersion(installed)
	if r.HasEpoch && r.Epoch != i.Epoch {
		return false
	}
	if verrevcmp(r.Upstream, i.Upstream) != 0 {
		return false
	}
	return !r.HasRevision || verrevcmp(r.Revision, i.Revision) == 0
}

// debOrder is the weight of one character in dpkg's comparison of the
// non-digit parts: '~' sorts before everything, even the end of the
// part; letters before other characters.
func debOrder(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return 0
	case (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'):
		return int(c)
	case c == '~':
		return -1
	case c != 0:
		return int(c) + 256
	}
	return 0
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// verrevcmp is dpkg's comparison of an upstream version or a revision
// (lib/dpkg/version.c): alternate non-digit parts, compared character by
// character with debOrder, and digit parts, compared as numbers.
func verrevcmp(a, b string) int {
	at := func(s string, i int) byte {
		if i < len(s) {
			return s[i]
		}
		return 0
	}
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		firstDiff := 0
		for (i < len(a) && !isDigit(a[i])) || (j < len(b) && !isDigit(b[j])) {
			ac, bc := debOrder(at(a, i)), debOrder(at(b, j))
			if ac != bc {
				return sign(ac - bc)
			}
			i++
			j++
		}
		for i < len(a) && a[i] == '0' {
			i++
		}
		for j < len(b) && b[j] == '0' {
			j++
		}
		for i < len(a) && j < len(b) && isDigit(a[i]) && isDigit(b[j]) {
			if firstDiff == 0 {
				firstDiff = int(a[i]) - int(b[j])
			}
			i++
			j++
		}
		if i < len(a) && isDigit(a[i]) {
			return 1
		}
		if j < len(b) && isDigit(b[j]) {
			return -1
		}
		if firstDiff != 0 {
			return sign(firstDiff)
		}
	}
	return 0
}

// RPMVersion is an RPM [epoch:]version[-release].
type RPMVersion struct {
	Epoch            int
	Version, Release string
	HasEpoch, HasRel bool
}

// ParseRPMVersion splits an RPM EVR at its epoch colon and its last
// hyphen (a version holds no hyphen).
func ParseRPMVersion(s string) RPMVersion {
	s = strings.TrimSpace(s)
	var v RPMVersion
	if e, rest, ok := strings.Cut(s, ":"); ok {
		if e == "" {
			e = "0" // rpm reads an empty epoch as 0
		}
		if n, err := strconv.Atoi(e); err == nil && allDigits(e) {
			v.Epoch, v.HasEpoch = n, true
			s = rest
		}
	}
	if i := strings.LastIndexByte(s, '-'); i >= 0 {
		v.Version, v.Release, v.HasRel = s[:i], s[i+1:], true
	} else {
		v.Version = s
	}
	return v
}

// CompareRPMVersions compares two EVRs as rpm does: epoch (none is 0),
// then version, then release, each with rpmvercmp.
func CompareRPMVersions(a, b string) int {
	return compareRPM(ParseRPMVersion(a), ParseRPMVersion(b))
}

func compareRPM(a, b RPMVersion) int {
	if a.Epoch != b.Epoch {
		return sign(a.Epoch - b.Epoch)
	}
	if c := rpmvercmp(a.Version, b.Version); c != 0 {
		return c
	}
	return rpmvercmp(a.Release, b.Release)
}

// RPMVersionMatches reports whether installed is the version requested:
// a requested version without an epoch matches any epoch and one without
// a release any release, as dnf and yum read "name-version".
func RPMVersionMatches(requested, installed string) bool {
	r, i := ParseRPMVersion(requested), ParseRPMVersion(installed)
	if r.HasEpoch && r.Epoch != i.Epoch {
		return false
	}
	if rpmvercmp(r.Version, i.Version) != 0 {
		return false
	}
	return !r.HasRel || rpmvercmp(r.Release, i.Release) == 0
}

func isAlpha(c byte) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }

// rpmvercmp is rpm's comparison of a version or a release
// (rpmio/rpmvercmp.c, rpm 4.15 and later): segments of digits or of
// letters, compared numerically or as strings, anything else separating
// them; '~' sorts before everything (even the end), '^' after the end
// but before anything else.
func rpmvercmp(a, b string) int {
	if a == b {
		return 0
	}
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		for i < len(a) && !isAlnum(a[i]) && a[i] != '~' && a[i] != '^' {
			i++
		}
		for j < len(b) && !isAlnum(b[j]) && b[j] != '~' && b[j] != '^' {
			j++
		}
		// Tilde: sorts before everything else.
		if (i < len(a) && a[i] == '~') || (j < len(b) && b[j] == '~') {
			if i >= len(a) || a[i] != '~' {
				return 1
			}
			if j >= len(b) || b[j] != '~' {
				return -1
			}
			i++
			j++
			continue
		}
		// Caret: like tilde, except that the end of a string (the base
		// version) sorts before it.
		if (i < len(a) && a[i] == '^') || (j < len(b) && b[j] == '^') {
			if i >= len(a) {
				return -1
			}
			if j >= len(b) {
				return 1
			}
			if a[i] != '^' {
				return 1
			}
			if b[j] != '^' {
				return -1
			}
			i++
			j++
			continue
		}
		if i >= len(a) || j >= len(b) {
			break
		}
		si, sj := i, j
		isNum := isDigit(a[i])
		if isNum {
			for i < len(a) && isDigit(a[i]) {
				i++
			}
			for j < len(b) && isDigit(b[j]) {
				j++
			}
		} else {
			for i < len(a) && isAlpha(a[i]) {
				i++
			}
			for j < len(b) && isAlpha(b[j]) {
				j++
			}
		}
		// Segments of different kinds: a number is newer than letters.
		if sj == j {
			if isNum {
				return 1
			}
			return -1
		}
		s1, s2 := a[si:i], b[sj:j]
		if isNum {
			s1 = strings.TrimLeft(s1, "0")
			s2 = strings.TrimLeft(s2, "0")
			if len(s1) != len(s2) {
				return sign(len(s1) - len(s2))
			}
		}
		if c := strings.Compare(s1, s2); c != 0 {
			return c
		}
	}
	if i >= len(a) && j >= len(b) {
		return 0
	}
	if i >= len(a) {
		return -1
	}
	return 1
}

// allDigits reports whether s is a non-empty run of ASCII digits (an
// epoch; strconv would also take a sign).
func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isDigit(s[i]) {
			return false
		}
	}
	return s != ""
}

func isAlnum(c byte) bool { return isDigit(c) || isAlpha(c) }

func sign(n int) int {
	switch {
	case n < 0:
		return -1
	case n > 0:
		return 1
	}
	return 0
}
