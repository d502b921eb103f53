// Package config loads, validates and saves /etc/opsagent.conf, the INI file
// of spec/install-update.md. It keeps every section, key and comment it does
// not know about, so a file written by the 2014 agent (package_path,
// gpg_key_uri, platform, …) loads without error and survives a rewrite.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"gopkg.in/ini.v1"

	"github.com/visualops/opsagent/internal/fsutil"
)

// DefaultPath is where the installer writes the config (relative to the root).
const DefaultPath = "/etc/opsagent.conf"

// FileMode is the mode of the saved file: it names the token file and the
// backend, so it is not world-readable.
const FileMode = 0o640

// Global is the [global] section: where things live on the instance. Every
// path is an instance path, to be joined with the configured root.
type Global struct {
	EnvRoot  string // the Python virtualenv
	ConfPath string // generated files: recipe.json, bridge.py, lock, …
	LogPath  string
	Token    string // the instance token file
	Watch    string // checksums of watched files
	LogFile  string
	LogLevel string // DEBUG, INFO, WARNING or ERROR (2014 spellings accepted)
}

// Userdata is the [userdata] section: what the instance's userdata said.
type Userdata struct {
	WSURI      string
	AppID      string
	Version    string
	BaseRemote string
	PubKey     string // minisign public key (base64), for self-update
}

// Module is the [module] section: the states repository.
type Module struct {
	Root      string
	Name      string
	Bootstrap string
	Repo      string // mod_repo
	Tag       string // mod_tag
}

// Network is the [network] section.
type Network struct {
	Metadata   string // instance metadata base URL
	InstanceID string // fixed instance id for non-cloud hosts and demos
	CAFile     string // extra CA certificates for wss://
}

// Salt is the [salt] section.
type Salt struct {
	Delay      time.Duration // pause between successful rounds; bare numbers are minutes
	Wheelhouse string        // pip --find-links directory for offline installs
}

// Agent is the [agent] section (new in the Go agent).
type Agent struct {
	RetryDelay       time.Duration
	StateTimeout     time.Duration // 0: none
	KillGrace        time.Duration
	AppNotReadyDelay time.Duration
	HealthDeadline   time.Duration
	Engine           string // auto, native or salt
	OutboxLimit      int
	OutputLimit      int // bytes kept of each state comment and stdout
}

// Config is the whole file. The typed sections are what the agent uses;
// Save writes them back into the original document.
type Config struct {
	Global   Global
	Userdata Userdata
	Module   Module
	Network  Network
	Salt     Salt
	Agent    Agent

	path string
	doc  *ini.File
}

// Default returns a config with every default set and no userdata.
func Default() *Config {
	c := &Config{doc: ini.Empty()}
	for _, f := range fields {
		if err := f.set(c, f.def); err != nil {
			panic(fmt.Sprintf("config: bad default for [%s] %s: %v", f.section, f.key, err))
		}
	}
	return c
}

// Path is the file the config was loaded from or last saved to.
func (c *Config) Path() string { return c.path }

// Load reads and validates the config at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("config %s: file not found (run 'opsagent install', or pass --config): %w", path, err)
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	c, err := Parse(path, data)
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Parse reads an INI document; name is used in error messages. It checks
// the form of every value but not that required keys are present (Validate).
func Parse(name string, data []byte) (*Config, error) {
	doc, err := ini.LoadSources(loadOptions, data)
	if err != nil {
		return nil, fmt.Errorf("config %s: not a valid INI file: %w", name, err)
	}
	c := Default()
	c.path, c.doc = name, doc
	for _, f := range fields {
		sec, err := doc.GetSection(f.section)
		if err != nil || !sec.HasKey(f.key) {
			continue
		}
		raw := strings.TrimSpace(sec.Key(f.key).String())
		if raw == "" && !f.required {
			// The 2014 installer wrote empty keys (mod_repo=) for "not set".
			continue
		}
		if err := f.set(c, raw); err != nil {
			return nil, fmt.Errorf("config %s: [%s] %s = %q: %w", name, f.section, f.key, raw, err)
		}
	}
	return c, nil
}

// loadOptions keep the document as written: keys are case-sensitive, inline
// comments are only taken after whitespace (so URLs with # or ; survive).
var loadOptions = ini.LoadOptions{
	Insensitive:                false,
	SpaceBeforeInlineComment:   true,
	AllowPythonMultilineValues: false,
	PreserveSurroundedQuote:    false,
}

// Validate checks that required keys are present and values make sense
// together.
func (c *Config) Validate() error {
	for _, f := range fields {
		if f.required && strings.TrimSpace(f.get(c)) == "" {
			return fmt.Errorf("config %s: [%s] %s is missing (set it, or re-run 'opsagent install' with --%s)", c.path, f.section, f.key, strings.ReplaceAll(f.key, "_", "-"))
		}
	}
	return nil
}

// Get returns the raw value of any key, known or not ("" when absent).
func (c *Config) Get(section, key string) string {
	if f := lookup(section, key); f != nil {
		return f.get(c)
	}
	sec, err := c.doc.GetSection(section)
	if err != nil || !sec.HasKey(key) {
		return ""
	}
	return sec.Key(key).String()
}

// Set changes any key. Known keys are parsed (and refused when malformed);
// unknown keys are kept as text.
func (c *Config) Set(section, key, value string) error {
	if f := lookup(section, key); f != nil {
		if err := f.set(c, value); err != nil {
			return fmt.Errorf("config: [%s] %s = %q: %w", section, key, value, err)
		}
		return nil
	}
	c.doc.Section(section).Key(key).SetValue(value)
	return nil
}

// Bytes renders the config: the original document with the typed values
// written back. Keys that are absent from the file and still at their
// default are not added, so the file stays as short as the user wrote it.
func (c *Config) Bytes() ([]byte, error) {
	for _, f := range fields {
		v := f.get(c)
		sec, err := c.doc.GetSection(f.section)
		if err == nil && sec.HasKey(f.key) {
			old := strings.TrimSpace(sec.Key(f.key).String())
			if old == v || sameValue(&f, old, v) {
				continue
			}
			sec.Key(f.key).SetValue(v)
			continue
		}
		if v != f.def {
			c.doc.Section(f.section).Key(f.key).SetValue(v)
		}
	}
	var buf bytes.Buffer
	if _, err := c.doc.WriteTo(&buf); err != nil {
		return nil, fmt.Errorf("config %s: render: %w", c.path, err)
	}
	return buf.Bytes(), nil
}

// sameValue reports whether old and new spell the same value (a file's
// "10" and our "10" minutes, or "30" and "30s" seconds), so that a rewrite
// does not churn keys the agent did not change.
func sameValue(f *field, old, v string) bool {
	a, b := Default(), Default()
	if f.set(a, old) != nil || f.set(b, v) != nil {
		return false
	}
	return f.get(a) == f.get(b)
}

// Save writes the config atomically (temp file in the same directory,
// fsync, rename) with mode 0640. An empty path means where it was loaded from.
func (c *Config) Save(path string) error {
	if path == "" {
		path = c.path
	}
	if path == "" {
		return errors.New("config: Save needs a path: this config was not loaded from a file")
	}
	data, err := c.Bytes()
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(path, data, FileMode); err != nil {
		return fmt.Errorf("config %s: save: %w", path, err)
	}
	c.path = path
	return nil
}

// field describes one known key: its default, how to parse it into the
// typed config and how to print it back.
type field struct {
	section, key string
	def          string
	required     bool
	get          func(*Config) string
	set          func(*Config, string) error
}

func lookup(section, key string) *field {
	for i := range fields {
		if fields[i].section == section && fields[i].key == key {
			return &fields[i]
		}
	}
	return nil
}

func str(section, key, def string, p func(*Config) *string) field {
	return field{section: section, key: key, def: def,
		get: func(c *Config) string { return *p(c) },
		set: func(c *Config, v string) error { *p(c) = strings.TrimSpace(v); return nil },
	}
}

func path(section, key, def string, p func(*Config) *string) field {
	f := str(section, key, def, p)
	f.set = func(c *Config, v string) error {
		v = strings.TrimSpace(v)
		if v != "" && !strings.HasPrefix(v, "/") {
			return errors.New("expected an absolute path such as /var/lib/visualops/opsagent")
		}
		*p(c) = v
		return nil
	}
	return f
}

func required(f field) field { f.required = true; return f }

func withCheck(f field, check func(string) error) field {
	set := f.set
	f.set = func(c *Config, v string) error {
		v = strings.TrimSpace(v)
		if v != "" {
			if err := check(v); err != nil {
				return err
			}
		}
		return set(c, v)
	}
	return f
}

// duration parses "30s", "2m", … and bare numbers in unit (the 2014 file
// wrote minutes for [salt] delay).
func duration(section, key, def string, unit time.Duration, p func(*Config) *time.Duration) field {
	return field{section: section, key: key, def: def,
		get: func(c *Config) string { return formatDuration(*p(c), unit) },
		set: func(c *Config, v string) error {
			d, err := ParseDuration(v, unit)
			if err != nil {
				return err
			}
			*p(c) = d
			return nil
		},
	}
}

// ParseDuration reads a Go duration ("30s", "1m30s") or a bare non-negative
// number counted in unit.
func ParseDuration(v string, unit time.Duration) (time.Duration, error) {
	v = strings.TrimSpace(v)
	if n, err := strconv.ParseFloat(v, 64); err == nil {
		if n < 0 {
			return 0, errors.New("must not be negative")
		}
		return time.Duration(n * float64(unit)), nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("expected a duration such as 30s or 5m, or a number of %s", unitName(unit))
	}
	if d < 0 {
		return 0, errors.New("must not be negative")
	}
	return d, nil
}

func unitName(unit time.Duration) string {
	if unit == time.Minute {
		return "minutes"
	}
	return "seconds"
}

// formatDuration prints d as a bare number of unit when it is a whole
// number of them (so [salt] delay stays "10"), else as a Go duration.
func formatDuration(d, unit time.Duration) string {
	if unit == time.Minute && d%time.Minute == 0 {
		return strconv.FormatInt(int64(d/time.Minute), 10)
	}
	return d.String()
}

func integer(section, key, def string, min int, p func(*Config) *int) field {
	return field{section: section, key: key, def: def,
		get: func(c *Config) string { return strconv.Itoa(*p(c)) },
		set: func(c *Config, v string) error {
			n, err := ParseSize(v)
			if err != nil {
				return err
			}
			if n < min {
				return fmt.Errorf("must be at least %d", min)
			}
			*p(c) = n
			return nil
		},
	}
}

// ParseSize reads an integer with an optional KiB/MiB (or K/M) suffix.
func ParseSize(v string) (int, error) {
	v = strings.TrimSpace(v)
	mult := 1
	for _, s := range []struct {
		suffix string
		mult   int
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"K", 1 << 10}, {"M", 1 << 20}} {
		if strings.HasSuffix(v, s.suffix) {
			v, mult = strings.TrimSpace(strings.TrimSuffix(v, s.suffix)), s.mult
			break
		}
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, errors.New("expected a whole number, optionally with KiB or MiB")
	}
	return n * mult, nil
}

func oneOf(values ...string) func(string) error {
	return func(v string) error {
		for _, ok := range values {
			if strings.EqualFold(v, ok) {
				return nil
			}
		}
		return fmt.Errorf("expected one of %s", strings.Join(values, ", "))
	}
}

func urlWithScheme(schemes ...string) func(string) error {
	return func(v string) error {
		u, err := url.Parse(v)
		if err != nil || u.Host == "" {
			return fmt.Errorf("expected a URL such as %s://host/path", schemes[0])
		}
		for _, s := range schemes {
			if u.Scheme == s {
				return nil
			}
		}
		return fmt.Errorf("expected a %s URL", strings.Join(schemes, " or "))
	}
}

// Log levels accepted in [global] loglvl (the 2014 agent used Python's names).
var logLevels = []string{"DEBUG", "INFO", "WARNING", "WARN", "ERROR"}

// fields is the table of known keys, in file order.
var fields = []field{
	path("global", "envroot", "/opt/visualops/env", func(c *Config) *string { return &c.Global.EnvRoot }),
	path("global", "conf_path", "/var/lib/visualops/opsagent", func(c *Config) *string { return &c.Global.ConfPath }),
	path("global", "log_path", "/var/log/visualops", func(c *Config) *string { return &c.Global.LogPath }),
	path("global", "token", "/etc/opsagent.token", func(c *Config) *string { return &c.Global.Token }),
	path("global", "watch", "/var/lib/visualops/opsagent/watch", func(c *Config) *string { return &c.Global.Watch }),
	path("global", "logfile", "/var/log/visualops/agent.log", func(c *Config) *string { return &c.Global.LogFile }),
	withCheck(str("global", "loglvl", "INFO", func(c *Config) *string { return &c.Global.LogLevel }), oneOf(logLevels...)),

	required(withCheck(str("userdata", "ws_uri", "", func(c *Config) *string { return &c.Userdata.WSURI }), urlWithScheme("wss", "ws"))),
	required(str("userdata", "app_id", "", func(c *Config) *string { return &c.Userdata.AppID })),
	str("userdata", "version", "", func(c *Config) *string { return &c.Userdata.Version }),
	withCheck(str("userdata", "base_remote", "", func(c *Config) *string { return &c.Userdata.BaseRemote }), urlWithScheme("https", "http")),
	str("userdata", "pubkey", "", func(c *Config) *string { return &c.Userdata.PubKey }),

	path("module", "root", "/opt/visualops/bootstrap", func(c *Config) *string { return &c.Module.Root }),
	str("module", "name", "salt", func(c *Config) *string { return &c.Module.Name }),
	str("module", "bootstrap", "scripts/bootstrap.sh", func(c *Config) *string { return &c.Module.Bootstrap }),
	str("module", "mod_repo", "", func(c *Config) *string { return &c.Module.Repo }),
	str("module", "mod_tag", "", func(c *Config) *string { return &c.Module.Tag }),

	withCheck(str("network", "metadata", "http://169.254.169.254", func(c *Config) *string { return &c.Network.Metadata }), urlWithScheme("http", "https")),
	str("network", "instance_id", "", func(c *Config) *string { return &c.Network.InstanceID }),
	path("network", "ca_file", "", func(c *Config) *string { return &c.Network.CAFile }),

	duration("salt", "delay", "10", time.Minute, func(c *Config) *time.Duration { return &c.Salt.Delay }),
	path("salt", "wheelhouse", "", func(c *Config) *string { return &c.Salt.Wheelhouse }),

	duration("agent", "retry_delay", "30s", time.Second, func(c *Config) *time.Duration { return &c.Agent.RetryDelay }),
	duration("agent", "state_timeout", "0s", time.Second, func(c *Config) *time.Duration { return &c.Agent.StateTimeout }),
	duration("agent", "kill_grace", "10s", time.Second, func(c *Config) *time.Duration { return &c.Agent.KillGrace }),
	duration("agent", "app_not_ready_delay", "30s", time.Second, func(c *Config) *time.Duration { return &c.Agent.AppNotReadyDelay }),
	duration("agent", "health_deadline", "2m0s", time.Second, func(c *Config) *time.Duration { return &c.Agent.HealthDeadline }),
	withCheck(str("agent", "engine", "auto", func(c *Config) *string { return &c.Agent.Engine }), oneOf("auto", "native", "salt")),
	integer("agent", "outbox_limit", "10000", 1, func(c *Config) *int { return &c.Agent.OutboxLimit }),
	integer("agent", "output_limit", "65536", 1024, func(c *Config) *int { return &c.Agent.OutputLimit }),
}
