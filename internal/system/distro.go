package system

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"
)

// Family groups distributions that share a package format and manager.
type Family string

// The families the native modules know.
const (
	FamilyDebian  Family = "debian" // dpkg/apt: Debian, Ubuntu and their derivatives
	FamilyRHEL    Family = "rhel"   // rpm/dnf or yum: RHEL, CentOS, Rocky, Alma, Fedora, Amazon Linux
	FamilyAlpine  Family = "alpine" // apk
	FamilyUnknown Family = ""
)

// Distro is what os-release(5) below the root says about the system.
type Distro struct {
	ID        string   // "debian", "ubuntu", "rhel", "amzn", …
	IDLike    []string // ID_LIKE, e.g. ["rhel", "fedora"]
	VersionID string   // "12", "9.4", "2023"
	Codename  string   // VERSION_CODENAME ("bookworm"), or UBUNTU_CODENAME
	Name      string   // PRETTY_NAME, else NAME
	// UbuntuCodename is UBUNTU_CODENAME: the Ubuntu release an Ubuntu
	// derivative (Linux Mint…) is built on, which its PPAs are built for.
	UbuntuCodename string
}

// Family is the distribution's family, from ID and then ID_LIKE.
func (d Distro) Family() Family {
	for _, id := range append([]string{d.ID}, d.IDLike...) {
		switch id {
		case "debian", "ubuntu":
			return FamilyDebian
		case "rhel", "centos", "fedora", "amzn", "rocky", "almalinux", "ol", "scientific":
			return FamilyRHEL
		case "alpine":
			return FamilyAlpine
		}
	}
	return FamilyUnknown
}

// String names the distribution for messages and status.
func (d Distro) String() string {
	switch {
	case d.Name != "":
		return d.Name
	case d.ID != "" && d.VersionID != "":
		return d.ID + " " + d.VersionID
	case d.ID != "":
		return d.ID
	}
	return "an unknown distribution"
}

// maxOSRelease bounds the file read; real ones are under 1 KiB.
const maxOSRelease = 64 << 10

// ParseOSRelease reads an os-release file: KEY=value lines, values
// optionally quoted with "…" or '…' and backslash escapes inside double
// quotes, comments and blank lines ignored. Lines it cannot read are
// skipped, as systemd does; a file with no ID is an error.
func ParseOSRelease(data []byte) (Distro, error) {
	if len(data) > maxOSRelease {
		return Distro{}, fmt.Errorf("os-release is %d bytes, larger than %d", len(data), maxOSRelease)
	}
	vars := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxOSRelease)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok || key == "" || strings.ContainsAny(key, " \t") {
			continue
		}
		v, ok := unquote(val)
		if !ok {
			continue
		}
		vars[key] = v
	}
	if err := sc.Err(); err != nil {
		return Distro{}, fmt.Errorf("os-release: %w", err)
	}
	d := Distro{
		ID:        strings.ToLower(vars["ID"]),
		IDLike:    strings.Fields(strings.ToLower(vars["ID_LIKE"])),
		VersionID: vars["VERSION_ID"],
		Codename:  vars["VERSION_CODENAME"],
		Name:      vars["PRETTY_NAME"],

		UbuntuCodename: vars["UBUNTU_CODENAME"],
	}
	if d.Codename == "" {
		d.Codename = vars["UBUNTU_CODENAME"]
	}
	if d.Name == "" {
		d.Name = vars["NAME"]
	}
	if d.ID == "" {
		return Distro{}, fmt.Errorf("os-release has no ID line")
	}
	return d, nil
}

// unquote reads an os-release value: bare, or wholly inside one pair of
// quotes. It reports false for an unbalanced quote.
func unquote(v string) (string, bool) {
	if v == "" {
		return "", true
	}
	q := v[0]
	if q != '"' && q != '\'' {
		return v, true
	}
	if len(v) < 2 || v[len(v)-1] != q {
		return "", false
	}
	inner := v[1 : len(v)-1]
	if q == '\'' {
		return inner, true
	}
	var b strings.Builder
	for i := 0; i < len(inner); i++ {
		c := inner[i]
		if c == '\\' && i+1 < len(inner) {
			i++
			c = inner[i]
		}
		b.WriteByte(c)
	}
	return b.String(), true
}
