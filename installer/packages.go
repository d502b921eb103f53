package installer

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/proc"
)

// packageManager installs OS packages.
type packageManager struct {
	name     string   // apt-get, dnf, yum, apk
	platform string   // what [global] platform says for it (bootstrap.sh)
	install  []string // the install command before the package names
	refresh  []string // run once when an install fails (stale index)
	// packages maps a prerequisite to its package names here.
	packages map[string][]string
}

var managers = []packageManager{
	{name: "apt-get", platform: "APT",
		install: []string{"apt-get", "install", "-y", "-q", "--no-install-recommends"}, refresh: []string{"apt-get", "update", "-q"},
		packages: map[string][]string{"python3": {"python3"}, "venv": {"python3-venv"}, "ca-certificates": {"ca-certificates"}}},
	{name: "dnf", platform: "YUM",
		install:  []string{"dnf", "install", "-y", "-q"},
		packages: map[string][]string{"python3": {"python3"}, "venv": {"python3"}, "ca-certificates": {"ca-certificates"}}},
	{name: "yum", platform: "YUM",
		install:  []string{"yum", "install", "-y", "-q"},
		packages: map[string][]string{"python3": {"python3"}, "venv": {"python3"}, "ca-certificates": {"ca-certificates"}}},
	{name: "apk", platform: "APK",
		install:  []string{"apk", "add", "--no-cache"},
		packages: map[string][]string{"python3": {"python3"}, "venv": {"python3"}, "ca-certificates": {"ca-certificates"}}},
}

// findManager returns the package manager of this host, if any.
func findManager() (packageManager, bool) {
	for _, m := range managers {
		if _, err := exec.LookPath(m.name); err == nil {
			return m, true
		}
	}
	return packageManager{}, false
}

// detectPlatform is [global] platform for the fork's bootstrap.sh: APT or
// YUM ("" when neither).
func detectPlatform() string {
	m, ok := findManager()
	if !ok || (m.platform != "APT" && m.platform != "YUM") {
		return ""
	}
	return m.platform
}

// caBundles are where the usual distributions keep the CA certificates.
var caBundles = []string{"/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"}

// missingPrerequisites checks what the agent needs of the OS: python3 with
// venv support (for the Salt path) and the CA certificates (wss://, the
// release bucket). git is not needed: the agent clones with go-git.
func missingPrerequisites(ctx context.Context, r proc.Runner) []string {
	var missing []string
	if _, err := exec.LookPath("python3"); err != nil {
		missing = append(missing, "python3", "venv")
	} else if res, err := r.Run(ctx, proc.Cmd{Path: "python3", Args: []string{"-c", "import venv, ensurepip"}, Timeout: time.Minute}); err != nil || res.ExitCode != 0 {
		missing = append(missing, "venv")
	}
	found := false
	for _, p := range caBundles {
		if _, err := os.Stat(p); err == nil {
			found = true
			break
		}
	}
	if !found {
		missing = append(missing, "ca-certificates")
	}
	return missing
}

func (in *installation) stepPackages(ctx context.Context) {
	if in.opts.SkipPackages {
		in.rep.add("packages", Skipped, "not installing OS packages (--skip-packages, or a root other than /)")
		return
	}
	missing := missingPrerequisites(ctx, in.opts.Runner)
	if len(missing) == 0 {
		in.rep.add("packages", Unchanged, "python3 with venv and the CA certificates are installed")
		return
	}
	m, ok := findManager()
	if !ok {
		in.rep.add("packages", Failed, "missing %s and no apt-get, dnf, yum or apk to install it: install them by hand", strings.Join(missing, ", "))
		return
	}
	var pkgs []string
	seen := map[string]bool{}
	for _, need := range missing {
		for _, p := range m.packages[need] {
			if !seen[p] {
				seen[p] = true
				pkgs = append(pkgs, p)
			}
		}
	}
	if in.opts.DryRun {
		in.rep.add("packages", Planned, "install %s with %s", strings.Join(pkgs, " "), m.name)
		return
	}
	if err := in.runInstall(ctx, m, pkgs); err != nil {
		in.rep.add("packages", Failed, "%s could not install %s: %v (install them by hand and run the install again)", m.name, strings.Join(pkgs, " "), err)
		return
	}
	in.rep.add("packages", Changed, "installed %s with %s", strings.Join(pkgs, " "), m.name)
}

func (in *installation) runInstall(ctx context.Context, m packageManager, pkgs []string) error {
	run := func(argv []string) error {
		res, err := in.opts.Runner.Run(ctx, proc.Cmd{Path: argv[0], Args: argv[1:], Timeout: 20 * time.Minute,
			Env: append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")})
		if err == nil && res.ExitCode != 0 {
			err = fmt.Errorf("exit code %d: %s", res.ExitCode, lastLine(res.Output))
		}
		return err
	}
	err := run(append(append([]string{}, m.install...), pkgs...))
	if err != nil && len(m.refresh) > 0 {
		if rerr := run(m.refresh); rerr == nil {
			err = run(append(append([]string{}, m.install...), pkgs...))
		}
	}
	return err
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
