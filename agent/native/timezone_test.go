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

// TestTimezone sets the zone the way Debian and systemd do (a symlink,
// /etc/timezone) and the hardware clock mode (/etc/adjtime), writes
// nothing on the next round, and runs no tool at all.
func TestTimezone(t *testing.T) {
	rig := newDebianRig(t)
	localtime := filepath.Join(rig.root, "etc/localtime")
	res := rig.converges(t, "common.timezone", `{"name": "Asia/Shanghai"}`)
	if res.Comment != "Timezone Asia/Shanghai updated: /etc/localtime -> /usr/share/zoneinfo/Asia/Shanghai, /etc/timezone" {
		t.Fatalf("comment %q", res.Comment)
	}
	if l, _ := os.Readlink(localtime); l != "/usr/share/zoneinfo/Asia/Shanghai" {
		t.Fatalf("/etc/localtime -> %q", l)
	}
	if got := rootFile(t, rig.root, "/etc/timezone"); got != "Asia/Shanghai\n" {
		t.Fatalf("/etc/timezone %q", got)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "etc/adjtime")); err == nil {
		t.Fatal("/etc/adjtime created for UTC (hwclock's default)")
	}
	if cmds := rig.runs.Since(0); len(cmds) > 0 {
		t.Fatalf("ran %v", cmds)
	}
	tzInfo, _ := os.Stat(filepath.Join(rig.root, "etc/timezone"))

	// Local time for the hardware clock: /etc/adjtime is created.
	res = rig.converges(t, "common.timezone", `{"name": "Asia/Shanghai", "use-utc": false}`)
	if res.Comment != "Timezone Asia/Shanghai updated: hardware clock LOCAL" || rootFile(t, rig.root, "/etc/adjtime") != "0.0 0 0.0\n0\nLOCAL\n" {
		t.Fatalf("%q %q", res.Comment, rootFile(t, rig.root, "/etc/adjtime"))
	}
	// hwclock's drift lines are kept when the mode changes back.
	if err := os.WriteFile(filepath.Join(rig.root, "etc/adjtime"), []byte("0.001 1700000000 0.0\n1700000000\nLOCAL\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res = rig.converges(t, "common.timezone", `{"name": "Asia/Shanghai", "use-utc": "true"}`)
	if got := rootFile(t, rig.root, "/etc/adjtime"); got != "0.001 1700000000 0.0\n1700000000\nUTC\n" || res.Comment != "Timezone Asia/Shanghai updated: hardware clock UTC" {
		t.Fatalf("%q %q", res.Comment, got)
	}
	if after, _ := os.Stat(filepath.Join(rig.root, "etc/timezone")); !after.ModTime().Equal(tzInfo.ModTime()) {
		t.Fatal("/etc/timezone was rewritten")
	}

	// What systemd and Salt 2014 leave count as set: a relative link, and
	// /etc/timezone without its newline.
	if err := os.Remove(localtime); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../usr/share/zoneinfo/Europe/Paris", localtime); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rig.root, "etc/timezone"), []byte("Europe/Paris"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := rig.apply(t, "common.timezone", `{"name": "Europe/Paris"}`, false); res.Changed || !res.OK {
		t.Fatalf("systemd's link: %+v", res)
	}

	// Asia/Chongqing is a link to Asia/Shanghai in tzdata: a different
	// name all the same, so a different setting (Salt 2014 compared the
	// files' content and kept the old name).
	rig.converges(t, "common.timezone", `{"name": "Asia/Shanghai"}`)
	res = rig.converges(t, "common.timezone", `{"name": "Asia/Chongqing"}`)
	if l, _ := os.Readlink(localtime); l != "/usr/share/zoneinfo/Asia/Chongqing" || rootFile(t, rig.root, "/etc/timezone") != "Asia/Chongqing\n" {
		t.Fatalf("Chongqing: %q %q", l, res.Comment)
	}

	// A copy of a zone file (older RHEL) becomes the link.
	if err := os.Remove(localtime); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(localtime, []byte(rootFile(t, rig.root, "/usr/share/zoneinfo/Asia/Chongqing")), 0o644); err != nil {
		t.Fatal(err)
	}
	rig.converges(t, "common.timezone", `{"name": "Asia/Chongqing"}`)
	if l, err := os.Readlink(localtime); err != nil || l != "/usr/share/zoneinfo/Asia/Chongqing" {
		t.Fatalf("copy replaced by %q %v", l, err)
	}

	for param, want := range map[string]string{
		`{"name": "Mars/Olympus"}`:      "Timezone Mars/Olympus: no such time zone: /usr/share/zoneinfo/Mars/Olympus does not exist (see the names under /usr/share/zoneinfo)",
		`{"name": "Asia"}`:              "Timezone Asia: no such time zone: /usr/share/zoneinfo/Asia does not exist (see the names under /usr/share/zoneinfo)",
		`{"name": "../../etc/passwd"}`:  `common.timezone: parameter name: "../../etc/passwd" is not a time zone name such as Europe/Paris or UTC`,
		`{"name": "Asia/../../../etc"}`: `common.timezone: parameter name: "Asia/../../../etc" is not a time zone name such as Europe/Paris or UTC`,
		`{"name": "/etc/passwd"}`:       `common.timezone: parameter name: "/etc/passwd" is not a time zone name such as Europe/Paris or UTC`,
		`{"name": ""}`:                  "common.timezone: parameter name: is required and missing or empty",
		`{"name": "UTC", "use-utc": 3}`: "common.timezone: parameter use-utc: must be true or false, got 3",
	} {
		if res := rig.apply(t, "common.timezone", param, false); res.OK || res.Comment != want {
			t.Errorf("%s: %+v\n want %q", param, res, want)
		}
	}
}

// TestTimezoneInstallsTzdata: a root without zoneinfo gets tzdata from
// its repositories first, and the comment says so.
func TestTimezoneInstallsTzdata(t *testing.T) {
	rig := newDebianRig(t)
	if _, err := rig.e.sys.Check(context.Background(), system.Cmd{Tool: "dpkg", Args: []string{"--purge", "--force-depends", "tzdata"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(rig.root, "usr/share/zoneinfo")); err == nil {
		t.Fatal("zoneinfo survived the purge")
	}
	check := rig.apply(t, "common.timezone", `{"name": "Europe/Paris"}`, true)
	if !check.Changed || !strings.HasPrefix(check.Comment, "tzdata would be installed (common.timezone needs /usr/share/zoneinfo); Timezone Europe/Paris would be updated: ") {
		t.Fatalf("check mode: %+v", check)
	}
	debroot.UseExtras(t, rig.root)
	res := rig.converges(t, "common.timezone", `{"name": "Europe/Paris"}`, "apt-get", "dpkg")
	if !strings.HasPrefix(res.Comment, "tzdata installed (common.timezone needs /usr/share/zoneinfo); Timezone Europe/Paris updated: /etc/localtime -> /usr/share/zoneinfo/Europe/Paris") {
		t.Fatalf("comment %q", res.Comment)
	}
}
