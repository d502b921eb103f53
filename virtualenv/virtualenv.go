// Package virtualenv creates and repairs the agent's Python virtualenv
// (/opt/visualops/env) with the system Python, and installs the states
// repository's requirements into it, online or from a local wheelhouse.
// A healthy virtualenv is kept: Ensure is idempotent and cheap when there
// is nothing to do.
package virtualenv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/proc"
)

// Options configures Ensure.
type Options struct {
	Dir    string // the virtualenv, e.g. <root>/opt/visualops/env
	Python string // system interpreter; default: python3, else python2
	Runner proc.Runner
	Logger *slog.Logger
}

// Env is a usable virtualenv.
type Env struct {
	Dir     string
	Python  string // <Dir>/bin/python
	Version string // e.g. 3.11.7
	Created bool   // built (or rebuilt) by this call

	runner proc.Runner
	log    *slog.Logger
}

const versionProbe = `import sys; print("%d.%d.%d" % tuple(sys.version_info[:3]))`

// Ensure returns a healthy virtualenv at opts.Dir, building it when it is
// missing, and rebuilding it when its interpreter is gone or is not the
// system Python's version (after an OS upgrade).
func Ensure(ctx context.Context, opts Options) (Env, error) {
	if opts.Runner == nil {
		opts.Runner = proc.New()
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	system, err := systemPython(opts.Python)
	if err != nil {
		return Env{}, err
	}
	want, err := version(ctx, opts.Runner, system)
	if err != nil {
		return Env{}, fmt.Errorf("virtualenv: system python %s does not run: %w", system, err)
	}
	env := Env{Dir: opts.Dir, Python: filepath.Join(opts.Dir, "bin", "python"), runner: opts.Runner, log: log}
	if have, err := version(ctx, opts.Runner, env.Python); err == nil && have == want {
		env.Version = have
		return env, nil
	} else if _, statErr := os.Stat(opts.Dir); statErr == nil {
		log.Warn("virtualenv is broken or outdated; rebuilding it", "dir", opts.Dir, "have", have, "want", want, "err", err)
		if err := os.RemoveAll(opts.Dir); err != nil {
			return Env{}, fmt.Errorf("virtualenv %s: cannot remove the broken one: %w", opts.Dir, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(opts.Dir), 0o755); err != nil {
		return Env{}, fmt.Errorf("virtualenv %s: %w", opts.Dir, err)
	}
	var tries []string
	for _, c := range builders(system, opts.Dir) {
		res, err := opts.Runner.Run(ctx, proc.Cmd{Path: c[0], Args: c[1:], Timeout: 10 * time.Minute})
		if err == nil && res.ExitCode == 0 {
			if v, err := version(ctx, opts.Runner, env.Python); err == nil {
				env.Version, env.Created = v, true
				log.Info("virtualenv built", "dir", opts.Dir, "python", v, "with", strings.Join(c[:min(3, len(c))], " "))
				return env, nil
			}
		}
		tries = append(tries, fmt.Sprintf("%s: %s", strings.Join(c[:min(3, len(c))], " "), lastLines(res.Output, err, 3)))
		_ = os.RemoveAll(opts.Dir)
	}
	return Env{}, fmt.Errorf("virtualenv %s: cannot build it (install python3-venv, or virtualenv): %s", opts.Dir, strings.Join(tries, "; "))
}

// builders are the ways to make a virtualenv, best first.
func builders(python, dir string) [][]string {
	cmds := [][]string{{python, "-m", "venv", dir}}
	if v, err := exec.LookPath("virtualenv"); err == nil {
		cmds = append(cmds, []string{v, "-p", python, dir})
	}
	if p2, err := exec.LookPath("python2"); err == nil {
		cmds = append(cmds, []string{p2, "-m", "virtualenv", dir})
	}
	return cmds
}

func systemPython(override string) (string, error) {
	if override != "" {
		return override, nil
	}
	for _, name := range []string{"python3", "python2", "python"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
	}
	return "", errors.New("virtualenv: no python3 on this instance (opsagent install installs it with the OS package manager)")
}

func version(ctx context.Context, r proc.Runner, python string) (string, error) {
	if _, err := os.Stat(python); err != nil && strings.Contains(python, "/") {
		return "", err
	}
	res, err := r.Run(ctx, proc.Cmd{Path: python, Args: []string{"-c", versionProbe}, Timeout: time.Minute})
	if err != nil {
		return "", err
	}
	if res.ExitCode != 0 {
		return "", fmt.Errorf("exit code %d: %s", res.ExitCode, strings.TrimSpace(res.Output))
	}
	return strings.TrimSpace(res.Output), nil
}

// InstallRequirements installs a requirements file with the virtualenv's
// pip; with a wheelhouse it installs offline (--no-index --find-links).
func (e Env) InstallRequirements(ctx context.Context, requirements, wheelhouse string) error {
	if _, err := os.Stat(requirements); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("requirements %s: %w", requirements, err)
	}
	args := []string{"-m", "pip", "install", "--disable-pip-version-check", "-r", requirements}
	if wheelhouse != "" {
		args = append(args, "--no-index", "--find-links", wheelhouse)
	}
	res, err := e.runner.Run(ctx, proc.Cmd{Path: e.Python, Args: args, Timeout: 30 * time.Minute})
	for _, line := range strings.Split(strings.TrimRight(res.Output, "\n"), "\n") {
		if line != "" {
			e.log.Info("pip", "line", line)
		}
	}
	if err != nil || res.ExitCode != 0 {
		return fmt.Errorf("pip install -r %s failed: %s", requirements, lastLines(res.Output, err, 5))
	}
	return nil
}

func lastLines(out string, err error, n int) string {
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	s := strings.Join(lines, " | ")
	if err != nil {
		s = strings.TrimSpace(err.Error() + " " + s)
	}
	return s
}
