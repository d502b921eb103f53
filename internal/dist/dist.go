// Package dist is the one definition of an opsagent release as a set of
// files: their names, latest.json, the minisign keys, signing, and the
// verification the self-updater runs (the shape of Tailscale's
// clientupdate/distsign). release/ builds and publishes with it and the
// updater verifies with it, so a release that release/ signs is, by
// construction, one the updater accepts (spec/install-update.md).
package dist

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Artifact names, in dist/ after a build and under <prefix><version>/ in
// the bucket (LatestName sits at <prefix>). TarballName holds VERSION
// first, then one binary per architecture (BinaryName, in Arches' order),
// then userdata.sh: the updater takes VERSION and its own binary in one
// pass that stops there, so the order only costs or saves time.
const (
	TarballName   = "opsagent.tgz"
	ChecksumName  = TarballName + ".sha256"
	SignatureName = TarballName + ".minisig"
	LatestName    = "latest.json"
)

// Arches returns the architectures every release carries. It is a function,
// not a variable, so no caller can change the list for everyone else.
func Arches() []string { return []string{"amd64", "arm64"} }

// BinaryName is the name of the agent binary for arch inside the tarball.
func BinaryName(arch string) string { return "opsagent-linux-" + arch }

var (
	versionPattern = regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)?$`)
	sha256Pattern  = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// CheckSHA256 refuses anything but a SHA-256 as sha256sum prints it: 64
// lowercase hexadecimal digits (opsagent.tgz.sha256, latest.json, the
// userdata script's SHA256).
func CheckSHA256(sum string) error {
	if !sha256Pattern.MatchString(sum) {
		return fmt.Errorf("sha256 %q: want the tarball's SHA-256 as 64 lowercase hex digits", sum)
	}
	return nil
}

// CheckVersion refuses anything but MAJOR.MINOR[.PATCH]: the version is a
// path segment in the bucket and a field of latest.json, so it must be
// plain.
func CheckVersion(v string) error {
	if !versionPattern.MatchString(v) {
		return fmt.Errorf("version %q: use MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. 2.1 or 2.1.3", v)
	}
	return nil
}

// Newer reports whether version v is above current (a dev build takes
// any version).
func Newer(v, current string) bool {
	a, err1 := parse(v)
	b, err2 := parse(current)
	if err2 != nil {
		return err1 == nil
	}
	if err1 != nil {
		return false
	}
	for i := 0; i < 3; i++ {
		if a[i] != b[i] {
			return a[i] > b[i]
		}
	}
	return false
}

func parse(v string) ([3]int, error) {
	var out [3]int
	parts := strings.Split(strings.TrimPrefix(v, "v"), ".")
	if len(parts) < 2 || len(parts) > 3 {
		return out, errors.New("not MAJOR.MINOR[.PATCH]")
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return out, errors.New("not numeric")
		}
		out[i] = n
	}
	return out, nil
}
