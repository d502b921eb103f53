package system

import "testing"

func TestParseDpkgStatus(t *testing.T) {
	status := `Package: bash
Status: install ok installed
Priority: required
Architecture: amd64
Version: 5.2.15-2+b2
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.

Package: removed-one
Status: deinstall ok config-files
Architecture: all
Version: 1.0

Package: half
Status: install reinstreq half-installed
Version: 2.0

Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u4
`
	got := ParseDpkgStatus([]byte(status))
	want := map[string]string{"bash": "5.2.15-2+b2", "bash:amd64": "5.2.15-2+b2", "libc6": "2.36-9+deb12u4", "libc6:amd64": "2.36-9+deb12u4"}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
}

func TestParseAptPolicy(t *testing.T) {
	out := `hellod:
  Installed: 1.0-1
  Candidate: 2.0-1
  Version table:
     2.0-1 500
        500 http://127.0.0.1:1/ ./ Packages
 *** 1.0-1 500
        100 /var/lib/dpkg/status
nothere:
  Installed: (none)
  Candidate: (none)
  Version table:
`
	got := parseAptPolicy(out)
	if len(got) != 1 || got["hellod"] != "2.0-1" {
		t.Fatalf("got %v", got)
	}
}
