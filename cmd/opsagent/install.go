package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/installer"
)

// paramFlags are the installation parameters, shared by install and
// userdata.
func paramFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "ws-uri", Usage: "backend WebSocket, wss://…/agent/ (else WS_URI, else the userdata)"},
		&cli.StringFlag{Name: "app-id", Usage: "the app this instance belongs to (else APP_ID, else the userdata)"},
		&cli.StringFlag{Name: "version", Usage: "release to install, MAJOR.MINOR[.PATCH] (else VERSION, else the userdata)"},
		&cli.StringFlag{Name: "base-remote", Usage: "where releases are downloaded from (else BASE_REMOTE, else the userdata)"},
		&cli.StringFlag{Name: "pubkey", Usage: "minisign public key trusted for self-updates (else PUBKEY)"},
		&cli.StringFlag{Name: "enroll-secret", Usage: "the app's enrollment secret, for the first Handshake (else ENROLL_SECRET)"},
		&cli.StringSliceFlag{Name: "set", Usage: "any other config key, section.key=value (repeatable), e.g. network.instance_id=i-0abc"},
	}
}

func paramsOf(cmd *cli.Command) installer.Params {
	return installer.Params{
		WSURI: cmd.String("ws-uri"), AppID: cmd.String("app-id"), Version: cmd.String("version"),
		BaseRemote: cmd.String("base-remote"), PubKey: cmd.String("pubkey"), EnrollSecret: cmd.String("enroll-secret"),
		ModRepo: cmd.String("mod-repo"), ModTag: cmd.String("mod-tag"),
	}
}

func installCommand() *cli.Command {
	flags := append(paramFlags(),
		&cli.StringFlag{Name: "mod-repo", Usage: "states repository (the Salt fork) used when a recipe names none (else MOD_REPO)"},
		&cli.StringFlag{Name: "mod-tag", Usage: "its tag or branch (else MOD_TAG)"},
		&cli.BoolFlag{Name: "skip-packages", Usage: "never call the OS package manager"},
		&cli.BoolFlag{Name: "start", Usage: "start the agent even below a --root other than /"},
		&cli.BoolFlag{Name: "dry-run", Usage: "print what would be done and write nothing"},
		&cli.BoolFlag{Name: "downgrade", Usage: "install --version even if the instance runs a newer one (else the newer one is kept)"},
	)
	return &cli.Command{
		Name:  "install",
		Usage: "install (or repair) the agent on this instance and start it",
		Description: "Lays out /opt/visualops, /var/lib/visualops, /var/log/visualops, /etc/opsagent.conf and the token,\n" +
			"installs missing OS prerequisites, builds the virtualenv, clones the states repository, installs\n" +
			"the systemd unit (when systemd runs) and the cron watchdog, and starts the agent. Safe to re-run:\n" +
			"it repairs what differs and says 'already installed, nothing to do' otherwise. Parameters come\n" +
			"from flags, else WS_URI, APP_ID, VERSION, BASE_REMOTE, PUBKEY, ENROLL_SECRET, MOD_REPO, MOD_TAG,\n" +
			"else the instance's userdata (IMDSv2, IMDSv1, OpenStack), else an earlier install's config.",
		Flags: flags,
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			if cmd.IsSet("enroll-secret") {
				fmt.Fprintln(cmd.Root().ErrWriter, "opsagent: warning: --enroll-secret on the command line is visible to every local user in ps; pass it as ENROLL_SECRET in the environment")
			}
			self, err := os.Executable()
			if err == nil {
				self, _ = filepath.EvalSymlinks(self)
			}
			_, err = installer.Install(ctx, installer.Options{
				Root: p.root, ConfigFile: p.configFile, Flags: paramsOf(cmd), Sets: cmd.StringSlice("set"),
				Env: os.Getenv, Self: self, SkipPackages: cmd.Bool("skip-packages"), Start: cmd.Bool("start"), Downgrade: cmd.Bool("downgrade"),
				OutputLogged: os.Getenv("OPSAGENT_OUTPUT_LOGGED") == "1",
				DryRun:       cmd.Bool("dry-run"), Out: cmd.Root().Writer, Terminal: terminalOrNil(cmd.Root().Writer) != nil,
			})
			if errors.Is(err, installer.ErrMissingParams) {
				return &usageError{err}
			}
			return err
		},
	}
}

func uninstallCommand() *cli.Command {
	return &cli.Command{
		Name:  "uninstall",
		Usage: "stop the agent and remove it (keeps the config, the token and the logs unless --purge)",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "purge", Usage: "also remove the config, the token, the state and the logs"}},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			return installer.Uninstall(ctx, installer.UninstallOptions{
				Root: p.root, ConfigFile: p.configFile, Purge: cmd.Bool("purge"),
				Out: cmd.Root().Writer, Terminal: terminalOrNil(cmd.Root().Writer) != nil,
			})
		},
	}
}

func userdataCommand() *cli.Command {
	flags := append(paramFlags(),
		&cli.StringFlag{Name: "sha256", Usage: "SHA-256 of the release's opsagent.tgz (else from --dist, else <base-remote>/<version>/opsagent.tgz.sha256)"},
		&cli.StringFlag{Name: "dist", Usage: "a local release directory (from 'opsagent release build') to take the SHA-256 from"},
	)
	return &cli.Command{
		Name:  "userdata",
		Usage: "print the bootstrap script to give an instance as its userdata",
		Description: "The script installs the agent when the instance boots (cloud-init), or when run by hand:\n" +
			"curl -sSL http://169.254.169.254/latest/user-data | bash",
		Flags: flags,
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			script, err := installer.Userdata(ctx, installer.UserdataOptions{
				Params: paramsOf(cmd), Sets: cmd.StringSlice("set"), SHA256: cmd.String("sha256"), Dist: cmd.String("dist"),
			})
			if err != nil {
				return err
			}
			_, err = cmd.Root().Writer.Write(script)
			return err
		},
	}
}
