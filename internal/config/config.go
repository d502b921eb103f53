// Package config loads, validates and saves /etc/opsagent.conf, the INI file
// of spec/install-update.md, and answers where every file of an
// installation lives (Layout). It keeps every section, key and comment it
// does not know about, so a file written by the 2014 agent (gpg_key_uri,
// scripts_path, …) loads without error and survives a rewrite, and it
// writes `key=value` lines without spaces, because the states repository's
// scripts/bootstrap.sh reads the file with `grep "^key=" | cut -d= -f2`.
//
// Exactly one value writes the file back: Owner. Components never hold a
// *Config; they get read-only options built from it at start, and changes
// reach them through Owner.OnChange.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unicode"

	"gopkg.in/ini.v1"

	"github.com/visualops/opsagent/internal/fsutil"
)

// DefaultPath is where the installer writes the config (an instance path).
const DefaultPath = "/etc/opsagent.conf"

// FileMode is the mode of the saved file: it names the token file and the
// backend, so it is not world-readable.
const FileMode = 0o640

// MaxFileSize bounds what Load reads: a config is a few hundred bytes, and
// a huge file (or a device linked in its place) must not be read whole.
const MaxFileSize = 1 << 20

// MinPause is the floor of the pauses between rounds ([salt] delay,
// [agent] retry_delay): below it a failing recipe would loop thousands of
// rounds a second.
const MinPause = time.Second

// Global is the [global] section: where things live on the instance. Every
// path is an instance path; Layout maps it below the root.
type Global struct {
	VenvDir     string // envroot: the Python virtualenv
	StateDir    string // conf_path: generated files (recipe.json, bridge.py, lock, …)
	LogDir      string // log_path
	TokenFile   string // token: the instance token
	WatchDir    string // watch: checksums of watched files
	LogFile     string // logfile
	LogLevel    string // loglvl: DEBUG, INFO, WARNING or ERROR (2014 spellings accepted)
	PackagePath string // package_path: the virtualenv's site-packages (read by bootstrap.sh)
	Platform    string // platform: APT or YUM (read by bootstrap.sh); empty: it detects
}

// Userdata is the [userdata] section: what the instance's userdata said.
type Userdata struct {
	WSURI        string // ws_uri
	AppID        string // app_id
	Version      string // version: the release the installer installed
	BaseRemote   string // base_remote: where releases are downloaded from
	PubKey       string // pubkey: minisign public key (base64) trusted for self-update
	EnrollSecret string // enroll_secret: the app's enrollment secret, for the first Handshake
}

// Module is the [module] section: the states repository.
type Module struct {
	ReposDir        string // root: where states repositories are cloned
	RepoName        string // name: the clone's directory name
	BootstrapScript string // bootstrap: relative to the clone; empty: none
	Repo            string // mod_repo: used when a recipe names none
	Tag             string // mod_tag
}

// Network is the [network] section.
type Network struct {
	Metadata   string // instance metadata base URL
	InstanceID string // fixed instance id for non-cloud hosts and demos
	CAFile     string // extra CA certificates for wss://
}

// Salt is the [salt] section.
type Salt struct {
	RoundDelay time.Duration // delay: pause between successful rounds; bare numbers are minutes
	Wheelhouse string        // pip --find-links directory (or plain packages) for offline installs
	Python     string        // interpreter for the virtualenv, a host path (not below the root); empty: what the states repository needs
}

// Agent is the [agent] section (new in the Go agent).
type Agent struct {
	RetryDelay          time.Duration
	StateTimeout        time.Duration // 0: none
	KillGrace           time.Duration
	AppNotReadyDelay    time.Duration
	UpdateHealthTimeout time.Duration // a new version must handshake within this, or it is rolled back
	Engine              string        // auto, native or salt
	OutboxLimit         int           // StateLogs kept while undelivered
	OutboxMaxBytes      int           // bytes of StateLogs kept while undelivered
	OutboxMaxAge        time.Duration // undelivered StateLogs older than this are dropped
	OutputLimit         int           // bytes kept of each state comment and stdout
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

	path     string
	doc      *ini.File
	warnings []string
	// unsaved is set when the document changed in a way the typed values
	// do not show (a new file, an unknown key set), so Owner saves it.
	unsaved bool
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

// New returns a config with defaults for a file that does not exist yet
// at path (the installer's first write goes through an Owner of it).
func New(path string) *Config {
	c := Default()
	c.path, c.unsaved = path, true
	return c
}

// Path is the file the config was loaded from or last saved to.
func (c *Config) Path() string { return c.path }

// Warnings are problems that did not stop the load (a key given twice, …);
// the agent logs them at start.
func (c *Config) Warnings() []string { return append([]string(nil), c.warnings...) }

// Load reads and validates the config at path (a host path).
func Load(path string) (*Config, error) {
	data, err := fsutil.ReadFixedFile(path, MaxFileSize)
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
	// Every value obeys the one rule the writers apply too (checkValue).
	for _, sec := range doc.Sections() {
		for _, k := range sec.Keys() {
			if err := checkValue(k.Value()); err != nil {
				return nil, fmt.Errorf("config %s: [%s] %s: %w", name, sec.Name(), k.Name(), err)
			}
		}
	}
	// What the agent writes back must read back as it was.
	for _, sec := range doc.Sections() {
		if sec.Name() != ini.DefaultSection && !sectionReadsBack(sec.Name()) {
			return nil, fmt.Errorf("config %s: section name %q cannot be written back as it is: use plain names", name, sec.Name())
		}
		for _, k := range sec.Keys() {
			if _, ok := spell(k.Name(), k.Value()); !ok {
				return nil, fmt.Errorf("config %s: [%s] %q = %q cannot be written back as it is: write a plain key and value", name, sec.Name(), k.Name(), k.Value())
			}
		}
	}
	c := Default()
	c.path, c.doc = name, doc
	c.warnings = duplicates(name, data)
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

// duplicates finds sections and keys given twice: the INI reader merges
// sections and keeps the last value of a key, which is rarely what the
// person who added the second line meant, so say so.
func duplicates(name string, data []byte) []string {
	var out []string
	section := ini.DefaultSection
	sections := map[string]int{}
	keys := map[string]int{}
	for i, line := range strings.Split(string(data), "\n") {
		n := i + 1
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && strings.HasSuffix(line, "]"):
			section = strings.TrimSpace(line[1 : len(line)-1])
			if first, ok := sections[section]; ok {
				out = append(out, fmt.Sprintf("config %s: section [%s] appears twice (lines %d and %d); their keys are merged", name, section, first, n))
			} else {
				sections[section] = n
			}
		default:
			k, _, ok := strings.Cut(line, "=")
			if !ok {
				continue
			}
			id := section + "\x00" + strings.TrimSpace(k)
			if first, ok := keys[id]; ok {
				out = append(out, fmt.Sprintf("config %s: [%s] %s appears twice (lines %d and %d); line %d is used", name, section, strings.TrimSpace(k), first, n, n))
			}
			keys[id] = n
		}
	}
	return out
}

// checkValue is the one rule for every value of the file, known key or
// not, that the reader (Parse) and the writers (Set, and through it
// `install --set` and `userdata`) share: one line of text without control
// characters (a tab aside). A backquoted value may span lines in INI, but
// the states repository's bootstrap.sh reads the file line by line, and
// one rewritten unquoted would no longer parse; a control character would
// reach a terminal or the backend, which refuses it.
func checkValue(v string) error {
	for i, r := range v {
		switch {
		case r == '\r' || r == '\n':
			return errors.New("the value spans several lines (a line break, or a `backquoted` value): write it on one line")
		case r != '\t' && unicode.IsControl(r):
			return fmt.Errorf("the value has a control character (%U) at byte %d: remove it", r, i)
		}
	}
	return nil
}

// CheckValue applies the rule every value of the file obeys (see
// checkValue) and, for a known key, its own parser: what a writer that
// is not the installer (the userdata renderer) checks before it promises
// a value that `install` will write and the agent will read.
func CheckValue(section, key, value string) error {
	return New("").Set(section, key, value)
}

// Check is what Owner checks before it writes: the values are complete
// (Validate), and the file they render to is one that Load reads back,
// with the same values, within MaxFileSize. So a config the installer or
// the agent writes is always one the agent starts with.
func (c *Config) Check() error {
	if err := c.Validate(); err != nil {
		return err
	}
	_, err := c.checkedBytes()
	return err
}

// checkedBytes renders the file and reads it back as Load would.
func (c *Config) checkedBytes() ([]byte, error) {
	data, err := c.Bytes()
	if err != nil {
		return nil, err
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("config %s: it would be %d bytes, over the %d bytes the agent reads: shorten the longest values", c.path, len(data), MaxFileSize)
	}
	back, err := Parse(c.path, data)
	if err == nil {
		err = back.Validate()
	}
	if err != nil {
		return nil, fmt.Errorf("config %s: what would be written does not read back: %w", c.path, err)
	}
	if back.Global != c.Global || back.Userdata != c.Userdata || back.Module != c.Module ||
		back.Network != c.Network || back.Salt != c.Salt || back.Agent != c.Agent {
		return nil, fmt.Errorf("config %s: what would be written reads back with other values: this is a bug, please report it", c.path)
	}
	return data, nil
}

// Validate checks that required keys are present.
func (c *Config) Validate() error {
	for _, f := range fields {
		if f.required && strings.TrimSpace(f.get(c)) == "" {
			return fmt.Errorf("config %s: [%s] %s is missing (set it, or re-run 'opsagent install' with --%s)", c.path, f.section, f.key, strings.ReplaceAll(f.key, "_", "-"))
		}
	}
	return nil
}

// Get returns the value of any key, known or not ("" when absent).
func (c *Config) Get(section, key string) string {
	if f := lookup(section, key); f != nil {
		return f.get(c)
	}
	if c.doc == nil {
		return ""
	}
	sec, err := c.doc.GetSection(section)
	if err != nil || !sec.HasKey(key) {
		return ""
	}
	return sec.Key(key).String()
}

// Set changes any key. Known keys are parsed (and refused when malformed);
// unknown keys are kept as text. A value is one line (checkValue, the
// rule Parse applies too).
func (c *Config) Set(section, key, value string) error {
	if err := checkValue(value); err != nil {
		return fmt.Errorf("config: [%s] %s: %w", section, key, err)
	}
	if f := lookup(section, key); f != nil {
		if err := f.set(c, value); err != nil {
			return fmt.Errorf("config: [%s] %s = %q: %w", section, key, value, err)
		}
		return nil
	}
	if !validName(section) || !validName(key) {
		return fmt.Errorf("config: [%s] %s: section and key are letters, digits and _", section, key)
	}
	if c.doc == nil {
		c.doc = ini.Empty()
	}
	value = strings.TrimSpace(value)
	if sec, err := c.doc.GetSection(section); err == nil && sec.HasKey(key) && sec.Key(key).String() == value {
		return nil // the same value: nothing to save
	}
	c.doc.Section(section).Key(key).SetValue(value)
	c.unsaved = true
	return nil
}

func validName(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r == '_' || r == '-' || r == '.' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

// Known reports whether section.key is a key the agent understands.
func Known(section, key string) bool { return lookup(section, key) != nil }

// Bytes renders the config: the original document with the typed values
// written back. Keys that are absent from the file and still at their
// default are not added, so the file stays as short as the user wrote it.
func (c *Config) Bytes() ([]byte, error) {
	if c.doc == nil {
		return nil, errors.New("config: this is a read-only copy; save through its Owner")
	}
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
		if v != f.def || f.written && v != "" {
			c.doc.Section(f.section).Key(f.key).SetValue(v)
		}
	}
	return render(c.doc), nil
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

// save writes the config atomically (temp file in the same directory,
// fsync, rename) with mode 0640. Only Owner and the installer's first
// write call it.
func (c *Config) save(path string) error {
	if path == "" {
		path = c.path
	}
	if path == "" {
		return errors.New("config: save needs a path: this config was not loaded from a file")
	}
	data, err := c.checkedBytes()
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(path, data, FileMode); err != nil {
		return fmt.Errorf("config %s: save: %w", path, err)
	}
	c.path, c.unsaved = path, false
	return nil
}

// copyValues returns a copy of the typed values with no document: what
// readers get. Every section holds only values, so the copy is deep.
func (c *Config) copyValues() *Config {
	cp := *c
	cp.doc = nil
	cp.warnings = append([]string(nil), c.warnings...)
	return &cp
}

// field describes one known key: its default, how to parse it into the
// typed config and how to print it back.
type field struct {
	section, key string
	def          string
	required     bool
	// written: the states repository's bootstrap.sh reads this key with
	// grep, so the file always carries it, default or not.
	written bool
	// owned: a path opsagent creates, chmods and removes (ownedPath).
	owned bool
	get   func(*Config) string
	set   func(*Config, string) error
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

// ownedPath is a path key naming a file or directory that opsagent
// creates, changes the mode of, writes, and that uninstall removes: it
// must be a place of opsagent's own (CheckOwnedPath).
func ownedPath(section, key, def string, p func(*Config) *string) field {
	f := withCheck(path(section, key, def, p), CheckOwnedPath)
	f.owned = true
	return f
}

// OwnedPathKeys lists the path keys that CheckOwnedPath governs, as
// {section, key, default}: the installer checks on disk that each one
// that is new is not a file or directory someone else made.
func OwnedPathKeys() [][3]string {
	var out [][3]string
	for _, f := range fields {
		if f.owned {
			out = append(out, [3]string{f.section, f.key, f.def})
		}
	}
	return out
}

// systemTrees hold the operating system's own files: nothing of opsagent's
// is ever in them. /etc is handled apart (the token lives there).
var systemTrees = []string{"/bin", "/boot", "/dev", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin", "/sys", "/usr"}

// systemDirs are shared directories that opsagent may create things in
// but that must never be one of its own paths (chmodded, or removed whole
// by uninstall).
var systemDirs = []string{"/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var",
	"/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/lock", "/var/log", "/var/mail",
	"/var/opt", "/var/run", "/var/spool", "/var/tmp", "/opt/visualops", "/var/lib/visualops"}

// CheckOwnedPath is the rule for the paths opsagent owns ([global]
// envroot, conf_path, log_path, token, watch, logfile and [module] root),
// an instance path taken as cleaned ("/var/lib/../../etc" is /etc):
//   - not "/" nor directly below it (/data: use /data/opsagent);
//   - not in the system trees /bin, /boot, /dev, /lib*, /proc, /run,
//     /sbin, /sys, /usr;
//   - in /etc only as /etc/opsagent* or /etc/visualops* (the token's
//     /etc/opsagent.token) or inside such a directory, and never the
//     config file /etc/opsagent.conf itself;
//   - not a shared directory such as /var/lib, /var/log, /opt or /tmp.
//
// The installer adds a rule that needs the file system: such a path that
// already exists must be one opsagent made (installer.checkOwnedPaths).
func CheckOwnedPath(v string) error {
	p := filepath.Clean("/" + strings.TrimSpace(v))
	under := func(dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }
	if strings.Count(p, "/") < 2 {
		return fmt.Errorf("%s is the root or directly below it: use a directory of opsagent's own, such as %s/opsagent", p, p)
	}
	for _, t := range systemTrees {
		if under(t) {
			return fmt.Errorf("%s is in %s, which belongs to the operating system: use a path of opsagent's own (below /var/lib/visualops, /var/log/visualops or /opt/visualops)", p, t)
		}
	}
	if under("/etc") {
		first, _, _ := strings.Cut(strings.TrimPrefix(p, "/etc/"), "/")
		if p == DefaultPath || !strings.HasPrefix(first, "opsagent") && !strings.HasPrefix(first, "visualops") {
			return fmt.Errorf("%s is a file of the system's /etc: in /etc, opsagent's own paths are /etc/opsagent.token and /etc/opsagent*/ or /etc/visualops*/ directories", p)
		}
	}
	for _, d := range systemDirs {
		if p == d {
			return fmt.Errorf("%s is a shared directory: use a directory of opsagent's own inside it, such as %s/opsagent", p, p)
		}
	}
	return nil
}

func required(f field) field { f.required = true; return f }

// readByBootstrap marks the keys scripts/bootstrap.sh greps for.
func readByBootstrap(f field) field { f.written = true; return f }

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

// maxDuration bounds every duration (about 290 years overflow int64
// nanoseconds; a year is plenty for any pause).
const maxDuration = 365 * 24 * time.Hour

// ParseDuration reads a Go duration ("30s", "1m30s") or a bare non-negative
// number counted in unit. NaN, infinities, negative values and values over
// a year are refused.
func ParseDuration(v string, unit time.Duration) (time.Duration, error) {
	v = strings.TrimSpace(v)
	if n, err := strconv.ParseFloat(v, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		switch {
		case math.IsNaN(n) || math.IsInf(n, 0) || errors.Is(err, strconv.ErrRange):
			return 0, fmt.Errorf("expected a finite number of %s", unitName(unit))
		case n < 0:
			return 0, errors.New("must not be negative")
		case n*float64(unit) > float64(maxDuration):
			return 0, fmt.Errorf("must be at most %s", maxDuration)
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
	if d > maxDuration {
		return 0, fmt.Errorf("must be at most %s", maxDuration)
	}
	return d, nil
}

// Pause returns d raised to MinPause, the floor of the pauses between
// rounds, and whether it was raised (the caller warns).
func Pause(d time.Duration) (time.Duration, bool) {
	if d < MinPause {
		return MinPause, true
	}
	return d, false
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

// ParseSize reads an integer with an optional KiB/MiB/GiB (or K/M/G) suffix.
func ParseSize(v string) (int, error) {
	v = strings.TrimSpace(v)
	mult := int64(1)
	for _, s := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}} {
		if strings.HasSuffix(v, s.suffix) {
			v, mult = strings.TrimSpace(strings.TrimSuffix(v, s.suffix)), s.mult
			break
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, errors.New("expected a whole number, optionally with KiB, MiB or GiB")
	}
	if n > math.MaxInt32/mult {
		return 0, fmt.Errorf("must be at most %d", math.MaxInt32)
	}
	return int(n * mult), nil
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

// CheckBackendURL is the one rule for a backend URL ([userdata] ws_uri):
// ws:// or wss://, a host, and no user name or password (the agent
// authenticates with its instance token; a password in the URL would be
// refused by every connection attempt after loading fine).
func CheckBackendURL(v string) error {
	if err := urlWithScheme("wss", "ws")(v); err != nil {
		return err
	}
	if u, _ := url.Parse(v); u.User != nil {
		return errors.New("a user name or password in the URL is not allowed: the agent authenticates with its instance token")
	}
	return nil
}

// ParseLogLevel reads a log level: debug, info, warn (warning) or error,
// in any case (the 2014 agent used Python's upper-case names).
func ParseLogLevel(v string) (slog.Level, error) {
	switch strings.ToUpper(strings.TrimSpace(v)) {
	case "DEBUG":
		return slog.LevelDebug, nil
	case "INFO", "":
		return slog.LevelInfo, nil
	case "WARN", "WARNING":
		return slog.LevelWarn, nil
	case "ERROR":
		return slog.LevelError, nil
	}
	return slog.LevelInfo, fmt.Errorf("log level %q: expected debug, info, warn or error", v)
}

func logLevel(v string) error { _, err := ParseLogLevel(v); return err }

// fields is the table of known keys, in file order.
var fields = []field{
	ownedPath("global", "envroot", "/opt/visualops/env", func(c *Config) *string { return &c.Global.VenvDir }),
	readByBootstrap(ownedPath("global", "conf_path", "/var/lib/visualops/opsagent", func(c *Config) *string { return &c.Global.StateDir })),
	ownedPath("global", "log_path", "/var/log/visualops", func(c *Config) *string { return &c.Global.LogDir }),
	ownedPath("global", "token", "/etc/opsagent.token", func(c *Config) *string { return &c.Global.TokenFile }),
	ownedPath("global", "watch", "/var/lib/visualops/opsagent/watch", func(c *Config) *string { return &c.Global.WatchDir }),
	ownedPath("global", "logfile", "/var/log/visualops/agent.log", func(c *Config) *string { return &c.Global.LogFile }),
	withCheck(str("global", "loglvl", "INFO", func(c *Config) *string { return &c.Global.LogLevel }), logLevel),
	readByBootstrap(path("global", "package_path", "", func(c *Config) *string { return &c.Global.PackagePath })),
	readByBootstrap(str("global", "platform", "", func(c *Config) *string { return &c.Global.Platform })),

	required(withCheck(str("userdata", "ws_uri", "", func(c *Config) *string { return &c.Userdata.WSURI }), CheckBackendURL)),
	required(str("userdata", "app_id", "", func(c *Config) *string { return &c.Userdata.AppID })),
	str("userdata", "version", "", func(c *Config) *string { return &c.Userdata.Version }),
	readByBootstrap(withCheck(str("userdata", "base_remote", "", func(c *Config) *string { return &c.Userdata.BaseRemote }), urlWithScheme("https", "http"))),
	str("userdata", "pubkey", "", func(c *Config) *string { return &c.Userdata.PubKey }),
	str("userdata", "enroll_secret", "", func(c *Config) *string { return &c.Userdata.EnrollSecret }),

	readByBootstrap(ownedPath("module", "root", "/opt/visualops/bootstrap", func(c *Config) *string { return &c.Module.ReposDir })),
	readByBootstrap(str("module", "name", "salt", func(c *Config) *string { return &c.Module.RepoName })),
	str("module", "bootstrap", "scripts/bootstrap.sh", func(c *Config) *string { return &c.Module.BootstrapScript }),
	str("module", "mod_repo", "", func(c *Config) *string { return &c.Module.Repo }),
	str("module", "mod_tag", "", func(c *Config) *string { return &c.Module.Tag }),

	withCheck(str("network", "metadata", "http://169.254.169.254", func(c *Config) *string { return &c.Network.Metadata }), urlWithScheme("http", "https")),
	str("network", "instance_id", "", func(c *Config) *string { return &c.Network.InstanceID }),
	path("network", "ca_file", "", func(c *Config) *string { return &c.Network.CAFile }),

	duration("salt", "delay", "10", time.Minute, func(c *Config) *time.Duration { return &c.Salt.RoundDelay }),
	path("salt", "wheelhouse", "", func(c *Config) *string { return &c.Salt.Wheelhouse }),
	path("salt", "python", "", func(c *Config) *string { return &c.Salt.Python }),

	duration("agent", "retry_delay", "30s", time.Second, func(c *Config) *time.Duration { return &c.Agent.RetryDelay }),
	duration("agent", "state_timeout", "0s", time.Second, func(c *Config) *time.Duration { return &c.Agent.StateTimeout }),
	duration("agent", "kill_grace", "10s", time.Second, func(c *Config) *time.Duration { return &c.Agent.KillGrace }),
	duration("agent", "app_not_ready_delay", "30s", time.Second, func(c *Config) *time.Duration { return &c.Agent.AppNotReadyDelay }),
	duration("agent", "update_health_timeout", "2m0s", time.Second, func(c *Config) *time.Duration { return &c.Agent.UpdateHealthTimeout }),
	withCheck(str("agent", "engine", "auto", func(c *Config) *string { return &c.Agent.Engine }), oneOf("auto", "native", "salt")),
	integer("agent", "outbox_limit", "10000", 1, func(c *Config) *int { return &c.Agent.OutboxLimit }),
	integer("agent", "outbox_max_bytes", "67108864", 64<<10, func(c *Config) *int { return &c.Agent.OutboxMaxBytes }),
	duration("agent", "outbox_max_age", "24h0m0s", time.Second, func(c *Config) *time.Duration { return &c.Agent.OutboxMaxAge }),
	integer("agent", "output_limit", "65536", 1024, func(c *Config) *int { return &c.Agent.OutputLimit }),
}

// Keys lists every known key as "section.key" with its default, in file
// order: the README's table and `opsagent install --set` check against it.
func Keys() [][2]string {
	out := make([][2]string, len(fields))
	for i, f := range fields {
		out[i] = [2]string{f.section + "." + f.key, f.def}
	}
	return out
}

// render writes the document the 2014 way: `key=value`, no spaces around
// the "=", comments and unknown sections kept. (ini.v1 aligns "=" with
// spaces unless its package-level PrettyFormat switch is turned off; a
// writer of our own avoids touching that global.)
func render(doc *ini.File) []byte {
	var buf bytes.Buffer
	for _, sec := range doc.Sections() {
		if sec.Name() == ini.DefaultSection && len(sec.Keys()) == 0 && sec.Comment == "" {
			continue
		}
		if buf.Len() > 0 {
			buf.WriteByte('\n')
		}
		writeComment(&buf, sec.Comment)
		if sec.Name() != ini.DefaultSection {
			fmt.Fprintf(&buf, "[%s]\n", sec.Name())
		}
		for _, k := range sec.Keys() {
			writeComment(&buf, k.Comment)
			line, _ := spell(k.Name(), k.Value())
			buf.WriteString(line + "\n")
		}
	}
	return buf.Bytes()
}

func writeComment(buf *bytes.Buffer, comment string) {
	if comment == "" {
		return
	}
	for _, line := range strings.Split(comment, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if line[0] != '#' && line[0] != ';' {
			line = "; " + line
		}
		buf.WriteString(line + "\n")
	}
}

// spell writes one key so that it reads back as itself: plain when it
// can be, else the value in backquotes, double quotes or triple quotes
// (surrounding spaces, a " #" that would start an inline comment, quote
// characters at its ends) and the name in quotes. ok is false when no
// spelling reads back (Parse refuses those).
func spell(name, value string) (line string, ok bool) {
	for _, n := range []string{name, "`" + name + "`", `"` + name + `"`} {
		for _, v := range []string{value, "`" + value + "`", `"` + value + `"`, `"""` + value + `"""`} {
			line = n + "=" + v
			if readsBack(line, name, value) {
				return line, true
			}
		}
	}
	return name + "=" + value, false
}

func readsBack(line, name, value string) bool {
	if strings.ContainsAny(line, "\r\n") {
		return false
	}
	doc, err := ini.LoadSources(loadOptions, []byte(line+"\n"))
	if err != nil {
		return false
	}
	keys := doc.Section(ini.DefaultSection).Keys()
	return len(keys) == 1 && keys[0].Name() == name && keys[0].Value() == value
}

// sectionReadsBack reports whether "[name]" reads back as that section.
func sectionReadsBack(name string) bool {
	if strings.ContainsAny(name, "\r\n") {
		return false
	}
	doc, err := ini.LoadSources(loadOptions, []byte("["+name+"]\n"))
	return err == nil && len(doc.Sections()) == 2 && doc.Sections()[1].Name() == name
}
