package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/backend"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
)

func backendCommand() *cli.Command {
	return &cli.Command{
		Name:  "backend",
		Usage: "serve the embedded reference backend (agents at /agent/, JSON API at /api/)",
		Description: "A small control plane for local trials, tests and small self-hosted fleets.\n" +
			"API: PUT /api/apps/{app}/recipe, GET /api/apps/{app}/instances, GET /api/apps/{app}/logs?after=N,\n" +
			"DELETE /api/apps/{app}/instances/{id} (revoke), POST /api/apps/{app}/instances/{id}/admit,\n" +
			"POST /api/apps/{app}/waits, POST /api/apps/{app}/update, GET /api/apps/{app}/enrollment,\n" +
			"POST /api/apps/{app}/enrollment/rotate, GET /api/apps, GET /api/healthz.\n" +
			"Every call but /api/healthz needs 'Authorization: Bearer <token>', on any address: the token\n" +
			"comes from --api-token-file or OPSAGENT_API_TOKEN, else from <data>/api-token, created on first start.\n" +
			"Mutating calls need Content-Type: application/json; the Host header must name this server\n" +
			"(--allow-host for other names) and cross-site Origins are refused.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8963", Usage: "address to listen on (port 0: any free port)"},
			&cli.StringFlag{Name: "data", Usage: "directory for apps, recipes, tokens and logs (created if missing)", Required: true},
			&cli.StringFlag{Name: "api-token", Usage: "bearer token every API call needs (default: <data>/api-token, made on first start); prefer OPSAGENT_API_TOKEN or --api-token-file: a flag shows in ps", Sources: cli.EnvVars("OPSAGENT_API_TOKEN")},
			&cli.StringFlag{Name: "api-token-file", Usage: "read the API token from this file (first line)"},
			&cli.StringSliceFlag{Name: "allow-host", Usage: "a host name clients may use to reach this server besides its listen address (repeatable)"},
			&cli.BoolFlag{Name: "open-enrollment", Usage: "let any agent that knows an app id enroll without the app's enrollment secret (the 2014 behaviour)"},
			&cli.IntFlag{Name: "enroll-limit", Value: 100, Usage: "new instances an app may enroll per --enroll-window (all at once, then at that rate); over it a Handshake is refused and retried later; -1: no limit"},
			&cli.DurationFlag{Name: "enroll-window", Value: time.Minute, Usage: "the window of --enroll-limit"},
			&cli.StringFlag{Name: "log-retention-size", Value: "1GiB", Usage: "StateLogs kept per app; the oldest segments go first"},
			&cli.DurationFlag{Name: "log-retention-age", Value: 30 * 24 * time.Hour, Usage: "StateLogs older than this are deleted (whole segments)"},
			&cli.StringFlag{Name: "log-segment-size", Value: "16MiB", Usage: "size at which a StateLog segment file is closed and a new one started"},
			&cli.StringFlag{Name: "addr-file", Usage: "write the bound address (host:port) to this file once listening"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			level, _ := config.ParseLogLevel(cmd.String("log-level"))
			log := slog.New(slog.NewTextHandler(cmd.Root().ErrWriter, &slog.HandlerOptions{Level: level}))
			token, err := apiToken(cmd, log)
			if err != nil {
				return err
			}
			retention, err := config.ParseSize(cmd.String("log-retention-size"))
			if err != nil {
				return usageErrorf("--log-retention-size: %v", err)
			}
			segment, err := config.ParseSize(cmd.String("log-segment-size"))
			if err != nil {
				return usageErrorf("--log-segment-size: %v", err)
			}
			enrollLimit := int(cmd.Int("enroll-limit"))
			switch {
			case enrollLimit == 0 || enrollLimit < -1:
				return usageErrorf("--enroll-limit %d: give new instances per --enroll-window (at least 1), or -1 for no limit", enrollLimit)
			case cmd.Duration("enroll-window") <= 0:
				return usageErrorf("--enroll-window %v: must be positive (e.g. 1m)", cmd.Duration("enroll-window"))
			}
			srv, err := backend.New(backend.Options{
				DataDir: cmd.String("data"), APIToken: token, Logger: log,
				AllowedHosts: cmd.StringSlice("allow-host"), OpenEnrollment: cmd.Bool("open-enrollment"),
				EnrollLimit: enrollLimit, EnrollWindow: cmd.Duration("enroll-window"),
				LogRetentionBytes: int64(retention), LogRetentionAge: cmd.Duration("log-retention-age"), LogSegmentBytes: int64(segment),
			})
			if err != nil {
				return err
			}
			if f := srv.APITokenFile(); f != "" {
				// The path, never the token: this output often ends up in
				// logs that others read.
				fmt.Fprintf(cmd.Root().Writer, "API token: %s (export OPSAGENT_API_TOKEN=$(cat %s))\n", f, f)
			}
			ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			var addrErr error
			err = srv.ListenAndServe(ctx, cmd.String("listen"), func(a net.Addr) {
				fmt.Fprintf(cmd.Root().Writer, "listening on http://%s (agents: ws://%s/agent/)\n", a, a)
				if p := cmd.String("addr-file"); p != "" {
					addrErr = fsutil.WriteFileAtomic(p, []byte(a.String()+"\n"), 0o644)
				}
			})
			if addrErr != nil {
				return fmt.Errorf("--addr-file: %w", addrErr)
			}
			return err
		},
	}
}

// apiToken reads the API token from --api-token-file, else the flag or
// OPSAGENT_API_TOKEN; a token given as a flag is visible in ps, so say so.
func apiToken(cmd *cli.Command, log *slog.Logger) (string, error) {
	if p := cmd.String("api-token-file"); p != "" {
		data, err := fsutil.ReadFileLimit(p, 4<<10)
		if err != nil {
			return "", fmt.Errorf("--api-token-file: %w", err)
		}
		tok, _, _ := strings.Cut(string(data), "\n")
		if tok = strings.TrimSpace(tok); tok == "" {
			return "", fmt.Errorf("--api-token-file %s is empty", p)
		}
		return tok, nil
	}
	if tokenOnCommandLine(os.Args) {
		log.Warn("--api-token on the command line is visible to every user in ps; use OPSAGENT_API_TOKEN or --api-token-file")
	}
	return cmd.String("api-token"), nil
}

func tokenOnCommandLine(args []string) bool {
	for _, a := range args {
		if a == "--api-token" || strings.HasPrefix(a, "--api-token=") || a == "-api-token" || strings.HasPrefix(a, "-api-token=") {
			return true
		}
	}
	return false
}
