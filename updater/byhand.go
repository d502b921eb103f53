package updater

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/internal/updatephase"
)

// HandOptions configures ByHand (`opsagent update`).
type HandOptions struct {
	Layout  config.Layout
	Request Request
	// Wait is how long to follow an update that the running agent applies
	// (0: ask and return).
	Wait time.Duration
	// Progress reads what the running agent says of its update (its
	// status file), polled while following it.
	Progress func() (Progress, error)
	// Out receives what ByHand has to say, a line at a time.
	Out io.Writer

	// With no agent running, the binary is updated here. Self is the
	// running executable: what is replaced when no installed binary
	// (Layout.Binary) exists. Current is its version.
	Self, Current string
	Source        Source
	EmbeddedKey   string
	HealthTimeout time.Duration
	OnStep        func(Step) // the steps of an update done here
	Runner        proc.Runner

	poll    time.Duration // how often Progress is read; default 200 ms
	noWatch bool          // tests: no detached `cron.sh watch`
}

// Progress is what the running agent's status says of an update.
type Progress struct {
	AgentVersion string            // the version that runs
	Version      string            // the update's version ("" when none)
	Phase        updatephase.Phase // where it stands
	Reason       string            // why it was refused, failed or rolled back
	// Line describes it in one line, printed each time it changes.
	Line string
}

// ByHand is `opsagent update`: with an agent running on the layout it
// leaves the request for it (WriteRequest, then SIGUSR1), and the agent
// downloads the release at once and installs it when its round ends; it
// then follows the agent's progress until the new version runs, the
// update ended otherwise, or Wait passed. With no agent running it
// updates the binary itself and starts the agent, which must confirm
// within the health timeout or the watchdog rolls it back.
func ByHand(ctx context.Context, o HandOptions) error {
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.poll <= 0 {
		o.poll = 200 * time.Millisecond
	}
	l := o.Layout
	if pid, running, _ := fsutil.HolderPID(l.LockFile()); running {
		if pid == 0 {
			// Signalling pid 0 would reach this whole process group.
			return fmt.Errorf("an agent holds %s, but the pid in it is not that process: stop it by hand, then run the update again", l.LockFile())
		}
		return askAgent(ctx, o, pid)
	}
	return updateDirectly(ctx, o)
}

// askAgent leaves the request for the running agent and follows its
// progress until the update is done or ended otherwise.
func askAgent(ctx context.Context, o HandOptions, pid int) error {
	l, req := o.Layout, o.Request
	if err := WriteRequest(l, req); err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		return fmt.Errorf("tell the agent (pid %d): %w", pid, err)
	}
	fmt.Fprintf(o.Out, "asked the running agent (pid %d) to update to %s: it downloads it now and installs it when its round ends\n", pid, req.Version)
	if o.Wait <= 0 || o.Progress == nil {
		return nil
	}
	deadline := time.Now().Add(o.Wait)
	last := ""
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(o.poll):
		}
		p, err := o.Progress()
		if err != nil {
			continue
		}
		if p.Line != last {
			fmt.Fprintln(o.Out, "  "+p.Line)
			last = p.Line
		}
		if p.AgentVersion == req.Version && p.Phase == updatephase.Done {
			fmt.Fprintf(o.Out, "updated to %s\n", req.Version)
			return nil
		}
		if p.Version == req.Version && p.Phase.Unsuccessful() {
			return fmt.Errorf("update to %s %s: %s", req.Version, p.Phase, p.Reason)
		}
	}
	return fmt.Errorf("update to %s: not done after %v; see 'opsagent status' and %s", req.Version, o.Wait, l.LogFile())
}

// updateDirectly updates the binary when no agent runs, then starts the
// agent through the watchdog, so that the new version confirms or is
// rolled back. The watchdog is first rewritten as this binary renders it,
// so that the start follows this binary's rules (below a root other than
// the host's, never through the host's systemd) rather than those of
// whatever script an older release left.
func updateDirectly(ctx context.Context, o HandOptions) error {
	l := o.Layout
	target := o.Self
	if _, err := os.Lstat(l.Binary()); err == nil {
		target = l.Binary() // the installed agent, not wherever this copy runs from
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if o.Runner == nil {
		o.Runner = proc.New()
	}
	u := New(Options{
		Layout: l, Current: o.Current, Target: target, Source: func() Source { return o.Source },
		EmbeddedKey: o.EmbeddedKey, HealthTimeout: o.HealthTimeout, OnStep: o.OnStep, Runner: o.Runner,
		// No agent holds the binary in place: the watchdog's lock keeps its
		// passes from starting the old one in the middle of the swap. The
		// watch starts once the new binary is in place.
		NoWatchdog: true,
	})
	fmt.Fprintf(o.Out, "no agent runs: updating %s directly\n", target)
	release, err := service.HoldWatchdog(l, 30*time.Second)
	if err != nil {
		return err
	}
	r, err := u.Do(ctx, o.Request)
	release()
	if err != nil {
		return err
	}
	how := "start it: " + l.CronScript()
	if l.Root().IsHost() {
		how = "start it: systemctl start opsagent, or " + l.CronScript()
	}
	if _, err := service.EnsureWatchdog(l); err != nil {
		return fmt.Errorf("updated to %s, but the watchdog cannot be written: %w (%s)", r.Version, err, how)
	}
	res, err := o.Runner.Run(ctx, proc.Cmd{Path: "/bin/sh", Args: []string{l.CronScript()}, Timeout: 2 * time.Minute})
	if err == nil && res.ExitCode != 0 {
		err = fmt.Errorf("exit code %d", res.ExitCode)
	}
	if err != nil {
		return fmt.Errorf("updated to %s, but starting the agent failed: %v %s (%s)", r.Version, err, res.Output, how)
	}
	if !o.noWatch {
		if err := service.StartWatch(l); err != nil {
			fmt.Fprintf(o.Out, "warning: %v; cron rolls the update back if it does not confirm\n", err)
		}
	}
	fmt.Fprintf(o.Out, "updated to %s; the agent is starting and must handshake within %v, or it is rolled back\n", r.Version, o.HealthTimeout)
	return nil
}
