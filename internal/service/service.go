// Package service renders the files that supervise the agent on an
// instance (spec/install-update.md, "Bootstrap" and "Self-update"): the
// systemd unit, the root cron entry, and the watchdog script (cron.sh) they
// both run. The installer writes all three; a confirmed update rewrites
// the watchdog, so that watchdog fixes ship with releases.
//
// It also owns the update-state file (update.state) that the Go updater and
// the watchdog, plain shell, share: key=value lines that `grep "^key=" |
// cut -d= -f2-` reads, times in Unix seconds that `date +%s` compares.
//
// Every path comes from config.Layout as a host path (below --root), so a
// rendering for a temporary root runs there for real.
//
// The renderers return bytes; a caller that wants to know whether a file on
// disk is already what it would write compares them (bytes.Equal).
package service

import (
	"bytes"
	"embed"
	"fmt"
	"os"
	"strings"
	"text/template"

	"github.com/visualops/opsagent/internal/config"
)

// templateFS holds the templates. They are parsed at each rendering
// (rare, and cheap) rather than kept in a package variable.
//
//go:embed templates/*.tmpl
var templateFS embed.FS

// UnitName is the systemd unit the installer writes (Layout.UnitFile).
const UnitName = "opsagent.service"

// Systemd reports whether systemd is the init of l's root:
// /run/systemd/system below the root is a directory (sd_booted's check).
// Below a root other than the host's it says that the root's system uses
// systemd (so the unit is written and enabled there), not that the
// systemd of this host may be asked anything about it (Systemctl).
func Systemd(l config.Layout) bool {
	st, err := os.Stat(l.SystemdRunDir())
	return err == nil && st.IsDir()
}

// offlineVerbs are what systemctl does on a unit file tree without the
// running manager (systemctl --root): the symlinks of enable and disable.
var offlineVerbs = map[string]bool{"enable": true, "disable": true, "is-enabled": true}

// Systemctl returns the systemctl command line for args against root (a
// host directory; "" or "/" is the host). On the host it is systemctl
// args. Below another root the systemd that runs is this host's, which
// knows nothing of that root: only enable, disable and is-enabled run,
// with --root=<root>, and never --now; anything else (start, stop,
// restart, daemon-reload) is refused with an error that says so, so that
// `install --root X` and `uninstall --root X` never drive the host's
// services.
func Systemctl(root string, args ...string) ([]string, error) {
	if root == "" || root == "/" {
		return append([]string{"systemctl"}, args...), nil
	}
	verb := ""
	for _, a := range args {
		if a == "--now" {
			return nil, fmt.Errorf("systemctl %s --now is not run below --root %s: the systemd that runs is this host's", verb, root)
		}
		if verb == "" && !strings.HasPrefix(a, "-") {
			verb = a
		}
	}
	if !offlineVerbs[verb] {
		return nil, fmt.Errorf("systemctl %s is not run below --root %s: the systemd that runs is this host's, not that root's", verb, root)
	}
	return append([]string{"systemctl", "--root=" + root}, args...), nil
}

// RunArgs are the arguments the agent runs with for the layout l: `run`,
// preceded by --root when the root is not the host's and by --config when
// the config is not the default one below the root.
func RunArgs(l config.Layout) []string {
	var args []string
	if !l.Root().IsHost() {
		args = append(args, "--root", l.Root().Dir())
	}
	if l.ConfigFile() != l.Root().Path(config.DefaultPath) {
		args = append(args, "--config", l.ConfigFile())
	}
	return append(args, "run")
}

// RenderUnit returns /etc/systemd/system/opsagent.service for l.
func RenderUnit(l config.Layout) []byte {
	words := []string{unitQuote(l.Binary(), true)}
	for _, a := range RunArgs(l) {
		words = append(words, unitQuote(a, false))
	}
	return render("opsagent.service.tmpl", map[string]string{
		"CronScript": unitQuote(l.CronScript(), false),
		"ExecStart":  strings.Join(words, " "),
	})
}

// RenderCronEntry returns /etc/cron.d/opsagent for l: the watchdog every
// minute, as root. It ends with a newline: cron ignores a last line
// without one.
func RenderCronEntry(l config.Layout) []byte {
	// cron turns an unescaped % into a newline before the shell sees it.
	script := strings.ReplaceAll(shellQuote(l.CronScript()), "%", `\%`)
	return render("cron.tmpl", map[string]string{"CronScript": script})
}

func render(name string, data any) []byte {
	var b bytes.Buffer
	t, err := template.ParseFS(templateFS, "templates/"+name)
	if err == nil {
		err = t.ExecuteTemplate(&b, name, data)
	}
	if err != nil {
		// Only a template bug gets here (the templates are part of the
		// binary and the data plain strings); every test would catch it.
		panic(fmt.Sprintf("service: template %s: %v", name, err))
	}
	return b.Bytes()
}

// shellQuote quotes s for sh: as is when it is made of characters no
// shell treats specially, else in single quotes.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:@,=") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// unitQuote quotes one word of a systemd command line: as is when it is
// plain, else in double quotes with C escapes. % (specifiers) is doubled,
// and $ (variables) too except in the executable's path, where systemd
// substitutes no variables (systemd.service(5), "Command lines").
func unitQuote(s string, executable bool) string {
	s = strings.ReplaceAll(s, "%", "%%")
	if !executable {
		s = strings.ReplaceAll(s, "$", "$$")
	}
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:@,=%$") == "" {
		return s
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`, "\t", `\t`)
	return `"` + r.Replace(s) + `"`
}
