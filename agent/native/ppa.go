package native

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path"
	"slices"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// PPAEndpoints are the services linux.apt.ppa asks for a PPA's signing
// key: Launchpad's API tells the key's fingerprint, the keyserver serves
// the key.
type PPAEndpoints struct {
	LaunchpadAPI string // default https://api.launchpad.net/1.0
	Keyserver    string // default https://keyserver.ubuntu.com
}

func (p PPAEndpoints) api() string {
	if p.LaunchpadAPI != "" {
		return strings.TrimSuffix(p.LaunchpadAPI, "/")
	}
	return "https://api.launchpad.net/1.0"
}

func (p PPAEndpoints) keyserver() string {
	if p.Keyserver != "" {
		return strings.TrimSuffix(p.Keyserver, "/")
	}
	return "https://keyserver.ubuntu.com"
}

// Where PPAs are served from, public and private (Launchpad's hosts since
// 2021; add-apt-repository writes the same).
const (
	ppaHost        = "ppa.launchpadcontent.net"
	privatePPAHost = "private-ppa.launchpadcontent.net"
	aptKeyringsDir = "/etc/apt/keyrings"
	aptAuthDir     = "/etc/apt/auth.conf.d"
)

// aptPPA is linux.apt.ppa: name "user/archive" (no "ppa:"), Ubuntu only.
// It writes what add-apt-repository would, with no Python and no gpg:
//   - /etc/apt/keyrings/USER-ubuntu-ARCHIVE.asc, the PPA's signing key,
//     fetched once: its fingerprint from Launchpad's API, the key from
//     the keyserver, checked to have that fingerprint;
//   - /etc/apt/sources.list.d/USER-ubuntu-ARCHIVE-CODENAME.list, one deb
//     line signed-by that keyring;
//   - for a private PPA (username and password), the credentials in
//     /etc/apt/auth.conf.d/USER-ubuntu-ARCHIVE.conf, mode 0600, and
//     never in the sources list, a comment or the output.
//
// Each file is rewritten only when its content differs; a round with all
// three in place reads them and fetches nothing. The next package state
// refreshes the index, which is older than its sources then (Salt 2014
// ran apt-get update after the PPA every round, and apt-key, which
// modern Ubuntu no longer has).
func (e *Executor) aptPPA(ctx context.Context, s *stateRun) (state.Result, error) {
	name, err := s.p.required("name")
	if err != nil {
		return state.Result{}, err
	}
	user, archive, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(name), "ppa:"), "/")
	if !ok || !launchpadName(user) || !launchpadName(archive) {
		return state.Result{}, &badParam{"name", fmt.Sprintf("%q is not a PPA name: write user/archive, e.g. chromium-daily/stable", name)}
	}
	username, err := s.p.str("username")
	if err != nil {
		return state.Result{}, err
	}
	password, err := s.p.str("password")
	if err != nil {
		return state.Result{}, err
	}
	if (username == "") != (password == "") {
		return state.Result{}, &badParam{"username", "a private PPA needs both username and password"}
	}
	if strings.ContainsAny(username+password, "\n\r") {
		return state.Result{}, &badParam{"password", "must be one line"}
	}
	private := username != ""

	if _, err := s.sys.PackagesFor(system.FamilyDebian, "linux.apt.ppa"); err != nil {
		return state.Result{}, err
	}
	d, err := s.sys.Distro()
	if err != nil {
		return state.Result{}, failf("linux.apt.ppa: %v", err)
	}
	codename := d.UbuntuCodename
	if d.ID != "ubuntu" && !slices.Contains(d.IDLike, "ubuntu") {
		return state.Result{}, failf("linux.apt.ppa: PPAs are built for Ubuntu, and this is %s: add the repository with linux.apt.repo instead", d)
	}
	if codename == "" {
		codename = d.Codename
	}
	if codename == "" {
		return state.Result{}, failf("linux.apt.ppa: /etc/os-release names no Ubuntu codename (UBUNTU_CODENAME or VERSION_CODENAME)")
	}

	base := user + "-ubuntu-" + archive
	keyring := path.Join(aptKeyringsDir, base+".asc")
	list := path.Join(aptSourcesDir, base+"-"+codename+".list")
	host := ppaHost
	if private {
		host = privatePPAHost
	}
	line := fmt.Sprintf("deb [signed-by=%s] https://%s/%s/%s/ubuntu %s main\n", keyring, host, user, archive, codename)

	var ch changes
	// The signing key: fetched only when the keyring is missing or empty.
	if fi, err := s.fs.Stat(keyring); err != nil || fi.Size() == 0 {
		if s.test {
			ch.add("signing key %s fetched", keyring)
		} else {
			key, fpr, err := e.ppaSigningKey(ctx, user, archive)
			if err != nil {
				return state.Result{}, failf("linux.apt.ppa: %s/%s: %v", user, archive, err)
			}
			if _, err := s.manageContent(keyring, key, 0o644); err != nil {
				return state.Result{}, failf("linux.apt.ppa: %s: %v", keyring, err)
			}
			ch.add("signing key %s fetched (%s)", keyring, fpr)
		}
	}
	if private {
		auth := path.Join(aptAuthDir, base+".conf")
		content := fmt.Sprintf("machine %s/%s/%s/ubuntu\nlogin %s\npassword %s\n", privatePPAHost, user, archive, username, password)
		c, err := s.manageContent(auth, []byte(content), 0o600)
		if err != nil {
			return state.Result{}, failf("linux.apt.ppa: %s: %v", auth, err)
		}
		if len(c) > 0 {
			ch.add("credentials %s %s", auth, strings.Join(c, " and "))
		}
	}
	c, err := s.manageContent(list, []byte(line), 0o644)
	if err != nil {
		return state.Result{}, failf("linux.apt.ppa: %s: %v", list, err)
	}
	if len(c) > 0 {
		ch.add("sources list %s %s", list, strings.Join(c, " and "))
	}
	return s.result("PPA "+user+"/"+archive, ch), nil
}

// launchpadName accepts Launchpad's names of people, teams and archives:
// lower-case letters, digits, and + - . after the first character.
func launchpadName(n string) bool {
	if n == "" || len(n) > 100 {
		return false
	}
	for i := 0; i < len(n); i++ {
		c := n[i]
		ok := (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && strings.IndexByte("+-.", c) >= 0)
		if !ok {
			return false
		}
	}
	return true
}

// ppaSigningKey asks Launchpad for the PPA's signing key fingerprint and
// fetches that key from the keyserver, refusing a key whose fingerprint
// is not the one Launchpad gave.
func (e *Executor) ppaSigningKey(ctx context.Context, user, archive string) ([]byte, string, error) {
	api := fmt.Sprintf("%s/~%s/+archive/ubuntu/%s", e.opts.PPA.api(), url.PathEscape(user), url.PathEscape(archive))
	body, err := e.fetchBytes(ctx, "name", api)
	if err != nil {
		return nil, "", fmt.Errorf("asking Launchpad for the PPA: %w (check the name; a private PPA's key may not be public)", err)
	}
	var info struct {
		Fingerprint string `json:"signing_key_fingerprint"`
	}
	if err := json.Unmarshal(body, &info); err != nil {
		return nil, "", fmt.Errorf("the answer of Launchpad's API is not JSON: %w", err)
	}
	fpr := strings.ToUpper(strings.TrimSpace(info.Fingerprint))
	if len(fpr) != 40 || strings.Trim(fpr, "0123456789ABCDEF") != "" {
		return nil, "", errors.New("no signing key fingerprint in the answer of Launchpad's API (has the PPA published anything yet?)")
	}
	lookup := fmt.Sprintf("%s/pks/lookup?op=get&options=mr&search=0x%s", e.opts.PPA.keyserver(), fpr)
	key, err := e.fetchBytes(ctx, "name", lookup)
	if err != nil {
		return nil, "", fmt.Errorf("fetching signing key %s: %w", fpr, err)
	}
	keys, err := system.ParsePGPPublicKeys(key)
	if err != nil {
		return nil, "", fmt.Errorf("signing key %s from the keyserver: %w", fpr, err)
	}
	if len(keys) != 1 || keys[0].Fingerprint != fpr {
		return nil, "", fmt.Errorf("the keyserver answered with key %s, not the PPA's signing key %s: not trusted", keyFingerprints(keys), fpr)
	}
	return key, fpr, nil
}

func keyFingerprints(keys []system.PGPKey) string {
	f := make([]string, len(keys))
	for i, k := range keys {
		f[i] = k.Fingerprint
	}
	return strings.Join(f, ", ")
}
