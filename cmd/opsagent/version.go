package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/version"
)

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version, commit, states interface, Go version and platform",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print as a JSON object"}},
		Action: func(_ context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			info := version.Get()
			// The release public key compiled in by `release build`: what
			// this binary trusts for self-updates besides [userdata] pubkey.
			key := dist.EmbeddedPublicKey()
			if cmd.Bool("json") {
				enc := json.NewEncoder(cmd.Root().Writer)
				enc.SetIndent("", "  ")
				return enc.Encode(struct {
					version.Info
					ReleaseKey string `json:"release_key,omitempty"`
				}{info, key})
			}
			line := info.String()
			if key != "" {
				line += ", release key " + key
			}
			_, err := fmt.Fprintln(cmd.Root().Writer, line)
			return err
		},
	}
}
