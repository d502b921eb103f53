package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/textcut"
)

// exitNotRunning is `opsagent status`'s exit code when no agent runs, as
// LSB init scripts use 3 for "program is not running".
const exitNotRunning = 3

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show what the running agent is doing (exit 0: running, 3: not running)",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print as a JSON object"}},
		Action: func(_ context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			cfg, err := config.Load(p.configFile)
			if err != nil {
				fmt.Fprintf(cmd.Root().ErrWriter, "opsagent: warning: %s; looking for the status at the default paths\n", oneLine(err.Error()))
				cfg = nil
			}
			l := p.layout(cfg)
			pid, running, lockErr := fsutil.HolderPID(l.LockFile())
			snap, readErr := statusfile.Read(l.StatusFile())
			report := statusReport{Running: running, PID: pid, Snapshot: snap}
			if readErr != nil {
				report.Error = readErr.Error()
			}
			w := cmd.Root().Writer
			if cmd.Bool("json") {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				if err := enc.Encode(report); err != nil {
					return err
				}
			} else {
				printStatus(w, report, time.Now())
			}
			switch {
			case lockErr != nil:
				return lockErr
			case !running:
				return cli.Exit("", exitNotRunning)
			case readErr != nil && !errors.Is(readErr, statusfile.ErrNoStatus):
				return readErr
			}
			return nil
		},
	}
}

type statusReport struct {
	Running  bool                `json:"running"`
	PID      int                 `json:"pid,omitempty"`
	Error    string              `json:"error,omitempty"`
	Snapshot statusfile.Snapshot `json:"status"`
}

// printStatus prints the report for a person. Every string in it came
// from elsewhere (the backend's close reason, a state's output, a release
// server's answer, the config), so each goes through textcut.Printable
// (p): nothing in status.json can drive the terminal.
func printStatus(w io.Writer, r statusReport, now time.Time) {
	s := r.Snapshot
	p := textcut.Printable
	if r.Running && r.PID == 0 {
		// Held, but the pid in the lock file is not a process that has it open.
		fmt.Fprintf(w, "agent:      running, pid unknown (version %s, instance %s, app %s)\n", p(s.AgentVersion), p(s.InstanceID), p(s.AppID))
	} else if r.Running {
		fmt.Fprintf(w, "agent:      running as pid %d (version %s, instance %s, app %s)\n", r.PID, p(s.AgentVersion), p(s.InstanceID), p(s.AppID))
	} else {
		fmt.Fprintln(w, "agent:      not running")
	}
	if r.Error != "" {
		fmt.Fprintf(w, "status:     %s\n", p(r.Error))
		return
	}
	if !r.Running {
		fmt.Fprintf(w, "last seen:  %s (what follows is the last status it wrote)\n", s.UpdatedAt.Format(time.RFC3339))
	}
	if sys := s.System; sys != nil {
		line := sys.Distro
		if sys.PackageManager != "" {
			line += ", packages with " + sys.PackageManager
		}
		line += ", services with " + string(sys.Init)
		if sys.Chroot {
			line += " (tools run chrooted into the root)"
		}
		if sys.Error != "" {
			line += " (" + sys.Error + ")"
		}
		fmt.Fprintf(w, "system:     %s\n", p(line))
	}
	conn := "disconnected"
	if s.Connection.Connected {
		conn = "connected"
	}
	since := ""
	if !s.Connection.Since.IsZero() {
		since = " since " + s.Connection.Since.Format(time.RFC3339)
	}
	fmt.Fprintf(w, "backend:    %s %s%s\n", p(s.Connection.Backend), conn, since)
	if s.Connection.LastError != "" {
		fmt.Fprintf(w, "last error: %s\n", p(s.Connection.LastError))
	}
	c := s.Connection
	fmt.Fprintf(w, "outbox:     %d StateLogs queued (%s), %d dropped%s; %d bad frames ignored\n", c.OutboxDepth, byteSize(c.OutboxBytes), c.DroppedLogs, droppedBy(c.DroppedBy), c.DroppedFrames)
	if c.OutboxStorage != "" && c.OutboxStorage != "disk" {
		fmt.Fprintf(w, "outbox:     in %s (StateLogs will not survive a restart)\n", p(c.OutboxStorage))
	}
	if c.Protocol == 1 {
		fmt.Fprintln(w, "delivery:   protocol 1 (the backend does not acknowledge StateLogs)")
	}
	e := s.Engine
	if e.RecipeVersion == 0 {
		fmt.Fprintln(w, "recipe:     none yet")
	} else {
		fmt.Fprintf(w, "recipe:     version %d, %d states; round %d (%d succeeded, %d failed)\n", e.RecipeVersion, e.States, e.Round, e.RoundsSucceeded, e.RoundsFailed)
		switch {
		case e.WaitingOn != "":
			fmt.Fprintf(w, "now:        waiting for the backend to release %s\n", p(e.WaitingOn))
		case e.StateIndex >= 0:
			fmt.Fprintf(w, "now:        running state %d/%d %s\n", e.StateIndex+1, e.States, p(e.StateID))
		case !e.NextRoundAt.IsZero():
			fmt.Fprintf(w, "now:        %s, next round in %s\n", p(e.Phase), e.NextRoundAt.Sub(now).Round(time.Second))
		default:
			fmt.Fprintf(w, "now:        %s\n", p(e.Phase))
		}
	}
	ids := make([]string, 0, len(e.LastResults))
	for id := range e.LastResults {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	width := 0
	for _, id := range ids {
		width = max(width, len(p(id)))
	}
	for _, id := range ids {
		res := e.LastResults[id]
		mark := "ok  "
		if !res.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %-*s  %s\n", mark, width, p(id), oneLine(res.Comment))
	}
	if line := updateLine(s); line != "" {
		fmt.Fprintf(w, "update:     %s\n", p(line))
	}
	for _, ie := range s.InitErrors {
		fmt.Fprintf(w, "init error: %s\n", p(ie))
	}
}

// updateLine is the update's line of the status: the pending update's
// stage (held, downloading N of M, ready), or the last update's outcome.
func updateLine(s statusfile.Snapshot) string {
	e, u := s.Engine, s.Update
	if u != nil && u.Version != e.PendingUpdate {
		u = nil // the last update's record, not the pending one's
	}
	switch {
	case e.PendingUpdate != "" && e.UpdateStage == "held":
		return e.PendingUpdate + " pending (prepared once the resumed recipe's first round ends)"
	case e.PendingUpdate != "" && e.UpdateStage == "ready":
		return e.PendingUpdate + " downloaded and verified; installed when the round ends"
	case e.PendingUpdate != "" && u != nil:
		return describeStep(u)
	case e.PendingUpdate != "":
		return e.PendingUpdate + " pending (installed between rounds)"
	case s.Update != nil:
		return describeStep(s.Update)
	}
	return e.UpdateNote
}

// describeStep renders where an update stands: "1.0 → 2.0: downloading
// 1.2 MiB of 30.0 MiB (why the last attempt was interrupted)".
func describeStep(u *statusfile.Update) string {
	line := fmt.Sprintf("%s %s", u.Version, u.Phase)
	if u.From != "" {
		line = fmt.Sprintf("%s → %s: %s", u.From, u.Version, u.Phase)
	}
	if u.Phase == "downloading" {
		line += " " + byteSize(u.Bytes)
		if u.Total > 0 {
			line += " of " + byteSize(u.Total)
		}
	}
	if u.Reason != "" {
		line += " (" + u.Reason + ")"
	}
	return line
}

// droppedBy is " (reason n, …)", reasons in a fixed order.
func droppedBy(by map[string]int64) string {
	reasons := make([]string, 0, len(by))
	for r := range by {
		reasons = append(reasons, r)
	}
	sort.Strings(reasons)
	for i, r := range reasons {
		reasons[i] = fmt.Sprintf("%s %d", r, by[r])
	}
	if len(reasons) == 0 {
		return ""
	}
	return " (" + strings.Join(reasons, ", ") + ")"
}

func byteSize(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
