// Package userdata is the one place that renders the bootstrap userdata
// script (`opsagent userdata`), parses userdata (the agent and `opsagent
// install` reading an instance's metadata), and holds the rules by which
// userdata changes an installation (rules.go): which variable sets which
// config key, that the version is never lowered, and that a new app id
// means a new instance token. Render and Parse are round-trip tested: for
// any Params that Render accepts, Parse(Render(p)) gives the same values
// back.
package userdata

import (
	"bytes"
	_ "embed"
	"fmt"
	"strings"
	"text/template"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
)

// MaxSize is EC2's limit on userdata; Render refuses a bigger script.
const MaxSize = 16 << 10

// The script's variables, the contract between Render, the script itself
// and Parse.
const (
	VarWSURI        = "WS_URI"
	VarAppID        = "APP_ID"
	VarVersion      = "VERSION"
	VarBaseRemote   = "BASE_REMOTE"
	VarPubKey       = "PUBKEY"
	VarSHA256       = "SHA256"
	VarEnrollSecret = "ENROLL_SECRET"
	VarSet          = "OPSAGENT_SET" // Set items, one a line
)

// Params fill the bootstrap script.
type Params struct {
	WSURI, AppID, Version, BaseRemote, PubKey, SHA256, EnrollSecret string
	// Set holds "section.key=value" items passed to `opsagent install --set`.
	Set []string
}

//go:embed bootstrap.sh.tmpl
var scriptText string

// script is parsed once; text/template is safe for concurrent Execute.
var script = template.Must(template.New("bootstrap.sh").
	Funcs(template.FuncMap{"sh": shellQuote}).Parse(scriptText))

// Render returns the bootstrap script for p, every value quoted for bash.
// It refuses what the script could not carry or would mis-use: a missing
// required value, a malformed version, checksum or --set item, a NUL byte
// (bash cannot hold one), and a script over MaxSize.
func Render(p Params) ([]byte, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	data := struct {
		WSURI, AppID, Version, BaseRemote, PubKey, SHA256, EnrollSecret, Set string
	}{p.WSURI, p.AppID, p.Version, p.BaseRemote, p.PubKey, p.SHA256, p.EnrollSecret, strings.Join(p.Set, "\n")}
	if err := script.Execute(&buf, data); err != nil {
		return nil, fmt.Errorf("userdata: rendering the bootstrap script: %w", err)
	}
	if buf.Len() > MaxSize {
		return nil, fmt.Errorf("userdata: the script is %d bytes, over EC2's %d-byte userdata limit: shorten the values (PUBKEY, --set items)", buf.Len(), MaxSize)
	}
	return buf.Bytes(), nil
}

// check validates p, naming the offending value and what to give instead.
func (p Params) check() error {
	fields := []struct {
		name, value string
		required    bool
	}{
		{VarWSURI, p.WSURI, true},
		{VarAppID, p.AppID, true},
		{VarVersion, p.Version, true},
		{VarBaseRemote, p.BaseRemote, true},
		{VarPubKey, p.PubKey, false},
		{VarSHA256, p.SHA256, false},
		{VarEnrollSecret, p.EnrollSecret, false},
	}
	for _, f := range fields {
		if f.required && f.value == "" {
			return fmt.Errorf("userdata: %s is empty: it is required (give the app's value)", f.name)
		}
		if strings.IndexByte(f.value, 0) >= 0 {
			return fmt.Errorf("userdata: %s contains a NUL byte, which bash cannot hold: remove it", f.name)
		}
	}
	if err := dist.CheckVersion(p.Version); err != nil {
		return fmt.Errorf("userdata: VERSION: %w", err)
	}
	if p.SHA256 != "" {
		if err := dist.CheckSHA256(p.SHA256); err != nil {
			return fmt.Errorf("userdata: SHA256: %w, or nothing to skip the check", err)
		}
	}
	// OPSAGENT_SET separates items by newlines: the install on the
	// instance reads them with the same parser.
	if _, err := config.ParseSettings(p.Set); err != nil {
		return fmt.Errorf("userdata: %w", err)
	}
	return nil
}

// shellQuote makes s one bash word with s's exact bytes: inside single
// quotes nothing is special but the quote itself, which is written as
// close quote, backslash quote, open quote.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
