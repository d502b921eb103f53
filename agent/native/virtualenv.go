package native

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// virtualenv is common.virtualenv: a Python virtual environment at path,
// made with the root's Python (python-bin, else python3): `PYTHON -m
// venv` for Python 3 (Debian's python3-venv installed first when
// missing), the `virtualenv` tool for a Python 2 python-bin (installed
// first when missing). An environment whose interpreter is gone (removed,
// or replaced by an upgrade of the distribution's Python) or is not
// python-bin's is rebuilt in place (--clear). system-site-packages
// (default true, as module.json says) is the environment's
// include-system-site-packages setting, corrected in pyvenv.cfg when it
// differs. requirements-file is installed with the environment's pip,
// with each extra-search-dir as --find-links, when its content (or the
// search directories) changed since it was last installed, or the
// environment was (re)built: a checksum kept in the environment
// (.opsagent-requirements) says so. Salt 2014 ran `pip freeze` and `pip
// install -r` on every round.
//
// A round with nothing to do reads a link, pyvenv.cfg, the requirements
// file and the checksum, and runs nothing.
func (e *Executor) virtualenv(ctx context.Context, s *stateRun) (state.Result, error) {
	dir, err := absPath(s.p, "path")
	if err != nil {
		return state.Result{}, err
	}
	if systemDirs[dir] {
		return state.Result{}, &badParam{"path", fmt.Sprintf("%s is a system directory: a virtualenv there would put its bin/python and lib/ among the system's (use a directory of its own, e.g. /opt/venv)", dir)}
	}
	pyBin, err := s.p.str("python-bin")
	if err != nil {
		return state.Result{}, err
	}
	pyBin = strings.TrimSpace(pyBin)
	site, err := s.p.boolean("system-site-packages", true)
	if err != nil {
		return state.Result{}, err
	}
	search, err := s.p.list("extra-search-dir")
	if err != nil {
		return state.Result{}, err
	}
	req, err := s.p.str("requirements-file")
	if err != nil {
		return state.Result{}, err
	}
	if req = strings.TrimSpace(req); req != "" {
		if req, err = absPath(s.p, "requirements-file"); err != nil {
			return state.Result{}, err
		}
	}
	v := &venv{s: s, dir: dir, pyBin: pyBin, site: site, search: search, req: req}
	return v.converge(ctx)
}

type venv struct {
	s      *stateRun
	dir    string
	pyBin  string // as given; "" for the system's python3
	site   bool
	search []string
	req    string
	ch     changes
	out    strings.Builder
}

func (v *venv) label() string { return "Virtualenv " + v.dir }

func (v *venv) fail(format string, a ...any) (state.Result, error) {
	return state.Result{Stdout: v.out.String()}, failf("%s: %s", v.label(), fmt.Sprintf(format, a...))
}

// reqMarker keeps the checksum of the requirements last installed.
const reqMarker = ".opsagent-requirements"

// systemDirs are never made environments.
var systemDirs = map[string]bool{
	"/": true, "/bin": true, "/boot": true, "/dev": true, "/etc": true, "/home": true, "/lib": true, "/lib64": true,
	"/opt": true, "/proc": true, "/root": true, "/run": true, "/sbin": true, "/srv": true, "/sys": true, "/tmp": true,
	"/usr": true, "/usr/bin": true, "/usr/lib": true, "/usr/local": true, "/usr/local/bin": true, "/usr/local/lib": true,
	"/usr/sbin": true, "/usr/share": true, "/var": true, "/var/lib": true,
}

// venvEntries are what venv and virtualenv put in an environment's
// directory (and the module's checksum): a rebuild (--clear, which
// deletes the directory's content) happens only when nothing else is
// there.
var venvEntries = map[string]bool{
	"bin": true, "include": true, "lib": true, "lib64": true, "local": true, "share": true,
	"pyvenv.cfg": true, ".gitignore": true, "pip-selfcheck.json": true, reqMarker: true,
}

func (v *venv) converge(ctx context.Context) (state.Result, error) {
	s := v.s
	if fi, err := s.fs.Lstat(v.dir); err == nil && !fi.IsDir() {
		return v.fail("%s exists and is not a directory", v.dir)
	}
	python := v.pyBin
	if python == "" {
		python = pipPython
	}
	// The interpreter asked for, followed to its file ("" when missing:
	// python3 is installed as a prerequisite below, python-bin is not).
	wantReal := ""
	if p, err := s.sys.LookTool(python); err == nil {
		if wantReal, err = s.fs.ResolveLinks(p); err != nil {
			wantReal = p
		}
	} else if v.pyBin != "" {
		return v.fail("python-bin %s is not installed (install it first)", v.pyBin)
	}

	build, why := v.needsBuild(wantReal)
	created := false
	if build && why != "created" {
		if err := v.rebuildBlocked(why); err != nil {
			return v.fail("%v", err)
		}
	}
	if build {
		if s.test {
			v.ch.add("%s with %s%s", why, python, v.siteNote())
		} else {
			if err := v.build(ctx, python, why); err != nil {
				return v.fail("%v", err)
			}
			created = true
		}
	}
	if !build || !s.test {
		if err := v.siteSetting(); err != nil {
			return v.fail("%v", err)
		}
	}
	if v.req != "" {
		if res, err := v.requirements(ctx, created || (build && s.test)); err != nil {
			return res, err
		}
	}
	res := s.result(v.label(), v.ch)
	res.Stdout = v.out.String()
	return res, nil
}

// needsBuild says whether the environment must be made, and why:
// "created" when there is none, "rebuilt" when its interpreter is gone or
// is another one than python-bin.
func (v *venv) needsBuild(wantReal string) (bool, string) {
	s := v.s
	py := path.Join(v.dir, "bin", "python")
	if _, err := s.fs.Lstat(path.Join(v.dir, "pyvenv.cfg")); err != nil {
		if _, err := s.fs.Lstat(py); err != nil {
			return true, "created"
		}
	}
	fi, err := s.fs.Stat(py)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return true, "rebuilt (its interpreter is gone)"
	}
	// The environment's interpreter: bin/python followed, or, for an
	// environment that copied it, the one pyvenv.cfg names.
	have, err := s.fs.ResolveLinks(py)
	if err != nil {
		return false, ""
	}
	cfg := v.readCfg()
	// bin/python links to python3, which an upgrade of the distribution
	// moves to a new minor version: the environment's packages are built
	// for the old one, under lib/pythonX.Y, which the new one does not
	// read.
	if m := pyNameRE.FindStringSubmatch(path.Base(have)); m != nil {
		if made := cfg["version"]; made != "" && m[1] != majorMinorOf(made) {
			return true, fmt.Sprintf("rebuilt (it was made with Python %s, its interpreter is now %s)", majorMinorOf(made), m[1])
		}
	}
	if v.pyBin == "" || wantReal == "" {
		return false, ""
	}
	if strings.HasPrefix(have, v.dir+"/") {
		exe := cfg["executable"]
		if exe == "" {
			return false, "" // cannot tell: keep it
		}
		if have, err = s.fs.ResolveLinks(exe); err != nil {
			return false, ""
		}
	}
	if have != wantReal {
		return true, fmt.Sprintf("rebuilt (its interpreter %s is not python-bin %s)", have, v.pyBin)
	}
	return false, ""
}

// readCfg reads pyvenv.cfg's "key = value" lines.
func (v *venv) readCfg() map[string]string {
	out := map[string]string{}
	data, err := v.s.fs.ReadFile(path.Join(v.dir, "pyvenv.cfg"), 1<<20)
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(data), "\n") {
		if k, val, ok := strings.Cut(line, "="); ok {
			out[strings.TrimSpace(k)] = strings.TrimSpace(val)
		}
	}
	return out
}

// versionProbe prints MAJOR.MINOR on Python 2 and 3 alike.
const versionProbe = `import sys; print("%d.%d" % sys.version_info[:2])`

var (
	pyVersionRE = regexp.MustCompile(`^([23])\.([0-9]+)$`)
	// An interpreter named for its version: python3.11.
	pyNameRE = regexp.MustCompile(`^python([23]\.[0-9]+)$`)
)

// majorMinorOf is "3.11" for "3.11.2".
func majorMinorOf(v string) string {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return v
	}
	return parts[0] + "." + parts[1]
}

// rebuildBlocked says why the environment cannot be rebuilt: rebuilding
// (--clear) deletes the directory's content, and files that are not the
// environment's are kept out of harm's way.
func (v *venv) rebuildBlocked(why string) error {
	names, err := dirNames(v.s.fs, v.dir)
	if err != nil {
		return err
	}
	var foreign []string
	for _, n := range names {
		if !venvEntries[n] {
			foreign = append(foreign, n)
		}
	}
	if len(foreign) == 0 {
		return nil
	}
	if len(foreign) > 5 {
		foreign = append(foreign[:5], "…")
	}
	return fmt.Errorf("must be %s, but %s holds other files (%s), which rebuilding would delete: move them away, or remove the directory", why, v.dir, strings.Join(foreign, ", "))
}

// siteNote is added to what was built.
func (v *venv) siteNote() string {
	if v.site {
		return " (system site packages)"
	}
	return ""
}

// build makes the environment, or remakes it in place (why is not
// "created").
func (v *venv) build(ctx context.Context, python, why string) error {
	s := v.s
	clear := why != "created"
	fam := system.FamilyUnknown
	if d, err := s.sys.Distro(); err == nil {
		fam = d.Family()
	}
	if v.pyBin == "" {
		// The system's python3, and its venv module: on Debian that is
		// python3-venv (which brings python3); elsewhere venv comes with
		// python3.
		if fam == system.FamilyDebian {
			if err := v.ensurePackage(ctx, "python3-venv"); err != nil {
				return err
			}
		} else {
			if _, err := s.need(ctx, system.Prerequisite{Tool: pipPython, Packages: map[system.Family]string{system.FamilyRHEL: "python3"}}, &v.ch); err != nil {
				return err
			}
		}
	}
	res, err := s.sys.Check(ctx, system.Cmd{Tool: python, Args: []string{"-c", versionProbe}})
	if err != nil {
		return fmt.Errorf("%s does not run: %w", python, err)
	}
	ver := pyVersionRE.FindStringSubmatch(lastLine(res.Output))
	if ver == nil {
		return fmt.Errorf("%s -c …: unexpected version %q", python, strings.TrimSpace(res.Output))
	}
	var cmd system.Cmd
	if ver[1] == "2" {
		// Python 2 has no venv module: the virtualenv tool makes its
		// environments.
		if _, err := s.need(ctx, system.Prerequisite{Tool: "virtualenv", Packages: map[system.Family]string{
			system.FamilyDebian: "virtualenv",
			system.FamilyRHEL:   "python3-virtualenv",
		}}, &v.ch); err != nil {
			return err
		}
		args := []string{"--python", python}
		if v.site {
			args = append(args, "--system-site-packages")
		}
		if clear {
			args = append(args, "--clear")
		}
		for _, d := range v.search {
			args = append(args, "--extra-search-dir", d)
		}
		cmd = system.Cmd{Tool: "virtualenv", Args: append(args, "--", v.dir)}
	} else {
		// Debian keeps ensurepip (which puts pip in the environment) in
		// pythonX.Y-venv.
		mm := ver[1] + "." + ver[2]
		if fam == system.FamilyDebian && v.pyBin != "" {
			if _, err := s.fs.Stat("/usr/lib/python" + mm + "/ensurepip/__init__.py"); err != nil {
				if err := v.ensurePackage(ctx, "python"+mm+"-venv"); err != nil {
					return err
				}
			}
		}
		args := []string{"-m", "venv"}
		if v.site {
			args = append(args, "--system-site-packages")
		}
		if clear {
			args = append(args, "--clear")
		}
		cmd = system.Cmd{Tool: python, Args: append(args, "--", v.dir)}
	}
	if clear {
		// The requirements go into the new environment again.
		_ = s.fs.Remove(path.Join(v.dir, reqMarker))
	}
	res, err = s.sys.Check(ctx, cmd)
	v.out.WriteString(res.Output)
	if err != nil {
		return err
	}
	v.ch.add("%s with %s%s", why, python, v.siteNote())
	return nil
}

// ensurePackage installs a distribution package the environment needs.
func (v *venv) ensurePackage(ctx context.Context, pkg string) error {
	m, err := v.s.sys.Packages()
	if err != nil {
		return err
	}
	done, err := m.EnsureInstalled(ctx, pkg)
	if err != nil {
		return fmt.Errorf("installing %s (needed to make the environment): %w", pkg, err)
	}
	if len(done) > 0 {
		v.ch.add("%s installed (prerequisite)", pkg)
	}
	return nil
}

// siteSetting corrects include-system-site-packages in pyvenv.cfg, the
// one thing that differs between environments made with and without
// --system-site-packages. An environment without pyvenv.cfg (made by an
// old virtualenv) is left as it is.
func (v *venv) siteSetting() error {
	p := path.Join(v.dir, "pyvenv.cfg")
	data, err := v.s.fs.ReadFile(p, 1<<20)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	want := "false"
	if v.site {
		want = "true"
	}
	lines := strings.Split(string(data), "\n")
	found := false
	for i, line := range lines {
		k, val, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(k) != "include-system-site-packages" {
			continue
		}
		found = true
		if strings.EqualFold(strings.TrimSpace(val), want) {
			return nil
		}
		lines[i] = "include-system-site-packages = " + want
	}
	if !found {
		lines = append([]string{"include-system-site-packages = " + want}, lines...)
	}
	v.ch.add("system site packages %s", map[bool]string{true: "enabled", false: "disabled"}[v.site])
	if v.s.test {
		return nil
	}
	fi, err := v.s.fs.Stat(p)
	if err != nil {
		return err
	}
	return v.s.fs.WriteFileAtomic(p, []byte(strings.Join(lines, "\n")), fi.Mode().Perm(), -1, -1)
}

// requirements installs the requirements file when it (or the search
// directories) changed since last installed, or when force (a new
// environment).
func (v *venv) requirements(ctx context.Context, force bool) (state.Result, error) {
	s := v.s
	data, err := s.fs.ReadFile(v.req, 16<<20)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return v.fail("requirements-file %s does not exist (create it first, e.g. with linux.file)", v.req)
		}
		return v.fail("requirements-file: %v", err)
	}
	sum := sha256.New()
	sum.Write(data)
	for _, d := range v.search {
		sum.Write([]byte("\x00" + d))
	}
	line := "sha256:" + hex.EncodeToString(sum.Sum(nil)) + " " + v.req + "\n"
	marker := path.Join(v.dir, reqMarker)
	if !force {
		if old, err := s.fs.ReadFile(marker, 4096); err == nil && string(old) == line {
			return state.Result{}, nil
		}
	}
	if s.test {
		v.ch.add("requirements of %s installed", v.req)
		return state.Result{}, nil
	}
	args := []string{"-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--requirement", v.req}
	for _, d := range v.search {
		args = append(args, "--find-links", d)
	}
	res, err := s.sys.Check(ctx, system.Cmd{Tool: path.Join(v.dir, "bin", "python"), Args: args, Dir: path.Dir(v.req), Env: pipEnv})
	v.out.WriteString(res.Output)
	if err != nil {
		return v.fail("installing requirements-file %s: %v", v.req, toolFailed(err, "check the requirements, extra-search-dir and the index the instance's pip.conf names"))
	}
	if err := s.fs.WriteFileAtomic(marker, []byte(line), 0o644, -1, -1); err != nil {
		return v.fail("%v", err)
	}
	v.ch.add("requirements of %s installed", v.req)
	return state.Result{}, nil
}
