package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/aptrepo"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// webd is a tiny daemon for the web app of TestFreshDebianRootWebApp: it
// forks its loop, records its pid, and logs each SIGHUP (reload).
const webd = `#!/bin/sh
mkdir -p /var/lib/webd
( trap 'echo reload >> /var/lib/webd/events' HUP
  while :; do sleep 1 & wait $!; done ) </dev/null >/dev/null 2>&1 &
echo $! > /run/webd.pid
echo start >> /var/lib/webd/events
`

const webdInit = `#!/bin/sh
### BEGIN INIT INFO
# Provides:          webd
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
### END INIT INFO
P=/run/webd.pid
running() { [ -s $P ] && kill -0 "$(cat $P)" 2>/dev/null; }
case "$1" in
start) running && exit 0; start-stop-daemon --start --quiet --pidfile $P --startas /usr/sbin/webd ;;
stop) running || exit 0; start-stop-daemon --stop --quiet --pidfile $P --remove-pidfile ;;
reload|force-reload) running || exit 7; kill -HUP "$(cat $P)" ;;
restart) "$0" stop; "$0" start ;;
status) running && exit 0; exit 3 ;;
*) exit 2 ;;
esac
`

// webAppRecipe is the recipe of the kind every web app needs: a package
// (with its service), a group and a user, a cron job, the timezone, a
// configuration file the service watches, a directory and a command.
const webAppRecipe = `{"state":[
 {"id":"pkg","module":"linux.apt.package","parameter":{"name":[{"key":"webd"}]}},
 {"id":"grp","module":"linux.group","parameter":{"groupname":"webapps"}},
 {"id":"usr","module":"linux.user","parameter":{"username":"web","password":"s3cret","groups":["webapps"]}},
 {"id":"dir","module":"linux.dir","parameter":{"path":["/srv/web"],"user":"web","group":"webapps","mode":"0750"}},
 {"id":"conf","module":"linux.file","parameter":{"path":"/etc/webd.conf","content":"port = 8080\n"}},
 {"id":"svc","module":"linux.service","parameter":{"name":["webd"],"watch":["/etc/webd.conf"]}},
 {"id":"cron","module":"linux.cronjob","parameter":{"user":"web","cmd":["/usr/bin/touch /srv/web/cron-ran"],"minute":"*/5"}},
 {"id":"tz","module":"common.timezone","parameter":{"name":"Europe/Paris"}},
 {"id":"cmd","module":"linux.cmd","parameter":{"cmd":"echo deployed > /srv/web/deployed","if-path-absent":["/srv/web/deployed"]}}
]}`

// TestFreshDebianRootWebApp is the story: a fresh Debian 12 root
// with no Python 2, the real agent with the default engine, and a recipe
// of native modules. The first round applies everything; the next round
// changes nothing: every state says so, and dpkg's database, the shadow
// file and the crontab are not rewritten.
func TestFreshDebianRootWebApp(t *testing.T) {
	root := debroot.New(t)
	if _, err := os.Stat(filepath.Join(root, "usr/bin/python2.7")); err == nil {
		t.Fatal("the Debian root has a Python 2")
	}
	debroot.UseExtras(t, root) // cron comes from here, as a prerequisite
	repo := aptrepo.New(t)
	repo.Add(t, aptrepo.Package{Name: "webd", Version: "1.0-1", Files: map[string]string{
		"/usr/sbin/webd": webd, "/etc/init.d/webd": webdInit,
	}})
	repo.Use(t, root)

	b := startBackend(t, t.TempDir(), "127.0.0.1:0")
	// A Salt path that cannot work: were any state routed there, it would fail.
	conf := fmt.Sprintf("[userdata]\nws_uri = ws://%s/agent/\napp_id = web\n[network]\ninstance_id = i-web\nmetadata = http://127.0.0.1:1\n"+
		"[salt]\ndelay = 1s\npython = /nonexistent/python2.7\n[agent]\napp_not_ready_delay = 200ms\n", b.addr)
	if err := os.WriteFile(filepath.Join(root, "etc/opsagent.conf"), []byte(conf), 0o640); err != nil {
		t.Fatal(err)
	}
	b.api(t, "PUT", "/api/apps/web/recipe", webAppRecipe)
	agent := startAgent(t, root)
	const states = 9
	eventually(t, "the first round", func() bool { return len(b.logs(t, "web")) >= states })
	first := b.logs(t, "web")[:states]
	for _, e := range first {
		if !e.Result {
			t.Fatalf("first round: %s failed: %s", e.StateID, comment(e))
		}
	}
	for _, p := range []string{"var/lib/dpkg/status", "etc/shadow", "var/spool/cron/crontabs/web", "etc/localtime", "srv/web/deployed"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
			t.Fatalf("after the first round: %v", err)
		}
	}
	if data, _ := os.ReadFile(filepath.Join(root, "var/lib/webd/events")); string(data) != "start\n" {
		t.Errorf("webd events after the first round: %q", data)
	}
	mtimes := map[string]time.Time{}
	for _, p := range []string{"var/lib/dpkg/status", "etc/shadow", "etc/passwd", "etc/group", "var/spool/cron/crontabs/web"} {
		fi, err := os.Stat(filepath.Join(root, p))
		if err != nil {
			t.Fatal(err)
		}
		mtimes[p] = fi.ModTime()
	}

	eventually(t, "the second round", func() bool { return len(b.logs(t, "web")) >= 2*states })
	second := b.logs(t, "web")[states : 2*states]
	for _, e := range second {
		c := comment(e)
		if !e.Result || !(strings.Contains(c, "already") || strings.Contains(c, "skipped")) {
			t.Errorf("second round: %s %v %q, want nothing to change", e.StateID, e.Result, c)
		}
		if strings.Contains(strings.ToLower(c), "salt") || strings.Contains(c, "python") {
			t.Errorf("%s went to the Salt path: %q", e.StateID, c)
		}
	}
	for p, before := range mtimes {
		if fi, err := os.Stat(filepath.Join(root, p)); err != nil || !fi.ModTime().Equal(before) {
			t.Errorf("%s rewritten by the second round", p)
		}
	}
	if data, _ := os.ReadFile(filepath.Join(root, "var/lib/webd/events")); string(data) != "start\n" {
		t.Errorf("webd touched by the second round: %q", data)
	}
	// Status names the system the modules act on.
	_, rep := status(t, root)
	st, _ := rep["status"].(map[string]any)
	sys, _ := st["system"].(map[string]any)
	if sys["id"] != "debian" || sys["package_manager"] != "apt" || sys["init"] != "sysv" {
		t.Errorf("status system = %v", sys)
	}
	agent.stop(t, 15)
}
