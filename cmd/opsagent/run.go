package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/visualops/opsagent/agent"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/version"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:  "run",
		Usage: "run the agent: connect to the backend and apply recipes in rounds (the service's command)",
		Description: "Reads --config, takes the single-instance lock, and runs until SIGTERM or SIGINT (exit 0).\n" +
			"SIGHUP re-reads the config and restarts the connection and the current round with it.",
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return usageErrorf("run takes no arguments, got %q", c.Args().First())
			}
			root, err := fsutil.NewRoot(c.String("root"))
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(c.Context, syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			reload := make(chan struct{}, 1)
			go forwardSignals(ctx, hup, reload)
			return agent.Run(ctx, agent.Options{
				Root:       root,
				ConfigPath: c.String("config"),
				LogLevel:   c.String("log-level"),
				Stderr:     terminalOrNil(c.App.ErrWriter),
				Reload:     reload,
				Version:    version.Version,
			})
		},
	}
}

func forwardSignals(ctx context.Context, in <-chan os.Signal, out chan<- struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-in:
			select {
			case out <- struct{}{}:
			default:
			}
		}
	}
}

// terminalOrNil returns w when it is a terminal, so that an agent run by
// hand shows its log, while the service's stderr (the journal) is not fed
// a second copy of agent.log.
func terminalOrNil(w any) *os.File {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	return f
}
