package native

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// TestPuppetApplyForReal: Debian's puppet is installed, check mode (with
// --noop) reports the change and makes none, the manifest is applied,
// and the next round — Puppet runs every round, by design — reports no
// change because Puppet made none. A failing manifest fails the state
// with Puppet's error.
func TestPuppetApplyForReal(t *testing.T) {
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	manifest := "file { '/srv/hello':\n  ensure  => file,\n  content => \"hi\\n\",\n}\n"
	os.MkdirAll(filepath.Join(rig.root, "srv"), 0o755)
	os.WriteFile(filepath.Join(rig.root, "etc/site.pp"), []byte(manifest), 0o644)
	param := `{"manifests": ["/etc/site.pp"], "arguments": [{"key": "logdest", "value": "console"}]}`

	check := rig.apply(t, "linux.puppet.apply", param, true)
	mustOK(t, check, "Puppet manifest /etc/site.pp would be updated: would be applied once puppet is installed, puppet would be installed (prerequisite)")

	first := rig.apply(t, "linux.puppet.apply", param, false)
	mustOK(t, first, "Puppet manifest /etc/site.pp updated: changes applied by /etc/site.pp, puppet installed (prerequisite)")
	if b, err := os.ReadFile(filepath.Join(rig.root, "srv/hello")); err != nil || string(b) != "hi\n" {
		t.Fatalf("/srv/hello: %q %v", b, err)
	}
	mark := rig.runs.Mark()
	again := rig.apply(t, "linux.puppet.apply", param, false)
	if !again.OK || again.Changed || again.Comment != "Puppet manifest /etc/site.pp is already in the correct state (puppet apply ran and changed nothing)" {
		t.Fatalf("second round: %+v", again)
	}
	if ran := rig.runs.Ran(mark, "puppet"); len(ran) != 1 || ran[0] != "puppet apply --logdest=console /etc/site.pp --detailed-exitcodes --color=false" {
		t.Fatalf("second round ran %v", ran)
	}
	if ran := rig.runs.Ran(mark, "apt-get", "dpkg"); len(ran) > 0 {
		t.Fatalf("second round ran %v", ran)
	}

	os.Remove(filepath.Join(rig.root, "srv/hello"))
	check = rig.apply(t, "linux.puppet.apply", param, true)
	if !check.OK || !check.Changed || check.Comment != "Puppet manifest /etc/site.pp would be updated: changes applied by /etc/site.pp" {
		t.Fatalf("check mode: %+v", check)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "srv/hello")); err == nil {
		t.Fatal("--noop applied the manifest")
	}

	os.WriteFile(filepath.Join(rig.root, "etc/bad.pp"), []byte("file { '/nonexistent/dir/x': ensure => file }\n"), 0o644)
	r := rig.apply(t, "linux.puppet.apply", `{"manifests": ["/etc/bad.pp", "/etc/site.pp"]}`, false)
	mustFail(t, r, "linux.puppet.apply: Manifest /etc/bad.pp: puppet reported failures (exit code")
	mustFail(t, r, "Error:")
	if _, err := os.Stat(filepath.Join(rig.root, "srv/hello")); err == nil {
		t.Fatal("the manifest after a failed one ran")
	}
	r = rig.apply(t, "linux.puppet.apply", `{"manifests": ["/etc/site.pp"], "version": "3.7.3"}`, false)
	mustFail(t, r, "linux.puppet.apply: puppet 7.23.0-1")
	mustFail(t, r, "is installed (package puppet), not version 3.7.3: install that version first")
	mustOK(t, rig.apply(t, "linux.puppet.apply", `{"manifests": ["/etc/site.pp"], "version": "7.23.0"}`, false), "changes applied")
}

// TestPuppetAgentAndRunCommands: no Puppet server can run here, so
// puppet is answered (scripted) and the test holds the exact command
// lines and how each exit code reads.
func TestPuppetAgentAndRunCommands(t *testing.T) {
	root := fakeRoot(t, []string{"puppet"}, nil)
	code := 0
	run := &scripted{fn: func(tool string, args []string) proc.Result {
		return proc.Result{ExitCode: code, Output: "Notice: Applied catalog in 0.02 seconds\n"}
	}}
	e := fakeExec(t, root, run)

	r := e.Execute(context.Background(), req("linux.puppet.agent", `{"server": "puppet.mydomain.com", "arguments": [{"key": "tags", "value": "basefiles::edit,apache::server"}, {"key": "debug"}]}`, false))
	if !r.OK || r.Changed || r.Comment != "Puppet agent run against puppet.mydomain.com is already in the correct state (puppet ran and changed nothing)" {
		t.Fatalf("agent: %+v", r)
	}
	want := "puppet agent --onetime --no-daemonize --verbose --no-usecacheonfailure --no-splay --show_diff --server=puppet.mydomain.com --tags=basefiles::edit,apache::server --debug --detailed-exitcodes --color=false"
	if got := run.take(); len(got) != 1 || got[0] != want {
		t.Fatalf("ran %q\nwant %q", got, want)
	}
	code = 2
	r = e.Execute(context.Background(), req("linux.puppet.run", `{}`, true))
	if !r.OK || !r.Changed || r.Comment != "Puppet run would be updated: changes applied" {
		t.Fatalf("run --noop: %+v", r)
	}
	if got := run.take(); got[0] != "puppet agent --onetime --no-daemonize --verbose --no-usecacheonfailure --no-splay --show_diff --detailed-exitcodes --color=false --noop" {
		t.Fatalf("ran %q", got)
	}
	for _, c := range []int{1, 4, 6} {
		code = c
		r = e.Execute(context.Background(), req("linux.puppet.run", `{}`, false))
		mustFail(t, r, "linux.puppet.run: Puppet run: puppet")
	}
	mustFail(t, e.Execute(context.Background(), req("linux.puppet.agent", `{}`, false)), "parameter server: is required")
}

// TestChefCommands: no distribution packages Chef, so chef-client and
// chef-solo are answered (scripted): the exact command lines, the
// resource count of Chef's closing line as the change, --why-run in
// check mode, and a missing Chef named with what to install.
func TestChefCommands(t *testing.T) {
	root := fakeRoot(t, []string{"chef-client", "chef-solo"}, nil)
	out, code := "", 0
	run := &scripted{fn: func(tool string, args []string) proc.Result {
		if len(args) == 1 && args[0] == "--version" {
			return proc.Result{Output: "Chef Infra Client: 18.2.7\n"}
		}
		return proc.Result{ExitCode: code, Output: out}
	}}
	e := fakeExec(t, root, run)

	out = "Starting Chef Infra Client, version 18.2.7\n...\nChef Infra Client finished, 3/12 resources updated in 05 seconds\n"
	r := e.Execute(context.Background(), req("linux.chef.client", `{"server": "https://chef.example.com/organizations/acme", "client_key": "/etc/chef/client.pem", "config": "/etc/chef/client.rb", "arguments": [{"key": "group", "value": "root"}, {"key": "log_level", "value": "warn"}, {"key": "skip-cookbook-sync"}], "version": "18.2"}`, false))
	if !r.OK || !r.Changed || r.Comment != "Chef client run against https://chef.example.com/organizations/acme updated: 3 of 12 resources" {
		t.Fatalf("client: %+v", r)
	}
	want := []string{"chef-client --version", "chef-client --server https://chef.example.com/organizations/acme --client_key /etc/chef/client.pem --config /etc/chef/client.rb --group root --log_level warn --skip-cookbook-sync --no-color"}
	if got := run.take(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("ran %q", got)
	}

	out = "Chef Infra Client finished, 0/12 resources updated in 02 seconds\n"
	r = e.Execute(context.Background(), req("linux.chef.solo", `{"config": "/etc/chef/solo.rb", "recipe_url": "http://server.com/recipe.tgz", "override-runlist": "recipe[web::default]"}`, false))
	if !r.OK || r.Changed || r.Comment != "Chef solo run is already in the correct state (chef-solo ran and updated no resource)" {
		t.Fatalf("solo: %+v", r)
	}
	if got := run.take(); got[0] != "chef-solo --config /etc/chef/solo.rb --recipe-url http://server.com/recipe.tgz --override-runlist recipe[web::default] --no-color" {
		t.Fatalf("ran %q", got)
	}
	out = "Chef Infra Client finished, 2/12 resources would have been updated\n"
	r = e.Execute(context.Background(), req("linux.chef.solo", `{}`, true))
	if !r.Changed || r.Comment != "Chef solo run would be updated: 2 of 12 resources" || run.take()[0] != "chef-solo --no-color --why-run" {
		t.Fatalf("why-run: %+v", r)
	}
	out, code = "ERROR: Connection refused connecting to https://chef.example.com\nFATAL: Stacktrace dumped\n", 1
	mustFail(t, e.Execute(context.Background(), req("linux.chef.client", `{"server": "https://chef.example.com"}`, false)), "linux.chef.client: Chef client run against https://chef.example.com failed with exit code 1: ERROR: Connection refused")
	code = 0
	mustFail(t, e.Execute(context.Background(), req("linux.chef.client", `{"server": "https://x", "version": "12.0.1"}`, false)), "chef-client 18.2.7 is installed, not version 12.0.1")

	bare := fakeExec(t, fakeRoot(t, nil, nil), run)
	mustFail(t, bare.Execute(context.Background(), req("linux.chef.solo", `{}`, false)), "linux.chef.solo: chef-solo is not installed, and Debian GNU/Linux 12 (bookworm) has no package of Chef: install Chef Infra Client (Chef's own packages) first")
}
