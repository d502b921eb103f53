package installer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/internal/version"
	saltbootstrap "github.com/visualops/opsagent/salt-bootstrap"
	"github.com/visualops/opsagent/virtualenv"
)

// cronRuns reports whether a cron daemon runs on this host (and so reads
// /etc/cron.d). Below a temporary root the host's cron reads nothing of
// ours.
func cronRuns(l config.Layout) bool {
	if !l.Root().IsHost() {
		return false
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil {
			continue
		}
		switch strings.TrimSpace(string(comm)) {
		case "cron", "crond", "cronie", "busybox-crond":
			return true
		}
	}
	return false
}

// stepSaltPath builds the virtualenv and, when a states repository is
// configured, clones it (running its bootstrap.sh); the agent would do the
// same before its first Salt state, so a failure here is reported and the
// install goes on.
func (in *installation) stepSaltPath(ctx context.Context) {
	c, l := in.cfg, in.layout
	if strings.EqualFold(c.Agent.Engine, "native") {
		in.rep.add("salt", Skipped, "[agent] engine = native: no virtualenv or states repository needed")
		return
	}
	if in.opts.DryRun {
		what := "build or check the virtualenv " + l.VenvDir()
		if c.Module.Repo != "" {
			what += fmt.Sprintf("; clone %s at %s into %s", c.Module.Repo, c.Module.Tag, l.StatesDir())
		}
		in.rep.add("salt", Planned, "%s", what)
		return
	}
	wheelhouse := ""
	if c.Salt.Wheelhouse != "" {
		wheelhouse = l.Host(c.Salt.Wheelhouse)
	}
	var env virtualenv.Env
	prepare := func(ctx context.Context) error {
		var err error
		env, err = virtualenv.ForRepo(ctx, virtualenv.RepoOptions{Dir: l.VenvDir(), RepoDir: l.StatesDir(), Python: c.Salt.Python,
			Wheelhouse: wheelhouse, Logger: in.opts.Logger})
		return err
	}
	var changes []string
	if c.Module.Repo != "" {
		f := saltbootstrap.New(saltbootstrap.Options{Dir: l.StatesDir(), StampFile: l.StatesStampFile(), ConfigPath: l.ConfigFile(),
			InterfaceVersion: version.StatesInterface, BootstrapScript: c.Module.BootstrapScript, Runner: in.opts.Runner, Logger: in.opts.Logger})
		res, err := f.Ensure(ctx, c.Module.Repo, c.Module.Tag, prepare)
		if err != nil {
			in.rep.add("salt", Failed, "%s (the agent tries again before its first Salt state)", errorComment(err))
			return
		}
		if res.Changed {
			changes = append(changes, fmt.Sprintf("cloned %s at %s", c.Module.Repo, c.Module.Tag))
		}
		if res.Warning != "" {
			in.rep.add("bootstrap", Failed, "%s (a warning: states run anyway)", res.Warning)
		}
	}
	if env.Dir == "" {
		if err := prepare(ctx); err != nil {
			in.rep.add("salt", Failed, "%v", err)
			return
		}
	}
	if env.Created {
		changes = append(changes, fmt.Sprintf("built the virtualenv %s (python %s)", env.Dir, env.Version))
	}
	if p, ok := l.Root().Instance(env.SitePackages); ok {
		changed, err := config.NewOwner(in.freshConfig()).Update(func(c *config.Config) error {
			c.Global.PackagePath = p
			return nil
		})
		if err != nil {
			in.rep.add("salt", Failed, "cannot write [global] package_path: %v", err)
			return
		}
		if changed {
			in.configChanged = true
			changes = append(changes, "[global] package_path = "+p)
		}
	}
	in.report("salt", changes, "virtualenv "+l.VenvDir()+" is healthy")
}

func errorComment(err error) string {
	var fe *saltbootstrap.Error
	if errors.As(err, &fe) {
		return fe.Comment
	}
	return err.Error()
}

// stepService writes the watchdog, its cron entry and, when systemd runs,
// the unit (enabled).
func (in *installation) stepService(ctx context.Context) {
	l := in.layout
	var changes []string
	files := []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{l.CronScript(), service.RenderWatchdog(l), 0o755},
		{l.CronEntry(), service.RenderCronEntry(l), 0o644},
	}
	systemd := service.Systemd(l)
	if systemd {
		files = append(files, struct {
			path string
			data []byte
			mode os.FileMode
		}{l.UnitFile(), service.RenderUnit(l), 0o644})
	}
	unitChanged := false
	for _, f := range files {
		what, err := in.ensureFile(f.path, f.data, f.mode)
		if err != nil {
			in.rep.add("service", Failed, "%v", err)
			return
		}
		if what != "" {
			changes = append(changes, what)
			unitChanged = unitChanged || f.path == l.UnitFile()
		}
	}
	if systemd && !in.opts.DryRun {
		// daemon-reload talks to the running systemd: the host's only.
		if unitChanged && in.host() {
			if err := in.systemctl(ctx, "daemon-reload"); err != nil {
				in.rep.add("service", Failed, "%v", err)
				return
			}
		}
		if err := in.systemctl(ctx, "is-enabled", "--quiet", service.UnitName); err != nil {
			if err := in.systemctl(ctx, "enable", service.UnitName); err != nil {
				in.rep.add("service", Failed, "%v", err)
				return
			}
			what := "enabled opsagent.service"
			if !in.host() {
				what += " with systemctl --root=" + l.Root().Dir() + " (the host's systemd is not told)"
			}
			changes = append(changes, what)
		}
	}
	how := "the cron watchdog"
	if systemd {
		how = "opsagent.service and the cron watchdog"
	}
	in.report("service", changes, how+" in place")
}

// systemctlRoot is the root systemctl acts on: "" (the host's running
// systemd) or, below another root, that root (offline verbs only).
func (in *installation) systemctlRoot() string {
	if in.host() {
		return ""
	}
	return in.layout.Root().Dir()
}

// systemctl runs systemctl for this root (service.Systemctl says how, and
// refuses what must not run below a root other than the host's).
func (in *installation) systemctl(ctx context.Context, args ...string) error {
	argv, err := service.Systemctl(in.systemctlRoot(), args...)
	if err != nil {
		return err
	}
	res, err := in.opts.Runner.Run(ctx, proc.Cmd{Path: argv[0], Args: argv[1:], Timeout: 2 * time.Minute})
	if err == nil && res.ExitCode != 0 {
		err = fmt.Errorf("exit code %d: %s", res.ExitCode, lastLine(res.Output))
	}
	if err != nil {
		return fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
	}
	return nil
}

// stepStart makes sure the agent runs with what was installed: started
// when it does not run, restarted after a new binary, told to reload after
// a new config or token. It returns the agent's pid when known. Below a
// root other than the host's it starts nothing unless --start, and then
// never through systemd (the one that runs is the host's).
func (in *installation) stepStart(ctx context.Context) int {
	l := in.layout
	if !in.host() && !in.opts.Start {
		in.rep.add("start", Skipped, "not started below a root other than / (pass --start to start it)")
		return 0
	}
	pid, running, _ := fsutil.HolderPID(l.LockFile())
	restart := in.binaryChanged
	reload := in.configChanged || in.tokenChanged
	if in.opts.DryRun {
		switch {
		case !running:
			in.rep.add("start", Planned, "start the agent")
		case restart:
			in.rep.add("start", Planned, "restart the agent (pid %d) on the new binary", pid)
		case reload:
			in.rep.add("start", Planned, "tell the agent (pid %d) to reload its config", pid)
		default:
			in.rep.add("start", Unchanged, "the agent runs as pid %d", pid)
		}
		return pid
	}
	if running && pid == 0 && (restart || reload) {
		in.rep.add("start", Failed, "an agent holds %s, but the pid in it is not that process: stop it by hand and run the install again", l.LockFile())
		return 0
	}
	if service.Systemd(l) && in.host() {
		verb := ""
		switch {
		case running && (restart || reload):
			verb = "restart"
		case !running:
			verb = "start"
		}
		if verb == "" {
			in.rep.add("start", Unchanged, "opsagent.service runs (pid %d)", pid)
			return pid
		}
		if err := in.systemctl(ctx, verb, service.UnitName); err != nil {
			in.rep.add("start", Failed, "%v (see journalctl -u opsagent)", err)
			return 0
		}
		newPID, ok := in.waitRunning(pid)
		if !ok {
			in.rep.add("start", Failed, "systemctl %s opsagent.service returned, but no new agent holds %s after %v (see journalctl -u opsagent and %s)",
				verb, l.LockFile(), in.opts.StartTimeout, l.LogFile())
			return 0
		}
		in.rep.add("start", Changed, "systemctl %s opsagent.service: running as pid %d", verb, newPID)
		return newPID
	}
	switch {
	case running && restart:
		if err := stopPID(pid, 15*time.Second); err != nil {
			in.rep.add("start", Failed, "cannot stop the old agent (pid %d): %v", pid, err)
			return 0
		}
	case running && reload:
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			in.rep.add("start", Failed, "cannot tell the agent (pid %d) to reload: %v", pid, err)
			return pid
		}
		in.rep.add("start", Changed, "the agent (pid %d) reloads its config", pid)
		return pid
	case running && pid == 0:
		in.rep.add("start", Unchanged, "an agent runs (the pid in %s is not that process)", l.LockFile())
		return 0
	case running:
		in.rep.add("start", Unchanged, "the agent runs as pid %d", pid)
		return pid
	}
	newPID, err := in.startDetached()
	if err != nil {
		in.rep.add("start", Failed, "%v", err)
		return 0
	}
	who := "the cron watchdog keeps it running"
	switch {
	case !in.host():
		who = "started directly below --root " + l.Root().Dir() + ", not through the host's systemd or cron"
	case !cronRuns(l):
		who = "no systemd and no cron daemon here: nothing restarts it if it stops (run opsagent under a supervisor)"
	}
	in.rep.add("start", Changed, "started the agent as pid %d (%s)", newPID, who)
	return newPID
}

// startDetached starts the installed binary in a session of its own, its
// output appended to bootstrap.log (the agent logs to agent.log; only a
// failure to start prints here), and waits until it holds its lock.
func (in *installation) startDetached() (int, error) {
	l := in.layout
	logf, err := in.fs.AppendLog(l.BootstrapLog())
	if err != nil {
		return 0, fmt.Errorf("start the agent: %w", err)
	}
	defer logf.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	cmd := exec.Command(l.Binary(), service.RunArgs(l)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, logf, logf
	// The agent reads the secret from the config: it need not carry it
	// in its environment for its whole life.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "ENROLL_SECRET=") })
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", l.Binary(), err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(in.opts.StartTimeout)
	for {
		if pid, held, _ := fsutil.HolderPID(l.LockFile()); held && pid > 0 {
			return pid, nil
		}
		select {
		case err := <-exited:
			return 0, fmt.Errorf("the agent exited at once (%v): see %s and %s", err, l.BootstrapLog(), l.LogFile())
		case <-deadline:
			return cmd.Process.Pid, nil
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitRunning waits (up to StartTimeout) until an agent other than old
// holds the lock, and returns its pid; ok is false when none did. A
// start that leaves no agent running is a failure, never "pid 0".
func (in *installation) waitRunning(old int) (pid int, ok bool) {
	deadline := time.Now().Add(in.opts.StartTimeout)
	for {
		if pid, held, _ := fsutil.HolderPID(in.layout.LockFile()); held && pid > 0 && pid != old {
			return pid, true
		}
		if !time.Now().Before(deadline) {
			return 0, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopPID sends SIGTERM to pid and waits until it is gone, SIGKILL after
// grace.
func stopPID(pid int, grace time.Duration) error {
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		return err
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}
