// Package virtualenv creates and repairs the agent's Python environment
// (/opt/visualops/env) with the interpreter the states repository needs,
// and installs Salt's dependencies into it, online or from a local
// wheelhouse. A healthy environment is kept: Ensure is idempotent and cheap
// when there is nothing to do.
//
// Python 3 gets a `python -m venv`. Python 2.7 (the 2014 Salt fork) has no
// venv module and often no virtualenv either, so when `virtualenv` cannot
// build one, Ensure makes a minimal environment of its own: bin/python, a
// symlink to the interpreter, and an empty lib/python2.7/site-packages.
// Such an interpreter does not put that directory on sys.path by itself
// (Python 2 resolves the symlink and uses its own prefix); the bridge adds
// it with site.addsitedir(Env.SitePackages).
package virtualenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
)

// Options configures Ensure.
type Options struct {
	Dir string // the environment, e.g. <root>/opt/visualops/env
	// Python is the interpreter to build it with (a name on PATH or a
	// path); PythonFor picks it for a states repository. Default: python3,
	// else python2.
	Python string
	Runner proc.Runner
	Logger *slog.Logger
}

// Env is a usable environment.
type Env struct {
	Dir          string
	Python       string // <Dir>/bin/python
	Version      string // e.g. 3.11.7
	SitePackages string // where its packages go
	// Minimal is our own Python 2 environment (no venv, no virtualenv):
	// its interpreter does not see SitePackages unless told to (the
	// bridge calls site.addsitedir), and pip installs into it with
	// --target.
	Minimal bool
	Created bool // built (or rebuilt) by this call

	runner proc.Runner
	log    *slog.Logger
}

// Major is the environment's Python major version (2 or 3), e.g. for
// SaltRequirements.
func (e Env) Major() int {
	return interpreter{version: e.Version}.major()
}

// minimalMarker marks an environment Ensure built itself; it records the
// interpreter the bin/python symlink points to.
const minimalMarker = "opsagent-env.cfg"

// probe prints, one per line, the interpreter's version, its real
// executable (a pyenv shim or a /usr/bin/python3 symlink resolves to the
// binary) and its site-packages (sysconfig works on Python 2.7 and every
// Python 3; distutils is gone since 3.12). One process answers all three.
const probe = `import sys, sysconfig; print("%d.%d.%d" % tuple(sys.version_info[:3])); print(sys.executable); print(sysconfig.get_paths()["purelib"])`

type interpreter struct {
	path    string // as given
	exe     string // sys.executable
	version string
	purelib string // its site-packages
}

func (i interpreter) major() int {
	n, _ := strconv.Atoi(strings.SplitN(i.version, ".", 2)[0])
	return n
}

// majorMinor is "2.7" for 2.7.18.
func majorMinor(version string) string {
	parts := strings.SplitN(version, ".", 3)
	if len(parts) < 2 {
		return version
	}
	return parts[0] + "." + parts[1]
}

// Ensure returns a healthy environment at opts.Dir, building it when it is
// missing, and rebuilding it when its interpreter is gone or is not the
// chosen interpreter's version (after an OS upgrade, or when the states
// repository now needs another Python).
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
	want, err := wanted(ctx, opts, system)
	if err != nil {
		return Env{}, fmt.Errorf("virtualenv: python %s does not run (install it, or set [salt] python): %w", system, err)
	}
	env := Env{Dir: opts.Dir, Python: filepath.Join(opts.Dir, "bin", "python"), runner: opts.Runner, log: log}
	have, err := inspect(ctx, opts.Runner, env.Python)
	switch {
	case err == nil && have.version == want.version:
		err = env.describe(ctx, have)
		if err == nil {
			rememberInterpreter(opts.Dir, system, want)
			return env, nil
		}
		log.Warn("virtualenv has no usable site-packages; rebuilding it", "dir", opts.Dir, "err", err)
	case pathExists(opts.Dir):
		log.Warn("virtualenv is broken or built with another python; rebuilding it", "dir", opts.Dir, "have", have.version, "want", want.version, "err", err)
	}
	if err := os.RemoveAll(opts.Dir); err != nil {
		return Env{}, fmt.Errorf("virtualenv %s: cannot remove the old one: %w", opts.Dir, err)
	}
	if err := os.MkdirAll(filepath.Dir(opts.Dir), 0o755); err != nil {
		return Env{}, fmt.Errorf("virtualenv %s: %w", opts.Dir, err)
	}
	var tries []string
	for _, c := range builders(want, opts.Dir) {
		res, err := opts.Runner.Run(ctx, proc.Cmd{Path: c[0], Args: c[1:], Timeout: 10 * time.Minute})
		if err == nil && res.ExitCode == 0 {
			built, berr := env.built(ctx, want)
			if berr == nil {
				rememberInterpreter(opts.Dir, system, want)
				log.Info("virtualenv built", "dir", opts.Dir, "python", built.Version, "with", strings.Join(c[:min(3, len(c))], " "))
				return built, nil
			}
			res.Output += "\n" + berr.Error()
		}
		tries = append(tries, fmt.Sprintf("%s: %s", strings.Join(c[:min(3, len(c))], " "), lastLines(res.Output, err, 3)))
		_ = os.RemoveAll(opts.Dir)
	}
	if want.major() == 2 {
		log.Debug("no virtualenv for Python 2; building a minimal environment", "dir", opts.Dir, "tried", strings.Join(tries, "; "))
		if err := buildMinimal(opts.Dir, want); err != nil {
			return Env{}, err
		}
		built, err := env.built(ctx, want)
		if err != nil {
			return Env{}, fmt.Errorf("virtualenv %s: the minimal Python 2 environment does not run: %w", opts.Dir, err)
		}
		rememberInterpreter(opts.Dir, system, want)
		log.Info("virtualenv built (minimal: virtualenv not available for Python 2)", "dir", opts.Dir, "python", built.Version, "interpreter", want.exe)
		return built, nil
	}
	return Env{}, fmt.Errorf("virtualenv %s: cannot build it with %s (install python3-venv, or virtualenv): %s", opts.Dir, system, strings.Join(tries, "; "))
}

// built checks a freshly built environment.
func (e Env) built(ctx context.Context, want interpreter) (Env, error) {
	have, err := inspect(ctx, e.runner, e.Python)
	if err != nil {
		return Env{}, err
	}
	if have.version != want.version {
		return Env{}, fmt.Errorf("its python is %s, not %s", have.version, want.version)
	}
	if err := e.describe(ctx, have); err != nil {
		return Env{}, err
	}
	e.Created = true
	return e, nil
}

// describe fills Version, Minimal and SitePackages.
func (e *Env) describe(ctx context.Context, have interpreter) error {
	e.Version = have.version
	if _, err := os.Stat(filepath.Join(e.Dir, minimalMarker)); err == nil {
		e.Minimal = true
		e.SitePackages = filepath.Join(e.Dir, "lib", "python"+majorMinor(have.version), "site-packages")
		// Cheap to repair, so not a reason to rebuild.
		return os.MkdirAll(e.SitePackages, 0o755)
	}
	sp := have.purelib
	if !filepath.IsAbs(sp) {
		return fmt.Errorf("%s names %q as its site-packages", e.Python, sp)
	}
	e.SitePackages = sp
	return nil
}

// builders are the commands that make an environment, best first. For
// Python 2 the last resort, buildMinimal, is not a command.
func builders(py interpreter, dir string) [][]string {
	var cmds [][]string
	if py.major() >= 3 {
		// Without pip: ensurepip takes seconds and most environments
		// never install anything with pip; pip is added when needed.
		cmds = append(cmds, []string{py.path, "-m", "venv", "--without-pip", dir})
	}
	if v, err := exec.LookPath("virtualenv"); err == nil {
		cmds = append(cmds, []string{v, "-p", py.exe, dir})
	}
	// The interpreter's own virtualenv module, when it has one.
	cmds = append(cmds, []string{py.path, "-m", "virtualenv", dir})
	return cmds
}

// buildMinimal makes a Python 2 environment without virtualenv.
func buildMinimal(dir string, py interpreter) error {
	sp := filepath.Join(dir, "lib", "python"+majorMinor(py.version), "site-packages")
	if err := os.MkdirAll(sp, 0o755); err != nil {
		return fmt.Errorf("virtualenv %s: %w", dir, err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		return fmt.Errorf("virtualenv %s: %w", dir, err)
	}
	if err := os.Symlink(py.exe, filepath.Join(dir, "bin", "python")); err != nil {
		return fmt.Errorf("virtualenv %s: %w", dir, err)
	}
	marker := fmt.Sprintf("# built by opsagent: bin/python is a symlink, site-packages is added by the bridge\nkind = minimal\nhome = %s\nversion = %s\n", py.exe, py.version)
	if err := os.WriteFile(filepath.Join(dir, minimalMarker), []byte(marker), 0o644); err != nil {
		return fmt.Errorf("virtualenv %s: %w", dir, err)
	}
	return nil
}

func pathExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
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

// inspect runs the interpreter once for its version and real executable.
func inspect(ctx context.Context, r proc.Runner, python string) (interpreter, error) {
	if strings.Contains(python, "/") {
		if _, err := os.Stat(python); err != nil {
			return interpreter{}, err
		}
	}
	res, err := r.Run(ctx, proc.Cmd{Path: python, Args: []string{"-c", probe}, Timeout: time.Minute})
	if err != nil {
		return interpreter{}, err
	}
	if res.ExitCode != 0 {
		return interpreter{}, fmt.Errorf("exit code %d: %s", res.ExitCode, strings.TrimSpace(res.Output))
	}
	lines := strings.Split(strings.TrimSpace(res.Output), "\n")
	in := interpreter{path: python, exe: python, version: strings.TrimSpace(lines[0])}
	if len(lines) > 1 && filepath.IsAbs(strings.TrimSpace(lines[1])) {
		in.exe = strings.TrimSpace(lines[1])
	}
	if len(lines) > 2 {
		in.purelib = strings.TrimSpace(lines[2])
	}
	return in, nil
}

// hasPip tells whether pip can install into the environment: a minimal
// one's pip belongs to the host interpreter, so it is used with --target.
func (e Env) hasPip(ctx context.Context) bool {
	res, err := e.runner.Run(ctx, proc.Cmd{Path: e.Python, Args: []string{"-m", "pip", "--version"}, Timeout: time.Minute})
	return err == nil && res.ExitCode == 0
}

// pip runs `python -m pip install ARGS`, into SitePackages for a minimal
// environment (never into the host interpreter's own site-packages).
func (e Env) pip(ctx context.Context, what string, args ...string) error {
	if !e.Minimal && !e.hasPip(ctx) {
		// A venv made --without-pip gets it the first time it is needed.
		res, err := e.runner.Run(ctx, proc.Cmd{Path: e.Python, Args: []string{"-m", "ensurepip", "--default-pip"}, Timeout: 10 * time.Minute})
		if err != nil || res.ExitCode != 0 {
			return fmt.Errorf("virtualenv %s: no pip to install %s, and ensurepip failed (install python3-venv, or give a wheelhouse): %s", e.Dir, what, lastLines(res.Output, err, 3))
		}
	}
	full := []string{"-m", "pip", "install", "--disable-pip-version-check"}
	if e.Minimal {
		full = append(full, "--target", e.SitePackages, "--upgrade")
	}
	full = append(full, args...)
	res, err := e.runner.Run(ctx, proc.Cmd{Path: e.Python, Args: full, Timeout: 30 * time.Minute})
	for _, line := range strings.Split(strings.TrimRight(res.Output, "\n"), "\n") {
		if line != "" {
			e.log.Info("pip", "line", line)
		}
	}
	if err != nil || res.ExitCode != 0 {
		return fmt.Errorf("pip install %s failed: %s", what, lastLines(res.Output, err, 5))
	}
	return nil
}

// InstallRequirements installs a requirements file with pip; with a
// wheelhouse it installs offline (--no-index --find-links).
func (e Env) InstallRequirements(ctx context.Context, requirements, wheelhouse string) error {
	if _, err := os.Stat(requirements); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("requirements %s: %w", requirements, err)
	}
	args := []string{"-r", requirements}
	if wheelhouse != "" {
		args = append(args, "--no-index", "--find-links", wheelhouse)
	}
	return e.pip(ctx, "-r "+requirements, args...)
}

// InstallPackages installs requirement specifiers (e.g. SaltRequirements)
// with pip from the package index.
func (e Env) InstallPackages(ctx context.Context, specs ...string) error {
	if len(specs) == 0 {
		return nil
	}
	if e.Minimal && !e.hasPip(ctx) {
		return fmt.Errorf("virtualenv %s: python %s has no pip to install %s: install pip for it (python-pip), or give the agent a wheelhouse ([salt] wheelhouse)", e.Dir, e.Version, strings.Join(specs, " "))
	}
	return e.pip(ctx, strings.Join(specs, " "), specs...)
}

// Missing returns those of modules the environment's Python cannot
// import (site-packages included, for a minimal environment), asking one
// interpreter for all of them.
func (e Env) Missing(ctx context.Context, modules ...string) []string {
	if len(modules) == 0 {
		return nil
	}
	code := missingProbe
	if e.Minimal {
		code = "import site; site.addsitedir(" + strconv.Quote(e.SitePackages) + ")\n" + code
	}
	res, err := e.runner.Run(ctx, proc.Cmd{Path: e.Python, Args: append([]string{"-c", code}, modules...), Timeout: time.Minute})
	if err != nil || res.ExitCode != 0 {
		return modules
	}
	return strings.Fields(res.Output)
}

// missingProbe prints the modules given as arguments that do not import.
const missingProbe = `import sys
missing = []
for m in sys.argv[1:]:
    try:
        __import__(m)
    except Exception:
        missing.append(m)
print(" ".join(missing))
`

// SaltRequirements are the pip requirements of the Salt a states
// repository bundles, for the Python major version it runs on. For Python 2
// they are the versions of the 2014 fork's time, pinned because later ones
// dropped Python 2 (they match testdata/fixtures/salt-py2-libs); Salt
// 2014.1's ZeroMQ and crypto dependencies are left out: the bridge runs
// Salt with file_client local and never talks to a master.
func SaltRequirements(pythonMajor int) []string {
	if pythonMajor == 2 {
		return []string{"PyYAML==3.10", "Jinja2==2.7.2", "MarkupSafe==0.18", "msgpack-python==0.4.0"}
	}
	return []string{"PyYAML>=5.1", "Jinja2>=2.11", "MarkupSafe>=1.1", "msgpack>=1.0"}
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

// interpreterCache remembers, inside the environment, what the system
// interpreter was when the environment was last checked, so that the next
// Ensure (every agent start, every install) need not start it again. It
// is trusted only while the name still leads, through its symlinks, to
// the same executable file, unchanged: an OS upgrade that repoints
// /usr/bin/python3 or replaces the binary is noticed. (A pyenv shim is a
// script, never the executable: it is probed every time.)
type interpreterCache struct {
	Name    string    `json:"name"` // as resolved on PATH
	Exe     string    `json:"exe"`
	Version string    `json:"version"`
	Size    int64     `json:"size"`
	ModTime time.Time `json:"mtime"`
}

const interpreterCacheFile = "opsagent-python.json"

func resolveName(name string) string {
	if !strings.Contains(name, "/") {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return name
}

// wanted is the system interpreter's identity: from the cache when still
// valid, else by running it.
func wanted(ctx context.Context, opts Options, system string) (interpreter, error) {
	name := resolveName(system)
	if data, err := os.ReadFile(filepath.Join(opts.Dir, interpreterCacheFile)); err == nil {
		var c interpreterCache
		if json.Unmarshal(data, &c) == nil && c.Name == name {
			real, err1 := filepath.EvalSymlinks(name)
			st, err2 := os.Stat(c.Exe)
			if err1 == nil && err2 == nil && real == c.Exe && st.Size() == c.Size && st.ModTime().Equal(c.ModTime) {
				return interpreter{path: system, exe: c.Exe, version: c.Version}, nil
			}
		}
	}
	return inspect(ctx, opts.Runner, system)
}

// rememberInterpreter writes the cache unless it already says the same
// (a re-run of the installer rewrites nothing); failing to is harmless.
func rememberInterpreter(dir, system string, in interpreter) {
	st, err := os.Stat(in.exe)
	if err != nil {
		return
	}
	data, _ := json.Marshal(interpreterCache{Name: resolveName(system), Exe: in.exe, Version: in.version, Size: st.Size(), ModTime: st.ModTime()})
	_, _ = fsutil.WriteFileIfChanged(filepath.Join(dir, interpreterCacheFile), data, 0o644)
}
