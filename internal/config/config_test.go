package config

import (
	"bytes"
	"fmt"
	"os/exec"

	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
)

const specExample = `[global]
envroot = /opt/visualops/env
conf_path = /var/lib/visualops/opsagent
log_path = /var/log/visualops
token = /etc/opsagent.token
watch = /var/lib/visualops/opsagent/watch
logfile = /var/log/visualops/agent.log
loglvl = INFO
[userdata]
ws_uri = wss://api.example.com/agent/
app_id = app-123
version = 2.1
base_remote = https://s3.amazonaws.com/opsagent
pubkey = RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3   ; replaces 2014's gpg_key_uri
[module]
root = /opt/visualops/bootstrap
name = salt
bootstrap = scripts/bootstrap.sh
mod_repo = https://github.com/MadeiraCloud/salt.git
mod_tag = v2015-03-26
[network]
metadata = http://169.254.169.254
[salt]
delay = 10
[agent]
retry_delay = 30s
`

// A file as the 2014 installer (scripts/init.sh) wrote it.
const file2014 = `[global]
platform=ubuntu
envroot=/opt/visualops/env
conf_path=/var/lib/visualops/opsagent
log_path=/var/log/visualops
package_path=/opt/visualops/env/lib/python2.7/site-packages
scripts_path=/opt/visualops/bootstrap/opsagent/scripts
token=/etc/opsagent.token
user=root
watch=/var/lib/visualops/opsagent/watch
logfile=/var/log/visualops/agent.log
[userdata]
ws_uri=wss://api.visualops.io:443/agent/
app_id=app-5f3c
version=2014-06-23
base_remote=https://s3.amazonaws.com/visualops
gpg_key_uri=https://s3.amazonaws.com/visualops/madeira.gpg.public.key
[module]
root=/opt/visualops/bootstrap
name=salt
bootstrap=/opt/visualops/bootstrap/opsagent/scripts/bootstrap.sh
mod_repo=
mod_tag=
`

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "opsagent.conf")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadSpecExample(t *testing.T) {
	c, err := Load(writeFile(t, specExample))
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string][2]string{
		"ws_uri":  {c.Userdata.WSURI, "wss://api.example.com/agent/"},
		"app_id":  {c.Userdata.AppID, "app-123"},
		"pubkey":  {c.Userdata.PubKey, "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3"},
		"repo":    {c.Module.Repo, "https://github.com/MadeiraCloud/salt.git"},
		"tag":     {c.Module.Tag, "v2015-03-26"},
		"token":   {c.Global.TokenFile, "/etc/opsagent.token"},
		"loglvl":  {c.Global.LogLevel, "INFO"},
		"engine":  {c.Agent.Engine, "auto"},
		"meta":    {c.Network.Metadata, "http://169.254.169.254"},
		"version": {c.Userdata.Version, "2.1"},
	}
	for name, v := range checks {
		if v[0] != v[1] {
			t.Errorf("%s = %q, want %q", name, v[0], v[1])
		}
	}
	if c.Salt.RoundDelay != 10*time.Minute {
		t.Errorf("salt delay = %v, want 10m (bare numbers are minutes)", c.Salt.RoundDelay)
	}
	if c.Agent.RetryDelay != 30*time.Second || c.Agent.KillGrace != 10*time.Second ||
		c.Agent.StateTimeout != 0 || c.Agent.UpdateHealthTimeout != 2*time.Minute ||
		c.Agent.AppNotReadyDelay != 30*time.Second {
		t.Errorf("agent durations = %+v", c.Agent)
	}
	if c.Agent.OutboxLimit != 10000 || c.Agent.OutputLimit != 64<<10 {
		t.Errorf("agent limits = %+v", c.Agent)
	}
}

func TestLoad2014FileKeepsObsoleteKeys(t *testing.T) {
	p := writeFile(t, file2014)
	c, err := Load(p)
	if err != nil {
		t.Fatalf("2014 config must load: %v", err)
	}
	if c.Module.Repo != "" || c.Module.Tag != "" {
		t.Errorf("empty mod_repo/mod_tag should mean unset, got %q %q", c.Module.Repo, c.Module.Tag)
	}
	if got := c.Get("userdata", "gpg_key_uri"); !strings.HasSuffix(got, "madeira.gpg.public.key") {
		t.Errorf("obsolete key not kept: %q", got)
	}
	if _, err := NewOwner(c).Update(func(c *Config) error {
		c.Module.Repo = "https://example.com/states.git"
		c.Module.Tag = "develop"
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	data := read(t, p)
	for _, want := range []string{"package_path", "gpg_key_uri", "platform", "scripts_path",
		"mod_repo=https://example.com/states.git", "mod_tag=develop"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("saved file lacks %q:\n%s", want, data)
		}
	}
	// Keys left at their default are not added to a file that lacked them.
	if strings.Contains(string(data), "[agent]") || strings.Contains(string(data), "retry_delay") {
		t.Errorf("defaults were added to the file:\n%s", data)
	}
	again, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if again.Module.Repo != "https://example.com/states.git" || again.Module.Tag != "develop" {
		t.Errorf("reloaded module = %+v", again.Module)
	}
}

func TestSaveKeepsCommentsUnknownSectionsAndMode(t *testing.T) {
	src := "; managed by opsagent install\n" + specExample + "\n[custom]\n# operator note\nfoo = bar\n"
	p := writeFile(t, src)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewOwner(c).Update(func(c *Config) error {
		c.Userdata.AppID = "app-456"
		c.Agent.RetryDelay = 45 * time.Second
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	s := read(t, p)
	for _, want := range []string{"managed by opsagent install", "[custom]", "operator note", "foo=bar", "app_id=app-456", "retry_delay=45s", "replaces 2014"} {
		if !strings.Contains(s, want) {
			t.Errorf("saved file lacks %q:\n%s", want, s)
		}
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != FileMode {
		t.Errorf("mode = %v, want %v", st.Mode().Perm(), os.FileMode(FileMode))
	}
	// Unchanged values keep their spelling: "10" minutes is not rewritten.
	if !strings.Contains(s, "delay=10\n") {
		t.Errorf("salt delay respelled:\n%s", s)
	}
}

func TestSaveLeavesNoTempFiles(t *testing.T) {
	p := writeFile(t, specExample)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwner(c)
	for i := 0; i < 3; i++ {
		if _, err := o.Update(func(c *Config) error { c.Agent.KillGrace = time.Duration(i+1) * time.Second; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(p))
	if len(entries) != 1 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("directory holds %v, want only the config", names)
	}
}

func read(t *testing.T, p string) string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestMissingRequiredKey(t *testing.T) {
	for _, key := range []string{"ws_uri", "app_id"} {
		var lines []string
		for _, l := range strings.Split(specExample, "\n") {
			if !strings.HasPrefix(l, key+" ") {
				lines = append(lines, l)
			}
		}
		p := writeFile(t, strings.Join(lines, "\n"))
		_, err := Load(p)
		want := "config " + p + ": [userdata] " + key + " is missing"
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %s: err = %v, want it to contain %q", key, err, want)
		}
	}
}

func TestWrongTypes(t *testing.T) {
	cases := []struct {
		section, key, value, want string
	}{
		{"agent", "retry_delay", "soon", "expected a duration such as 30s or 5m, or a number of seconds"},
		{"agent", "retry_delay", "-5s", "must not be negative"},
		{"salt", "delay", "ten", "number of minutes"},
		{"agent", "outbox_limit", "many", "expected a whole number"},
		{"agent", "outbox_limit", "0", "must be at least 1"},
		{"agent", "engine", "python", "expected one of auto, native, salt"},
		{"global", "loglvl", "LOUD", "expected debug, info, warn or error"},
		{"global", "conf_path", "relative/dir", "expected an absolute path"},
		{"userdata", "ws_uri", "http://api.example.com/agent/", "expected a wss or ws URL"},
		{"userdata", "ws_uri", "not a url", "expected a URL"},
		{"userdata", "base_remote", "ftp://x/y", "expected a https or http URL"},
		{"network", "metadata", "169.254.169.254", "expected a URL"},
		{"userdata", "ws_uri", "wss://user:secret@api.example.com/agent/", "user name or password"},
		{"agent", "retry_delay", "NaN", "finite number"},
		{"agent", "retry_delay", "Inf", "finite number"},
		{"agent", "retry_delay", "-Inf", "finite number"},
		{"salt", "delay", "1e300", "at most"},
		{"salt", "delay", "99999999999", "at most"},
		{"agent", "retry_delay", "9000h", "at most"},
		{"agent", "outbox_max_bytes", "99999GiB", "at most"},
	}
	for _, tc := range cases {
		t.Run(tc.section+"."+tc.key+"="+tc.value, func(t *testing.T) {
			src := specExample + "\n[" + tc.section + "]\n" + tc.key + " = " + tc.value + "\n"
			_, err := Parse("/etc/opsagent.conf", []byte(src))
			if err == nil {
				// ini merges repeated sections; a duplicate key keeps the last value.
				t.Fatalf("accepted %s = %s", tc.key, tc.value)
			}
			msg := err.Error()
			for _, want := range []string{"/etc/opsagent.conf", "[" + tc.section + "] " + tc.key, tc.value, tc.want} {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q lacks %q", msg, want)
				}
			}
		})
	}
}

func TestDurationsAndSizes(t *testing.T) {
	cases := []struct {
		in   string
		unit time.Duration
		want time.Duration
	}{
		{"10", time.Minute, 10 * time.Minute},
		{"0.5", time.Minute, 30 * time.Second},
		{"30s", time.Minute, 30 * time.Second},
		{"30", time.Second, 30 * time.Second},
		{"1m30s", time.Second, 90 * time.Second},
		{"0", time.Second, 0},
	}
	for _, tc := range cases {
		got, err := ParseDuration(tc.in, tc.unit)
		if err != nil || got != tc.want {
			t.Errorf("ParseDuration(%q, %v) = %v, %v; want %v", tc.in, tc.unit, got, err, tc.want)
		}
	}
	sizes := map[string]int{"65536": 65536, "64KiB": 65536, "64K": 65536, "1 MiB": 1 << 20}
	for in, want := range sizes {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	c := Default()
	c.Salt.RoundDelay = 90 * time.Second
	if got := c.Get("salt", "delay"); got != "1m30s" {
		t.Errorf("non-whole minutes print as %q, want 1m30s", got)
	}
}

func TestGetSetUnknownAndKnown(t *testing.T) {
	c, err := Parse("x.conf", []byte(specExample))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Set("agent", "engine", "native"); err != nil || c.Agent.Engine != "native" {
		t.Errorf("Set engine: %v, engine=%q", err, c.Agent.Engine)
	}
	if err := c.Set("agent", "kill_grace", "forever"); err == nil {
		t.Error("Set accepted a bad duration")
	}
	if err := c.Set("extra", "color", "blue"); err != nil || c.Get("extra", "color") != "blue" {
		t.Errorf("unknown key round trip: %v %q", err, c.Get("extra", "color"))
	}
	data, err := c.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "[extra]") {
		t.Errorf("unknown section not rendered:\n%s", data)
	}
}

func TestLoadErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.conf")
	_, err := Load(missing)
	if err == nil || !strings.Contains(err.Error(), "file not found") || !strings.Contains(err.Error(), "opsagent install") {
		t.Errorf("missing file: %v", err)
	}
	_, err = Load(writeFile(t, "[global\nbroken"))
	if err == nil || !strings.Contains(err.Error(), "not a valid INI file") {
		t.Errorf("broken INI: %v", err)
	}
}

func TestNewFileRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "new.conf")
	o := NewOwner(New(p))
	changed, err := o.Update(func(c *Config) error {
		c.Userdata.WSURI, c.Userdata.AppID = "ws://127.0.0.1:1/agent/", "demo"
		return nil
	})
	if err != nil || !changed {
		t.Fatalf("first save: %v %v", changed, err)
	}
	back, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	c := o.Current()
	if back.Userdata != c.Userdata || back.Agent != c.Agent || back.Global != c.Global {
		t.Errorf("round trip differs:\n%+v\n%+v", back, c)
	}
	if _, err := c.Bytes(); err == nil {
		t.Error("a read-only copy rendered itself: only the Owner saves")
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(specExample))
	f.Add([]byte(file2014))
	f.Add([]byte("[agent]\nretry_delay = 1e400\n"))
	f.Add([]byte("[salt]\ndelay=-1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("fuzz.conf", data)
		if err != nil {
			return
		}
		out, err := c.Bytes()
		if err != nil {
			return
		}
		// What we render must parse back to the same typed values.
		back, err := Parse("fuzz.conf", out)
		if err != nil {
			t.Fatalf("rendered config does not parse: %v\n%s", err, out)
		}
		if back.Agent != c.Agent || back.Userdata != c.Userdata || back.Salt != c.Salt {
			t.Fatalf("round trip differs:\n%+v\n%+v", back, c)
		}
	})
}

// The states repository's bootstrap.sh reads the file with
// `grep "^key=" | cut -d '=' -f 2`: every key it reads must come out whole
// from a file the agent wrote.
func TestWrittenFileReadsWithBootstrapShGrepCut(t *testing.T) {
	p := writeFile(t, specExample)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewOwner(c).Update(func(c *Config) error {
		c.Global.PackagePath = "/opt/visualops/env/lib/python2.7/site-packages"
		c.Global.Platform = "APT"
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"package_path": "/opt/visualops/env/lib/python2.7/site-packages",
		"root":         "/opt/visualops/bootstrap",
		"name":         "salt",
		"conf_path":    "/var/lib/visualops/opsagent",
		"base_remote":  "https://s3.amazonaws.com/opsagent",
		"platform":     "APT",
	}
	for key, v := range want {
		out, err := exec.Command("bash", "-c", `cat "$1" | grep "^$2=" | cut -d '=' -f 2`, "-", p, key).Output()
		if err != nil || strings.TrimSpace(string(out)) != v {
			t.Errorf("grep ^%s= | cut: %q %v, want %q", key, out, err, v)
		}
	}
	if data := read(t, p); strings.Contains(data, " = ") {
		t.Errorf("the file has spaced key = value lines:\n%s", data)
	}
}

func TestDuplicatesWarn(t *testing.T) {
	c, err := Parse("x.conf", []byte(specExample+"\n[agent]\nretry_delay = 45s\n"))
	if err != nil {
		t.Fatal(err)
	}
	w := strings.Join(c.Warnings(), "\n")
	if !strings.Contains(w, "[agent] appears twice") || !strings.Contains(w, "[agent] retry_delay appears twice") {
		t.Errorf("warnings: %q", w)
	}
	if c.Agent.RetryDelay != 45*time.Second {
		t.Errorf("the last value should win: %v", c.Agent.RetryDelay)
	}
}

func TestPauseFloor(t *testing.T) {
	for in, want := range map[time.Duration]time.Duration{0: MinPause, time.Millisecond: MinPause, 2 * time.Second: 2 * time.Second} {
		if got, _ := Pause(in); got != want {
			t.Errorf("Pause(%v) = %v, want %v", in, got, want)
		}
	}
}

// Readers never see a torn config while an Update runs, and every
// subscriber sees every change in order (run with -race).
func TestOwnerConcurrentReadersAndChanges(t *testing.T) {
	c, err := Load(writeFile(t, specExample))
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwner(c)
	var seen []string
	o.OnChange(func(before, after *Config) { seen = append(seen, after.Userdata.AppID) })
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 2000; i++ {
			cur := o.Current()
			if cur.Userdata.AppID == "" || cur.Userdata.WSURI == "" {
				t.Error("torn read")
				return
			}
		}
	}()
	for i := 0; i < 20; i++ {
		id := fmt.Sprintf("app-%d", i)
		if _, err := o.Update(func(c *Config) error { c.Userdata.AppID = id; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	<-done
	if len(seen) != 20 || seen[19] != "app-19" {
		t.Errorf("subscriber saw %v", seen)
	}
	// No change: nothing saved, nobody told.
	if changed, err := o.Update(func(c *Config) error { c.Userdata.AppID = "app-19"; return nil }); changed || err != nil {
		t.Errorf("no-op update: %v %v", changed, err)
	}
	// A change that fails validation is not saved.
	if _, err := o.Update(func(c *Config) error { c.Userdata.AppID = ""; return nil }); err == nil {
		t.Error("invalid change saved")
	}
	if o.Current().Userdata.AppID != "app-19" || len(seen) != 20 {
		t.Errorf("after refused change: %q, %d notifications", o.Current().Userdata.AppID, len(seen))
	}
}

func TestLayoutFollowsTheConfig(t *testing.T) {
	root, _ := fsutil.NewRoot(t.TempDir())
	c := Default()
	c.Global.StateDir = "/srv/state"
	l := NewLayout(root, "", c)
	checks := map[string]string{
		l.LockFile():   "/srv/state/lock",
		l.RecipeFile(): "/srv/state/recipe.json",
		l.TokenFile():  "/etc/opsagent.token",
		l.StatesDir():  "/opt/visualops/bootstrap/salt",
		l.Binary():     "/opt/visualops/bin/opsagent",
		l.OldBinary():  "/opt/visualops/bin/opsagent.old",
		l.ConfigFile(): "/etc/opsagent.conf",
		l.CronEntry():  "/etc/cron.d/opsagent",
	}
	for got, want := range checks {
		if got != root.Path(want) {
			t.Errorf("%s, want %s below the root", got, want)
		}
	}
}

// The README's configuration table lists every key with its default.
func TestReadmeListsEveryKey(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Skip("no README.md next to the module")
	}
	for _, kd := range Keys() {
		section, key, _ := strings.Cut(kd[0], ".")
		row := fmt.Sprintf("| `[%s] %s", section, key)
		i := bytes.Index(readme, []byte(row))
		if i < 0 {
			t.Errorf("README.md has no row for [%s] %s", section, key)
			continue
		}
		line, _, _ := bytes.Cut(readme[i:], []byte("\n"))
		if kd[1] != "" && !bytes.Contains(line, []byte("`"+kd[1]+"`")) {
			t.Errorf("README.md row for [%s] %s does not give its default %q: %s", section, key, kd[1], line)
		}
	}
}

// A backquoted value spanning lines is refused, naming the key: rewritten
// unquoted it would not parse, and bootstrap.sh reads the file by lines.
func TestMultilineValueRefused(t *testing.T) {
	_, err := Parse("x.conf", []byte("[userdata]\nws_uri = ws://h/agent/\napp_id = `a\nb`\n"))
	if err == nil || !strings.Contains(err.Error(), "[userdata] app_id: the value spans several lines") {
		t.Fatalf("err = %v", err)
	}
}

// The writers and the reader apply one rule to every value: what Set
// refuses, Parse refuses, and the other way round (a control character, a
// line break), naming the key.
func TestWriterAndReaderShareOneValueRule(t *testing.T) {
	for _, v := range []string{"a\rb", "a\nb", "esc \x1b[2J", "nul\x00", "del\x7f", "c1 \u009b"} {
		for _, k := range [][2]string{{"userdata", "app_id"}, {"userdata", "enroll_secret"}, {"custom", "key"}} {
			setErr := New("/x.conf").Set(k[0], k[1], v)
			checkErr := CheckValue(k[0], k[1], v)
			_, parseErr := Parse("/x.conf", []byte("[userdata]\nws_uri = ws://h/agent/\napp_id = a\n["+k[0]+"]\n"+k[1]+" = `"+v+"`\n"))
			if setErr == nil || checkErr == nil || parseErr == nil {
				t.Errorf("[%s] %s = %q: Set %v, CheckValue %v, Parse %v; want all three to refuse", k[0], k[1], v, setErr, checkErr, parseErr)
				continue
			}
			for _, err := range []error{setErr, parseErr} {
				if !strings.Contains(err.Error(), "["+k[0]+"] "+k[1]) {
					t.Errorf("%q: error %q does not name the key", v, err)
				}
			}
		}
	}
	if err := CheckValue("userdata", "app_id", "app\twith tab é"); err != nil {
		t.Errorf("a tab and UTF-8 refused: %v", err)
	}
	if err := CheckValue("agent", "retry_delay", "soon"); err == nil || !strings.Contains(err.Error(), "expected a duration") {
		t.Errorf("CheckValue does not parse a known key: %v", err)
	}
}

// The Owner never writes a file the agent would not load: one over
// MaxFileSize is refused before anything is written.
func TestOwnerRefusesAFileTheReaderRefuses(t *testing.T) {
	p := filepath.Join(t.TempDir(), "opsagent.conf")
	if err := os.WriteFile(p, []byte("[userdata]\nws_uri=ws://h/agent/\napp_id=a\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwner(c)
	big := strings.Repeat("x", 1200<<10)
	_, err = o.Update(func(c *Config) error { return c.Set("custom", "big", big) })
	if err == nil || !strings.Contains(err.Error(), "over the 1048576 bytes the agent reads") {
		t.Fatalf("a 1.2 MB config: %v", err)
	}
	if _, err := Load(p); err != nil {
		t.Fatalf("the file was damaged: %v", err)
	}
	if data, _ := os.ReadFile(p); len(data) > 100 {
		t.Errorf("the big value was written (%d bytes)", len(data))
	}
	fresh := New(p)
	if err := fresh.Set("userdata", "ws_uri", "ws://h/agent/"); err != nil {
		t.Fatal(err)
	}
	if err := fresh.Set("userdata", "app_id", "a"); err != nil {
		t.Fatal(err)
	}
	if err := fresh.Check(); err != nil {
		t.Errorf("Check of a small config: %v", err)
	}
	if err := fresh.Set("custom", "big", big); err != nil {
		t.Fatal(err)
	}
	if err := fresh.Check(); err == nil {
		t.Error("Check passed a 1.2 MB config")
	}
}

// Paths opsagent owns (creates, chmods, removes) are never system files
// or shared directories, whoever writes them: Set and Parse refuse alike.
func TestOwnedPathsAreOpsagentsOwn(t *testing.T) {
	bad := map[string]string{
		"/etc/passwd":                "/etc/passwd is a file of the system's /etc",
		"/etc/opsagent.conf":         "/etc/opsagent.conf is a file of the system's /etc",
		"/etc/cron.d/x":              "system's /etc",
		"/var/lib/../../etc/shadow":  "/etc/shadow is a file of the system's /etc",
		"/usr/bin/opsagent":          "/usr/bin/opsagent is in /usr",
		"/proc/self/environ":         "in /proc",
		"/dev/sda":                   "in /dev",
		"/":                          "the root or directly below it",
		"/data":                      "/data is the root or directly below it",
		"/var/lib":                   "/var/lib is a shared directory",
		"/tmp":                       "the root or directly below it",
		"/home/alice":                "", // accepted here; install refuses it when it exists (not ours)
		"/etc/opsagent.token":        "",
		"/etc/opsagent/token":        "",
		"/etc/visualops/conf":        "",
		"/srv/opsagent":              "",
		"/var/lib/visualops/custom":  "",
		"/var/lib/visualops/../x/y/": "",
	}
	for _, key := range []string{"token", "conf_path", "log_path", "logfile", "envroot", "watch"} {
		for v, want := range bad {
			setErr := New("/x.conf").Set("global", key, v)
			_, parseErr := Parse("/x.conf", []byte("[userdata]\nws_uri = ws://h/agent/\napp_id = a\n[global]\n"+key+" = "+v+"\n"))
			if want == "" {
				if setErr != nil || parseErr != nil {
					t.Errorf("[global] %s = %s refused: %v / %v", key, v, setErr, parseErr)
				}
				continue
			}
			for _, err := range []error{setErr, parseErr} {
				if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "[global] "+key) {
					t.Errorf("[global] %s = %s: %v; want %q", key, v, err, want)
				}
			}
		}
	}
	if err := New("/x.conf").Set("module", "root", "/usr/share/salt"); err == nil {
		t.Error("[module] root in /usr accepted")
	}
	// Paths opsagent only reads may be anywhere.
	for _, kv := range [][3]string{{"network", "ca_file", "/etc/ssl/certs/ca.pem"}, {"salt", "python", "/usr/bin/python3"}, {"salt", "wheelhouse", "/tmp"}} {
		if err := New("/x.conf").Set(kv[0], kv[1], kv[2]); err != nil {
			t.Errorf("[%s] %s = %s: %v", kv[0], kv[1], kv[2], err)
		}
	}
}
