package userdata

import (
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
)

// FuzzRoundTrip: whatever Render accepts, Parse reads back unchanged, and
// the script assigns nothing but its eight values. The inputs are first
// made valid (see validParams) so that every one exercises the quoting.
// Seeds: testdata/fuzz/FuzzRoundTrip.
func FuzzRoundTrip(f *testing.F) {
	for _, p := range []Params{goodParams(), hostileParams(everything)} {
		f.Add(p.WSURI, p.AppID, p.Version, p.BaseRemote, p.PubKey, p.SHA256, p.EnrollSecret, strings.Join(p.Set, "\n"))
	}
	f.Fuzz(func(t *testing.T, wsURI, appID, version, baseRemote, pubKey, sha, secret, set string) {
		p := validParams(Params{WSURI: wsURI, AppID: appID, Version: version, BaseRemote: baseRemote,
			PubKey: pubKey, SHA256: sha, EnrollSecret: secret, Set: strings.Split(set, "\n")})
		if _, err := Render(p); err != nil {
			if !strings.Contains(err.Error(), "userdata limit") {
				t.Fatalf("Render refused valid params %+q: %v", p, err)
			}
			return
		}
		checkRoundTrip(t, p)
	})
}

// validParams makes p acceptable to Render, keeping all it can: NUL bytes
// dropped, required values made non-empty, a bad version or checksum
// replaced, bad --set items left out.
func validParams(p Params) Params {
	for _, s := range []*string{&p.WSURI, &p.AppID, &p.BaseRemote, &p.PubKey, &p.SHA256, &p.EnrollSecret} {
		*s = strings.ReplaceAll(*s, "\x00", "")
	}
	for _, s := range []*string{&p.WSURI, &p.AppID, &p.BaseRemote} {
		if *s == "" {
			*s = "x"
		}
	}
	if dist.CheckVersion(p.Version) != nil {
		p.Version = "2.1"
	}
	if dist.CheckSHA256(p.SHA256) != nil {
		p.SHA256 = ""
	}
	var set []string
	for _, item := range p.Set {
		if _, err := config.ParseSetting(item); err == nil {
			set = append(set, item)
		}
	}
	p.Set = set
	return p
}

// FuzzParse: Parse never panics on any text, and what it returns is
// consistent. Seeds: testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	script, err := Render(hostileParams(everything))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(script)
	for _, w := range words {
		f.Add([]byte("A=" + w.src + "\n"))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		v := Parse(data)
		for k := range v.Vars {
			if k == "" || strings.ContainsAny(k, "= \t\r\n;'\"\\$") {
				t.Fatalf("bad name %q", k)
			}
		}
		for _, item := range v.Set {
			if item == "" || strings.Contains(item, "\n") {
				t.Fatalf("bad --set item %q", item)
			}
		}
		if v.AppID != v.Vars[VarAppID] || v.WSURI != v.Vars[VarWSURI] || v.EnrollSecret != v.Vars[VarEnrollSecret] {
			t.Fatalf("fields disagree with Vars: %+q", v)
		}
	})
}
