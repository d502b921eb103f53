package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/system"
	"github.com/visualops/opsagent/virtualenv"
)

// How a catalogue module runs on a host (`opsagent modules`).
const (
	RunsNative      = "native"      // in Go, by the agent
	RunsSalt        = "salt"        // through the Salt bridge and the states repository
	RunsUnavailable = "unavailable" // neither: Why says why and what to do
)

// ModuleInfo is how one catalogue module runs on this host.
type ModuleInfo struct {
	Module string `json:"module"`
	Runs   string `json:"runs"`
	Why    string `json:"why,omitempty"`
}

// ModulesOptions configures Modules.
type ModulesOptions struct {
	Root       fsutil.Root
	ConfigFile string // "" = /etc/opsagent.conf below Root; a missing file means the defaults
	// FindPython2 finds the interpreter the 2014 states repository needs;
	// nil: virtualenv.FindPython2.
	FindPython2 func(context.Context) (string, error)
}

// Modules tells, for every module of the catalogue, how it runs here:
// natively, through the Salt bridge, or not at all and why. It follows
// [agent] engine exactly as the round engine's router does.
func Modules(ctx context.Context, opts ModulesOptions) ([]ModuleInfo, error) {
	if opts.ConfigFile == "" {
		opts.ConfigFile = opts.Root.Path(config.DefaultPath)
	}
	cfg, err := applyConfig(opts.ConfigFile)
	if err != nil {
		return nil, err
	}
	find := opts.FindPython2
	if find == nil {
		find = func(ctx context.Context) (string, error) { return virtualenv.FindPython2(ctx, nil) }
	}
	sys := system.New(system.Options{Root: opts.Root})
	nat := native.New(native.Options{Root: opts.Root, System: sys})
	engine := strings.ToLower(cfg.Agent.Engine)

	// The Salt path, looked at once: the 2014 fork needs Python 2.7.
	saltWhy, saltOK := "", false
	if cfg.Salt.Python != "" {
		saltOK, saltWhy = true, "through the Salt bridge ([salt] python = "+cfg.Salt.Python+")"
	} else if py, err := find(ctx); err == nil {
		saltOK, saltWhy = true, "through the Salt bridge (Python 2.7 at "+py+")"
	} else {
		saltWhy = fmt.Sprintf("the 2014 Salt states repository needs Python 2.7, and this host has none (%v): install python2.7, or set [salt] python", err)
	}
	d, derr := sys.Distro()
	here := d.Family()

	out := make([]ModuleInfo, 0, len(native.Catalogue))
	for _, m := range native.Catalogue {
		info := ModuleInfo{Module: m.Name}
		isNative := nat.Supports(m.Name)
		switch {
		case m.Name == rounds.ModuleComment || m.Name == rounds.ModuleWait:
			info.Runs, info.Why = RunsNative, "run by the agent's round engine"
		case engine == rounds.EngineSalt:
			if saltOK {
				info.Runs, info.Why = RunsSalt, "[agent] engine = salt: "+saltWhy
			} else {
				info.Runs, info.Why = RunsUnavailable, "[agent] engine = salt, but "+saltWhy
			}
		case isNative && refused(nat, m.Name) != "":
			// Known to the native executor, which refuses it: why says why.
			info.Runs, info.Why = RunsUnavailable, refused(nat, m.Name)
		case isNative:
			info.Runs = RunsNative
			if m.Family != "" && derr == nil && here != "" && here != m.Family {
				info.Why = fmt.Sprintf("written for the %s family; this is %s, where its states fail saying so", m.Family, d)
			}
		case engine == rounds.EngineNative:
			info.Runs, info.Why = RunsUnavailable, "not implemented natively, and [agent] engine = native: set engine = auto to run it through the Salt bridge"
		case saltOK:
			info.Runs, info.Why = RunsSalt, "not implemented natively: "+saltWhy
		default:
			info.Runs, info.Why = RunsUnavailable, "not implemented natively, and "+saltWhy
		}
		out = append(out, info)
	}
	return out, nil
}

// refused is why the native executor refuses module ("" when it runs it).
func refused(nat *native.Executor, module string) string {
	why, _ := nat.Refused(module)
	return why
}
