package metadata

import (
	"bufio"
	"bytes"
	"regexp"
	"strings"
)

// Userdata is what the agent reads from an instance's userdata.
type Userdata struct {
	WSURI      string // WS_URI
	AppID      string // APP_ID
	Version    string // VERSION
	BaseRemote string // BASE_REMOTE
	PubKey     string // PUBKEY
	// Vars holds every KEY=value assignment found, known or not.
	Vars map[string]string
}

var assignment = regexp.MustCompile(`^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$`)

// ParseUserdata reads KEY=value lines (also the 2014 form `export KEY=value`)
// from a userdata script. Other lines are ignored, so a whole bash script
// can be given. Values may be single- or double-quoted; an unquoted value
// ends at whitespace or a # comment. A later assignment wins.
func ParseUserdata(data []byte) Userdata {
	u := Userdata{Vars: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		m := assignment.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		u.Vars[m[1]] = unquote(m[2])
	}
	u.WSURI = u.Vars["WS_URI"]
	u.AppID = u.Vars["APP_ID"]
	u.Version = u.Vars["VERSION"]
	u.BaseRemote = u.Vars["BASE_REMOTE"]
	u.PubKey = u.Vars["PUBKEY"]
	return u
}

func unquote(v string) string {
	v = strings.TrimSpace(v)
	if len(v) >= 1 && (v[0] == '"' || v[0] == '\'') {
		if end := strings.IndexByte(v[1:], v[0]); end >= 0 {
			return v[1 : 1+end]
		}
		return strings.TrimSpace(v[1:])
	}
	if i := strings.IndexAny(v, " \t"); i >= 0 {
		v = v[:i]
	}
	if strings.HasPrefix(v, "#") { // `KEY= # comment` assigns nothing
		return ""
	}
	return v
}
