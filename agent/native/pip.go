package native

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// pipPackage is common.pip.package: Python packages installed with the
// pip of the instance's Python 3 (`python3 -m pip`), system-wide, from
// the indexes the instance's pip configuration names (pip.conf).
//
// PEP 668: Debian 12 and Ubuntu 23.04+ mark their Python "externally
// managed" (EXTERNALLY-MANAGED beside the standard library), and pip
// then refuses system-wide installs. A user who writes "install this pip
// package" on an instance wants `import pkg` and its command to work for
// every program on it, which is what the module did before these
// releases; so where the marker exists the module passes
// --break-system-packages. Debian's pip installs into /usr/local (its
// purelib) and never removes or overwrites files dpkg installed, so the
// distribution's own packages stay intact; the module refuses to remove a
// package the distribution installed (its metadata says INSTALLER is not
// pip) and says to use linux.apt.package. Where there is no marker
// (RHEL, Amazon Linux, older Ubuntu) pip runs without the option, which
// older pips do not know.
//
// Installed versions are read from the dist-info/egg-info metadata in
// the interpreter's site-packages directories, in sys.path order (the
// directories are asked of Python once, and again only when the
// interpreter changes): a round with nothing to do runs no process.
// `latest` asks the index (`pip index versions`, one pip run per
// package that is installed and wants latest, about a second each):
// that query is the documented cost of latest.
func (e *Executor) pipPackage(ctx context.Context, s *stateRun) (state.Result, error) {
	specs, err := pkgSpecs(s.p, "name", pipRules)
	if err != nil {
		return state.Result{}, err
	}
	return convergePackages(ctx, s, &pipManager{s: s, cache: &e.lang}, specs)
}

var (
	// PEP 508 names, with optional extras (requests[security]).
	pipNameRE = regexp.MustCompile(`^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])(\[[A-Za-z0-9._, -]*\])?$`)
	// An exact PEP 440 version (no specifier operators).
	pipVersionRE = regexp.MustCompile(`^[vV]?[0-9][0-9A-Za-z.+!_-]*$`)
	// PEP 503 normalisation.
	pipNormRE = regexp.MustCompile(`[-_.]+`)
)

var pipRules = pkgRules{
	name: func(n string) string {
		if !pipNameRE.MatchString(n) {
			return "a pip package name has letters, digits, '.', '_' and '-' (and optional [extras])"
		}
		return ""
	},
	version: func(v string) string {
		if !pipVersionRE.MatchString(v) {
			return "is not an exact version"
		}
		return ""
	},
}

// pipNorm is a distribution name as pip compares them (PEP 503).
func pipNorm(name string) string {
	if i := strings.IndexByte(name, '['); i >= 0 {
		name = name[:i]
	}
	return strings.ToLower(pipNormRE.ReplaceAllString(name, "-"))
}

// pipVersionKey compares PEP 440 versions loosely: case, a leading v and
// trailing zero release components do not matter (1.0 == 1.0.0).
func pipVersionKey(v string) string {
	v = strings.TrimPrefix(strings.ToLower(strings.TrimSpace(v)), "v")
	return trimZeros(v)
}

// pipFacts is where the interpreter keeps its packages.
type pipFacts struct {
	// Sites are the user site (when enabled) and the site-packages
	// directories, in the order sys.path has them.
	Sites []string `json:"sites"`
	// Stdlib holds EXTERNALLY-MANAGED where the distribution marks its
	// Python (PEP 668).
	Stdlib string `json:"stdlib"`
}

// pipProbe prints pipFacts. site.getsitepackages lists directories that
// do not exist yet too (sys.path leaves them out), so the answer stays
// true after pip creates one.
const pipProbe = `import json, site, sysconfig
s = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
print(json.dumps({"sites": s + site.getsitepackages(), "stdlib": sysconfig.get_path("stdlib")}))`

// pipPython is the interpreter whose pip the module drives.
const pipPython = "python3"

type pipManager struct {
	s     *stateRun
	cache *langCache
}

func (m *pipManager) noun() string  { return "pip package" }
func (m *pipManager) scope() string { return "" }

func (m *pipManager) prerequisite() system.Prerequisite {
	return system.Prerequisite{Tool: "pip3", Packages: map[system.Family]string{
		system.FamilyDebian: "python3-pip",
		system.FamilyRHEL:   "python3-pip",
	}}
}

func (m *pipManager) key(name string) string { return pipNorm(name) }

func (m *pipManager) sameVersion(a, b string) bool { return pipVersionKey(a) == pipVersionKey(b) }

// facts asks the interpreter for its directories, once per interpreter;
// nil when there is no python3 (then nothing is installed).
func (m *pipManager) facts(ctx context.Context) (*pipFacts, error) {
	real, id := toolIdentity(m.s, pipPython)
	if real == "" {
		return nil, nil
	}
	v, err := m.cache.get("pip "+real, id, func() (any, error) {
		res, err := m.s.sys.Check(ctx, system.Cmd{Tool: pipPython, Args: []string{"-c", pipProbe}})
		if err != nil {
			return nil, fmt.Errorf("asking %s for its site-packages: %w", pipPython, err)
		}
		var f pipFacts
		if err := json.Unmarshal([]byte(lastLine(res.Output)), &f); err != nil || len(f.Sites) == 0 {
			return nil, fmt.Errorf("%s -c …: unexpected answer %q", pipPython, strings.TrimSpace(res.Output))
		}
		return &f, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*pipFacts), nil
}

// lastLine is the last non-empty line of a tool's output, trimmed
// (warnings may come first); "" when there is none.
func lastLine(out string) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// installed reads the metadata directories of the site-packages: the
// first one found of a name wins, as on sys.path.
func (m *pipManager) installed(ctx context.Context, keys []string) (map[string][]installedPkg, error) {
	out := map[string][]installedPkg{}
	f, err := m.facts(ctx)
	if err != nil || f == nil {
		return out, err
	}
	want := map[string]bool{}
	for _, k := range keys {
		want[k] = true
	}
	for _, dir := range f.Sites {
		names, err := dirNames(m.s.fs, dir)
		if err != nil {
			return nil, err
		}
		for _, n := range names {
			name, version, ok := pipMetaName(n)
			if !ok {
				continue
			}
			k := pipNorm(name)
			if !want[k] || len(out[k]) > 0 {
				continue
			}
			p := path.Join(dir, n)
			if v := m.metadataVersion(p); v != "" {
				version = v
			}
			out[k] = []installedPkg{{version: version, where: p}}
		}
	}
	return out, nil
}

// pipMetaName splits NAME-VERSION.dist-info or NAME-VERSION[-pyX.Y].egg-info.
func pipMetaName(entry string) (name, version string, ok bool) {
	base, found := strings.CutSuffix(entry, ".dist-info")
	if !found {
		if base, found = strings.CutSuffix(entry, ".egg-info"); !found {
			return "", "", false
		}
	}
	name, rest, ok := strings.Cut(base, "-")
	if !ok || name == "" || rest == "" {
		return "", "", false
	}
	version, _, _ = strings.Cut(rest, "-")
	return name, version, true
}

// metadataVersion reads Version from METADATA (dist-info) or PKG-INFO
// (an egg-info directory, or the egg-info file itself).
func (m *pipManager) metadataVersion(p string) string {
	var data []byte
	var err error
	switch {
	case strings.HasSuffix(p, ".dist-info"):
		data, err = m.s.fs.ReadFile(p+"/METADATA", 1<<20)
	default:
		if data, err = m.s.fs.ReadFile(p+"/PKG-INFO", 1<<20); err != nil {
			data, err = m.s.fs.ReadFile(p, 1<<20)
		}
	}
	if err != nil {
		return ""
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break // the headers end here
		}
		if v, ok := strings.CutPrefix(line, "Version:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// removable: pip removes what pip installed. A package the distribution
// installed (Debian's egg-info in /usr/lib/python3/dist-packages, a
// dist-info whose INSTALLER is debian or rpm) is left to its package
// manager: Debian's pip refuses, and other pips would break the
// distribution's package.
func (m *pipManager) removable(p installedPkg) string {
	if strings.HasSuffix(p.where, ".dist-info") {
		if inst, err := m.s.fs.ReadFile(p.where+"/INSTALLER", 4096); err == nil && strings.TrimSpace(string(inst)) == "pip" {
			return ""
		}
	}
	return fmt.Sprintf("it was installed by the system's package manager (%s), not pip: remove its distribution package (linux.apt.package or linux.yum.package)", p.where)
}

// baseArgs are given to every pip run: no questions, no self-update
// check, and, where the distribution marks its Python externally
// managed, the PEP 668 override (see pipPackage).
func (m *pipManager) baseArgs(ctx context.Context, cmd ...string) ([]string, error) {
	args := append([]string{"-m", "pip"}, cmd...)
	args = append(args, "--disable-pip-version-check", "--no-input")
	f, err := m.facts(ctx)
	if err != nil {
		return nil, err
	}
	if f != nil && f.Stdlib != "" {
		if _, err := m.s.fs.Stat(path.Join(f.Stdlib, "EXTERNALLY-MANAGED")); err == nil {
			args = append(args, "--break-system-packages")
		}
	}
	return args, nil
}

// pipEnv keeps pip from warning about running as root on every install:
// the module installs system-wide on purpose (an environment variable,
// which pips that do not know the option ignore).
var pipEnv = []string{"PIP_ROOT_USER_ACTION=ignore"}

const pipHint = "check the name, the version and the index the instance's pip.conf names"

func (m *pipManager) install(ctx context.Context, pkgs []pkgSpec) (string, error) {
	args, err := m.baseArgs(ctx, "install")
	if err != nil {
		return "", err
	}
	args = append(args, "--")
	for _, p := range pkgs {
		if p.want == "" {
			args = append(args, p.name)
		} else {
			args = append(args, p.name+"=="+p.want)
		}
	}
	res, err := m.s.sys.Check(ctx, system.Cmd{Tool: pipPython, Args: args, Env: pipEnv})
	if err != nil {
		return res.Output, toolFailed(err, pipHint)
	}
	return res.Output, nil
}

func (m *pipManager) remove(ctx context.Context, names []string) (string, error) {
	args, err := m.baseArgs(ctx, "uninstall", "--yes")
	if err != nil {
		return "", err
	}
	args = append(args, "--")
	for _, n := range names {
		args = append(args, pipNorm(n))
	}
	res, err := m.s.sys.Check(ctx, system.Cmd{Tool: pipPython, Args: args, Env: pipEnv})
	if err != nil {
		return res.Output, toolFailed(err, "pip could not remove it")
	}
	return res.Output, nil
}

// latest asks the index for each package's newest version with `pip
// index versions` (pip 21.2 and later: Debian 12, Ubuntu 22.04+, RHEL 9,
// Amazon Linux 2023), whose first line is "NAME (VERSION)". It honours
// the instance's pip configuration and skips pre-releases and files this
// Python cannot install, as an install does.
func (m *pipManager) latest(ctx context.Context, names []string) (map[string]string, error) {
	out := map[string]string{}
	for _, n := range names {
		args := []string{"-m", "pip", "index", "versions", "--disable-pip-version-check", "--no-input", "--", pipNorm(n)}
		res, err := m.s.sys.Check(ctx, system.Cmd{Tool: pipPython, Args: args, Env: pipEnv})
		if err != nil {
			return nil, toolFailed(fmt.Errorf("no index offers %s, or it could not be asked: %w", n, err), pipHint)
		}
		v, ok := parsePipIndexVersions(res.Output)
		if !ok {
			return nil, fmt.Errorf("pip index versions %s: unexpected answer %q", n, strings.TrimSpace(res.Output))
		}
		out[n] = v
	}
	return out, nil
}

// pipIndexRE is the first line of `pip index versions NAME`.
var pipIndexRE = regexp.MustCompile(`(?m)^\S+ \(([^()\s]+)\)\s*$`)

func parsePipIndexVersions(out string) (string, bool) {
	m := pipIndexRE.FindStringSubmatch(out)
	if m == nil {
		return "", false
	}
	return m[1], true
}
