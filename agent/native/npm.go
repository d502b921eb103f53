package native

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// npmPackage is common.npm.package: Node.js packages installed with the
// instance's npm, globally (`npm install --global`, under npm's global
// prefix: /usr/local/lib/node_modules with Debian's npm) or, with path,
// in that project directory (`npm install` run there, into
// path/node_modules, recorded in its package.json as npm does), from the
// registry the instance's npmrc names.
//
// Installed versions are read from node_modules/NAME/package.json; the
// global prefix is asked of npm (`npm prefix --global`) once, and again
// only when npm or an npmrc changes: a round with nothing to do runs no
// npm. `latest` asks the registry for the package's latest dist-tag
// (`npm view NAME version`, one npm run per installed package that wants
// latest).
func (e *Executor) npmPackage(ctx context.Context, s *stateRun) (state.Result, error) {
	specs, err := pkgSpecs(s.p, "name", npmRules)
	if err != nil {
		return state.Result{}, err
	}
	dir, err := s.p.str("path")
	if err != nil {
		return state.Result{}, err
	}
	if dir = strings.TrimSpace(dir); dir != "" {
		if dir, err = absPath(s.p, "path"); err != nil {
			return state.Result{}, err
		}
	}
	return convergePackages(ctx, s, &npmManager{s: s, cache: &e.lang, dir: dir}, specs)
}

var (
	// npm package names, scoped or not (old packages may have capitals).
	npmNameRE = regexp.MustCompile(`^(@[A-Za-z0-9~][A-Za-z0-9._~-]*/)?[A-Za-z0-9~][A-Za-z0-9._~-]*$`)
	// An exact semantic version: npm reads 1.2 as the range 1.2.x.
	npmVersionRE = regexp.MustCompile(`^[v=]?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)
)

var npmRules = pkgRules{
	name: func(n string) string {
		if !npmNameRE.MatchString(n) {
			return "an npm package name has letters, digits, '.', '_', '~' and '-', optionally after an @scope/"
		}
		return ""
	},
	version: func(v string) string {
		if !npmVersionRE.MatchString(v) {
			return "is not an exact version of three numbers (npm reads 1.2 as a range)"
		}
		return ""
	},
}

// npmVersion drops what npm drops from an exact version: a leading v or
// = and the build metadata.
func npmVersion(v string) string {
	v = strings.TrimLeft(strings.TrimSpace(v), "v=")
	v, _, _ = strings.Cut(v, "+")
	return v
}

type npmManager struct {
	s     *stateRun
	cache *langCache
	dir   string // the project directory; "" for global packages
}

func (m *npmManager) noun() string { return "npm package" }

func (m *npmManager) scope() string {
	if m.dir != "" {
		return "in " + m.dir
	}
	return "(global)"
}

func (m *npmManager) prerequisite() system.Prerequisite {
	return system.Prerequisite{Tool: "npm", Packages: map[system.Family]string{
		system.FamilyDebian: "npm",
		system.FamilyRHEL:   "npm",
	}}
}

func (m *npmManager) key(name string) string { return name }

func (m *npmManager) sameVersion(a, b string) bool { return npmVersion(a) == npmVersion(b) }

func (m *npmManager) removable(installedPkg) string { return "" }

// modules is the node_modules directory the packages are in; "" when it
// cannot be known because npm is not installed (nothing global is then).
func (m *npmManager) modules(ctx context.Context) (string, error) {
	if m.dir != "" {
		return path.Join(m.dir, "node_modules"), nil
	}
	real, id := toolIdentity(m.s, "npm")
	if real == "" {
		return "", nil
	}
	// npm's global prefix comes from its configuration: the environment,
	// the user's and the global npmrc, npm's built-in npmrc (which
	// belongs to the npm package, so its identity is real's).
	home := homeDir(m.s)
	key := id + identity(m.s.fs, home+"/.npmrc", "/etc/npmrc", "/usr/etc/npmrc", "/usr/local/etc/npmrc") +
		os.Getenv("NPM_CONFIG_PREFIX") + "|" + os.Getenv("npm_config_prefix")
	v, err := m.cache.get("npm "+real, key, func() (any, error) {
		res, err := m.s.sys.Check(ctx, system.Cmd{Tool: "npm", Args: []string{"prefix", "--global"}, Env: npmEnv})
		if err != nil {
			return nil, fmt.Errorf("asking npm for its global prefix: %w", err)
		}
		prefix := lastLine(res.Output)
		if !strings.HasPrefix(prefix, "/") {
			return nil, fmt.Errorf("npm prefix --global: unexpected answer %q", strings.TrimSpace(res.Output))
		}
		return path.Join(prefix, "lib", "node_modules"), nil
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

func (m *npmManager) installed(ctx context.Context, keys []string) (map[string][]installedPkg, error) {
	out := map[string][]installedPkg{}
	mods, err := m.modules(ctx)
	if err != nil || mods == "" {
		return out, err
	}
	for _, k := range keys {
		p := path.Join(mods, k, "package.json")
		data, err := m.s.fs.ReadFile(p, 16<<20)
		if err != nil {
			continue // not installed (or not readable: npm will say)
		}
		var pj struct {
			Version string `json:"version"`
		}
		if json.Unmarshal(data, &pj) != nil || pj.Version == "" {
			continue
		}
		out[k] = []installedPkg{{version: pj.Version, where: path.Join(mods, k)}}
	}
	return out, nil
}

// npmEnv keeps npm to its job: no audit report, funding message or
// update check (each a request to the registry), and no prompt. As
// environment variables, so that npms that do not know one ignore it.
var npmEnv = []string{
	"npm_config_audit=false",
	"npm_config_fund=false",
	"npm_config_update_notifier=false",
	"npm_config_yes=true",
}

const npmHint = "check the name, the version and the registry the instance's npmrc names"

// run runs npm in the project directory (created if missing) or
// globally.
func (m *npmManager) run(ctx context.Context, args ...string) (string, error) {
	c := system.Cmd{Tool: "npm", Env: npmEnv}
	if m.dir != "" {
		if err := m.s.fs.MkdirAll(m.dir, 0o755, nil); err != nil {
			return "", fmt.Errorf("creating %s: %w", m.dir, err)
		}
		c.Dir = m.dir
		c.Args = args
	} else {
		c.Args = append([]string{args[0], "--global"}, args[1:]...)
	}
	res, err := m.s.sys.Check(ctx, c)
	return res.Output, err
}

func (m *npmManager) install(ctx context.Context, pkgs []pkgSpec) (string, error) {
	args := []string{"install", "--"}
	for _, p := range pkgs {
		if p.want == "" {
			args = append(args, p.name)
		} else {
			args = append(args, p.name+"@"+npmVersion(p.want))
		}
	}
	out, err := m.run(ctx, args...)
	if err != nil {
		return out, toolFailed(err, npmHint)
	}
	return out, nil
}

func (m *npmManager) remove(ctx context.Context, names []string) (string, error) {
	out, err := m.run(ctx, append([]string{"uninstall", "--"}, names...)...)
	if err != nil {
		return out, toolFailed(err, "npm could not remove it")
	}
	return out, nil
}

// latest asks the registry for each package's latest dist-tag.
func (m *npmManager) latest(ctx context.Context, names []string) (map[string]string, error) {
	out := map[string]string{}
	for _, n := range names {
		res, err := m.s.sys.Check(ctx, system.Cmd{Tool: "npm", Args: []string{"view", "--", n, "version"}, Env: npmEnv, Dir: m.dir})
		if err != nil {
			return nil, toolFailed(fmt.Errorf("no registry offers %s, or it could not be asked: %w", n, err), npmHint)
		}
		v := lastLine(res.Output)
		if !npmVersionRE.MatchString(v) {
			return nil, fmt.Errorf("npm view %s version: unexpected answer %q", n, strings.TrimSpace(res.Output))
		}
		out[n] = npmVersion(v)
	}
	return out, nil
}
