package config

import (
	"fmt"
	"regexp"
	"strings"
)

// Setting is one `--set section.key=value` of `opsagent install` and
// `opsagent userdata` (which carries it to the instance's install).
type Setting struct{ Section, Key, Value string }

// setName is what a --set item names: section.key, each part in
// [a-z0-9_], the spelling of every key the agent knows and one that the
// states repository's bootstrap.sh can grep for.
var setName = regexp.MustCompile(`^([a-z0-9_]+)\.([a-z0-9_]+)$`)

// ParseSetting is the one reader of a --set item: install, and userdata
// (which renders it into the script for the instance's install to read
// again), accept and refuse the same items. It refuses a value with a
// newline or NUL byte, which no --set can carry (the userdata script
// separates items by newlines); whether the value suits its key, and the
// rule every value of the file obeys, are Set's to say (Apply).
func ParseSetting(item string) (Setting, error) {
	name, value, ok := strings.Cut(item, "=")
	m := setName.FindStringSubmatch(name)
	if !ok || m == nil {
		return Setting{}, fmt.Errorf("--set %q: write section.key=value, section and key in [a-z0-9_], e.g. network.instance_id=i-0abc", item)
	}
	if strings.ContainsAny(value, "\n\x00") {
		return Setting{}, fmt.Errorf("--set %q: a value may not contain a newline or NUL byte: put it on one line", item)
	}
	return Setting{Section: m[1], Key: m[2], Value: strings.TrimSpace(value)}, nil
}

// ParseSettings reads --set items in order.
func ParseSettings(items []string) ([]Setting, error) {
	out := make([]Setting, 0, len(items))
	for _, item := range items {
		s, err := ParseSetting(item)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// Apply sets s in c (Set: a known key's value is parsed and refused when
// malformed).
func (s Setting) Apply(c *Config) error {
	if err := c.Set(s.Section, s.Key, s.Value); err != nil {
		return fmt.Errorf("--set %s.%s: %w", s.Section, s.Key, err)
	}
	return nil
}
