package system

import (
	"strings"
	"testing"
)

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

func TestParseDpkgDBLeftovers(t *testing.T) {
	db := ParseDpkgDB([]byte("Package: gone\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 1.0\nProvides: ghost\n\nPackage: here\nStatus: install ok installed\nProvides: awk, x-thing (= 1.0)\nVersion: 2.0\n"))
	if !db.Leftovers["gone"] || !db.Leftovers["gone:all"] || db.Leftovers["here"] || db.Installed["here"] != "2.0" || db.Installed["gone"] != "" {
		t.Fatalf("%+v", db)
	}
	if db.Provided["awk"] != "here" || db.Provided["x-thing"] != "here" || db.Provided["ghost"] != "" {
		t.Fatalf("provided %v", db.Provided)
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
        500 http://127.0.0.1:1/ ./ Packages
        100 /var/lib/dpkg/status
local:
  Installed: 3.0
  Candidate: 3.0
  Version table:
 *** 3.0 100
        100 /var/lib/dpkg/status
pinned:
  Installed: (none)
  Candidate: 1:0.9-1
  Package pin: 1:0.9-1
  Version table:
     1:1.0-1 500
        500 http://127.0.0.1:1/ ./ Packages
     1:0.9-1 990
        990 http://127.0.0.1:2/ ./ Packages
nothere:
  Installed: (none)
  Candidate: (none)
  Version table:
`
	got := parseAptPolicy(out)
	if len(got) != 4 || !got["nothere"].Virtual || got["hellod"].Virtual {
		t.Fatalf("got %v", got)
	}
	if o := got["hellod"]; o.Candidate != "2.0-1" || strings.Join(o.Versions, " ") != "2.0-1 1.0-1" {
		t.Errorf("hellod: %+v", o)
	}
	// Installed from a file: apt's candidate, but no repository offers it.
	if o := got["local"]; o.Candidate != "3.0" || len(o.Versions) != 0 {
		t.Errorf("local: %+v", o)
	}
	if o := got["pinned"]; o.Candidate != "1:0.9-1" || strings.Join(o.Versions, " ") != "1:1.0-1 1:0.9-1" {
		t.Errorf("pinned: %+v", o)
	}
}
