package main

import (
	"fmt"
	"log/slog"
	"net"

	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/visualops/opsagent/backend"
	"github.com/visualops/opsagent/internal/fsutil"
)

func backendCommand() *cli.Command {
	return &cli.Command{
		Name:  "backend",
		Usage: "serve the embedded reference backend (agents at /agent/, JSON API at /api/)",
		Description: "A small control plane for local trials, tests and small self-hosted fleets.\n" +
			"API: PUT /api/apps/{app}/recipe, GET /api/apps/{app}/instances, GET /api/apps/{app}/logs?after=N,\n" +
			"POST /api/apps/{app}/waits, POST /api/apps/{app}/update, GET /api/apps, GET /api/healthz.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8963", Usage: "address to listen on (port 0: any free port)"},
			&cli.StringFlag{Name: "data", Usage: "directory for apps, recipes, tokens and logs (created if missing)", Required: true},
			&cli.StringFlag{Name: "api-token", Usage: "bearer token required on /api/ (required off loopback)", EnvVars: []string{"OPSAGENT_API_TOKEN"}},
			&cli.StringFlag{Name: "addr-file", Usage: "write the bound address (host:port) to this file once listening"},
		},
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return usageErrorf("backend takes no arguments, got %q", c.Args().First())
			}
			if err := backend.CheckExposure(c.String("listen"), c.String("api-token")); err != nil {
				return usageErrorf("%v", err)
			}
			level := slog.LevelInfo
			if c.String("log-level") == "debug" {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))
			srv, err := backend.New(backend.Options{DataDir: c.String("data"), APIToken: c.String("api-token"), Logger: log})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(c.Context, syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			var addrErr error
			err = srv.ListenAndServe(ctx, c.String("listen"), func(a net.Addr) {
				fmt.Fprintf(c.App.Writer, "listening on http://%s (agents: ws://%s/agent/)\n", a, a)
				if p := c.String("addr-file"); p != "" {
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
