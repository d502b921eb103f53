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
			"(--allow-host for other names) and cross-site Origins are refused.\n" +
			"State: without --nats, an embedded NATS JetStream server in <data>/nats (in-process, no port);\n" +
			"with --nats, an existing NATS cluster shared by any number of replicas behind a load balancer.\n" +
			"A data directory of an earlier version (<data>/apps) is imported on first start.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8963", Usage: "address to listen on (port 0: any free port)"},
			&cli.StringFlag{Name: "data", Usage: "directory for the lock, the API token and, without --nats, the embedded NATS server's data (created if missing)", Required: true},
			&cli.StringSliceFlag{Name: "nats", Usage: "NATS server URLs of an existing cluster with JetStream (comma-separated or repeated); default: an embedded single-node server"},
			&cli.StringFlag{Name: "nats-creds", Usage: "NATS credentials file (JWT and seed) for --nats"},
			&cli.StringFlag{Name: "nats-tls-ca", Usage: "PEM file of CAs that sign the NATS servers' certificates"},
			&cli.StringFlag{Name: "nats-tls-cert", Usage: "client certificate (PEM) for NATS servers that require one"},
			&cli.StringFlag{Name: "nats-tls-key", Usage: "the client certificate's key (PEM)"},
			&cli.IntFlag{Name: "nats-replicas", Value: 1, Usage: "replicas of every stream and bucket the backend makes (3 on a three-node cluster survives the loss of a node)"},
			&cli.StringFlag{Name: "api-token", Usage: "bearer token every API call needs (default: <data>/api-token, made on first start); prefer OPSAGENT_API_TOKEN or --api-token-file: a flag shows in ps", Sources: cli.EnvVars("OPSAGENT_API_TOKEN")},
			&cli.StringFlag{Name: "api-token-file", Usage: "read the API token from this file (first line)"},
			&cli.StringSliceFlag{Name: "allow-host", Usage: "a host name clients may use to reach this server besides its listen address (repeatable)"},
			&cli.BoolFlag{Name: "open-enrollment", Usage: "let any agent that knows an app id enroll without the app's enrollment secret (the 2014 behaviour)"},
			&cli.IntFlag{Name: "enroll-limit", Value: 100, Usage: "new instances an app may enroll per --enroll-window (all at once, then at that rate); over it a Handshake is refused and retried later; -1: no limit"},
			&cli.DurationFlag{Name: "enroll-window", Value: time.Minute, Usage: "the window of --enroll-limit"},
			&cli.StringFlag{Name: "log-retention-size", Value: "1GiB", Usage: "StateLogs kept per app (its JetStream stream's limit); the oldest go first"},
			&cli.DurationFlag{Name: "log-retention-age", Value: 30 * 24 * time.Hour, Usage: "StateLogs older than this are deleted"},
			&cli.StringFlag{Name: "log-segment-size", Hidden: true, Usage: "ignored: StateLogs are in JetStream, which sizes its own blocks"},
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
			if cmd.IsSet("log-segment-size") {
				log.Warn("--log-segment-size is ignored: StateLogs are kept in NATS JetStream, which sizes its own blocks")
			}
			natsOpts, err := natsOptions(cmd)
			if err != nil {
				return err
			}
			enrollLimit := int(cmd.Int("enroll-limit"))
			switch {
			case enrollLimit == 0 || enrollLimit < -1:
				return usageErrorf("--enroll-limit %d: give new instances per --enroll-window (at least 1), or -1 for no limit", enrollLimit)
			case cmd.Duration("enroll-window") <= 0:
				return usageErrorf("--enroll-window %v: must be positive (e.g. 1m)", cmd.Duration("enroll-window"))
			}
			host, _ := os.Hostname()
			srv, err := backend.New(backend.Options{
				DataDir: cmd.String("data"), NATS: natsOpts, ReplicaName: host, APIToken: token, Logger: log,
				AllowedHosts: cmd.StringSlice("allow-host"), OpenEnrollment: cmd.Bool("open-enrollment"),
				EnrollLimit: enrollLimit, EnrollWindow: cmd.Duration("enroll-window"),
				LogRetentionBytes: int64(retention), LogRetentionAge: cmd.Duration("log-retention-age"),
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

// natsOptions reads the --nats flags.
func natsOptions(cmd *cli.Command) (backend.NATSOptions, error) {
	o := backend.NATSOptions{Creds: cmd.String("nats-creds"), TLSCA: cmd.String("nats-tls-ca"),
		TLSCert: cmd.String("nats-tls-cert"), TLSKey: cmd.String("nats-tls-key"), Replicas: int(cmd.Int("nats-replicas"))}
	for _, v := range cmd.StringSlice("nats") {
		for _, u := range strings.Split(v, ",") {
			if u = strings.TrimSpace(u); u != "" {
				o.URLs = append(o.URLs, u)
			}
		}
	}
	switch {
	case o.Replicas < 1 || o.Replicas > 5:
		return o, usageErrorf("--nats-replicas %d: JetStream takes 1 to 5", o.Replicas)
	case len(o.URLs) == 0 && o.Replicas > 1:
		return o, usageErrorf("--nats-replicas %d needs --nats: the embedded server is a single node", o.Replicas)
	case len(o.URLs) == 0 && (o.Creds != "" || o.TLSCA != "" || o.TLSCert != "" || o.TLSKey != ""):
		return o, usageErrorf("--nats-creds and --nats-tls-* need --nats (the embedded server is reached in-process)")
	case (o.TLSCert == "") != (o.TLSKey == ""):
		return o, usageErrorf("--nats-tls-cert and --nats-tls-key go together")
	}
	for _, f := range []struct{ flag, path string }{{"--nats-creds", o.Creds}, {"--nats-tls-ca", o.TLSCA}, {"--nats-tls-cert", o.TLSCert}, {"--nats-tls-key", o.TLSKey}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return o, usageErrorf("%s: %v", f.flag, err)
		}
	}
	return o, nil
}
