package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/internal/fsutil"
)

// TestModulesFollowTheEngine: the list says what the router would do
// under each [agent] engine, with and without a Python 2.7 for the Salt
// path, and names the family a module is written for.
func TestModulesFollowTheEngine(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "etc/os-release"), []byte("ID=debian\nVERSION_ID=12\nPRETTY_NAME=\"Debian 12\"\n"), 0o644)
	r, _ := fsutil.NewRoot(root)
	conf := filepath.Join(root, "opsagent.conf")
	noPython := func(context.Context) (string, error) { return "", errors.New("no Python 2.7 in /usr/bin/python2") }
	withPython := func(context.Context) (string, error) { return "/opt/py27/bin/python2.7", nil }
	get := func(engine string, find func(context.Context) (string, error)) map[string]ModuleInfo {
		t.Helper()
		os.WriteFile(conf, []byte("[agent]\nengine="+engine+"\n"), 0o644)
		mods, err := Modules(context.Background(), ModulesOptions{Root: r, ConfigFile: conf, FindPython2: find})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]ModuleInfo{}
		for _, m := range mods {
			out[m.Module] = m
		}
		return out
	}
	// A module not (yet) native: Salt when Python 2.7 exists, else
	// unavailable. (Once the whole catalogue is native there is none.)
	nat := native.New(native.Options{Root: r})
	other := ""
	for _, m := range native.Catalogue {
		if _, refused := nat.Refused(m.Name); !nat.Supports(m.Name) && !refused && !strings.HasPrefix(m.Name, "meta.") {
			other = m.Name
			break
		}
	}
	if other != "" {
		if m := get("auto", withPython)[other]; m.Runs != RunsSalt || !strings.Contains(m.Why, "/opt/py27") {
			t.Errorf("auto with python2: %+v", m)
		}
		if m := get("auto", noPython)[other]; m.Runs != RunsUnavailable || !strings.Contains(m.Why, "Python 2.7") {
			t.Errorf("auto without python2: %+v", m)
		}
		if m := get("native", withPython)[other]; m.Runs != RunsUnavailable || !strings.Contains(m.Why, "engine = native") {
			t.Errorf("native engine: %+v", m)
		}
	}
	// A module the native executor refuses: unavailable with its reason,
	// whether or not the Salt path exists, unless engine = salt.
	for _, engine := range []string{"auto", "native"} {
		for _, find := range []func(context.Context) (string, error){withPython, noPython} {
			if m := get(engine, find)["linux.mesos.master"]; m.Runs != RunsUnavailable || !strings.Contains(m.Why, "Apache Attic") {
				t.Errorf("mesos under %s: %+v", engine, m)
			}
		}
	}
	if m := get("salt", withPython)["linux.mesos.slave"]; m.Runs != RunsSalt {
		t.Errorf("mesos under engine = salt: %+v", m)
	}
	salt := get("salt", withPython)
	if salt["linux.file"].Runs != RunsSalt || salt["meta.wait"].Runs != RunsNative {
		t.Errorf("salt engine: %+v %+v", salt["linux.file"], salt["meta.wait"])
	}
	if m := get("salt", noPython)["linux.file"]; m.Runs != RunsUnavailable {
		t.Errorf("salt engine without python2: %+v", m)
	}
	if m := get("auto", noPython)["linux.cmd"]; m.Runs != RunsNative || m.Why != "" {
		t.Errorf("linux.cmd: %+v", m)
	}
}
