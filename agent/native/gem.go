package native

import (
	"context"
	"fmt"
	"os"
	"path"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// gemPackage is common.gem.package: Ruby gems installed with the
// instance's gem (`gem install NAME -v VERSION --no-document`) into
// RubyGems' installation directory (/var/lib/gems/X.Y.0 with Debian's
// ruby), from the sources the instance's gemrc names; removed with `gem
// uninstall --all --executables --ignore-dependencies`.
//
// RubyGems keeps several versions of a gem side by side: a version is in
// place when that version is installed (others are left, as gem and
// Salt leave them), latest when the newest version the sources offer is
// installed, and removed takes every version away.
//
// Installed versions are read from the specifications directories of
// RubyGems' paths (asked of `gem environment` once, and again only when
// gem or a gemrc changes): a round with nothing to do runs no ruby.
// `latest` asks the sources (`gem list --remote --exact`, one run for all
// installed gems that want latest).
func (e *Executor) gemPackage(ctx context.Context, s *stateRun) (state.Result, error) {
	specs, err := pkgSpecs(s.p, "name", gemRules)
	if err != nil {
		return state.Result{}, err
	}
	return convergePackages(ctx, s, &gemManager{s: s, cache: &e.lang}, specs)
}

var (
	gemNameRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
	gemVersionRE = regexp.MustCompile(`^[0-9]+(\.[0-9A-Za-z]+)*$`)
)

var gemRules = pkgRules{
	name: func(n string) string {
		if !gemNameRE.MatchString(n) {
			return "a gem name has letters, digits, '.', '_' and '-'"
		}
		return ""
	},
	version: func(v string) string {
		if !gemVersionRE.MatchString(v) {
			return "is not an exact version"
		}
		return ""
	},
}

// gemFacts is where RubyGems installs and finds gems.
type gemFacts struct {
	dir   string   // the installation directory (gem install writes here)
	paths []string // every directory gems are found in
}

type gemManager struct {
	s     *stateRun
	cache *langCache
}

func (m *gemManager) noun() string  { return "gem" }
func (m *gemManager) scope() string { return "" }

func (m *gemManager) prerequisite() system.Prerequisite {
	// Debian's ruby brings gem (2014: rubygems, now a transitional
	// package); on RHEL gem is its own package.
	return system.Prerequisite{Tool: "gem", Packages: map[system.Family]string{
		system.FamilyDebian: "ruby",
		system.FamilyRHEL:   "rubygems",
	}}
}

func (m *gemManager) key(name string) string { return name }

// sameVersion: RubyGems compares 1.0 and 1.0.0 as equal.
func (m *gemManager) sameVersion(a, b string) bool { return trimZeros(a) == trimZeros(b) }

func (m *gemManager) facts(ctx context.Context) (*gemFacts, error) {
	real, id := toolIdentity(m.s, "gem")
	if real == "" {
		return nil, nil
	}
	home := homeDir(m.s)
	key := id + identity(m.s.fs, "/etc/gemrc", home+"/.gemrc") + os.Getenv("GEM_HOME") + "|" + os.Getenv("GEM_PATH") + "|" + os.Getenv("GEMRC")
	v, err := m.cache.get("gem "+real, key, func() (any, error) {
		res, err := m.s.sys.Check(ctx, system.Cmd{Tool: "gem", Args: []string{"environment"}})
		if err != nil {
			return nil, fmt.Errorf("asking gem for its paths: %w", err)
		}
		f := parseGemEnvironment(res.Output)
		if f.dir == "" || len(f.paths) == 0 {
			return nil, fmt.Errorf("gem environment: no INSTALLATION DIRECTORY or GEM PATHS in %q", strings.TrimSpace(res.Output))
		}
		return f, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*gemFacts), nil
}

// parseGemEnvironment reads `gem environment`: the item "INSTALLATION
// DIRECTORY: DIR", and the item "GEM PATHS:" followed by one more
// indented item per directory.
func parseGemEnvironment(out string) *gemFacts {
	f := &gemFacts{}
	inPaths := false
	for _, line := range strings.Split(out, "\n") {
		t := strings.TrimSpace(line)
		item, isItem := strings.CutPrefix(t, "- ")
		if !isItem {
			inPaths = false
			continue
		}
		indent := len(line) - len(strings.TrimLeft(line, " "))
		switch {
		case inPaths && indent > 2 && strings.HasPrefix(item, "/"):
			f.paths = append(f.paths, item)
			continue
		case strings.HasPrefix(item, "INSTALLATION DIRECTORY:"):
			f.dir = strings.TrimSpace(strings.TrimPrefix(item, "INSTALLATION DIRECTORY:"))
		}
		inPaths = item == "GEM PATHS:"
	}
	if f.dir != "" && !contains(f.paths, f.dir) {
		f.paths = append([]string{f.dir}, f.paths...)
	}
	return f
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// installed reads NAME-VERSION[-PLATFORM].gemspec in each path's
// specifications directory, and specifications/default (the gems that
// come with ruby).
func (m *gemManager) installed(ctx context.Context, keys []string) (map[string][]installedPkg, error) {
	out := map[string][]installedPkg{}
	f, err := m.facts(ctx)
	if err != nil || f == nil {
		return out, err
	}
	for _, dir := range f.paths {
		for _, sub := range []string{"specifications", "specifications/default"} {
			specDir := path.Join(dir, sub)
			names, err := dirNames(m.s.fs, specDir)
			if err != nil {
				return nil, err
			}
			for _, n := range names {
				for _, k := range keys {
					v, ok := gemSpecVersion(n, k)
					if !ok || hasVersion(m, out[k], v) {
						continue
					}
					out[k] = append(out[k], installedPkg{version: v, where: path.Join(specDir, n)})
				}
			}
		}
	}
	return out, nil
}

// gemSpecVersion is the version in a specification file name of gem
// name: net-telnet-0.2.0.gemspec is net-telnet 0.2.0, not net; a
// platform follows the version (nokogiri-1.15.0-x86_64-linux).
func gemSpecVersion(file, name string) (string, bool) {
	rest, ok := strings.CutPrefix(file, name+"-")
	if !ok {
		return "", false
	}
	if rest, ok = strings.CutSuffix(rest, ".gemspec"); !ok || rest == "" || rest[0] < '0' || rest[0] > '9' {
		return "", false
	}
	v, _, _ := strings.Cut(rest, "-")
	return v, gemVersionRE.MatchString(v)
}

// removable: gem uninstalls from its installation directory only; a gem
// that came with ruby (a default gem) or with a distribution package
// stays.
func (m *gemManager) removable(p installedPkg) string {
	if strings.Contains(p.where, "/specifications/default/") {
		return fmt.Sprintf("it is a default gem of ruby (%s), which gem cannot uninstall", p.where)
	}
	f, err := m.facts(context.Background())
	if err == nil && f != nil && strings.HasPrefix(p.where, f.dir+"/") {
		return ""
	}
	return fmt.Sprintf("it was installed by the system's package manager (%s), not gem: remove its distribution package (linux.apt.package or linux.yum.package)", p.where)
}

const gemHint = "check the name, the version and the sources the instance's gemrc names"

// install runs gem install once per gem: gem takes one --version per
// command.
func (m *gemManager) install(ctx context.Context, pkgs []pkgSpec) (string, error) {
	var out strings.Builder
	for _, p := range pkgs {
		args := []string{"install", "--no-document"}
		if p.want != "" {
			args = append(args, "--version", p.want)
		}
		// No "--": gem's parser drops what follows it. Names are
		// checked (gemRules) and never start with '-'.
		args = append(args, p.name)
		res, err := m.s.sys.Check(ctx, system.Cmd{Tool: "gem", Args: args})
		out.WriteString(res.Output)
		if err != nil {
			return out.String(), toolFailed(err, gemHint)
		}
	}
	return out.String(), nil
}

// remove uninstalls every version with its executables, without asking
// about gems that depend on it (there is no one to answer).
func (m *gemManager) remove(ctx context.Context, names []string) (string, error) {
	args := append([]string{"uninstall", "--all", "--executables", "--ignore-dependencies"}, names...)
	res, err := m.s.sys.Check(ctx, system.Cmd{Tool: "gem", Args: args})
	if err != nil {
		return res.Output, toolFailed(err, "gem could not remove it")
	}
	return res.Output, nil
}

// gemListRE is a line of `gem list --remote`: "name (2.0.0)" or, with
// platforms, "name (1.15.0 x86_64-linux, 1.15.0)".
var gemListRE = regexp.MustCompile(`^(\S+) \(([^()]+)\)$`)

// latest asks the sources for the newest version of each gem, in one run.
func (m *gemManager) latest(ctx context.Context, names []string) (map[string]string, error) {
	args := append([]string{"list", "--remote", "--exact"}, names...)
	res, err := m.s.sys.Check(ctx, system.Cmd{Tool: "gem", Args: args})
	if err != nil {
		return nil, toolFailed(fmt.Errorf("asking the gem sources: %w", err), gemHint)
	}
	found := parseGemList(res.Output)
	out := map[string]string{}
	for _, n := range names {
		v, ok := found[n]
		if !ok {
			return nil, fmt.Errorf("no gem source offers %s (%s)", n, gemHint)
		}
		out[n] = v
	}
	return out, nil
}

func parseGemList(out string) map[string]string {
	found := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		m := gemListRE.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		first, _, _ := strings.Cut(m[2], ",")
		v, _, _ := strings.Cut(strings.TrimSpace(first), " ")
		found[m[1]] = v
	}
	return found
}
