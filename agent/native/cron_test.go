package native

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// crontabOf is user's crontab as crontab -l shows it (run chrooted in
// the root).
func crontabOf(t *testing.T, rig *debianRig, user string) string {
	t.Helper()
	res, err := rig.e.sys.Run(context.Background(), system.Cmd{Tool: "crontab", Args: []string{"-l", "-u", user}})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		return ""
	}
	return res.Output
}

func setCrontab(t *testing.T, rig *debianRig, user, content string) {
	t.Helper()
	if err := rig.e.sys.SetCrontab(context.Background(), user, content); err != nil {
		t.Fatal(err)
	}
}

// TestCronJob: cron is installed as the module's prerequisite (say so),
// the job is installed with crontab below the 2014 marker, and the next
// round runs no crontab (nor apt-get): the spool file is read.
func TestCronJob(t *testing.T) {
	rig := newDebianRig(t)
	param := `{"cmd": ["echo tata >> /tmp/tata.cron 2>&1"], "user": "root"}`

	check := rig.apply(t, "linux.cronjob", param, true)
	if !check.OK || !check.Changed || check.Comment != `cron would be installed (prerequisite); Crontab of root would be updated: job "echo tata >> /tmp/tata.cron 2>&1" added` {
		t.Fatalf("check mode on a root without cron: %+v", check)
	}
	if rig.e.sys.HasTool("crontab") || len(rig.runs.Since(0)) > 0 {
		t.Fatalf("check mode ran %v", rig.runs.Since(0))
	}

	debroot.UseExtras(t, rig.root)
	first := rig.converges(t, "linux.cronjob", param, "crontab", "apt-get", "dpkg")
	if first.Comment != `cron installed (prerequisite); Crontab of root updated: job "echo tata >> /tmp/tata.cron 2>&1" added` {
		t.Fatalf("comment %q", first.Comment)
	}
	if got := crontabOf(t, rig, "root"); got != cronMarker+"\n* * * * * echo tata >> /tmp/tata.cron 2>&1\n" {
		t.Fatalf("crontab:\n%s", got)
	}
	// Installed by crontab(1): the spool file has cron's owner and mode.
	fi, err := os.Stat(filepath.Join(rig.root, "var/spool/cron/crontabs/root"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("spool file %v %v", fi, err)
	}
}

// TestCronJob2014Crontab: a crontab the 2014 agent managed (its marker,
// its job, the user's own lines above) gets no duplicate; the user's
// lines are kept as they are; a schedule change rewrites the job in
// place; a new job goes below the marker.
func TestCronJob2014Crontab(t *testing.T) {
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	if _, err := rig.e.sys.EnsureTool(context.Background(), system.CronPrerequisite); err != nil {
		t.Fatal(err)
	}
	own := "# my own jobs\nMAILTO=ops@example.com\n5  4 * * *   /usr/local/bin/backup   --all\n"
	salt2014 := own + cronMarker + "\n" +
		"MAILTO=\"\"\n" +
		"# a comment Salt kept\n" +
		"*/1 */2 */3 */4 */5 echo toto >> /tmp/toto.cron 2>&1\n" +
		"@reboot /usr/bin/on-boot\n"
	setCrontab(t, rig, "root", salt2014)

	// The same job, white space aside: nothing to do, nothing run.
	mark := rig.runs.Mark()
	res := rig.apply(t, "linux.cronjob", `{"cmd": ["echo  toto >> /tmp/toto.cron  2>&1"], "minute": "*/1", "hour": "*/2", "day-of-month": "*/3", "month": "*/4", "day-of-week": "*/5", "user": "root"}`, false)
	if !res.OK || res.Changed || res.Comment != "Crontab of root is already in the correct state" {
		t.Fatalf("2014 job: %+v", res)
	}
	if ran := rig.runs.Ran(mark, "crontab"); len(ran) > 0 {
		t.Fatalf("ran %v", ran)
	}

	// Another schedule: the line is rewritten where it is.
	res = rig.converges(t, "linux.cronjob", `{"cmd": ["echo toto >> /tmp/toto.cron 2>&1"], "minute": "30", "hour": "2", "user": "root"}`, "crontab")
	if res.Comment != `Crontab of root updated: job "echo toto >> /tmp/toto.cron 2>&1" scheduled 30 2 * * *` {
		t.Fatalf("comment %q", res.Comment)
	}
	want := strings.Replace(salt2014, "*/1 */2 */3 */4 */5 echo toto", "30 2 * * * echo toto", 1)
	if got := crontabOf(t, rig, "root"); got != want {
		t.Fatalf("crontab:\n%s\nwant:\n%s", got, want)
	}

	// New jobs (a list, and two lines of one entry) are added below the
	// marker, after what is there; a job of the user's own section is not
	// the agent's.
	res = rig.converges(t, "linux.cronjob", `{"cmd": ["/usr/local/bin/backup --all", "date >> /tmp/a\nuptime >> /tmp/b"], "minute": "0", "user": "root"}`, "crontab")
	want += "0 * * * * /usr/local/bin/backup --all\n0 * * * * date >> /tmp/a\n0 * * * * uptime >> /tmp/b\n"
	if got := crontabOf(t, rig, "root"); got != want {
		t.Fatalf("crontab:\n%s\nwant:\n%s", got, want)
	}
	if !strings.Contains(res.Comment, `job "uptime >> /tmp/b" added`) {
		t.Fatalf("comment %q", res.Comment)
	}
}

// TestCronJobOtherUser: a user's crontab without a marker gets one; a
// user that does not exist, an empty command or a schedule with a space
// fail with one line naming the problem.
func TestCronJobOtherUser(t *testing.T) {
	rig := newDebianRig(t)
	debroot.UseExtras(t, rig.root)
	rig.converges(t, "linux.user", `{"username": "bob"}`, accountTools...)
	if _, err := rig.e.sys.EnsureTool(context.Background(), system.CronPrerequisite); err != nil {
		t.Fatal(err)
	}
	setCrontab(t, rig, "bob", "0 0 * * * /bin/true\n")
	rig.converges(t, "linux.cronjob", `{"cmd": "ntpdate time.apple.com", "user": "bob", "minute": "*/10"}`, "crontab")
	if got := crontabOf(t, rig, "bob"); got != "0 0 * * * /bin/true\n"+cronMarker+"\n*/10 * * * * ntpdate time.apple.com\n" {
		t.Fatalf("crontab:\n%s", got)
	}
	if got := crontabOf(t, rig, "root"); got != "" {
		t.Fatalf("root's crontab: %q", got)
	}

	for param, want := range map[string]string{
		`{"cmd": [""]}`:                          "linux.cronjob: parameter cmd[0]: is empty: write the command the job runs, or remove the entry",
		`{"cmd": ["x", "  "]}`:                   "linux.cronjob: parameter cmd[1]: is empty: write the command the job runs, or remove the entry",
		`{"user": "root"}`:                       "linux.cronjob: parameter cmd: is required: a list of commands, one job each",
		`{"cmd": ["x"], "hour": "1 2"}`:          `linux.cronjob: parameter hour: "1 2" must be one crontab field, without spaces (e.g. */5 or 1,15)`,
		`{"cmd": ["x"], "user": "nosuch"}`:       "Crontab of nosuch: no such user in /etc/passwd (create it first with linux.user)",
		`{"cmd": ["x"], "user": "a:b"}`:          `linux.cronjob: parameter user: account name "a:b" cannot contain ':'`,
		`{"cmd": ["x"], "minute": "61"}`:         "Crontab of root: crontab -u root - failed with exit code 1: ",
		`{"cmd": [{"key": "x"}, {"key": ""}]}`:   "linux.cronjob: parameter cmd[1]: is empty: write the command the job runs, or remove the entry",
		`{"cmd": [3]}`:                           "linux.cronjob: parameter cmd[0]: must be a command (a string), got a number",
		`{"cmd": ["x"], "day-of-week": "1\n2"}`:  `linux.cronjob: parameter day-of-week: "1\n2" must be one crontab field, without spaces (e.g. */5 or 1,15)`,
		`{"cmd": ["x"], "month": {"a": 1}}`:      "linux.cronjob: parameter month: must be a string, got an object",
		`{"cmd": ["x"], "day-of-month": "0-40"}`: "Crontab of root: crontab -u root - failed with exit code 1: ",
	} {
		res := rig.apply(t, "linux.cronjob", param, false)
		if res.OK || !strings.HasPrefix(res.Comment, want) {
			t.Errorf("%s: %+v\n want %q", param, res, want)
		}
	}
	if got := crontabOf(t, rig, "root"); got != "" {
		t.Fatalf("a failed state wrote root's crontab: %q", got)
	}
}
