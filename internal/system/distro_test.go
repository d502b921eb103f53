package system

import (
	"slices"
	"strings"
	"testing"
)

func TestParseOSRelease(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       Distro
		family     Family
	}{
		{"debian 12", `PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
`, Distro{ID: "debian", VersionID: "12", Codename: "bookworm", Name: "Debian GNU/Linux 12 (bookworm)"}, FamilyDebian},
		{"ubuntu 24.04", `NAME="Ubuntu"
VERSION_ID="24.04"
ID=ubuntu
ID_LIKE=debian
PRETTY_NAME="Ubuntu 24.04.1 LTS"
UBUNTU_CODENAME=noble
`, Distro{ID: "ubuntu", IDLike: []string{"debian"}, VersionID: "24.04", Codename: "noble", Name: "Ubuntu 24.04.1 LTS"}, FamilyDebian},
		{"rhel 9", `NAME="Red Hat Enterprise Linux"
VERSION="9.4 (Plow)"
ID="rhel"
ID_LIKE="fedora"
VERSION_ID="9.4"
PRETTY_NAME="Red Hat Enterprise Linux 9.4 (Plow)"
`, Distro{ID: "rhel", IDLike: []string{"fedora"}, VersionID: "9.4", Name: "Red Hat Enterprise Linux 9.4 (Plow)"}, FamilyRHEL},
		{"amazon linux 2023", `NAME="Amazon Linux"
VERSION="2023"
ID="amzn"
ID_LIKE="fedora"
VERSION_ID="2023"
PRETTY_NAME="Amazon Linux 2023.6.20241212"
`, Distro{ID: "amzn", IDLike: []string{"fedora"}, VersionID: "2023", Name: "Amazon Linux 2023.6.20241212"}, FamilyRHEL},
		{"rocky via ID_LIKE", "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.3\"\n",
			Distro{ID: "rocky", IDLike: []string{"rhel", "centos", "fedora"}, VersionID: "9.3"}, FamilyRHEL},
		{"escapes and comments", "# a comment\n\nID=alpine\nPRETTY_NAME=\"a \\\"quoted\\\" \\$name\"\nBROKEN=\"unbalanced\n",
			Distro{ID: "alpine", Name: `a "quoted" $name`}, FamilyAlpine},
		{"unknown family", "ID=nixos\n", Distro{ID: "nixos"}, FamilyUnknown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := ParseOSRelease([]byte(tc.text))
			if err != nil {
				t.Fatal(err)
			}
			if d.ID != tc.want.ID || d.VersionID != tc.want.VersionID || d.Codename != tc.want.Codename || d.Name != tc.want.Name || !slices.Equal(d.IDLike, tc.want.IDLike) {
				t.Errorf("got %+v, want %+v", d, tc.want)
			}
			if d.Family() != tc.family {
				t.Errorf("family %q, want %q", d.Family(), tc.family)
			}
		})
	}
}

func TestParseOSReleaseRefuses(t *testing.T) {
	for _, text := range []string{"", "NAME=x\n", strings.Repeat("A=b\n", 20000)} {
		if _, err := ParseOSRelease([]byte(text)); err == nil {
			t.Errorf("%.20q: accepted", text)
		}
	}
}

// FuzzParseOSRelease: any input is read or refused, never a panic, and
// what is read has an ID without surrounding space.
func FuzzParseOSRelease(f *testing.F) {
	f.Add([]byte("ID=debian\nVERSION_ID=\"12\"\n"))
	f.Add([]byte("ID='x'\nID_LIKE=\"a b\"\nPRETTY_NAME=\"\\\\\"\n"))
	f.Add([]byte("ID=\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseOSRelease(data)
		if err != nil {
			return
		}
		if d.ID == "" {
			t.Fatal("accepted without an ID")
		}
		_ = d.Family()
		_ = d.String()
	})
}
