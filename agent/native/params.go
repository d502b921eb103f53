package native

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/internal/rootfs"
)

// params reads a state's parameter object leniently, the way the 2014
// adaptor did: real recipes send numbers as strings ("timeout": "1000"),
// lists as a single string ("if-path-present": "/tmp/x"), and dicts as
// "KEY=value" strings ("env": "WORLD=world"). Errors name the parameter.
type params map[string]json.RawMessage

// badParam is a parameter that cannot be used; its message becomes the
// state's comment.
type badParam struct{ name, problem string }

func (e *badParam) Error() string { return fmt.Sprintf("parameter %s: %s", e.name, e.problem) }

func parseParams(raw json.RawMessage) (params, error) {
	p := params{}
	if len(raw) == 0 {
		return p, nil
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, &badParam{"(all)", "must be a JSON object"}
	}
	return p, nil
}

func (p params) has(name string) bool {
	v, ok := p[name]
	return ok && string(v) != "null"
}

// str reads a scalar as a string (numbers and booleans are printed).
func (p params) str(name string) (string, error) {
	v, ok := p[name]
	if !ok || string(v) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(v, &s) == nil {
		return s, nil
	}
	var n json.Number
	if json.Unmarshal(v, &n) == nil {
		return n.String(), nil
	}
	var b bool
	if json.Unmarshal(v, &b) == nil {
		return strconv.FormatBool(b), nil
	}
	// A one-element list of strings is accepted for a line (cron's "cmd").
	if l, err := p.list(name); err == nil && len(l) == 1 {
		return l[0], nil
	}
	return "", &badParam{name, "must be a string, got " + kindOf(v)}
}

func (p params) required(name string) (string, error) {
	s, err := p.str(name)
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(s) == "" {
		return "", &badParam{name, "is required and missing or empty"}
	}
	return s, nil
}

// list reads a list of strings: a JSON list of strings or of {"key": …}
// objects, or a single string.
func (p params) list(name string) ([]string, error) {
	v, ok := p[name]
	if !ok || string(v) == "null" {
		return nil, nil
	}
	var s string
	if json.Unmarshal(v, &s) == nil {
		if strings.TrimSpace(s) == "" {
			return nil, nil
		}
		return []string{s}, nil
	}
	var items []json.RawMessage
	if json.Unmarshal(v, &items) != nil {
		return nil, &badParam{name, "must be a list of strings, got " + kindOf(v)}
	}
	var out []string
	for i, it := range items {
		var s string
		if json.Unmarshal(it, &s) == nil {
			if s != "" {
				out = append(out, s)
			}
			continue
		}
		var kv struct {
			Key *string `json:"key"`
		}
		if json.Unmarshal(it, &kv) == nil && kv.Key != nil {
			if *kv.Key != "" {
				out = append(out, *kv.Key)
			}
			continue
		}
		return nil, &badParam{fmt.Sprintf("%s[%d]", name, i), "must be a string, got " + kindOf(it)}
	}
	return out, nil
}

// pair is one entry of a dict parameter: a key and its value ("" when
// none was given).
type pair struct{ key, value string }

// pairs reads a dict parameter the way the IDE sends it: a list of
// {"key": …, "value": …} objects (the value optional, a string, a number
// or a boolean), plain strings (a key without a value), or a JSON object.
// Keys are trimmed; entries with an empty key are skipped, as the 2014
// adaptor did.
func (p params) pairs(name string) ([]pair, error) {
	v, ok := p[name]
	if !ok || string(v) == "null" {
		return nil, nil
	}
	scalar := func(raw json.RawMessage) (string, bool) {
		if len(raw) == 0 || string(raw) == "null" {
			return "", true
		}
		var s string
		if json.Unmarshal(raw, &s) == nil {
			return s, true
		}
		var n json.Number
		if json.Unmarshal(raw, &n) == nil {
			return n.String(), true
		}
		var b bool
		if json.Unmarshal(raw, &b) == nil {
			return strconv.FormatBool(b), true
		}
		return "", false
	}
	if s, ok := scalar(v); ok {
		if strings.TrimSpace(s) == "" {
			return nil, nil
		}
		return []pair{{key: s}}, nil
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(v, &obj) == nil {
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var out []pair
		for _, k := range keys {
			val, ok := scalar(obj[k])
			if !ok {
				return nil, &badParam{name + "." + k, "must be a string, got " + kindOf(obj[k])}
			}
			if k = strings.TrimSpace(k); k != "" {
				out = append(out, pair{k, val})
			}
		}
		return out, nil
	}
	var items []json.RawMessage
	if json.Unmarshal(v, &items) != nil {
		return nil, &badParam{name, "must be a list of {key, value} entries, got " + kindOf(v)}
	}
	var out []pair
	for i, it := range items {
		if s, ok := scalar(it); ok {
			if s != "" {
				out = append(out, pair{key: s})
			}
			continue
		}
		var kv struct {
			Key   *string         `json:"key"`
			Value json.RawMessage `json:"value"`
		}
		if json.Unmarshal(it, &kv) != nil || kv.Key == nil {
			return nil, &badParam{fmt.Sprintf("%s[%d]", name, i), "must be a {key, value} entry, got " + kindOf(it)}
		}
		val, ok := scalar(kv.Value)
		if !ok {
			return nil, &badParam{fmt.Sprintf("%s[%d].value", name, i), "must be a string, got " + kindOf(kv.Value)}
		}
		if k := strings.TrimSpace(*kv.Key); k != "" {
			out = append(out, pair{k, val})
		}
	}
	return out, nil
}

// boolean reads true/false, also "true", "yes", "1".
func (p params) boolean(name string, def bool) (bool, error) {
	v, ok := p[name]
	if !ok || string(v) == "null" {
		return def, nil
	}
	var b bool
	if json.Unmarshal(v, &b) == nil {
		return b, nil
	}
	s, err := p.str(name)
	if err == nil {
		switch strings.ToLower(strings.TrimSpace(s)) {
		case "true", "yes", "1", "on":
			return true, nil
		case "false", "no", "0", "off", "":
			return false, nil
		}
	}
	return false, &badParam{name, "must be true or false, got " + string(v)}
}

// integer reads a whole number, also as a string.
func (p params) integer(name string, def int64) (int64, error) {
	s, err := p.str(name)
	if err != nil {
		return 0, err
	}
	if strings.TrimSpace(s) == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return 0, &badParam{name, fmt.Sprintf("must be a whole number, got %q", s)}
	}
	return n, nil
}

// mode reads a file mode written in octal, as a string ("0755") or a
// number (755, which means octal as in Salt).
func (p params) mode(name string) (uint32, bool, error) {
	s, err := p.str(name)
	if err != nil {
		return 0, false, err
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, false, nil
	}
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n > 0o7777 {
		return 0, false, &badParam{name, fmt.Sprintf("must be an octal mode such as 0755, got %q", s)}
	}
	return uint32(n), true, nil
}

// env reads environment variables: a JSON object, a list of
// {"key","value"}, or "KEY=value" text, one variable per line.
func (p params) env(name string) ([]string, error) {
	v, ok := p[name]
	if !ok || string(v) == "null" {
		return nil, nil
	}
	var obj map[string]any
	if json.Unmarshal(v, &obj) == nil {
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var out []string
		for _, k := range keys {
			out = append(out, k+"="+fmt.Sprint(obj[k]))
		}
		return out, nil
	}
	var pairs []struct {
		Key   string `json:"key"`
		Value any    `json:"value"`
	}
	if json.Unmarshal(v, &pairs) == nil {
		var out []string
		for _, kv := range pairs {
			if kv.Key != "" {
				val := ""
				if kv.Value != nil {
					val = fmt.Sprint(kv.Value)
				}
				out = append(out, kv.Key+"="+val)
			}
		}
		return out, nil
	}
	s, err := p.str(name)
	if err != nil {
		return nil, &badParam{name, "must be an object of variables or KEY=value text, got " + kindOf(v)}
	}
	var out []string
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if k, _, ok := strings.Cut(line, "="); !ok || strings.TrimSpace(k) == "" || strings.ContainsAny(k, " \t") {
			return nil, &badParam{name, fmt.Sprintf("%q is not KEY=value", line)}
		}
		out = append(out, line)
	}
	return out, nil
}

func kindOf(v json.RawMessage) string {
	s := strings.TrimSpace(string(v))
	if s == "" {
		return "nothing"
	}
	switch s[0] {
	case '{':
		return "an object"
	case '[':
		return "a list"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// absPath reads an absolute instance path, cleaned.
func absPath(p params, name string) (string, error) {
	v, err := p.required(name)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(v, "/") {
		return "", &badParam{name, fmt.Sprintf("must be an absolute path, got %q", v)}
	}
	return rootfs.Clean(v), nil
}
