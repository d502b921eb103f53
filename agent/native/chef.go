package native

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// The Chef modules run the installed chef-client or chef-solo with the
// documented arguments, every round, as in 2014: idempotence is Chef's
// own. No distribution the agent runs on packages Chef any more (Debian
// dropped it after 10; RHEL never had it), and the 2014 fork fetched and
// ran Chef's install script from the internet, which the agent does not
// do: a missing Chef fails the state saying what to install. Chef's
// closing line ("… finished, 3/12 resources updated") says whether the
// run changed something; check mode runs it with --why-run, which
// changes nothing. arguments become options (log_level: warn →
// --log_level warn; a key alone → --key).

// chefUpdated reads the resource count of Chef's closing line.
var chefUpdated = regexp.MustCompile(`finished, (\d+)/(\d+) resources? (?:updated|would have been updated)`)

// chefClient is linux.chef.client: a chef-client run against server.
func (e *Executor) chefClient(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.chef.client"
	server, err := s.p.required("server")
	if err != nil {
		return state.Result{}, err
	}
	args := []string{"--server", strings.TrimSpace(server)}
	if key, err := s.p.str("client_key"); err != nil {
		return state.Result{}, err
	} else if key = strings.TrimSpace(key); key != "" {
		args = append(args, "--client_key", key)
	}
	if conf, err := s.p.str("config"); err != nil {
		return state.Result{}, err
	} else if conf = strings.TrimSpace(conf); conf != "" {
		args = append(args, "--config", conf)
	}
	return s.chef(ctx, module, "chef-client", "Chef client run against "+strings.TrimSpace(server), args)
}

// chefSolo is linux.chef.solo: a chef-solo run.
func (e *Executor) chefSolo(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.chef.solo"
	p := s.p.norm()
	var args []string
	for _, o := range []struct{ param, flag string }{{"config", "--config"}, {"recipe-url", "--recipe-url"}, {"override-runlist", "--override-runlist"}} {
		v, err := p.str(o.param)
		if err != nil {
			return state.Result{}, err
		}
		if v = strings.TrimSpace(v); v != "" {
			args = append(args, o.flag, v)
		}
	}
	return s.chef(ctx, module, "chef-solo", "Chef solo run", args)
}

func (s *stateRun) chef(ctx context.Context, module, tool, what string, args []string) (state.Result, error) {
	extra, err := s.p.options("arguments")
	if err != nil {
		return state.Result{}, err
	}
	version, err := s.p.str("version")
	if err != nil {
		return state.Result{}, err
	}
	if !s.sys.HasTool(tool) {
		d, _ := s.sys.Distro()
		return state.Result{}, failf("%s: %s is not installed, and %s has no package of Chef: install Chef Infra Client (Chef's own packages) first%s", module, tool, d, versionHint(version))
	}
	if version = strings.TrimSpace(version); version != "" && version != "latest" {
		res, err := s.sys.Check(ctx, system.Cmd{Tool: tool, Args: []string{"--version"}})
		if err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
		have := strings.TrimSpace(res.Output[strings.LastIndex(res.Output, ":")+1:])
		if !versionMatches(have, version) && !strings.HasPrefix(have, version+".") {
			return state.Result{}, failf("%s: %s %s is installed, not version %s: install that version first, or leave version empty", module, tool, have, version)
		}
	}
	args = append(append(args, longOptions(extra, "")...), "--no-color")
	if s.test {
		args = append(args, "--why-run")
	}
	res, err := s.sys.Run(ctx, system.Cmd{Tool: tool, Args: args})
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	if res.ExitCode != 0 {
		r := state.Failed(fmt.Sprintf("%s: %s failed with exit code %d: %s", module, what, res.ExitCode, firstError(res.Output)))
		r.Stdout = res.Output
		return r, nil
	}
	var r state.Result
	m := chefUpdated.FindAllStringSubmatch(res.Output, -1)
	switch n := -1; {
	case len(m) > 0:
		n, _ = strconv.Atoi(m[len(m)-1][1])
		if n == 0 {
			r = unchanged(fmt.Sprintf("%s is already in the correct state (%s ran and updated no resource)", what, tool))
			break
		}
		r = s.result(what, changes{fmt.Sprintf("%d of %s resources", n, m[len(m)-1][2])})
	default:
		// No closing line to read: count the run as a change.
		r = s.result(what, changes{"ran " + tool})
	}
	r.Stdout = res.Output
	return r, nil
}

func versionHint(v string) string {
	if v = strings.TrimSpace(v); v != "" && v != "latest" {
		return " (version " + v + ")"
	}
	return ""
}
