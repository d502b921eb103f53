package installer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/service"
)

// UninstallOptions configures Uninstall.
type UninstallOptions struct {
	Root       fsutil.Root
	ConfigFile string
	// Purge also removes the config, the token, the logs and the state.
	Purge    bool
	Out      io.Writer
	Terminal bool
	Runner   proc.Runner
	Logger   *slog.Logger

	treatAsHost bool // see Options.treatAsHost
}

// Uninstall stops the agent and removes the unit, the cron entry, the
// state and /opt/visualops. It keeps /var/log/visualops, the config and
// the token (an instance re-installed later keeps its identity) unless
// Purge. Removing what is already gone is not an error.
func Uninstall(ctx context.Context, o UninstallOptions) error {
	if o.ConfigFile == "" {
		o.ConfigFile = o.Root.Path(config.DefaultPath)
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.Runner == nil {
		o.Runner = proc.New()
	}
	fsys, err := openFiles(o.Root, false)
	if err != nil {
		return err
	}
	defer fsys.Close()
	in := &installation{opts: Options{Root: o.Root, ConfigFile: o.ConfigFile, Runner: o.Runner, Logger: o.Logger, treatAsHost: o.treatAsHost}, fs: fsys}
	in.layout = config.NewLayout(o.Root, o.ConfigFile, in.loadExisting())
	l := in.layout
	in.rep = &reporter{out: o.Out, terminal: o.Terminal, now: time.Now}
	if !o.Purge {
		in.rep.logTo = in.appendBootstrapLog
	}

	// The watchdog restarts a stopped agent: its cron entry goes first,
	// then any pass in progress, then the agent. Everything is removed
	// inside the root and no link is followed: a link is removed itself.
	var removed []string
	remove := func(path string, all bool) {
		if _, err := in.fs.Lstat(path); errors.Is(err, fs.ErrNotExist) {
			return
		}
		var err error
		if all {
			err = in.fs.RemoveAll(path)
		} else {
			err = in.fs.Remove(path)
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			in.rep.add("remove", Failed, "%v", err)
			return
		}
		removed = append(removed, path)
	}
	remove(l.CronEntry(), false)
	if n := service.StopWatchdogs(l); n > 0 {
		in.rep.add("watchdog", Changed, "stopped the watchdog pass in progress (%d processes)", n)
	}
	in.stopAgent(ctx)
	remove(l.UnitFile(), false)
	remove(l.StateDir(), true)
	remove(l.OptDir(), true)
	if service.Systemd(l) && in.host() {
		_ = in.systemctl(ctx, "daemon-reload")
	}
	if o.Purge {
		remove(l.ConfigFile(), false)
		remove(l.TokenFile(), false)
		remove(l.LogDir(), true)
		remove(l.WatchDir(), true)
	}
	if len(removed) == 0 {
		in.rep.add("remove", Unchanged, "nothing left to remove")
	} else {
		in.rep.add("remove", Changed, "removed %s", joinChanges(removed))
	}
	if in.rep.count(Failed) > 0 {
		return fmt.Errorf("uninstall: %d steps failed (see above)", in.rep.count(Failed))
	}
	kept := "kept the config, the token and the logs (--purge removes them)"
	if o.Purge {
		kept = "purged: nothing of opsagent is left"
	}
	in.rep.note("uninstalled; " + kept)
	return nil
}

// stopAgent stops the service (systemd: disable --now) or the process
// holding the lock. Below a root other than the host's the unit is only
// disabled there (systemctl --root): the host's systemd stops nothing,
// and an agent started there with --start is stopped by its lock.
func (in *installation) stopAgent(ctx context.Context) {
	l := in.layout
	if service.Systemd(l) {
		if _, err := in.fs.Lstat(l.UnitFile()); err == nil {
			if !in.host() {
				if err := in.systemctl(ctx, "disable", service.UnitName); err != nil {
					in.rep.add("stop", Failed, "%v", err)
					return
				}
				in.rep.add("stop", Changed, "disabled opsagent.service with systemctl --root=%s (the host's systemd was not asked to stop anything)", l.Root().Dir())
			} else {
				if err := in.systemctl(ctx, "disable", "--now", service.UnitName); err != nil {
					in.rep.add("stop", Failed, "%v", err)
					return
				}
				in.rep.add("stop", Changed, "stopped and disabled opsagent.service")
				return
			}
		}
	}
	pid, running, _ := fsutil.HolderPID(l.LockFile())
	if !running {
		in.rep.add("stop", Unchanged, "the agent is not running")
		return
	}
	if pid == 0 {
		in.rep.add("stop", Failed, "an agent holds %s, but the pid in it is not that process: stop it by hand", l.LockFile())
		return
	}
	if err := stopPID(pid, 15*time.Second); err != nil {
		in.rep.add("stop", Failed, "cannot stop the agent (pid %d): %v", pid, err)
		return
	}
	in.rep.add("stop", Changed, "stopped the agent (pid %d)", pid)
}
