package virtualenv

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
)

// RepoOptions configures ForRepo.
type RepoOptions struct {
	Dir        string // the environment
	RepoDir    string // the states repository checkout
	Python     string // [salt] python; "" lets the repository decide
	Wheelhouse string // [salt] wheelhouse; "" installs Salt's libraries with pip
	Logger     *slog.Logger
}

// saltModules are what a bundled Salt imports beyond the standard library.
var saltModules = []string{"yaml", "jinja2", "markupsafe", "msgpack"}

// ForRepo makes the environment a states repository needs: built (or kept)
// with the Python it needs (PythonFor), Salt's libraries installed when it
// bundles Salt and they do not import (offline from the wheelhouse, else
// pinned versions with pip), and its requirements.txt. The agent calls it
// between a checkout and bootstrap.sh, and the installer when a states
// repository is configured. A missing Python 2 is an error that says what
// to do.
func ForRepo(ctx context.Context, o RepoOptions) (Env, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	python, why, err := PythonFor(ctx, nil, o.RepoDir, o.Python)
	if err != nil {
		return Env{}, err
	}
	env, err := Ensure(ctx, Options{Dir: o.Dir, Python: python, Logger: log})
	if err != nil {
		return Env{}, err
	}
	if env.Created {
		log.Info("virtualenv ready", "python", env.Version, "why", why)
	}
	if _, err := SaltVersion(o.RepoDir); err == nil {
		if missing := env.Missing(ctx, saltModules...); len(missing) > 0 {
			if err := env.installSaltLibraries(ctx, o.Wheelhouse, missing); err != nil {
				return Env{}, err
			}
		}
	}
	if err := env.InstallRequirements(ctx, filepath.Join(o.RepoDir, "requirements.txt"), o.Wheelhouse); err != nil {
		return Env{}, err
	}
	return env, nil
}

// installSaltLibraries installs the libraries a bundled Salt needs:
// offline from wheelhouse (wheels or plain package directories), else with
// pip at the versions of that Salt's time.
func (e Env) installSaltLibraries(ctx context.Context, wheelhouse string, missing []string) error {
	e.log.Info("installing Salt's libraries into the virtualenv", "missing", strings.Join(missing, ","), "wheelhouse", wheelhouse)
	var err error
	if wheelhouse != "" {
		err = e.InstallFromWheelhouse(ctx, wheelhouse)
	} else {
		err = e.InstallPackages(ctx, SaltRequirements(e.Major())...)
	}
	if err != nil {
		return err
	}
	if still := e.Missing(ctx, missing...); len(still) > 0 {
		return fmt.Errorf("virtualenv %s: %s still cannot be imported after installing Salt's libraries (check [salt] wheelhouse)", e.Dir, strings.Join(still, ", "))
	}
	return nil
}
