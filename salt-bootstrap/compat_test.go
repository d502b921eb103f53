package saltbootstrap

import (
	"strings"
	"testing"
)

// FuzzCompatible: any compat.txt and version give an answer or an error,
// never a panic; a parsable verdict does not change when the version's
// own bounds (">= v", "<= v") are added, and a version always satisfies
// exactly those bounds.
func FuzzCompatible(f *testing.F) {
	f.Add(">= 1.0\n< 2.0\n", "1.0")
	f.Add("# comment\n\n!= 1.5.1\n", "1.5.1")
	f.Add("== v2\n", "2.0.0")
	f.Add("<=", "1")
	f.Add(">= 99999999999999999999", "1.0")
	f.Add(strings.Repeat("x", 70000), "1.0")
	f.Fuzz(func(t *testing.T, text, version string) {
		ok, err := Compatible(text, version)
		if err != nil {
			if ok {
				t.Fatalf("ok together with error %v", err)
			}
			return
		}
		if _, perr := parseVersion(version); perr != nil || strings.ContainsAny(version, "\r\n") {
			return
		}
		bounded := text + "\n>= " + version + "\n<= " + version + "\n"
		if ok2, err2 := Compatible(bounded, version); err2 != nil || ok2 != ok {
			t.Fatalf("adding the version's own bounds changed the verdict: %v,%v → %v,%v", ok, err, ok2, err2)
		}
		if ok3, err3 := Compatible(">= "+version+"\n<= "+version, version); !ok3 || err3 != nil {
			t.Fatalf("%q does not satisfy its own bounds: %v", version, err3)
		}
	})
}
