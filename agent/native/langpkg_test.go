package native

import (
	"encoding/json"
	"strings"
	"testing"
)

// shInRoot runs a shell script chrooted into root, as a user of the
// instance would (inRoot), and returns its trimmed output; it fails the
// test when the script fails.
func shInRoot(t testing.TB, root, script string) string {
	t.Helper()
	return strings.TrimSpace(inRoot(t, root, "/bin/sh", "-ec", script))
}

// ranWith lists the commands since mark of program whose arguments
// include every one of args.
func (r *recordingRunner) ranWith(mark int, program string, args ...string) []string {
	var out []string
	for _, c := range r.Since(mark) {
		if c[0] != program {
			continue
		}
		line := " " + strings.Join(c[1:], " ") + " "
		all := true
		for _, a := range args {
			if !strings.Contains(line, " "+a+" ") {
				all = false
			}
		}
		if all {
			out = append(out, strings.Join(c, " "))
		}
	}
	return out
}

func TestPkgSpecs(t *testing.T) {
	rules := pkgRules{name: pipRules.name, version: pipRules.version}
	for _, tc := range []struct {
		param string
		want  []pkgSpec
		bad   string
	}{
		{`"flask"`, []pkgSpec{{"flask", langAny}}, ""},
		{`["flask", "six"]`, []pkgSpec{{"flask", langAny}, {"six", langAny}}, ""},
		{`[{"key": "flask"}, {"key": "six", "value": "1.16.0"}, {"key": "x", "value": "latest"}, {"key": "y", "value": "removed"}]`,
			[]pkgSpec{{"flask", langAny}, {"six", "1.16.0"}, {"x", langLatest}, {"y", langRemoved}}, ""},
		{`[{"key": "a", "value": 2}, {"key": "b", "value": null}, {"key": "c", "value": "Installed"}, {"key": "d", "value": "purged"}]`,
			[]pkgSpec{{"a", "2"}, {"b", langAny}, {"c", langAny}, {"d", langRemoved}}, ""},
		{`{"b": "1.0", "a": "latest"}`, []pkgSpec{{"a", langLatest}, {"b", "1.0"}}, ""},
		{`[{"key": "requests[security]", "value": "2.0"}]`, []pkgSpec{{"requests[security]", "2.0"}}, ""},
		{`[{"key": "a"}, {"key": "a"}]`, []pkgSpec{{"a", langAny}}, ""},
		{`[{"key": "a"}, {"key": "a", "value": "removed"}]`, nil, "a is listed twice"},
		{`[{"key": "flask", "value": ">=1.0"}]`, nil, `version ">=1.0" is not an exact version`},
		{`[{"key": "--index-url=http://x"}]`, nil, "is not a package name"},
		{`[]`, nil, "is required"},
		{`[{"key": ""}]`, nil, "is required"},
		{`[{"value": "1.0"}]`, nil, "must be a {key, value} entry"},
		{`true`, nil, "must be a list of {key, value} entries"},
	} {
		p, err := parseParams(json.RawMessage(`{"name": ` + tc.param + `}`))
		if err != nil {
			t.Fatal(err)
		}
		got, err := pkgSpecs(p, "name", rules)
		if tc.bad != "" {
			if err == nil || !strings.Contains(err.Error(), tc.bad) || !strings.Contains(err.Error(), "parameter name") {
				t.Errorf("%s: error %v, want one naming the parameter and %q", tc.param, err, tc.bad)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.param, err)
			continue
		}
		if len(got) != len(tc.want) {
			t.Errorf("%s: %v, want %v", tc.param, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%s: %v, want %v", tc.param, got, tc.want)
			}
		}
	}
}

func TestLanguageVersionRules(t *testing.T) {
	for _, tc := range []struct {
		rules pkgRules
		v     string
		ok    bool
	}{
		{pipRules, "1.0", true}, {pipRules, "2.0.0rc1", true}, {pipRules, "1!2.0+local.1", true},
		{pipRules, "~=1.0", false}, {pipRules, "1.0,<2", false}, {pipRules, "1.*", false},
		{npmRules, "1.0.0", true}, {npmRules, "1.0.0-beta.1", true}, {npmRules, "v2.3.4", true},
		{npmRules, "1.0", false}, {npmRules, "^1.0.0", false}, {npmRules, "1.x", false}, {npmRules, "next", false},
		{gemRules, "1.0", true}, {gemRules, "1.0.0.pre", true},
		{gemRules, "~> 1.0", false}, {gemRules, ">=1", false},
	} {
		if got := tc.rules.version(tc.v) == ""; got != tc.ok {
			t.Errorf("version %q accepted=%v, want %v", tc.v, got, tc.ok)
		}
	}
	for _, tc := range []struct {
		rules pkgRules
		name  string
		ok    bool
	}{
		{npmRules, "@types/node", true}, {npmRules, "express", true}, {npmRules, "-g", false}, {npmRules, "../x", false},
		{gemRules, "net-telnet", true}, {gemRules, "-v", false},
		{pipRules, "zope.interface", true}, {pipRules, "-r", false},
	} {
		if got := tc.rules.name(tc.name) == ""; got != tc.ok {
			t.Errorf("name %q accepted=%v, want %v", tc.name, got, tc.ok)
		}
	}
}

func TestLanguageMetadataNames(t *testing.T) {
	for _, tc := range []struct{ entry, name, version string }{
		{"six-1.16.0.egg-info", "six", "1.16.0"},
		{"opsdemo-1.0.dist-info", "opsdemo", "1.0"},
		{"zope.interface-5.5.2-py3.11.egg-info", "zope.interface", "5.5.2"},
		{"typing_extensions-4.4.0.dist-info", "typing_extensions", "4.4.0"},
	} {
		n, v, ok := pipMetaName(tc.entry)
		if !ok || n != tc.name || v != tc.version {
			t.Errorf("pipMetaName(%s) = %s %s %v", tc.entry, n, v, ok)
		}
	}
	if _, _, ok := pipMetaName("six.py"); ok {
		t.Error("six.py read as metadata")
	}
	if pipNorm("Zope.Interface[x]") != "zope-interface" || pipNorm("typing_extensions") != "typing-extensions" {
		t.Error("pipNorm")
	}
	for _, tc := range []struct {
		file, name, version string
		ok                  bool
	}{
		{"net-telnet-0.2.0.gemspec", "net-telnet", "0.2.0", true},
		{"net-telnet-0.2.0.gemspec", "net", "", false},
		{"nokogiri-1.15.0-x86_64-linux.gemspec", "nokogiri", "1.15.0", true},
		{"rake-13.0.6.gemspec", "rake", "13.0.6", true},
		{"rake-13.0.6.gem", "rake", "", false},
	} {
		v, ok := gemSpecVersion(tc.file, tc.name)
		if ok != tc.ok || v != tc.version {
			t.Errorf("gemSpecVersion(%s, %s) = %s %v", tc.file, tc.name, v, ok)
		}
	}
	if !(&pipManager{}).sameVersion("1.0", "1.0.0") || (&pipManager{}).sameVersion("1.0", "1.0.1") || !(&gemManager{}).sameVersion("2", "2.0.0") {
		t.Error("sameVersion")
	}
}

func TestLanguageToolOutputs(t *testing.T) {
	v, ok := parsePipIndexVersions("WARNING: pip index is currently an experimental command.\nopsdemo (2.0)\nAvailable versions: 2.0, 1.0\n  INSTALLED: 1.0\n  LATEST:    2.0\n")
	if !ok || v != "2.0" {
		t.Errorf("pip index versions: %q %v", v, ok)
	}
	got := parseGemList("\n*** REMOTE GEMS ***\n\nopsgem (2.0.0)\nnokogiri (1.15.0 x86_64-linux, 1.15.0)\n")
	if got["opsgem"] != "2.0.0" || got["nokogiri"] != "1.15.0" {
		t.Errorf("gem list: %v", got)
	}
	env := `RubyGems Environment:
  - RUBYGEMS VERSION: 3.3.15
  - INSTALLATION DIRECTORY: /var/lib/gems/3.1.0
  - USER INSTALLATION DIRECTORY: /root/.local/share/gem/ruby/3.1.0
  - GEM PATHS:
     - /var/lib/gems/3.1.0
     - /root/.local/share/gem/ruby/3.1.0
     - /usr/share/rubygems-integration/all
  - GEM CONFIGURATION:
     - :update_sources => true
  - REMOTE SOURCES:
     - https://rubygems.org/
`
	f := parseGemEnvironment(env)
	if f.dir != "/var/lib/gems/3.1.0" || strings.Join(f.paths, ",") != "/var/lib/gems/3.1.0,/root/.local/share/gem/ruby/3.1.0,/usr/share/rubygems-integration/all" {
		t.Errorf("gem environment: %+v", f)
	}
}
