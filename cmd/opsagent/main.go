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
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/textcut"
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
	proc.PassSIGHUPToChildren() // the reload of the daemons it starts
	os.Exit(run(context.Background(), os.Args, streams{os.Stdin, os.Stdout, os.Stderr}))
}

// run executes one command line and returns the process exit code. Errors are
// printed to stderr on a single line.
func run(ctx context.Context, args []string, s streams) int {
	err := newApp(s).Run(ctx, args)
	var re *reexec
	if errors.As(err, &re) {
		// The agent unwound cleanly (close frame, status, outbox flushed)
		// and asks to become the new binary: the very last step.
		err = re.exec()
	}
	if err == nil {
		return exitOK
	}
	code := exitFailure
	var ue *usageError
	var ec cli.ExitCoder
	switch {
	case errors.As(err, &ue):
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
func newApp(s streams) *cli.Command {
	app := &cli.Command{
		Name:            "opsagent",
		Usage:           "the VisualOps instance agent",
		HideVersion:     true,
		Reader:          s.stdin,
		Writer:          s.stdout,
		ErrWriter:       s.stderr,
		Flags:           globalFlags(),
		CommandNotFound: func(context.Context, *cli.Command, string) {},
		// The CLI must never call os.Exit itself: run() owns exit codes.
		ExitErrHandler: func(context.Context, *cli.Command, error) {},
		Before: func(ctx context.Context, cmd *cli.Command) (context.Context, error) {
			if _, err := config.ParseLogLevel(cmd.String("log-level")); err != nil {
				return ctx, usageErrorf("--log-level: %v", err)
			}
			return ctx, nil
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if cmd.Args().Present() {
				return unknownCommand(cmd.Args().First())
			}
			return cli.ShowRootCommandHelp(cmd)
		},
		Commands: []*cli.Command{
			versionCommand(),
			statusCommand(),
			runCommand(),
			applyCommand(),
			modulesCommand(),
			installCommand(),
			uninstallCommand(),
			userdataCommand(),
			updateCommand(),
			backendCommand(),
			releaseCommand(),
		},
	}
	setUsageHandlers(app)
	return app
}

// setUsageHandlers makes flag errors of every (sub)command usage errors.
func setUsageHandlers(cmd *cli.Command) {
	if cmd.OnUsageError == nil {
		cmd.OnUsageError = func(_ context.Context, c *cli.Command, err error, _ bool) error {
			if c.Root() != c {
				path := strings.Join(c.Path()[1:], " ") // "release build", not "build"
				return &usageError{fmt.Errorf("%s: %w (see 'opsagent %s --help')", path, err, path)}
			}
			// The root parses flags until it meets a verb; a word it met
			// first that is no verb is the mistake to report, not a flag
			// after it ("opsagent frobnicate --x").
			if c.Args().Present() {
				return unknownCommand(c.Args().First())
			}
			return &usageError{fmt.Errorf("%w (see 'opsagent --help')", err)}
		}
	}
	for _, sub := range cmd.Commands {
		setUsageHandlers(sub)
	}
}

func unknownCommand(name string) error {
	return usageErrorf("unknown command %q; run 'opsagent help' for the list of commands", name)
}

// globalFlags are accepted before or after any verb (urfave/cli v3 flags
// are persistent: `opsagent run --config X` and `opsagent --config X run`
// mean the same).
func globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{
			Name: "config",
			Usage: "configuration file (INI). Given here or in OPSAGENT_CONFIG, it is a path on this host, " +
				"relative to the current directory; not given, it is /etc/opsagent.conf below --root",
			Sources: cli.EnvVars("OPSAGENT_CONFIG"),
		},
		&cli.StringFlag{
			Name:    "root",
			Value:   "/",
			Usage:   "directory every instance path is relative to (tests and demos use a temporary one)",
			Sources: cli.EnvVars("OPSAGENT_ROOT"),
		},
		&cli.StringFlag{
			Name:    "log-level",
			Usage:   "debug, info, warn or error (default: [global] loglvl of the config, else info)",
			Sources: cli.EnvVars("OPSAGENT_LOG_LEVEL"),
		},
	}
}

// placement is where this invocation works: the root and the config
// file, resolved by the one rule every verb follows (see --config).
type placement struct {
	root       fsutil.Root
	configFile string // host path
}

func placementOf(cmd *cli.Command) (placement, error) {
	root, err := fsutil.NewRoot(cmd.String("root"))
	if err != nil {
		return placement{}, usageErrorf("--root: %v", err)
	}
	file := root.Path(config.DefaultPath)
	if p := cmd.String("config"); p != "" {
		if file, err = filepath.Abs(p); err != nil {
			return placement{}, usageErrorf("--config %q: %v", p, err)
		}
	}
	return placement{root: root, configFile: file}, nil
}

// layout is the installation's layout with the config's paths when it
// loads, else the defaults (what `status` and `uninstall` need even when
// the config is broken).
func (p placement) layout(c *config.Config) config.Layout {
	return config.NewLayout(p.root, p.configFile, c)
}

// noArgs refuses positional arguments for a verb that takes none.
func noArgs(cmd *cli.Command) error {
	if cmd.Args().Present() {
		return usageErrorf("%s takes no arguments, got %q", cmd.Name, cmd.Args().First())
	}
	return nil
}

// usageError marks a command-line mistake (exit code 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, a ...any) error {
	return &usageError{fmt.Errorf(format, a...)}
}

// oneLine folds a multi-line message onto one line for a terminal, with
// anything that could drive the terminal made visible (textcut.Printable):
// errors carry text from elsewhere (a release server's status line, a
// backend's answer, a config value).
func oneLine(s string) string {
	return textcut.Printable(strings.Join(strings.Fields(s), " "))
}

// terminalOrNil returns w when it is a terminal (progress bars, ✓ marks,
// the agent's log mirrored when run by hand); nil otherwise.
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
