package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/internal/updatephase"
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
			self, err := os.Executable()
			if err == nil {
				self, err = filepath.EvalSymlinks(self)
			}
			if err != nil {
				return err
			}
			l := p.layout(cfg)
			req := updater.Request{Version: cmd.String("version"), URL: cmd.String("url"),
				Force: cmd.Bool("force"), InsecureSkipSignature: cmd.Bool("insecure-skip-signature")}
			out, term := cmd.Root().Writer, terminalOrNil(cmd.Root().ErrWriter)
			return updater.ByHand(ctx, updater.HandOptions{
				Layout: l, Request: req, Wait: cmd.Duration("wait"), Out: out,
				Progress: func() (updater.Progress, error) { return progressOf(l, req.Version) },
				Self:     self, Current: version.Version, Source: updater.SourceOf(cfg), EmbeddedKey: dist.EmbeddedPublicKey(),
				HealthTimeout: cfg.Agent.UpdateHealthTimeout, OnStep: func(s updater.Step) { printStep(out, term, s) },
			})
		},
	}
}

// progressOf reads what the running agent's status file says of the
// update to want; its line is made printable (textcut.Printable): the
// status carries text from elsewhere (a release server's answer).
func progressOf(l config.Layout, want string) (updater.Progress, error) {
	snap, err := statusfile.Read(l.StatusFile())
	if err != nil {
		return updater.Progress{}, err
	}
	p := updater.Progress{AgentVersion: snap.AgentVersion, Line: textcut.Printable(describeUpdate(snap, want))}
	if u := snap.Update; u != nil {
		p.Version, p.Phase, p.Reason = u.Version, u.Phase, u.Reason
	}
	return p, nil
}

func describeUpdate(s statusfile.Snapshot, want string) string {
	if s.Engine.PendingUpdate == want || (s.Update != nil && s.Update.Version == want) {
		if line := updateLine(s); line != "" {
			return line
		}
	}
	return fmt.Sprintf("agent %s runs", s.AgentVersion)
}

// printStep shows an update's steps; on a terminal the download is a bar.
func printStep(out io.Writer, term *os.File, s updater.Step) {
	if s.Phase == updatephase.Downloading && s.Bytes > 0 {
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
	fmt.Fprintf(out, "  %s %s\n", textcut.Printable(s.Phase.String()), textcut.Printable(s.Version))
}
