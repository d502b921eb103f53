package userdata

import (
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"
)

// words are bash words whose value Parse must read as bash does; the
// bash oracle test checks the expectations themselves.
var words = []struct{ src, want string }{
	{`plain`, "plain"},
	{`'a'\''b'`, "a'b"}, // the defect of the parser this package replaces
	{`'it'"'"'s'`, "it's"},
	{`"a b"`, "a b"},
	{`"q\"q \\ \$x \` + "`" + `y"`, "q\"q \\ $x `y"},
	{`"keep\n\a"`, `keep\n\a`},
	{`'\n $x "'`, `\n $x "`},
	{`a\ b\'c\"d\\e`, `a b'c"d\e`},
	{`ab"c d"'e f'g`, "abc de fg"},
	{`x#y`, "x#y"},
	{`$'tab\there\nnl \'q\' \\ \x41\101\e'`, "tab\there\nnl 'q' \\ AA\x1b"},
	{`$'\z'`, `\z`},
	{"'multi\nline'", "multi\nline"},
	{"\"multi\nline\"", "multi\nline"},
	{"\"join\\\nlines\"", "joinlines"},
	{"join\\\nlines", "joinlines"},
	{`"ünï ✓"`, "ünï ✓"},
	{`''`, ""},
	{`""`, ""},
	{``, ""},
}

func TestParseWords(t *testing.T) {
	for _, w := range words {
		for _, form := range []string{"A=%s\n", "export A=%s", "  A=%s ; B=2\n", "A=%s # comment\n", "\tA=%s\tB=2 cmd\n"} {
			src := strings.Replace(form, "%s", w.src, 1)
			if got := Parse([]byte(src)).Vars["A"]; got != w.want {
				t.Errorf("Parse(%q): A = %q, want %q", src, got, w.want)
			}
		}
	}
}

// TestParseWordsLikeBash checks the expectations above against bash.
func TestParseWordsLikeBash(t *testing.T) {
	requireTool(t, "bash")
	for _, w := range words {
		cmd := exec.Command("bash", "-c", "A="+w.src+"\nprintf '%s' \"$A\"")
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("bash on %q: %v", w.src, err)
		}
		if string(out) != w.want {
			t.Errorf("bash reads %q as %q; the table says %q", w.src, out, w.want)
		}
	}
}

func TestParseLines(t *testing.T) {
	cases := []struct {
		name, src string
		want      map[string]string
	}{
		{"later wins", "export APP_ID=old\nAPP_ID=new\n", map[string]string{"APP_ID": "new"}},
		{"other lines ignored", "#!/bin/bash\n# APP_ID=commented\necho APP_ID=no\nnot an assignment\n", map[string]string{}},
		{"empty value before a comment", "  EMPTY= # nothing\n", map[string]string{"EMPTY": ""}},
		{"several on a line", "A=1 B=2; C=3\n", map[string]string{"A": "1", "B": "2", "C": "3"}},
		{"export of several", "export A=1 B='2 3'\n", map[string]string{"A": "1", "B": "2 3"}},
		{"word ends at an operator", "A=1&& B=2\nC=x|y\nD=z>f\n", map[string]string{"A": "1", "C": "x", "D": "z"}},
		{"case arm is no assignment", "case x in\n  a) A=1 ;;\nesac\n", map[string]string{}},
		{"crlf", "A=1\r\nB='x y'\r\n", map[string]string{"A": "1", "B": "x y"}},
		{"no trailing newline", "A=1", map[string]string{"A": "1"}},
		{"array skipped", "A=(1 2)\nB=3\n", map[string]string{"B": "3"}},
		{"not a name", "1A=1\nA-B=2\nA+=3\n=4\n", map[string]string{}},
		{"export is a whole word", "exportA=1\nexport\nexport -n A=1\n", map[string]string{"exportA": "1"}},
		{"unclosed single quote ends at the line", "A='open\nB=2\n", map[string]string{"A": "open", "B": "2"}},
		{"unclosed double quote ends at the line", "A=\"open\nB=2\n", map[string]string{"A": "open", "B": "2"}},
		{"quote in prose does not swallow", "#cloud-config\nruncmd: don't\nB=2\n", map[string]string{"B": "2"}},
		{"multi-line value then more", "A='x\ny'\nB=2\n", map[string]string{"A": "x\ny", "B": "2"}},
		{"trailing backslash", `A=x\`, map[string]string{"A": `x\`}},
	}
	for _, c := range cases {
		if got := Parse([]byte(c.src)).Vars; !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: Parse(%q).Vars = %q, want %q", c.name, c.src, got, c.want)
		}
	}
}

// The 2014 userdata form: variables, then the script piped from S3.
func TestParse2014(t *testing.T) {
	const ud = `#!/bin/bash
# VisualOps agent bootstrap
WS_URI=wss://api.example.com/agent/
APP_ID="app-123"
export VERSION='2.1'
export BASE_REMOTE=https://s3.amazonaws.com/opsagent   # where releases live
PUBKEY=RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3
ENROLL_SECRET=$'s\'cret'
OPSAGENT_SET='salt.delay=5
agent.retry_delay=30s
'
curl -sSL $BASE_REMOTE/$VERSION/userdata.sh | bash
`
	got := Parse([]byte(ud))
	got.Vars = nil
	want := Values{
		WSURI: "wss://api.example.com/agent/", AppID: "app-123", Version: "2.1",
		BaseRemote: "https://s3.amazonaws.com/opsagent", PubKey: "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3",
		EnrollSecret: "s'cret", Set: []string{"salt.delay=5", "agent.retry_delay=30s"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %+q\nwant %+q", got, want)
	}
	if v := Parse(nil); len(v.Vars) != 0 || v.Set != nil || v.AppID != "" {
		t.Errorf("Parse(nil) = %+v", v)
	}
}
