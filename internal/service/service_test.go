package service

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
)

// tempLayout is the default layout below a fresh temporary root (named
// dir below t.TempDir()).
func tempLayout(t *testing.T, dir string) config.Layout {
	t.Helper()
	root, err := fsutil.NewRoot(filepath.Join(t.TempDir(), dir))
	if err != nil {
		t.Fatal(err)
	}
	return config.NewLayout(root, "", nil)
}

func hostLayout(t *testing.T) config.Layout {
	t.Helper()
	root, err := fsutil.NewRoot("/")
	if err != nil {
		t.Fatal(err)
	}
	return config.NewLayout(root, "", nil)
}

func TestRenderUnit(t *testing.T) {
	// Sandboxing directives the unit must not have: states manage the
	// whole system.
	hardening := []string{"ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "PrivateDevices",
		"ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ProtectKernel", "RestrictNamespaces",
		"CapabilityBoundingSet", "SystemCallFilter", "DynamicUser", "User=", "MemoryDenyWriteExecute"}
	l := tempLayout(t, "root")
	unit := string(RenderUnit(l))
	for _, want := range []string{
		"\nType=simple\n",
		"\nExecStart=" + l.Binary() + " --root " + l.Root().Dir() + " run\n",
		"\nExecStartPre=-/bin/sh " + l.CronScript() + " pre-start\n",
		"\nRestart=always\n", "\nRestartSec=5\n", "\nNice=10\n",
		"\nKillMode=process\n", "\nTimeoutStopSec=30\n",
		"\nAfter=network-online.target\n", "\nWants=network-online.target\n",
		"\nWantedBy=multi-user.target\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", strings.TrimSpace(want), unit)
		}
	}
	for _, h := range hardening {
		if strings.Contains(unit, h) {
			t.Errorf("unit has the hardening directive %s:\n%s", h, unit)
		}
	}
	if strings.Contains(unit, "--config") {
		t.Errorf("--config with the default config file:\n%s", unit)
	}

	host := string(RenderUnit(hostLayout(t)))
	if !strings.Contains(host, "\nExecStart=/opt/visualops/bin/opsagent run\n") ||
		!strings.Contains(host, "\nExecStartPre=-/bin/sh /var/lib/visualops/opsagent/cron.sh pre-start\n") {
		t.Errorf("host unit:\n%s", host)
	}

	root, _ := fsutil.NewRoot("/")
	custom := string(RenderUnit(config.NewLayout(root, "/srv/agent.conf", nil)))
	if !strings.Contains(custom, "\nExecStart=/opt/visualops/bin/opsagent --config /srv/agent.conf run\n") {
		t.Errorf("unit with --config:\n%s", custom)
	}
}

func TestRunArgs(t *testing.T) {
	l := tempLayout(t, "r")
	if got := strings.Join(RunArgs(l), " "); got != "--root "+l.Root().Dir()+" run" {
		t.Errorf("RunArgs = %q", got)
	}
	if got := strings.Join(RunArgs(hostLayout(t)), " "); got != "run" {
		t.Errorf("host RunArgs = %q", got)
	}
}

// The unit passes systemd's own checks, also with a root whose path needs
// quoting (a space) and escaping (% is a specifier, $ a variable).
// Verify needs the ExecStart binary to exist; it runs offline (no running
// systemd needed); --man=false keeps it from looking up man pages.
func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed")
	}
	for _, dir := range []string{"root", "a b%c$d"} {
		t.Run(dir, func(t *testing.T) {
			l := tempLayout(t, dir)
			mustMkdir(t, l.BinDir())
			if err := os.WriteFile(l.Binary(), []byte("#!/bin/sh\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			unit := filepath.Join(t.TempDir(), UnitName)
			if err := os.WriteFile(unit, RenderUnit(l), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(analyze, "verify", "--man=false", unit).CombinedOutput()
			if err != nil || len(bytes.TrimSpace(out)) != 0 {
				t.Errorf("systemd-analyze verify: %v\n%s\nunit:\n%s", err, out, RenderUnit(l))
			}
			// The check is real: a missing binary fails it.
			if err := os.Remove(l.Binary()); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(analyze, "verify", "--man=false", unit).CombinedOutput(); err == nil {
				t.Errorf("verify passed with ExecStart's binary missing: %s", out)
			}
		})
	}
}

func TestRenderCronEntry(t *testing.T) {
	l := tempLayout(t, "root")
	entry := string(RenderCronEntry(l))
	if !strings.HasSuffix(entry, "\n") {
		t.Error("the cron entry does not end with a newline; cron would ignore its last line")
	}
	lines := map[string]bool{}
	for _, line := range strings.Split(entry, "\n") {
		lines[line] = true
	}
	for _, want := range []string{
		"SHELL=/bin/sh",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"* * * * * root /bin/sh " + l.CronScript() + " >/dev/null 2>&1",
	} {
		if !lines[want] {
			t.Errorf("cron entry lacks the line %q:\n%s", want, entry)
		}
	}
	host := string(RenderCronEntry(hostLayout(t)))
	if !strings.Contains(host, "\n* * * * * root /bin/sh /var/lib/visualops/opsagent/cron.sh >/dev/null 2>&1\n") {
		t.Errorf("host cron entry:\n%s", host)
	}
	// A path with a quote and a % stays one shell word, and cron does not
	// cut the line at the %.
	odd := string(RenderCronEntry(tempLayout(t, "it's 100%")))
	if !strings.Contains(odd, `'\''s 100\%/var/lib/visualops/opsagent/cron.sh'`) {
		t.Errorf("odd path not quoted for sh and cron:\n%s", odd)
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"/opt/visualops/bin/opsagent": "/opt/visualops/bin/opsagent",
		"":                            "''",
		"a b":                         "'a b'",
		"it's":                        `'it'\''s'`,
		"$HOME":                       "'$HOME'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
		out, err := exec.Command("/bin/sh", "-c", `printf %s `+shellQuote(in)).Output()
		if err != nil || string(out) != in {
			t.Errorf("sh reads %s as %q (%v), want %q", shellQuote(in), out, err, in)
		}
	}
}

func mustMkdir(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// On the host systemctl runs as asked; below another root only the
// offline verbs run, with --root, and never --now, start, stop or reload.
func TestSystemctlNeverDrivesTheHostBelowARoot(t *testing.T) {
	for _, host := range []string{"", "/"} {
		for _, args := range [][]string{{"daemon-reload"}, {"start", UnitName}, {"disable", "--now", UnitName}} {
			got, err := Systemctl(host, args...)
			if err != nil || !slices.Equal(got, append([]string{"systemctl"}, args...)) {
				t.Errorf("host %q %q: %q %v", host, args, got, err)
			}
		}
	}
	for _, args := range [][]string{{"enable", UnitName}, {"disable", UnitName}, {"is-enabled", "--quiet", UnitName}} {
		got, err := Systemctl("/srv/image", args...)
		if want := append([]string{"systemctl", "--root=/srv/image"}, args...); err != nil || !slices.Equal(got, want) {
			t.Errorf("%q: %q %v, want %q", args, got, err, want)
		}
	}
	for _, args := range [][]string{{"start", UnitName}, {"restart", UnitName}, {"stop", UnitName}, {"daemon-reload"}, {"disable", "--now", UnitName}, {"--quiet", "start", UnitName}} {
		if got, err := Systemctl("/srv/image", args...); err == nil || !strings.Contains(err.Error(), "/srv/image") {
			t.Errorf("%q below a root: %q %v; want a refusal naming the root", args, got, err)
		}
	}
}
