package system

import (
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

func TestCompareDebVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"1.0", "1.0", 0},
		{"1.0", "1.00", 0},
		{"1.9", "1.10", -1},
		{"1.0~rc1", "1.0", -1},
		{"1.0~~", "1.0~", -1},
		{"1.0", "1.0a", -1},
		{"1.0a", "1.0+", -1}, // letters before other characters
		{"1.0-1", "1.0-2", -1},
		{"1.0-10", "1.0-9", 1},
		{"1:0.1", "2.0", 1},
		{"0:2.0", "2.0", 0},
		{"2.0-1", "2.0", 1},
		{"1.2.3-1+deb12u1", "1.2.3-1", 1},
		{"1.2.3-1~bpo12+1", "1.2.3-1", -1},
		{"5.2.15-2+b2", "5.2.15-2", 1},
		{"1.0-1-1", "1.0-1", 1}, // the last hyphen splits the revision
	} {
		if got := CompareDebVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareDebVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := CompareDebVersions(c.b, c.a); got != -c.want {
			t.Errorf("CompareDebVersions(%q, %q) = %d, want %d", c.b, c.a, got, -c.want)
		}
	}
}

func TestCompareRPMVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"1.0-1", "1.0-1", 0},
		{"1.9", "1.10", -1},
		{"1.0", "1.0a", -1}, // a left-over segment wins
		{"1.0a", "1.0.1", -1},
		{"1.0~rc1", "1.0", -1},
		{"1.0^git1", "1.0", 1},
		{"1.0^git1", "1.0.1", -1},
		{"1.0-1.el9", "1.0-1.el9_2", -1},
		{"1:1.0-1", "2.0-1", 1},
		{"0:1.0-1", "1.0-1", 0},
		{"1.01", "1.1", 0},
		{"1.0_1", "1.0.1", 0}, // separators are all alike
		{"2.0-1", "2.0", 1},
		{"a", "1", -1}, // numbers newer than letters
	} {
		if got := CompareRPMVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareRPMVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := CompareRPMVersions(c.b, c.a); got != -c.want {
			t.Errorf("CompareRPMVersions(%q, %q) = %d, want %d", c.b, c.a, got, -c.want)
		}
	}
}

func TestVersionMatches(t *testing.T) {
	for _, c := range []struct {
		req, inst string
		deb, rpm  bool
	}{
		{"1.0", "1.0-1", true, true},       // no revision/release: any
		{"1.0", "1.0-3", true, true},       // …of that version
		{"1.0-1", "1.0-1", true, true},     // exact
		{"1.0-1", "1.0-2", false, false},   // another revision
		{"1.0", "1.0.1-1", false, false},   // not a prefix match
		{"1.0", "1:1.0-1", true, true},     // no epoch: any epoch
		{"2:1.0", "1:1.0-1", false, false}, // an epoch given must match
		{"1:1.0", "1:1.0-1", true, true},
		{"1.00", "1.0-1", true, true}, // compared, not as strings
		{"1.0-1", "1.0-1.el9", false, false},
	} {
		if got := DebVersionMatches(c.req, c.inst); got != c.deb {
			t.Errorf("DebVersionMatches(%q, %q) = %v", c.req, c.inst, got)
		}
		if got := RPMVersionMatches(c.req, c.inst); got != c.rpm {
			t.Errorf("RPMVersionMatches(%q, %q) = %v", c.req, c.inst, got)
		}
	}
}

// versionPairs is a fixed random sample of version pairs built from the
// pieces that make comparisons interesting (tildes, carets, letters,
// leading zeros, epochs, revisions), plus each version against a close
// variant of itself.
func versionPairs(n int, alphabet []string) [][2]string {
	r := rand.New(rand.NewPCG(19, 2014))
	gen := func() string {
		var b strings.Builder
		if r.IntN(6) == 0 {
			b.WriteString(strconv.Itoa(r.IntN(3)) + ":")
		}
		b.WriteString(strconv.Itoa(r.IntN(12))) // both dpkg and rpm versions start well with a digit
		for k := r.IntN(5); k > 0; k-- {
			b.WriteString(alphabet[r.IntN(len(alphabet))])
		}
		if r.IntN(3) == 0 {
			b.WriteString("-" + strconv.Itoa(r.IntN(4)))
			if r.IntN(2) == 0 {
				b.WriteString(alphabet[r.IntN(len(alphabet))])
			}
		}
		return b.String()
	}
	var out [][2]string
	for len(out) < n {
		a := gen()
		b := gen()
		if r.IntN(3) == 0 {
			b = a + alphabet[r.IntN(len(alphabet))]
		}
		out = append(out, [2]string{a, b})
	}
	return out
}

// TestCompareDebVersionsAgainstDpkg checks the Go comparison against the
// real `dpkg --compare-versions` on a random sample (small: dpkg takes
// tens of milliseconds per call on a busy machine).
func TestCompareDebVersionsAgainstDpkg(t *testing.T) {
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("dpkg is not installed")
	}
	alphabet := []string{".", "0", "1", "01", "9", "10", "~", "~rc", "a", "b", "z", "+", "+b1", "~~", "A", "ubuntu1", "00"}
	pairs := versionPairs(120, alphabet)
	// One shell runs every comparison: dpkg exits 0 when the relation holds.
	var script strings.Builder
	for _, p := range pairs {
		fmt.Fprintf(&script, "if dpkg --compare-versions '%s' lt '%s'; then echo -1; elif dpkg --compare-versions '%s' eq '%s'; then echo 0; else echo 1; fi\n", p[0], p[1], p[0], p[1])
	}
	out, err := exec.Command("sh", "-c", script.String()).Output()
	if err != nil {
		t.Fatalf("dpkg: %v", err)
	}
	lines := strings.Fields(string(out))
	if len(lines) != len(pairs) {
		t.Fatalf("%d answers for %d pairs", len(lines), len(pairs))
	}
	for i, p := range pairs {
		want, _ := strconv.Atoi(lines[i])
		if got := CompareDebVersions(p[0], p[1]); got != want {
			t.Errorf("CompareDebVersions(%q, %q) = %d, dpkg says %d", p[0], p[1], got, want)
		}
	}
}

// TestCompareRPMVersionsAgainstRpm checks the Go comparison against rpm's
// own (rpm.vercmp of rpm's Lua interpreter compares whole EVRs with the
// same code as rpm -U) on a random sample.
func TestCompareRPMVersionsAgainstRpm(t *testing.T) {
	if _, err := exec.LookPath("rpm"); err != nil {
		t.Skip("rpm is not installed")
	}
	alphabet := []string{".", "0", "1", "01", "9", "10", "~", "~rc", "^", "^git1", "a", "b", "z", "_", "+", "A", "el9", "00"}
	pairs := versionPairs(400, alphabet)
	var lua strings.Builder
	lua.WriteString("%{lua:\n")
	for _, p := range pairs {
		fmt.Fprintf(&lua, "print(rpm.vercmp(%q, %q)) print(\" \")\n", p[0], p[1])
	}
	lua.WriteString("}")
	out, err := exec.Command("rpm", "--eval", lua.String()).Output()
	if err != nil {
		t.Fatalf("rpm --eval: %v", err)
	}
	answers := strings.Fields(string(out))
	if len(answers) != len(pairs) {
		t.Fatalf("%d answers for %d pairs: %.200s", len(answers), len(pairs), out)
	}
	for i, p := range pairs {
		want, _ := strconv.Atoi(answers[i])
		if got := CompareRPMVersions(p[0], p[1]); got != sign(want) {
			t.Errorf("CompareRPMVersions(%q, %q) = %d, rpm says %d", p[0], p[1], got, want)
		}
	}
}

// FuzzCompareDebVersions: an order (antisymmetric, reflexive, consistent
// with matching) on any input, and no panic.
func FuzzCompareDebVersions(f *testing.F) {
	f.Add("1.0~rc1-1", "1:1.0")
	f.Add("", "~")
	f.Add("1.0-", "1.0")
	f.Fuzz(func(t *testing.T, a, b string) {
		ab, ba := CompareDebVersions(a, b), CompareDebVersions(b, a)
		if ab != -ba || ab < -1 || ab > 1 {
			t.Fatalf("compare(%q, %q) = %d, reverse %d", a, b, ab, ba)
		}
		if CompareDebVersions(a, a) != 0 {
			t.Fatalf("%q differs from itself", a)
		}
		if ab == 0 && ParseDebVersion(a).HasEpoch == ParseDebVersion(b).HasEpoch && !DebVersionMatches(a, b) {
			t.Fatalf("%q equals %q but does not match it", a, b)
		}
	})
}

// FuzzCompareRPMVersions: the same properties for rpm's order.
func FuzzCompareRPMVersions(f *testing.F) {
	f.Add("1.0^git1-1", "1:1.0")
	f.Add("~", "^")
	f.Add("1.0-", "1.0")
	f.Fuzz(func(t *testing.T, a, b string) {
		ab, ba := CompareRPMVersions(a, b), CompareRPMVersions(b, a)
		if ab != -ba || ab < -1 || ab > 1 {
			t.Fatalf("compare(%q, %q) = %d, reverse %d", a, b, ab, ba)
		}
		if CompareRPMVersions(a, a) != 0 {
			t.Fatalf("%q differs from itself", a)
		}
		if ab == 0 && ParseRPMVersion(a).HasEpoch == ParseRPMVersion(b).HasEpoch && !RPMVersionMatches(a, b) {
			t.Fatalf("%q equals %q but does not match it", a, b)
		}
	})
}
