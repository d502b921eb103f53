package userdata

import (
	"fmt"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
)

// Key is a userdata variable and the config key it sets.
type Key struct {
	Var          string // the script's variable, also install's environment variable
	Section, Key string
}

// keys are the variables userdata sets in the config, in the config's
// order. The agent applies the [userdata] ones at start and after
// AppNotReady (Apply); install takes them all as parameters.
var keys = []Key{
	{VarWSURI, "userdata", "ws_uri"},
	{VarAppID, "userdata", "app_id"},
	{VarVersion, "userdata", "version"},
	{VarBaseRemote, "userdata", "base_remote"},
	{VarPubKey, "userdata", "pubkey"},
	{VarEnrollSecret, "userdata", "enroll_secret"},
	{"MOD_REPO", "module", "mod_repo"},
	{"MOD_TAG", "module", "mod_tag"},
}

// Keys lists the variables userdata sets in the config.
func Keys() []Key { return append([]Key(nil), keys...) }

// KeyOf returns the config key the variable name sets.
func KeyOf(name string) (Key, bool) {
	for _, k := range keys {
		if k.Var == name {
			return k, true
		}
	}
	return Key{}, false
}

// Value is what v holds for the variable name ("" when it is not set).
func (v Values) Value(name string) string { return v.Vars[name] }

// KeepsVersion is the version rule: the userdata (and install's VERSION)
// names the release an instance was first given, and after a self-update
// the instance runs a newer one, which stays. It reports whether current,
// the version the config names, stays when offered is offered.
func KeepsVersion(current, offered string) bool { return dist.Newer(current, offered) }

// NewToken is the app rule: an instance that moves to another app gets a
// new instance token, as the 2014 agent did (the token is what the
// backend knows the instance by, within its app). It reports whether the
// token must be replaced when the app id goes from before (as the config
// had it; "" for a first install) to after.
func NewToken(before, after string) bool { return before != "" && after != before }

// Apply writes the [userdata] values of v into c, by the rules: an empty
// or unchanged value is skipped, the version is never lowered
// (KeepsVersion), and each value is checked as the config's reader checks
// it (a ws_uri must be ws:// or wss://). It returns the keys it changed;
// on error c may be half changed, so apply it to a copy (config.Owner's
// Update does). The caller replaces the token when the app id changed
// (NewToken).
func Apply(c *config.Config, v Values) ([]string, error) {
	var changed []string
	for _, k := range keys {
		if k.Section != "userdata" {
			continue // [module] is install's parameter, not the agent's to follow
		}
		value, current := v.Value(k.Var), c.Get(k.Section, k.Key)
		if value == "" || value == current {
			continue
		}
		if k.Var == VarVersion && KeepsVersion(current, value) {
			continue
		}
		if err := c.Set(k.Section, k.Key, value); err != nil {
			return nil, fmt.Errorf("userdata values not applied: %w", err)
		}
		changed = append(changed, k.Key)
	}
	return changed, nil
}
