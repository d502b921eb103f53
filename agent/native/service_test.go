package native

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/testutil/aptrepo"
	"github.com/visualops/opsagent/internal/testutil/wait"
)

// foodDaemon is a tiny daemon: it forks its loop and returns once the
// loop has published its own pid, which it does only after setting its
// traps, so that a reload sent as soon as start returns is never the
// default SIGHUP that kills it (seen on a loaded machine). The loop
// records every SIGHUP (reload) in the events file.
const foodDaemon = `#!/bin/sh
events=/var/lib/food/events
mkdir -p /var/lib/food
rm -f /run/food.pid
sh -c 'trap "echo reload >> /var/lib/food/events" HUP
	trap "echo stop >> /var/lib/food/events; exit 0" TERM
	echo $$ > /run/food.pid.new && mv /run/food.pid.new /run/food.pid
	while :; do sleep 1 & wait $!; done' </dev/null >/dev/null 2>&1 &
i=0
while [ ! -s /run/food.pid ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
echo start >> $events
`

// foodInit is its LSB init script; reload fails while /etc/food.noreload
// exists (a service whose reload is broken).
const foodInit = `#!/bin/sh
### BEGIN INIT INFO
# Provides:          food
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: food test daemon
### END INIT INFO
PIDFILE=/run/food.pid
running() { [ -s $PIDFILE ] && kill -0 "$(cat $PIDFILE)" 2>/dev/null; }
case "$1" in
start)
	running && exit 0
	start-stop-daemon --start --quiet --pidfile $PIDFILE --startas /usr/sbin/food
	;;
stop)
	running || exit 0
	start-stop-daemon --stop --quiet --pidfile $PIDFILE --retry TERM/5 --remove-pidfile
	;;
reload|force-reload)
	[ -e /etc/food.noreload ] && { echo "reload is broken" >&2; exit 3; }
	running || exit 7
	kill -HUP "$(cat $PIDFILE)"
	;;
restart)
	echo restart >> /var/lib/food/events
	"$0" stop && "$0" start
	;;
status)
	running && exit 0
	exit 3
	;;
*)
	echo "Usage: $0 {start|stop|restart|reload|status}" >&2
	exit 2
	;;
esac
`

// newFoodRig is a Debian rig with the food package (daemon, init script,
// /etc/food.conf) installed from a test-built repository.
func newFoodRig(t testing.TB) *debianRig {
	t.Helper()
	rig := newDebianRig(t)
	repo := aptrepo.New(t)
	repo.Add(t, aptrepo.Package{Name: "food", Version: "1.0", Files: map[string]string{
		"/usr/sbin/food":   foodDaemon,
		"/etc/init.d/food": foodInit,
		"/etc/food.conf":   "port = 1\n",
	}})
	repo.Use(t, rig.root)
	m, err := rig.e.sys.Packages()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.EnsureInstalled(context.Background(), "food"); err != nil {
		t.Fatal(err)
	}
	return rig
}

func (r *debianRig) events(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(r.root, "var/lib/food/events"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(data))
}

func (r *debianRig) running(t *testing.T, name string) bool {
	t.Helper()
	ok, err := r.e.sys.ServiceRunning(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// serviceVerbs are the service(8) verbs run since mark, in order.
func (r *debianRig) serviceVerbs(mark int) []string {
	var out []string
	for _, c := range r.runs.Since(mark) {
		if c[0] == "service" && len(c) == 3 {
			out = append(out, c[2])
		}
	}
	return out
}

func (r *debianRig) writeConf(t *testing.T, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(r.root, "etc/food.conf"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestServiceInitScript: a stopped service is started through service(8)
// and its init script, chrooted in the Debian root; the next round only
// asks its status.
func TestServiceInitScript(t *testing.T) {
	rig := newFoodRig(t)
	if rig.running(t, "food") {
		t.Fatal("food runs after its install (policy-rc.d should prevent it)")
	}
	check := rig.apply(t, "linux.service", `{"name": ["food"]}`, true)
	if !check.Changed || check.Comment != "Service food would be started" || rig.running(t, "food") {
		t.Fatalf("check mode: %+v", check)
	}
	mark := rig.runs.Mark()
	res := rig.apply(t, "linux.service", `{"name": ["food"]}`, false)
	if !res.OK || !res.Changed || res.Comment != "Service food started" {
		t.Fatalf("first round %+v", res)
	}
	if got := rig.serviceVerbs(mark); !slices.Equal(got, []string{"status", "start", "status"}) {
		t.Fatalf("verbs %v", got)
	}
	if !rig.running(t, "food") || !slices.Equal(rig.events(t), []string{"start"}) {
		t.Fatalf("food: running %v, events %v", rig.running(t, "food"), rig.events(t))
	}
	mark = rig.runs.Mark()
	res = rig.apply(t, "linux.service", `{"name": ["food"]}`, false)
	if !res.OK || res.Changed || res.Comment != "Service food is already running" {
		t.Fatalf("second round %+v", res)
	}
	if got := rig.serviceVerbs(mark); !slices.Equal(got, []string{"status"}) || len(rig.runs.Since(mark)) != 1 {
		t.Fatalf("second round ran %v", rig.runs.Since(mark))
	}

	// Errors name the service and the reason.
	if err := os.WriteFile(filepath.Join(rig.root, "etc/init.d/broken"), []byte("#!/bin/sh\n[ \"$1\" = status ] && exit 3\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for param, want := range map[string]string{
		`{"name": ["nosuch"]}`:                           "Service nosuch: the service nosuch is not available: there is no init script /etc/init.d/nosuch",
		`{"name": ["food", "broken"]}`:                   "Service broken was started but does not run (its status says it is stopped): see its logs",
		`{"name": ["../init.d/food"]}`:                   `linux.service: parameter name[0]: service name "../init.d/food" cannot contain '/'`,
		`{"name": ["-food"]}`:                            `linux.service: parameter name[0]: service name "-food" cannot start with '-'`,
		`{"name": []}`:                                   "linux.service: parameter name: is required: the services to run",
		`{"name": ["food", "food"]}`:                     "linux.service: parameter name[1]: service food is named twice",
		`{"name": [{"key": "food", "value": 3}]}`:        "linux.service: parameter name[0]: the action of food must be empty, reload, restart or a command, got 3",
		`{"name": ["food"], "watch": ["etc/food.conf"]}`: `linux.service: parameter watch[0]: must be an absolute path, got "etc/food.conf"`,
	} {
		if res := rig.apply(t, "linux.service", param, false); res.OK || res.Comment != want {
			t.Errorf("%s: %+v\n want %q", param, res, want)
		}
	}
}

// TestServiceWatch: a changed watched file reloads the service (the
// daemon records the signal), the next round does nothing; restart and
// command actions; reload falling back to restart; checksums kept under
// the bridge's names, stored only after the action succeeded.
func TestServiceWatch(t *testing.T) {
	rig := newFoodRig(t)
	watchDir := rig.e.opts.WatchDir
	cksum := filepath.Join(watchDir, "s-linux.service--etc-food.conf.cksum")
	param := `{"name": [{"key": "food", "value": ""}], "watch": ["/etc/food.conf"]}`

	// The very first round starts the service: it reads its file now, so
	// no reload follows; the checksum is stored.
	mark := rig.runs.Mark()
	res := rig.apply(t, "linux.service", param, false)
	if !res.Changed || res.Comment != "Service food started" {
		t.Fatalf("first round %+v", res)
	}
	if got := rig.serviceVerbs(mark); !slices.Equal(got, []string{"status", "start", "status"}) {
		t.Fatalf("verbs %v", got)
	}
	sum := md5.Sum([]byte("port = 1\n"))
	if data, err := os.ReadFile(cksum); err != nil || string(data) != hex.EncodeToString(sum[:]) {
		t.Fatalf("checksum file %q %v", data, err)
	}
	mark = rig.runs.Mark()
	if res := rig.apply(t, "linux.service", param, false); res.Changed || !slices.Equal(rig.serviceVerbs(mark), []string{"status"}) {
		t.Fatalf("unchanged file: %+v, ran %v", res, rig.runs.Since(mark))
	}

	// The file changes: reloaded, once.
	rig.writeConf(t, "port = 2\n")
	mark = rig.runs.Mark()
	check := rig.apply(t, "linux.service", param, true)
	if !check.Changed || check.Comment != "Service food is already running\nService food would be reloaded (or restarted): /etc/food.conf changed" || !slices.Equal(rig.serviceVerbs(mark), []string{"status"}) {
		t.Fatalf("check mode %+v, verbs %v", check, rig.serviceVerbs(mark))
	}
	mark = rig.runs.Mark()
	res = rig.apply(t, "linux.service", param, false)
	if !res.Changed || res.Comment != "Service food is already running\nService food reloaded: /etc/food.conf changed" || !slices.Equal(rig.serviceVerbs(mark), []string{"status", "reload"}) {
		t.Fatalf("changed file: %+v, verbs %v", res, rig.serviceVerbs(mark))
	}
	wait.Eventually(t, "food records the reload", func() bool { return slices.Equal(rig.events(t), []string{"start", "reload"}) })
	mark = rig.runs.Mark()
	if res := rig.apply(t, "linux.service", param, false); res.Changed || !slices.Equal(rig.serviceVerbs(mark), []string{"status"}) {
		t.Fatalf("after the reload: %+v, ran %v", res, rig.runs.Since(mark))
	}

	// restart, and a command (run in the root).
	rig.writeConf(t, "port = 3\n")
	res = rig.apply(t, "linux.service", `{"name": [{"key": "food", "value": "restart"}], "watch": ["/etc/food.conf"]}`, false)
	if res.Comment != "Service food is already running\nService food restarted: /etc/food.conf changed" {
		t.Fatalf("restart: %+v", res)
	}
	if got := rig.events(t); !slices.Equal(got[len(got)-3:], []string{"restart", "stop", "start"}) {
		t.Fatalf("events %v", got)
	}
	rig.writeConf(t, "port = 4\n")
	res = rig.apply(t, "linux.service", `{"name": [{"key": "food", "value": "echo custom >> /var/lib/food/events; echo done"}], "watch": ["/etc/food.conf"]}`, false)
	if res.Comment != "Service food is already running\nService food command \"echo custom >> /var/lib/food/events; echo done\" run: /etc/food.conf changed" || res.Stdout != "done\n" {
		t.Fatalf("command: %+v", res)
	}
	if got := rig.events(t); got[len(got)-1] != "custom" {
		t.Fatalf("events %v", got)
	}

	// Reload broken: the default action restarts.
	if err := os.WriteFile(filepath.Join(rig.root, "etc/food.noreload"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rig.writeConf(t, "port = 5\n")
	mark = rig.runs.Mark()
	res = rig.apply(t, "linux.service", param, false)
	if res.Comment != "Service food is already running\nService food restarted (reload failed): /etc/food.conf changed" {
		t.Fatalf("fallback: %+v", res)
	}
	if got := rig.serviceVerbs(mark); !slices.Equal(got, []string{"status", "reload", "restart"}) {
		t.Fatalf("verbs %v", got)
	}

	// A failing action fails the state and keeps the old checksum: the
	// next round tries again.
	rig.writeConf(t, "port = 6\n")
	before, _ := os.ReadFile(cksum)
	res = rig.apply(t, "linux.service", `{"name": [{"key": "food", "value": "reload"}], "watch": ["/etc/food.conf"]}`, false)
	if res.OK || !strings.HasPrefix(res.Comment, "Service food: /etc/food.conf changed, and reload failed: service food reload failed with exit code 3: reload is broken") {
		t.Fatalf("failing reload: %+v", res)
	}
	if after, _ := os.ReadFile(cksum); string(after) != string(before) {
		t.Fatal("the checksum was stored after a failed action")
	}
	if err := os.Remove(filepath.Join(rig.root, "etc/food.noreload")); err != nil {
		t.Fatal(err)
	}
	res = rig.apply(t, "linux.service", `{"name": [{"key": "food", "value": "reload"}], "watch": ["/etc/food.conf"]}`, false)
	if !res.OK || res.Comment != "Service food is already running\nService food reloaded: /etc/food.conf changed" {
		t.Fatalf("retry: %+v", res)
	}

	// A stopped service whose file changed is started, not reloaded.
	if _, err := rig.e.sys.Check(context.Background(), system.Cmd{Tool: "service", Args: []string{"food", "stop"}}); err != nil {
		t.Fatal(err)
	}
	rig.writeConf(t, "port = 7\n")
	mark = rig.runs.Mark()
	res = rig.apply(t, "linux.service", param, false)
	if res.Comment != "Service food started" || !slices.Equal(rig.serviceVerbs(mark), []string{"status", "start", "status"}) {
		t.Fatalf("stopped and changed: %+v, verbs %v", res, rig.serviceVerbs(mark))
	}

	// "watch": true (2014 recipes) watches nothing, and says so.
	res = rig.apply(t, "linux.service", `{"name": ["food"], "watch": true}`, false)
	if !res.OK || res.Changed || res.Comment != "Service food is already running\n(parameter watch is a boolean, not a list of files: nothing is watched)" {
		t.Fatalf("watch true: %+v", res)
	}
}

// TestServiceWatchFirstRoundRunning: on the first round of a state (no
// checksum stored), a service that was already running gets its action:
// it may have read the file before an earlier state wrote it. A checksum
// the Salt bridge stored under the same name counts: switching engines
// triggers nothing.
func TestServiceWatchFirstRoundRunning(t *testing.T) {
	rig := newFoodRig(t)
	if _, err := rig.e.sys.Check(context.Background(), system.Cmd{Tool: "service", Args: []string{"food", "start"}}); err != nil {
		t.Fatal(err)
	}
	param := `{"name": ["food"], "watch": ["/etc/food.conf"]}`
	res := rig.apply(t, "linux.service", param, false)
	if res.Comment != "Service food is already running\nService food reloaded: /etc/food.conf changed" {
		t.Fatalf("first round: %+v", res)
	}
	wait.Eventually(t, "food records the reload", func() bool { return slices.Equal(rig.events(t), []string{"start", "reload"}) })

	// The bridge's checksum of the same file for another state id.
	sum := md5.Sum([]byte("port = 1\n"))
	if err := os.WriteFile(filepath.Join(rig.e.opts.WatchDir, "state-B--etc-food.conf.cksum"), []byte(hex.EncodeToString(sum[:])), 0o644); err != nil {
		t.Fatal(err)
	}
	mark := rig.runs.Mark()
	res = rig.e.Execute(context.Background(), state.Request{StateID: "state-B", Module: "linux.service", Parameter: []byte(param)})
	if !res.OK || res.Changed || !slices.Equal(rig.serviceVerbs(mark), []string{"status"}) {
		t.Fatalf("after the bridge: %+v, ran %v", res, rig.runs.Since(mark))
	}
}

// fakeSystemctl answers systemctl like a systemd host and records the
// calls; nothing runs.
type fakeSystemctl struct {
	mu      sync.Mutex
	calls   []string
	active  map[string]bool
	failing map[string]bool // "reload food": exits 1
}

func (f *fakeSystemctl) Run(_ context.Context, c proc.Cmd) (proc.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if filepath.Base(c.Path) != "systemctl" || c.Chroot != "" {
		return proc.Result{ExitCode: 127}, errors.New("the systemd path ran " + c.Path)
	}
	line := strings.Join(c.Args, " ")
	f.calls = append(f.calls, line)
	switch {
	case len(c.Args) == 3 && c.Args[0] == "is-active":
		if f.active[c.Args[2]] {
			return proc.Result{}, nil
		}
		return proc.Result{ExitCode: 3}, nil
	case f.failing[line]:
		return proc.Result{ExitCode: 1, Output: "Job failed.\n"}, nil
	case len(c.Args) == 2 && c.Args[0] == "start":
		f.active[c.Args[1]] = true
	}
	return proc.Result{}, nil
}

// TestServiceSystemd: where PID 1 is systemd, the module's exact
// systemctl calls (a fake runner: the real systemctl of this machine
// never runs).
func TestServiceSystemd(t *testing.T) {
	if _, err := os.Stat("/usr/bin/systemctl"); err != nil {
		if _, err := os.Stat("/bin/systemctl"); err != nil {
			t.Skip("no systemctl on this machine: the systemd path looks the tool up in the root /")
		}
	}
	fake := &fakeSystemctl{active: map[string]bool{"nginx": true}, failing: map[string]bool{}}
	root, _ := fsutil.NewRoot("/")
	sys := system.New(system.Options{Root: root, Runner: fake, HostPID1: func() system.InitSystem { return system.InitSystemd }})
	if sys.Init() != system.InitSystemd {
		t.Fatal("not systemd")
	}
	watchDir := t.TempDir()
	e := New(Options{Root: root, Runner: fake, System: sys, WatchDir: watchDir})
	conf := filepath.Join(t.TempDir(), "nginx.conf") // an instance path: the root is "/"
	if err := os.WriteFile(conf, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(param string, test bool) state.Result {
		fake.mu.Lock()
		fake.calls = nil
		fake.mu.Unlock()
		return e.Execute(context.Background(), state.Request{StateID: "st", Module: "linux.service", Parameter: []byte(param), Test: test})
	}
	calls := func() []string {
		fake.mu.Lock()
		defer fake.mu.Unlock()
		return slices.Clone(fake.calls)
	}
	param := `{"name": [{"key": "nginx", "value": ""}, {"key": "redis", "value": "restart"}], "watch": ["` + conf + `"]}`

	res := run(param, true)
	if got := calls(); !slices.Equal(got, []string{"is-active --quiet nginx", "is-active --quiet redis"}) || !res.Changed {
		t.Fatalf("check mode: %v %+v", got, res)
	}
	res = run(param, false)
	want := []string{"is-active --quiet nginx", "is-active --quiet redis", "start redis", "is-active --quiet redis", "reload nginx"}
	if got := calls(); !slices.Equal(got, want) || res.Comment != "Service nginx is already running\nService redis started\nService nginx reloaded: "+conf+" changed" {
		t.Fatalf("first round: %v\n%+v", got, res)
	}
	res = run(param, false)
	if got := calls(); !slices.Equal(got, []string{"is-active --quiet nginx", "is-active --quiet redis"}) || res.Changed {
		t.Fatalf("second round: %v %+v", got, res)
	}
	if err := os.WriteFile(conf, []byte("b"), 0o644); err != nil {
		t.Fatal(err)
	}
	fake.failing["reload nginx"] = true
	res = run(param, false)
	want = []string{"is-active --quiet nginx", "is-active --quiet redis", "reload nginx", "restart nginx", "restart redis"}
	if got := calls(); !slices.Equal(got, want) || !res.OK {
		t.Fatalf("changed file: %v %+v", got, res)
	}
}
