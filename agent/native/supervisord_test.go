package native

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
)

const supervisorConf = `[unix_http_server]
file=/run/opsagent-test-supervisor.sock ; the socket

[supervisord]
logfile=/var/log/supervisord-test.log
pidfile=/run/supervisord-test.pid

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix:///run/opsagent-test-supervisor.sock

[program:foo]
command=/bin/sleep 1000
startsecs=0

[program:bar]
command=/bin/sleep 1001
autostart=false
startsecs=0

[group:grp]
programs=baz

[program:baz]
command=/bin/sleep 1002
startsecs=0

[program:broken]
command=/bin/false
autostart=false
startsecs=1
startretries=0
`

// supervisorStatus is supervisorctl status as the test reads it.
func supervisorStatus(t *testing.T, rig *debianRig) map[string]string {
	t.Helper()
	out, _ := exec.Command("chroot", rig.root, "supervisorctl", "-c", "/etc/supervisord.conf", "status").Output()
	st := map[string]string{}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 {
			st[f[0]] = strings.Join(f[1:], " ")
		}
	}
	return st
}

func pidOf(status string) string {
	return regexp.MustCompile(`pid (\d+)`).FindStringSubmatch(status + " pid -")[1]
}

// TestSupervisordRunsPrograms: Debian's supervisor is installed, started
// with the configuration, and the programs (one not autostarted, a
// group) run; the next round starts no process at all (the state is read
// over supervisord's XML-RPC socket). A stopped program is started again,
// a changed watched file restarts the program once, a changed
// configuration restarts supervisord, a program that cannot start fails
// the state naming it, and an unknown name fails naming the file.
func TestSupervisordRunsPrograms(t *testing.T) {
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	conf := filepath.Join(rig.root, "etc/supervisord.conf")
	if err := os.WriteFile(conf, []byte(supervisorConf), 0o644); err != nil {
		t.Fatal(err)
	}
	watched := filepath.Join(rig.root, "etc/foo.conf")
	os.WriteFile(watched, []byte("v1\n"), 0o644)
	param := `{"config": "/etc/supervisord.conf", "name": ["foo", "bar", "grp"], "watch": ["/etc/foo.conf"]}`

	first := rig.converges(t, "linux.supervisord", param, "supervisord", "supervisorctl", "apt-get", "dpkg")
	mustOK(t, first, "Supervisor programs foo, bar, grp updated: supervisord started, bar started, supervisor installed (prerequisite)")
	st := supervisorStatus(t, rig)
	for _, n := range []string{"foo", "bar", "grp:baz"} {
		if !strings.HasPrefix(st[n], "RUNNING") {
			t.Fatalf("%s: %q (%v)", n, st[n], st)
		}
	}

	// Stopped by hand: started again.
	exec.Command("chroot", rig.root, "supervisorctl", "-c", "/etc/supervisord.conf", "stop", "bar").Run()
	check := rig.apply(t, "linux.supervisord", param, true)
	if !check.Changed || check.Comment != "Supervisor programs foo, bar, grp would be updated: bar started" {
		t.Fatalf("check mode: %+v", check)
	}
	if st := supervisorStatus(t, rig); !strings.HasPrefix(st["bar"], "STOPPED") {
		t.Fatalf("check mode started bar: %q", st["bar"])
	}
	mustOK(t, rig.apply(t, "linux.supervisord", param, false), "updated: bar started")

	// The watched file changes: foo, bar and grp restart, once.
	before := pidOf(supervisorStatus(t, rig)["foo"])
	os.WriteFile(watched, []byte("v2\n"), 0o644)
	first = rig.converges(t, "linux.supervisord", param, "supervisord", "supervisorctl")
	mustOK(t, first, "foo restarted (watched file changed), bar restarted (watched file changed), grp restarted (watched file changed)")
	if after := pidOf(supervisorStatus(t, rig)["foo"]); after == before {
		t.Fatalf("foo not restarted: pid %s", after)
	}

	// The configuration changes: supervisord restarts (module.json).
	before = pidOf(supervisorStatus(t, rig)["foo"])
	os.WriteFile(conf, []byte(supervisorConf+"\n; changed\n"), 0o644)
	first = rig.converges(t, "linux.supervisord", param, "supervisord", "supervisorctl")
	mustOK(t, first, "supervisord restarted (/etc/supervisord.conf changed)")
	if st := supervisorStatus(t, rig); pidOf(st["foo"]) == before || !strings.HasPrefix(st["bar"], "RUNNING") {
		t.Fatalf("after the reload: %v", st)
	}

	r := rig.apply(t, "linux.supervisord", `{"config": "/etc/supervisord.conf", "name": ["broken"]}`, false)
	mustFail(t, r, "linux.supervisord: ")
	mustFail(t, r, "broken")
	r = rig.apply(t, "linux.supervisord", `{"config": "/etc/supervisord.conf", "name": ["nope"]}`, false)
	mustFail(t, r, "linux.supervisord: no program or group nope in /etc/supervisord.conf")
	r = rig.apply(t, "linux.supervisord", `{"config": "/etc/nothere.conf", "name": ["foo"]}`, false)
	mustFail(t, r, "linux.supervisord: the configuration /etc/nothere.conf does not exist: write it first (linux.file)")
}

// TestParseProcessInfo reads supervisor.getAllProcessInfo as supervisord
// 4.2 answers it.
func TestParseProcessInfo(t *testing.T) {
	answer := `<?xml version='1.0'?>
<methodResponse>
<params>
<param>
<value><array><data>
<value><struct>
<member>
<name>description</name>
<value><string>pid 5885, uptime 0:00:06</string></value>
</member>
<member>
<name>pid</name>
<value><int>5885</int></value>
</member>
<member>
<name>name</name>
<value><string>baz</string></value>
</member>
<member>
<name>group</name>
<value><string>grp</string></value>
</member>
<member>
<name>statename</name>
<value><string>RUNNING</string></value>
</member>
<member>
<name>spawnerr</name>
<value><string></string></value>
</member>
</struct></value>
</data></array></value>
</param>
</params>
</methodResponse>
`
	procs, err := parseProcessInfo([]byte(answer))
	if err != nil || len(procs) != 1 || procs[0].full() != "grp:baz" || procs[0].State != "RUNNING" {
		t.Fatalf("%+v %v", procs, err)
	}
	if m := matchProcesses(procs, "grp"); len(m) != 1 {
		t.Fatalf("group match %v", m)
	}
	fault := `<?xml version='1.0'?><methodResponse><fault><value><struct><member><name>faultCode</name><value><int>1</int></value></member><member><name>faultString</name><value><string>UNKNOWN_METHOD</string></value></member></struct></value></fault></methodResponse>`
	if _, err := parseProcessInfo([]byte(fault)); err == nil || !strings.Contains(err.Error(), "UNKNOWN_METHOD") {
		t.Fatalf("fault: %v", err)
	}
}
