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
				fmt.Fprintf(cmd.Root().ErrWriter, "opsagent: warning: %v; looking for the status at the default paths\n", oneLine(err.Error()))
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

func printStatus(w io.Writer, r statusReport, now time.Time) {
	s := r.Snapshot
	if r.Running {
		fmt.Fprintf(w, "agent:      running as pid %d (version %s, instance %s, app %s)\n", r.PID, s.AgentVersion, s.InstanceID, s.AppID)
	} else {
		fmt.Fprintln(w, "agent:      not running")
	}
	if r.Error != "" {
		fmt.Fprintf(w, "status:     %s\n", r.Error)
		return
	}
	if !r.Running {
		fmt.Fprintf(w, "last seen:  %s (what follows is the last status it wrote)\n", s.UpdatedAt.Format(time.RFC3339))
	}
	conn := "disconnected"
	if s.Connection.Connected {
		conn = "connected"
	}
	since := ""
	if !s.Connection.Since.IsZero() {
		since = " since " + s.Connection.Since.Format(time.RFC3339)
	}
	fmt.Fprintf(w, "backend:    %s %s%s\n", s.Connection.Backend, conn, since)
	if s.Connection.LastError != "" {
		fmt.Fprintf(w, "last error: %s\n", s.Connection.LastError)
	}
	c := s.Connection
	fmt.Fprintf(w, "outbox:     %d StateLogs queued (%s), %d dropped%s; %d bad frames ignored\n", c.OutboxDepth, byteSize(c.OutboxBytes), c.DroppedLogs, droppedBy(c.DroppedBy), c.DroppedFrames)
	if c.OutboxStorage != "" && c.OutboxStorage != "disk" {
		fmt.Fprintf(w, "outbox:     in %s (StateLogs will not survive a restart)\n", c.OutboxStorage)
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
			fmt.Fprintf(w, "now:        waiting for the backend to release %s\n", e.WaitingOn)
		case e.StateIndex >= 0:
			fmt.Fprintf(w, "now:        running state %d/%d %s\n", e.StateIndex+1, e.States, e.StateID)
		case !e.NextRoundAt.IsZero():
			fmt.Fprintf(w, "now:        %s, next round in %s\n", e.Phase, e.NextRoundAt.Sub(now).Round(time.Second))
		default:
			fmt.Fprintf(w, "now:        %s\n", e.Phase)
		}
	}
	ids := make([]string, 0, len(e.LastResults))
	for id := range e.LastResults {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	width := 0
	for _, id := range ids {
		width = max(width, len(id))
	}
	for _, id := range ids {
		res := e.LastResults[id]
		mark := "ok  "
		if !res.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %-*s  %s\n", mark, width, id, oneLine(res.Comment))
	}
	switch u := s.Update; {
	case e.PendingUpdate != "":
		fmt.Fprintf(w, "update:     %s pending (applied when the round ends)\n", e.PendingUpdate)
	case u != nil:
		line := fmt.Sprintf("%s %s", u.Version, u.Phase)
		if u.From != "" {
			line = fmt.Sprintf("%s → %s: %s", u.From, u.Version, u.Phase)
		}
		if u.Phase == "downloading" && u.Bytes > 0 {
			line += " " + byteSize(u.Bytes)
			if u.Total > 0 {
				line += " of " + byteSize(u.Total)
			}
		}
		if u.Reason != "" {
			line += " (" + u.Reason + ")"
		}
		fmt.Fprintf(w, "update:     %s\n", line)
	case e.UpdateNote != "":
		fmt.Fprintf(w, "update:     %s\n", e.UpdateNote)
	}
	for _, ie := range s.InitErrors {
		fmt.Fprintf(w, "init error: %s\n", ie)
	}
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
