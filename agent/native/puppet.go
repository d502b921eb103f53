package native

import (
	"context"
	"fmt"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// The Puppet modules run the installed puppet (the distribution's
// package, installed first when missing: Debian 12 has puppet 7; the
// 2014 fork installed the puppet gem) with the documented arguments. They
// run every round, as in 2014: idempotence is Puppet's own. What Puppet
// reports decides the result: every run uses --detailed-exitcodes, so
// exit 0 is "no change" (the state is in the correct state), 2 is
// "changes applied", and 1, 4 or 6 are failures. Check mode runs Puppet
// with --noop, which changes nothing; its "(noop)" events are the changes
// it would make. arguments become long options
// (tags: a,b → --tags=a,b; a key alone → --key).

// puppetAgentArgs are the one-shot foreground options of a puppet agent
// run (Salt 2014's puppet.run, less --ignorecache, which Puppet no longer
// has).
var puppetAgentArgs = []string{"agent", "--onetime", "--no-daemonize", "--verbose", "--no-usecacheonfailure", "--no-splay", "--show_diff"}

// puppetApply is linux.puppet.apply: each manifest applied with puppet
// apply, in order, stopping at the first that fails. (The 2014 state ran
// puppet only inside its loop over arguments: with no arguments, nothing
// ran at all.)
func (e *Executor) puppetApply(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.puppet.apply"
	manifests, err := s.p.list("manifests")
	if err != nil {
		return state.Result{}, err
	}
	if len(manifests) == 0 {
		return state.Result{}, &badParam{"manifests", "is required: the manifest files to apply"}
	}
	extra, err := s.p.options("arguments")
	if err != nil {
		return state.Result{}, err
	}
	what := "Puppet manifest " + strings.Join(manifests, ", ")
	if len(manifests) > 1 {
		what = "Puppet manifests " + strings.Join(manifests, ", ")
	}
	var ch changes
	missing, err := s.needPuppet(ctx, module, &ch)
	if err != nil {
		return state.Result{}, err
	}
	if missing {
		ch = append(changes{"would be applied once puppet is installed"}, ch...)
		return s.result(what, ch), nil
	}
	var out strings.Builder
	var applied []string
	for _, m := range manifests {
		args := append([]string{"apply"}, longOptions(extra, "=")...)
		args = append(args, m)
		changed, stdout, err := s.puppet(ctx, module, "Manifest "+m, args)
		out.WriteString(stdout)
		if err != nil {
			r := state.Failed(err.Error())
			r.Stdout = out.String()
			return r, nil
		}
		if changed {
			applied = append(applied, m)
		}
	}
	if len(applied) > 0 {
		ch = append(changes{"changes applied by " + strings.Join(applied, ", ")}, ch...)
	}
	r := s.puppetResult(what, ch, "puppet apply")
	r.Stdout = out.String()
	return r, nil
}

// puppetAgent is linux.puppet.agent: one puppet agent run against server.
func (e *Executor) puppetAgent(ctx context.Context, s *stateRun) (state.Result, error) {
	server, err := s.p.required("server")
	if err != nil {
		return state.Result{}, err
	}
	return s.puppetRun(ctx, "linux.puppet.agent", "Puppet agent run against "+server, []string{"--server=" + strings.TrimSpace(server)})
}

// puppetRunOnce is linux.puppet.run: one puppet agent run with the
// configuration already on the instance.
func (e *Executor) puppetRunOnce(ctx context.Context, s *stateRun) (state.Result, error) {
	return s.puppetRun(ctx, "linux.puppet.run", "Puppet run", nil)
}

func (s *stateRun) puppetRun(ctx context.Context, module, what string, more []string) (state.Result, error) {
	extra, err := s.p.options("arguments")
	if err != nil {
		return state.Result{}, err
	}
	var ch changes
	missing, err := s.needPuppet(ctx, module, &ch)
	if err != nil {
		return state.Result{}, err
	}
	if missing {
		ch = append(changes{"would run once puppet is installed"}, ch...)
		return s.result(what, ch), nil
	}
	args := append(append(append([]string(nil), puppetAgentArgs...), more...), longOptions(extra, "=")...)
	changed, stdout, err := s.puppet(ctx, module, what, args)
	if err != nil {
		r := state.Failed(err.Error())
		r.Stdout = stdout
		return r, nil
	}
	if changed {
		ch = append(changes{"changes applied"}, ch...)
	}
	r := s.puppetResult(what, ch, "puppet")
	r.Stdout = stdout
	return r, nil
}

// puppetResult says that Puppet ran and whether it changed anything.
func (s *stateRun) puppetResult(what string, ch changes, tool string) state.Result {
	if len(ch) == 0 {
		return unchanged(fmt.Sprintf("%s is already in the correct state (%s ran and changed nothing)", what, tool))
	}
	return s.result(what, ch)
}

// needPuppet installs puppet when missing and checks the version asked.
func (s *stateRun) needPuppet(ctx context.Context, module string, ch *changes) (missing bool, err error) {
	missing, err = s.need(ctx, prePuppet, ch)
	if err != nil {
		return false, failf("%s: %v", module, err)
	}
	version, err := s.p.str("version")
	if err != nil {
		return false, err
	}
	if version = strings.TrimSpace(version); missing || version == "" || version == "latest" {
		return missing, nil
	}
	m, err := s.sys.Packages()
	if err != nil {
		return false, failf("%s: %v", module, err)
	}
	pkg := prePuppet.Packages[m.Family()]
	have, err := m.Installed(ctx, pkg)
	if err != nil {
		return false, failf("%s: %v", module, err)
	}
	if v, ok := have[pkg]; ok && !versionMatches(v, version) {
		return false, failf("%s: puppet %s is installed (package %s), not version %s: install that version first (linux.apt.package %s=…), or leave version empty", module, v, pkg, version, pkg)
	}
	return false, nil
}

// versionMatches tells whether an installed package version is the
// upstream version asked: 7.23.0 matches 7.23.0-1+deb12u1.
func versionMatches(installed, want string) bool {
	if i := strings.Index(installed, ":"); i >= 0 && !strings.Contains(want, ":") {
		installed = installed[i+1:]
	}
	return installed == want || strings.HasPrefix(installed, want+"-") || strings.HasPrefix(installed, want+"+") || strings.HasPrefix(installed, want+"~")
}

// puppet runs puppet with --detailed-exitcodes (and --noop in check
// mode) and says whether it changed something.
func (s *stateRun) puppet(ctx context.Context, module, what string, args []string) (changed bool, stdout string, err error) {
	args = append(append([]string(nil), args...), "--detailed-exitcodes", "--color=false")
	if s.test {
		args = append(args, "--noop")
	}
	res, err := s.sys.Run(ctx, system.Cmd{Tool: "puppet", Args: args})
	if err != nil {
		return false, res.Output, failf("%s: %v", module, err)
	}
	switch res.ExitCode {
	case 0, 2:
		// With --noop, Puppet 7 exits 0 even when it would change
		// something: its "(noop)" events say so.
		return res.ExitCode == 2 || s.test && strings.Contains(res.Output, "(noop)"), res.Output, nil
	case 4, 6:
		return false, res.Output, failf("%s: %s: puppet reported failures (exit code %d): %s", module, what, res.ExitCode, firstError(res.Output))
	}
	return false, res.Output, failf("%s: %s: puppet failed with exit code %d: %s", module, what, res.ExitCode, firstError(res.Output))
}

// firstError is the first "Error:" line of a tool's output (Puppet's and
// Chef's way of saying what failed), else its last line.
// Facter's complaints about what it cannot read (in containers) come
// only when nothing else does.
func firstError(out string) string {
	facter := ""
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "Error: Facter:"):
			if facter == "" {
				facter = l
			}
		case strings.HasPrefix(l, "Error:") || strings.HasPrefix(l, "ERROR:") || strings.HasPrefix(l, "FATAL:"):
			return abbreviate(l, 300)
		}
	}
	if facter != "" {
		return abbreviate(facter, 300)
	}
	if l := lastLine(out); l != "" {
		return abbreviate(l, 300)
	}
	return "(no output)"
}
