package installer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/metadata"
	"github.com/visualops/opsagent/internal/userdata"
)

// Params are what an installation is made of. Each comes from a flag,
// else the environment, else the instance's userdata, else the config an
// earlier install wrote.
type Params struct {
	WSURI        string // WS_URI
	AppID        string // APP_ID
	Version      string // VERSION
	BaseRemote   string // BASE_REMOTE
	PubKey       string // PUBKEY
	EnrollSecret string // ENROLL_SECRET
	ModRepo      string // MOD_REPO
	ModTag       string // MOD_TAG
}

// Sources of parameters, in order of precedence.
type Sources struct {
	Flags Params
	// Env looks up an environment variable (os.Getenv).
	Env func(string) string
	// Metadata reads the instance's userdata; nil skips it.
	Metadata *metadata.Client
	// Existing is the config of an earlier install; nil if none.
	Existing *config.Config
}

// param names one parameter: its environment variable (the userdata's
// variable of the same name), its flag, and its field. Where it lives in
// the config is userdata.KeyOf's to say (section and key).
type param struct {
	env, flag string
	required  bool
	field     func(*Params) *string
	// section and key: where install writes it in the config.
	section, key string
}

var params = withKeys([]param{
	{env: userdata.VarWSURI, flag: "--ws-uri", required: true, field: func(p *Params) *string { return &p.WSURI }},
	{env: userdata.VarAppID, flag: "--app-id", required: true, field: func(p *Params) *string { return &p.AppID }},
	{env: userdata.VarVersion, flag: "--version", required: true, field: func(p *Params) *string { return &p.Version }},
	{env: userdata.VarBaseRemote, flag: "--base-remote", required: true, field: func(p *Params) *string { return &p.BaseRemote }},
	{env: userdata.VarPubKey, flag: "--pubkey", field: func(p *Params) *string { return &p.PubKey }},
	{env: userdata.VarEnrollSecret, flag: "--enroll-secret", field: func(p *Params) *string { return &p.EnrollSecret }},
	{env: "MOD_REPO", flag: "--mod-repo", field: func(p *Params) *string { return &p.ModRepo }},
	{env: "MOD_TAG", flag: "--mod-tag", field: func(p *Params) *string { return &p.ModTag }},
})

// withKeys fills each parameter's config key from the userdata's table.
func withKeys(ps []param) []param {
	for i := range ps {
		k, ok := userdata.KeyOf(ps[i].env)
		if !ok {
			panic("installer: parameter " + ps[i].env + " is no userdata variable")
		}
		ps[i].section, ps[i].key = k.Section, k.Key
	}
	return ps
}

// ErrMissingParams is wrapped by Resolve's error when required parameters
// are missing; the error lists all of them at once.
var ErrMissingParams = errors.New("missing parameters")

// Resolve fills every parameter from the first source that has it. The
// userdata is read only when the flags and the environment leave a
// required parameter empty. It returns where each value came from, for
// the log.
func Resolve(ctx context.Context, s Sources) (Params, map[string]string, error) {
	var out Params
	from := map[string]string{}
	env := s.Env
	if env == nil {
		env = func(string) string { return "" }
	}
	for _, p := range params {
		if v := strings.TrimSpace(*p.field(&s.Flags)); v != "" {
			*p.field(&out), from[p.env] = v, "flag"
		} else if v := strings.TrimSpace(env(p.env)); v != "" {
			*p.field(&out), from[p.env] = v, "environment"
		}
	}
	if missingRequired(out) && s.Metadata != nil {
		mctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		raw, err := s.Metadata.UserData(mctx)
		cancel()
		if err == nil {
			ud := userdata.Parse(raw)
			for _, p := range params {
				if *p.field(&out) == "" {
					if v := ud.Value(p.env); v != "" {
						*p.field(&out), from[p.env] = v, "userdata"
					}
				}
			}
		}
	}
	if s.Existing != nil {
		for _, p := range params {
			if *p.field(&out) == "" {
				if v := s.Existing.Get(p.section, p.key); v != "" {
					*p.field(&out), from[p.env] = v, "the existing config"
				}
			}
		}
	}
	var missing []string
	for _, p := range params {
		if p.required && *p.field(&out) == "" {
			missing = append(missing, fmt.Sprintf("%s (or %s)", p.flag, p.env))
		}
	}
	if len(missing) > 0 {
		return out, from, fmt.Errorf("%w: %s; give them as flags, environment variables, or in the instance's userdata", ErrMissingParams, strings.Join(missing, ", "))
	}
	return out, from, nil
}

func missingRequired(p Params) bool {
	for _, q := range params {
		if q.required && *q.field(&p) == "" {
			return true
		}
	}
	return false
}
