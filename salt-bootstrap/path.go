package saltbootstrap

import (
	"context"
	"log/slog"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/version"
	"github.com/visualops/opsagent/virtualenv"
)

// PathOptions configure the Salt path of one installation: the states
// repository clone and the virtualenv its states run in.
type PathOptions struct {
	Layout config.Layout // the clone, its stamp, the config bootstrap.sh reads, the virtualenv
	// Python is [salt] python: an interpreter named like linux.cmd's
	// shell, a host path not mapped below the root; "" lets the
	// repository decide.
	Python string
	// Wheelhouse is [salt] wheelhouse as a host path ("" installs Salt's
	// libraries with pip).
	Wheelhouse string
	// BootstrapScript is [module] bootstrap, relative to the clone.
	BootstrapScript string
	Runner          proc.Runner // bootstrap.sh; default proc.New()
	Logger          *slog.Logger
}

// PathOptionsFrom converts the config's [salt] and [module] keys into the
// Salt path's options: the one conversion, used by the agent and by
// `opsagent install`.
func PathOptionsFrom(l config.Layout, c *config.Config) PathOptions {
	o := PathOptions{Layout: l, Python: c.Salt.Python, BootstrapScript: c.Module.BootstrapScript}
	if c.Salt.Wheelhouse != "" {
		o.Wheelhouse = l.Host(c.Salt.Wheelhouse)
	}
	return o
}

// Path prepares the Salt path: the one sequence the agent runs before the
// first Salt state of a round and `opsagent install` runs once.
type Path struct {
	opts  PathOptions
	fetch *Fetcher
	env   *virtualenv.Env // as last built or checked
}

// NewPath returns the Salt path of o.
func NewPath(o PathOptions) *Path {
	l := o.Layout
	return &Path{opts: o, fetch: New(Options{
		Dir: l.StatesDir(), StampFile: l.StatesStampFile(), ConfigPath: l.ConfigFile(),
		InterfaceVersion: version.StatesInterface, BootstrapScript: o.BootstrapScript, Runner: o.Runner, Logger: o.Logger,
	})}
}

// PathResult is what Ensure found or did.
type PathResult struct {
	Changed bool   // the checkout changed
	Warning string // bootstrap.sh failed for this checkout: shown, not fatal
	Env     virtualenv.Env
	// EnvChecked: the virtualenv was built or checked by this call (a
	// changed checkout, or the first call): Env.Created says whether it
	// was built anew.
	EnvChecked bool
	// PackagePath is the virtualenv's site-packages as an instance path,
	// for [global] package_path (which bootstrap.sh reads); "" when it is
	// not below the root.
	PackagePath string
}

// Ensure brings the clone to repo at tag (Fetcher.Ensure; nothing to
// clone when repo is "") and the virtualenv to what that checkout needs
// (virtualenv.ForRepo), built between the checkout and bootstrap.sh: its
// Python depends on the repository, and the script copies libraries into
// its site-packages. An unchanged checkout keeps the virtualenv this Path
// last checked; the first call checks it whatever the checkout. A clone
// failure is an *Error whose Comment is the failed state's; a virtualenv
// failure's message is one too.
func (p *Path) Ensure(ctx context.Context, repo, tag string) (PathResult, error) {
	var built *virtualenv.Env
	prepare := func(ctx context.Context) error {
		env, err := virtualenv.ForRepo(ctx, virtualenv.RepoOptions{Dir: p.opts.Layout.VenvDir(), RepoDir: p.opts.Layout.StatesDir(),
			Python: p.opts.Python, Wheelhouse: p.opts.Wheelhouse, Logger: p.opts.Logger})
		if err != nil {
			return err
		}
		built = &env
		return nil
	}
	var res Result
	if repo != "" {
		var err error
		if res, err = p.fetch.Ensure(ctx, repo, tag, prepare); err != nil {
			return PathResult{}, err
		}
	}
	if built == nil && p.env == nil {
		if err := prepare(ctx); err != nil {
			return PathResult{}, err
		}
	}
	if built != nil {
		p.env = built
	}
	out := PathResult{Changed: res.Changed, Warning: res.Warning, Env: *p.env, EnvChecked: built != nil}
	if ip, ok := p.opts.Layout.Root().Instance(p.env.SitePackages); ok {
		out.PackagePath = ip
	}
	return out, nil
}

// FindPython2 finds the Python 2.7 that the 2014 states repository needs,
// as the Salt path finds it (virtualenv.FindPython2): `opsagent modules`
// asks it whether Salt states can run here.
func FindPython2(ctx context.Context) (string, error) { return virtualenv.FindPython2(ctx, nil) }
