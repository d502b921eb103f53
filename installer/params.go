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

// param names one parameter: its environment variable, its flag, and
// where it lives in each source.
type param struct {
	env, flag string
	required  bool
	// section and key: where install writes it in the config.
	section, key string
	field        func(*Params) *string
	fromUD       func(userdata.Values) string
	fromConf     func(*config.Config) string
}

var params = []param{
	{"WS_URI", "--ws-uri", true, "userdata", "ws_uri", func(p *Params) *string { return &p.WSURI }, func(v userdata.Values) string { return v.WSURI }, func(c *config.Config) string { return c.Userdata.WSURI }},
	{"APP_ID", "--app-id", true, "userdata", "app_id", func(p *Params) *string { return &p.AppID }, func(v userdata.Values) string { return v.AppID }, func(c *config.Config) string { return c.Userdata.AppID }},
	{"VERSION", "--version", true, "userdata", "version", func(p *Params) *string { return &p.Version }, func(v userdata.Values) string { return v.Version }, func(c *config.Config) string { return c.Userdata.Version }},
	{"BASE_REMOTE", "--base-remote", true, "userdata", "base_remote", func(p *Params) *string { return &p.BaseRemote }, func(v userdata.Values) string { return v.BaseRemote }, func(c *config.Config) string { return c.Userdata.BaseRemote }},
	{"PUBKEY", "--pubkey", false, "userdata", "pubkey", func(p *Params) *string { return &p.PubKey }, func(v userdata.Values) string { return v.PubKey }, func(c *config.Config) string { return c.Userdata.PubKey }},
	{"ENROLL_SECRET", "--enroll-secret", false, "userdata", "enroll_secret", func(p *Params) *string { return &p.EnrollSecret }, func(v userdata.Values) string { return v.EnrollSecret }, func(c *config.Config) string { return c.Userdata.EnrollSecret }},
	{"MOD_REPO", "--mod-repo", false, "module", "mod_repo", func(p *Params) *string { return &p.ModRepo }, func(v userdata.Values) string { return v.Vars["MOD_REPO"] }, func(c *config.Config) string { return c.Module.Repo }},
	{"MOD_TAG", "--mod-tag", false, "module", "mod_tag", func(p *Params) *string { return &p.ModTag }, func(v userdata.Values) string { return v.Vars["MOD_TAG"] }, func(c *config.Config) string { return c.Module.Tag }},
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
					if v := p.fromUD(ud); v != "" {
						*p.field(&out), from[p.env] = v, "userdata"
					}
				}
			}
		}
	}
	if s.Existing != nil {
		for _, p := range params {
			if *p.field(&out) == "" {
				if v := p.fromConf(s.Existing); v != "" {
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

// Setting is one `--set section.key=value`.
type Setting struct{ Section, Key, Value string }

// ParseSets reads `--set section.key=value` items.
func ParseSets(items []string) ([]Setting, error) {
	var out []Setting
	for _, item := range items {
		name, value, ok := strings.Cut(item, "=")
		section, key, dotted := strings.Cut(name, ".")
		if !ok || !dotted || section == "" || key == "" {
			return nil, fmt.Errorf("--set %q: expected section.key=value, e.g. network.instance_id=i-0abc", item)
		}
		out = append(out, Setting{Section: strings.TrimSpace(section), Key: strings.TrimSpace(key), Value: strings.TrimSpace(value)})
	}
	return out, nil
}
