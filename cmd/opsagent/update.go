package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/agent"
	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/internal/version"
	"github.com/visualops/opsagent/updater"
)

func updateCommand() *cli.Command {
	return &cli.Command{
		Name:  "update",
		Usage: "update the agent to another release (waits for the running round to end)",
		Description: "With an agent running, it asks that agent (SIGUSR1), which applies the update when its\n" +
			"round ends, and follows it until the new version has handshaken or the update was refused.\n" +
			"With no agent running, it updates the binary itself and starts the agent, which must\n" +
			"confirm within [agent] update_health_timeout or the watchdog rolls it back.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "version", Usage: "the release, MAJOR.MINOR[.PATCH]", Required: true},
			&cli.StringFlag{Name: "url", Usage: "opsagent.tgz to fetch (default <base_remote>/<version>/opsagent.tgz)"},
			&cli.BoolFlag{Name: "force", Usage: "allow a version that is not newer than the running one"},
			&cli.BoolFlag{Name: "insecure-skip-signature", Usage: "apply a release without checking its signature (by hand only; never do this for a release you did not build)"},
			&cli.DurationFlag{Name: "wait", Value: 10 * time.Minute, Usage: "how long to follow an update the running agent applies (0: do not wait)"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			if err := dist.CheckVersion(cmd.String("version")); err != nil {
				return usageErrorf("%v", err)
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			cfg, err := config.Load(p.configFile)
			if err != nil {
				return err
			}
			l := p.layout(cfg)
			req := agent.UpdateRequest{Version: cmd.String("version"), URL: cmd.String("url"),
				Force: cmd.Bool("force"), InsecureSkipSignature: cmd.Bool("insecure-skip-signature")}
			out := cmd.Root().Writer
			if pid, running, _ := fsutil.HolderPID(l.LockFile()); running {
				if pid == 0 {
					// Signalling pid 0 would reach this whole process group.
					return fmt.Errorf("an agent holds %s, but the pid in it is not that process: stop it by hand, then run the update again", l.LockFile())
				}
				return askAgent(ctx, l, pid, req, cmd.Duration("wait"), out)
			}
			return updateDirectly(ctx, l, cfg, req, out, terminalOrNil(cmd.Root().ErrWriter))
		},
	}
}

// askAgent leaves the request for the running agent and follows its
// status until the update is done or refused.
func askAgent(ctx context.Context, l config.Layout, pid int, req agent.UpdateRequest, wait time.Duration, out io.Writer) error {
	if err := agent.WriteUpdateRequest(l, req); err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		return fmt.Errorf("tell the agent (pid %d): %w", pid, err)
	}
	fmt.Fprintf(out, "asked the running agent (pid %d) to update to %s: it downloads it now and installs it when its round ends\n", pid, req.Version)
	if wait <= 0 {
		return nil
	}
	deadline := time.Now().Add(wait)
	last := ""
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		snap, err := statusfile.Read(l.StatusFile())
		if err != nil {
			continue
		}
		line := describeUpdate(snap, req.Version)
		if line != last {
			fmt.Fprintln(out, "  "+textcut.Printable(line))
			last = line
		}
		if snap.AgentVersion == req.Version && snap.Update != nil && snap.Update.Phase == "done" {
			fmt.Fprintf(out, "updated to %s\n", req.Version)
			return nil
		}
		if u := snap.Update; u != nil && u.Version == req.Version && (u.Phase == "refused" || u.Phase == "failed" || u.Phase == "rolled-back") {
			return fmt.Errorf("update to %s %s: %s", req.Version, u.Phase, u.Reason)
		}
	}
	return fmt.Errorf("update to %s: not done after %v; see 'opsagent status' and %s", req.Version, wait, l.LogFile())
}

func describeUpdate(s statusfile.Snapshot, want string) string {
	if s.Engine.PendingUpdate == want || (s.Update != nil && s.Update.Version == want) {
		if line := updateLine(s); line != "" {
			return line
		}
	}
	return fmt.Sprintf("agent %s runs", s.AgentVersion)
}

// updateDirectly updates the binary when no agent runs, then starts the
// agent through the watchdog (which uses systemd when it runs), so that
// the new version confirms or is rolled back.
func updateDirectly(ctx context.Context, l config.Layout, cfg *config.Config, req agent.UpdateRequest, out io.Writer, term *os.File) error {
	target, err := os.Executable()
	if err == nil {
		target, err = filepath.EvalSymlinks(target)
	}
	if err != nil {
		return err
	}
	if _, err := os.Stat(l.Binary()); err == nil {
		target = l.Binary() // the installed agent, not wherever this copy runs from
	}
	// No agent holds the binary in place: the watchdog's lock keeps its
	// passes from starting the old one in the middle of the swap. The
	// watch starts once the new binary is in place.
	u := updater.New(updater.Options{
		Layout: l, Current: version.Version, Target: target, Settings: func() *config.Config { return cfg },
		EmbeddedKey: dist.EmbeddedPublicKey(), HealthTimeout: cfg.Agent.UpdateHealthTimeout,
		OnStep: func(s updater.Step) { printStep(out, term, s) }, NoWatchdog: true,
	})
	fmt.Fprintf(out, "no agent runs: updating %s directly\n", target)
	release, err := service.HoldWatchdog(l, 30*time.Second)
	if err != nil {
		return err
	}
	r, err := u.Do(ctx, updater.Request{Version: req.Version, URL: req.URL, Force: req.Force, InsecureSkipSignature: req.InsecureSkipSignature})
	release()
	if err != nil {
		return err
	}
	start := exec.CommandContext(ctx, "/bin/sh", l.CronScript())
	if outp, err := start.CombinedOutput(); err != nil {
		return fmt.Errorf("updated to %s, but starting the agent failed: %v %s (start it: systemctl start opsagent, or %s)", r.Version, err, outp, l.CronScript())
	}
	if err := service.StartWatch(l); err != nil {
		fmt.Fprintf(out, "warning: %v; cron rolls the update back if it does not confirm\n", err)
	}
	fmt.Fprintf(out, "updated to %s; the agent is starting and must handshake within %v, or it is rolled back\n", r.Version, cfg.Agent.UpdateHealthTimeout)
	return nil
}

// printStep shows an update's steps; on a terminal the download is a bar.
func printStep(out io.Writer, term *os.File, s updater.Step) {
	if s.Phase == "downloading" && s.Bytes > 0 {
		if term == nil {
			return
		}
		pct := ""
		if s.Total > 0 {
			pct = fmt.Sprintf(" %3d%%", s.Bytes*100/s.Total)
		}
		fmt.Fprintf(term, "\r  downloading %s%s", byteSize(s.Bytes), pct)
		if s.Bytes == s.Total {
			fmt.Fprintln(term)
		}
		return
	}
	fmt.Fprintf(out, "  %s %s\n", textcut.Printable(s.Phase), textcut.Printable(s.Version))
}
