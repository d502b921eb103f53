package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/agent"
	"github.com/visualops/opsagent/internal/version"
	"github.com/visualops/opsagent/updater"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:  "run",
		Usage: "run the agent: connect to the backend and apply recipes in rounds (the service's command)",
		Description: "Reads the config, takes the single-instance lock, and runs until SIGTERM or SIGINT (exit 0).\n" +
			"SIGHUP re-reads the config and, once it has loaded, restarts the connection and the current round with it\n" +
			"(queued StateLogs are kept); a config that does not load is logged and changes nothing.\n" +
			"SIGUSR1 takes a request left by 'opsagent update'.\n" +
			"After a self-update it re-executes the new binary with the same arguments, keeping the lock.",
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			reload := make(chan struct{}, 1)
			go forwardSignals(ctx, hup, reload)
			usr1 := make(chan os.Signal, 1)
			signal.Notify(usr1, syscall.SIGUSR1)
			defer signal.Stop(usr1)
			updateNow := make(chan struct{}, 1)
			go forwardSignals(ctx, usr1, updateNow)
			restart, err := agent.Run(ctx, agent.Options{
				Root:       p.root,
				ConfigFile: p.configFile,
				LogLevel:   cmd.String("log-level"),
				Stderr:     terminalOrNil(cmd.Root().ErrWriter),
				Reload:     reload,
				UpdateNow:  updateNow,
				Version:    version.Version,
			})
			if err != nil {
				return err
			}
			if restart != nil {
				return &reexec{restart}
			}
			return nil
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

// reexec carries a restart request from `run` out to main, past every
// deferred cleanup, so that exec is the process's very last step.
type reexec struct{ r *updater.Restart }

func (e *reexec) Error() string { return "restart into " + e.r.Binary }

// exec replaces the process with the new binary, same arguments, same
// environment plus the inherited lock. It returns only on failure.
func (e *reexec) exec() error {
	env := append(os.Environ(), e.r.Env...)
	err := syscall.Exec(e.r.Binary, append([]string{e.r.Binary}, os.Args[1:]...), env)
	return fmt.Errorf("re-executing %s after the update: %w (the watchdog restarts the agent)", e.r.Binary, err)
}
