package userdata

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// hostile are values that break naive quoting: quotes, expansions,
// command substitution, escapes, separators, newlines, bytes that are not
// UTF-8.
var hostile = []string{
	`it's`, `"double"`, `$(touch /nonexistent/pwned)`, "`touch /nonexistent/pwned`",
	`back\slash\`, "new\nline", "  spaces  ", "#hash", "a;b&c|d<e>f(g)",
	"ünïcødé ✓", `'a'\''b'`, `$HOME ${x} $'x' $"y"`, "cr\r\nlf", "tab\there", `\`, `'`, `"`,
	"\xff\xfe", "!event", "*glob?[a]", "~", "-flag", "--pubkey=x", "{{.WSURI}}", "\\\n",
}

// everything is one value holding every hostile string.
var everything = strings.Join(hostile, "")

func goodParams() Params {
	return Params{
		WSURI: "wss://api.example.com/agent/", AppID: "app-123", Version: "2.1",
		BaseRemote: "https://s3.amazonaws.com/opsagent", PubKey: "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3",
		SHA256:       strings.Repeat("0123456789abcdef", 4),
		EnrollSecret: "s3cret", Set: []string{"salt.delay=5", "agent.retry_delay=30s"},
	}
}

// hostileParams puts h in every free-text value (and in a --set value,
// newlines aside: those are refused there).
func hostileParams(h string) Params {
	p := goodParams()
	p.WSURI, p.AppID, p.BaseRemote, p.PubKey, p.EnrollSecret = "wss://x/"+h, h, h, h, h
	p.Set = []string{"a.b=" + strings.ReplaceAll(h, "\n", " "), "module.mod_tag=" + h[:0], "c_1.d_2=x=y"}
	return p
}

func TestRenderRefuses(t *testing.T) {
	cases := map[string]struct {
		edit func(*Params)
		want string
	}{
		"no ws uri":          {func(p *Params) { p.WSURI = "" }, "WS_URI is empty"},
		"no app id":          {func(p *Params) { p.AppID = "" }, "APP_ID is empty"},
		"no version":         {func(p *Params) { p.Version = "" }, "VERSION is empty"},
		"no base remote":     {func(p *Params) { p.BaseRemote = "" }, "BASE_REMOTE is empty"},
		"version word":       {func(p *Params) { p.Version = "latest" }, "MAJOR.MINOR"},
		"version v":          {func(p *Params) { p.Version = "v2.1" }, "MAJOR.MINOR"},
		"version four parts": {func(p *Params) { p.Version = "2.1.3.4" }, "MAJOR.MINOR"},
		"version newline":    {func(p *Params) { p.Version = "2.1\n" }, "MAJOR.MINOR"},
		"sha256 short":       {func(p *Params) { p.SHA256 = "abc" }, "64 lowercase hex"},
		"sha256 upper":       {func(p *Params) { p.SHA256 = strings.Repeat("AB", 32) }, "64 lowercase hex"},
		"sha256 not hex":     {func(p *Params) { p.SHA256 = strings.Repeat("g", 64) }, "64 lowercase hex"},
		"NUL in pubkey":      {func(p *Params) { p.PubKey = "a\x00b" }, "PUBKEY contains a NUL"},
		"NUL in secret":      {func(p *Params) { p.EnrollSecret = "\x00" }, "ENROLL_SECRET contains a NUL"},
		"set no dot":         {func(p *Params) { p.Set = []string{"delay=5"} }, "section.key=value"},
		"set no value":       {func(p *Params) { p.Set = []string{"salt.delay"} }, "section.key=value"},
		"set upper":          {func(p *Params) { p.Set = []string{"Salt.delay=5"} }, "section.key=value"},
		"set two dots":       {func(p *Params) { p.Set = []string{"a.b.c=5"} }, "section.key=value"},
		"set empty":          {func(p *Params) { p.Set = []string{""} }, "section.key=value"},
		"set space in key":   {func(p *Params) { p.Set = []string{"a.b c=5"} }, "section.key=value"},
		"set newline":        {func(p *Params) { p.Set = []string{"a.b=1\nc.d=2"} }, "newline"},
		"set NUL":            {func(p *Params) { p.Set = []string{"a.b=\x00"} }, "NUL"},
		"too big":            {func(p *Params) { p.PubKey = strings.Repeat("k", MaxSize) }, "16384-byte"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := goodParams()
			c.edit(&p)
			out, err := Render(p)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Render = %d bytes, %v; want an error containing %q", len(out), err, c.want)
			}
		})
	}
}

// The values Render accepts at the edges.
func TestRenderAccepts(t *testing.T) {
	for name, edit := range map[string]func(*Params){
		"only required": func(p *Params) { p.PubKey, p.SHA256, p.EnrollSecret, p.Set = "", "", "", nil },
		"patch version": func(p *Params) { p.Version = "10.20.30" },
		"empty set value": func(p *Params) {
			p.Set = []string{"a.b="}
		},
		"every hostile value": func(p *Params) { *p = hostileParams(everything) },
	} {
		p := goodParams()
		edit(&p)
		if _, err := Render(p); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func wantValues(p Params) Values {
	return Values{WSURI: p.WSURI, AppID: p.AppID, Version: p.Version, BaseRemote: p.BaseRemote,
		PubKey: p.PubKey, SHA256: p.SHA256, EnrollSecret: p.EnrollSecret, Set: p.nonEmptySet()}
}

func (p Params) nonEmptySet() []string {
	if len(p.Set) == 0 {
		return nil
	}
	return p.Set
}

// checkRoundTrip fails unless Parse gives back exactly what Render got, and
// finds no assignment in the script but the eight of its header: a body
// that assigned one of them would silently override the value.
func checkRoundTrip(t *testing.T, p Params) {
	t.Helper()
	script, err := Render(p)
	if err != nil {
		t.Fatalf("Render(%+q): %v", p, err)
	}
	got := Parse(script)
	vars := got.Vars
	got.Vars = nil
	if want := wantValues(p); !reflect.DeepEqual(got, want) {
		t.Fatalf("Parse(Render(p)) =\n%+q\nwant\n%+q", got, want)
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for k := range vars {
			if !yield(k) {
				return
			}
		}
	})
	want := []string{VarAppID, VarBaseRemote, VarEnrollSecret, VarSet, VarPubKey, VarSHA256, VarVersion, VarWSURI}
	if !slices.Equal(names, want) {
		t.Fatalf("assignments in the script: %q, want only %q", names, want)
	}
}

func TestRoundTrip(t *testing.T) {
	checkRoundTrip(t, goodParams())
	p := goodParams()
	p.PubKey, p.SHA256, p.EnrollSecret, p.Set = "", "", "", nil
	checkRoundTrip(t, p)
	for _, h := range append(hostile, everything) {
		checkRoundTrip(t, hostileParams(h))
	}
}

// bashValues runs the script's header in bash (the script with its last
// lines, which start the work, replaced) and returns the variables as bash
// sees them: the oracle for Render's quoting.
func bashValues(t *testing.T, script []byte) Values {
	t.Helper()
	head, _, ok := bytes.Cut(script, []byte("\nopsagent_start\n"))
	if !ok {
		t.Fatal("the script has no `opsagent_start` line")
	}
	prog := string(head) + "\nprintf '%s\\0' \"$WS_URI\" \"$APP_ID\" \"$VERSION\" \"$BASE_REMOTE\" \"$PUBKEY\" \"$SHA256\" \"$ENROLL_SECRET\" \"$OPSAGENT_SET\"\n"
	cmd := exec.Command("bash", "-c", prog)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("bash: %v", err)
	}
	f := strings.Split(string(out), "\x00")
	if len(f) != 9 {
		t.Fatalf("bash printed %d values: %q", len(f)-1, out)
	}
	v := Values{WSURI: f[0], AppID: f[1], Version: f[2], BaseRemote: f[3], PubKey: f[4], SHA256: f[5], EnrollSecret: f[6]}
	if f[7] != "" {
		v.Set = strings.Split(f[7], "\n")
	}
	return v
}

func TestBashReadsWhatRenderWrote(t *testing.T) {
	requireTool(t, "bash")
	for _, h := range append(hostile, everything) {
		p := hostileParams(h)
		script, err := Render(p)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := bashValues(t, script), wantValues(p); !reflect.DeepEqual(got, want) {
			t.Errorf("bash read\n%+q\nwant\n%+q", got, want)
		}
	}
}

func TestScriptSyntax(t *testing.T) {
	requireTool(t, "bash")
	for _, h := range []string{"", everything} {
		p := hostileParams(h)
		if h == "" {
			p = goodParams()
		}
		file := writeScript(t, p)
		if out, err := exec.Command("bash", "-n", file).CombinedOutput(); err != nil {
			t.Errorf("bash -n: %v\n%s", err, out)
		}
	}
}

func TestShellcheck(t *testing.T) {
	requireTool(t, "shellcheck")
	for _, p := range []Params{goodParams(), hostileParams(everything)} {
		file := writeScript(t, p)
		if out, err := exec.Command("shellcheck", "--shell=bash", "--severity=style", file).CombinedOutput(); err != nil {
			t.Errorf("shellcheck: %v\n%s", err, out)
		}
	}
}

// The script leaves room in EC2's 16 KiB for the values.
func TestSize(t *testing.T) {
	p := goodParams()
	script, err := Render(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(script) > MaxSize/2 {
		t.Errorf("rendered script is %d bytes; keep it under %d so the values have room", len(script), MaxSize/2)
	}
	// The largest values that fit are accepted, one more byte is not.
	p.PubKey += strings.Repeat("k", MaxSize-len(script))
	if _, err := Render(p); err != nil {
		t.Errorf("a script of exactly %d bytes: %v", MaxSize, err)
	}
	p.PubKey += "k"
	if _, err := Render(p); err == nil {
		t.Errorf("a script of %d bytes was accepted", MaxSize+1)
	}
}

func requireTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed: %v", name, err)
	}
	return path
}

// writeScript renders p into an executable file in a temporary directory.
func writeScript(t *testing.T, p Params) string {
	t.Helper()
	script, err := Render(p)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "userdata.sh")
	if err := os.WriteFile(file, script, 0o755); err != nil {
		t.Fatal(err)
	}
	return file
}
