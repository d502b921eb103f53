package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/agent"
)

func modulesCommand() *cli.Command {
	return &cli.Command{
		Name:  "modules",
		Usage: "list every catalogue module and how it runs on this host: native, salt, or unavailable and why",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: `print a JSON list of {"module", "runs", "why"}`}},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := noArgs(cmd); err != nil {
				return err
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			mods, err := agent.Modules(ctx, agent.ModulesOptions{Root: p.root, ConfigFile: p.configFile})
			if err != nil {
				return err
			}
			w := cmd.Root().Writer
			if cmd.Bool("json") {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				return enc.Encode(mods)
			}
			tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
			counts := map[string]int{}
			for _, m := range mods {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", m.Module, m.Runs, m.Why)
				counts[m.Runs]++
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintf(w, "%d modules: %d native, %d through Salt, %d unavailable\n", len(mods), counts[agent.RunsNative], counts[agent.RunsSalt], counts[agent.RunsUnavailable])
			return nil
		},
	}
}
