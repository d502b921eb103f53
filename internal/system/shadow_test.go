package system

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
)

func TestParseShadow(t *testing.T) {
	got := ParseShadow([]byte("root:*:19000:0:99999:7:::\n# c\nbroken\n+nis:x\nbob:$6$s$h:19000::::::\nbob:second:1\nlocked:!:1\n"))
	want := map[string]string{"root": "*", "bob": "$6$s$h", "locked": "!"}
	if len(got) != len(want) {
		t.Fatalf("%v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: %q, want %q", k, got[k], v)
		}
	}
}

func TestCheckAccountName(t *testing.T) {
	for _, ok := range []string{"root", "InstantForge1", "www-data", "a.b", "user$", "_x"} {
		if err := CheckAccountName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-r", "+x", "~x", "a:b", "a,b", "a b", "a/b", "a\nb", ".", "..", strings.Repeat("x", 300)} {
		if err := CheckAccountName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCheckServiceName(t *testing.T) {
	for _, ok := range []string{"nginx", "getty@tty1", "foo.service", "php7.4-fpm"} {
		if err := CheckServiceName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-x", "a/b", "../x", "a b", "..", "a\tb"} {
		if err := CheckServiceName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestIsNologinShell(t *testing.T) {
	for sh, want := range map[string]bool{"/usr/sbin/nologin": true, "/sbin/nologin": true, "/bin/false": true, "/bin/sh": false, "": false, "/bin/bash": false} {
		if IsNologinShell(sh) != want {
			t.Errorf("%q", sh)
		}
	}
}

func TestStripCrontabHeader(t *testing.T) {
	header := debianCrontabHeader + "\n# (- installed on Thu Dec  3 09:03:12 2026)\n# (Cron version -- $Id: crontab.c,v 2.13 1994/01/17 03:20:37 vixie Exp $)\n"
	for in, want := range map[string]string{
		header + "* * * * * x\n":                    "* * * * * x\n",
		header:                                      "",
		"# a\n# b\n# c\n* * * * * x\n":              "# a\n# b\n# c\n* * * * * x\n",
		debianCrontabHeader + "\nnot a header\n":    debianCrontabHeader + "\nnot a header\n",
		debianCrontabHeader + "\n# (x)\n# (y)\nz\n": "z\n",
		"": "",
	} {
		if got := stripCrontabHeader(in); got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}

// TestCrontabSpool: the crontab is read from Debian's crontabs/ when
// that directory exists, else from cronie's spool directory (RHEL).
func TestCrontabSpool(t *testing.T) {
	root := t.TempDir()
	r, _ := fsutil.NewRoot(root)
	h := New(Options{Root: r})
	if err := os.MkdirAll(filepath.Join(root, "var/spool/cron"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := h.Crontab("bob"); got != "" || err != nil {
		t.Fatalf("none: %q %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(root, "var/spool/cron/bob"), []byte("1 * * * * rhel\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := h.Crontab("bob"); got != "1 * * * * rhel\n" || err != nil {
		t.Fatalf("cronie: %q %v", got, err)
	}
	if err := os.MkdirAll(filepath.Join(root, "var/spool/cron/crontabs"), 0o730); err != nil {
		t.Fatal(err)
	}
	if got, err := h.Crontab("bob"); got != "" || err != nil {
		t.Fatalf("debian, none: %q %v", got, err)
	}
	if _, err := h.Crontab("../bob"); err == nil {
		t.Fatal("a path was taken for a user")
	}
}

// recorder records commands and runs nothing.
type recorder struct {
	mu   sync.Mutex
	cmds []proc.Cmd
}

func (r *recorder) Run(_ context.Context, c proc.Cmd) (proc.Result, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cmds = append(r.cmds, c)
	return proc.Result{ExitCode: 3}, nil
}

// TestServiceInitScriptDirect: with no service(8) in the root, the init
// script itself is run, chrooted; with no script the service is not
// available.
func TestServiceInitScriptDirect(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc/init.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/init.d/food"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r, _ := fsutil.NewRoot(root)
	rec := &recorder{}
	h := New(Options{Root: r, Runner: rec})
	if h.Init() != InitSysV {
		t.Fatal("below a root: init scripts")
	}
	if err := h.ServiceAvailable("food"); err != nil {
		t.Fatal(err)
	}
	if err := h.ServiceAvailable("bar"); err == nil || err.Error() != "the service bar is not available: there is no init script /etc/init.d/bar" {
		t.Fatalf("bar: %v", err)
	}
	running, err := h.ServiceRunning(context.Background(), "food")
	if err != nil || running {
		t.Fatalf("status: %v %v", running, err)
	}
	if err := h.ServiceDo(context.Background(), "food", ServiceReload); err == nil {
		t.Fatal("a failing reload succeeded")
	}
	if len(rec.cmds) != 2 {
		t.Fatalf("cmds %+v", rec.cmds)
	}
	for i, verb := range []string{"status", "reload"} {
		c := rec.cmds[i]
		if c.Path != "/etc/init.d/food" || !slices.Equal(c.Args, []string{verb}) || c.Chroot != root {
			t.Fatalf("cmd %d: %+v", i, c)
		}
	}
	if err := h.ServiceDo(context.Background(), "food", "stop"); err == nil {
		t.Fatal("an unknown action was run")
	}
}
