// Command opsagent is the VisualOps instance agent: one static binary whose
// verbs install the agent, run it, update it, publish releases and serve a
// reference backend. This package only wires flags to the packages that do
// the work; it holds no logic of its own.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
)

// Exit codes shared by every verb.
const (
	exitOK      = 0
	exitFailure = 1 // the verb ran and failed
	exitUsage   = 2 // the command line was wrong
)

// streams are the process's standard streams, injected so that tests run the
// CLI in-process with buffers.
type streams struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
}

func main() {
	os.Exit(run(context.Background(), os.Args, streams{os.Stdin, os.Stdout, os.Stderr}))
}

// run executes one command line and returns the process exit code. Errors are
// printed to stderr on a single line.
func run(ctx context.Context, args []string, s streams) int {
	app := newApp(s)
	err := app.RunContext(ctx, args)
	if err == nil {
		return exitOK
	}
	code := exitFailure
	var ue *usageError
	var ec cli.ExitCoder
	switch {
	case errors.As(err, &ue):
		code = exitUsage
	case strings.HasPrefix(err.Error(), "Required flag"):
		code = exitUsage
	case errors.As(err, &ec):
		code = ec.ExitCode()
		if strings.TrimSpace(err.Error()) == "" {
			return code
		}
	}
	fmt.Fprintf(s.stderr, "opsagent: %s\n", oneLine(err.Error()))
	return code
}

// newApp builds a fresh CLI application. Every verb is registered here.
func newApp(s streams) *cli.App {
	app := &cli.App{
		Name:            "opsagent",
		Usage:           "the VisualOps instance agent",
		HideVersion:     true,
		Reader:          s.stdin,
		Writer:          s.stdout,
		ErrWriter:       s.stderr,
		Flags:           globalFlags(),
		CommandNotFound: func(*cli.Context, string) {},
		// The CLI must never call os.Exit itself: run() owns exit codes.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return &usageError{fmt.Errorf("%w (see 'opsagent help')", err)}
		},
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return usageErrorf("unknown command %q; run 'opsagent help' for the list of commands", c.Args().First())
			}
			return cli.ShowAppHelp(c)
		},
		Commands: []*cli.Command{
			versionCommand(),
			statusCommand(),
			backendCommand(),
			runCommand(),
			releaseCommand(),
		},
	}
	for _, cmd := range app.Commands {
		setUsageHandlers(cmd)
	}
	return app
}

// setUsageHandlers makes flag errors of every (sub)command usage errors.
func setUsageHandlers(cmd *cli.Command) {
	if cmd.OnUsageError == nil {
		cmd.OnUsageError = func(_ *cli.Context, err error, _ bool) error {
			return &usageError{fmt.Errorf("%s: %w (see 'opsagent %s --help')", cmd.Name, err, cmd.Name)}
		}
	}
	for _, sub := range cmd.Subcommands {
		setUsageHandlers(sub)
	}
}

// globalFlags are accepted before any verb.
func globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{
			Name:    "config",
			Value:   "/etc/opsagent.conf",
			Usage:   "configuration file (INI), taken relative to --root",
			EnvVars: []string{"OPSAGENT_CONFIG"},
		},
		&cli.StringFlag{
			Name:    "root",
			Value:   "/",
			Usage:   "directory every instance path is relative to (tests and demos use a temporary one)",
			EnvVars: []string{"OPSAGENT_ROOT"},
		},
		&cli.StringFlag{
			Name:    "log-level",
			Value:   "",
			Usage:   "debug, info, warn or error (default: [global] loglvl of the config, else info)",
			EnvVars: []string{"OPSAGENT_LOG_LEVEL"},
		},
	}
}

// usageError marks a command-line mistake (exit code 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, a ...any) error {
	return &usageError{fmt.Errorf(format, a...)}
}

// oneLine folds a multi-line error onto one line for stderr.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}
