package main

import (
	"encoding/json"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/visualops/opsagent/internal/version"
)

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version, commit, Go version and platform",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print as a JSON object"}},
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return usageErrorf("version takes no arguments, got %q", c.Args().First())
			}
			info := version.Get()
			if c.Bool("json") {
				enc := json.NewEncoder(c.App.Writer)
				enc.SetIndent("", "  ")
				return enc.Encode(info)
			}
			_, err := fmt.Fprintln(c.App.Writer, info.String())
			return err
		},
	}
}
