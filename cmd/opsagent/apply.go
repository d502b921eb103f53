package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/agent"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/textcut"
	"github.com/visualops/opsagent/protocol"
)

// maxRecipeFile bounds the recipe file read by apply (a frame's limit).
const maxRecipeFile = protocol.DefaultMaxFrame

func applyCommand() *cli.Command {
	return &cli.Command{
		Name:      "apply",
		Usage:     "apply a recipe once, here, with no backend (exit 0: every state succeeded, 1: one failed)",
		ArgsUsage: "RECIPE.json",
		Description: "RECIPE.json is a recipe as the backend's API takes it ({\"module\": {...}, \"state\": [...]})\n" +
			"or a whole RecipeMetadata frame. The states run in order, as in one round of the agent, with the\n" +
			"engine of the config ([agent] engine; no config: the defaults), and the first failure ends it.\n" +
			"--test reports what each state would change and changes nothing (Salt's test=True).",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "test", Usage: "check mode: report what would change, change nothing"},
			&cli.BoolFlag{Name: "json", Usage: "print the results as one JSON object"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if cmd.Args().Len() != 1 {
				return usageErrorf("apply takes one recipe file, got %d arguments", cmd.Args().Len())
			}
			p, err := placementOf(cmd)
			if err != nil {
				return err
			}
			file := cmd.Args().First()
			data, err := fsutil.ReadFileLimit(file, maxRecipeFile)
			if err != nil {
				return fmt.Errorf("recipe %s: %w", file, err)
			}
			recipe, err := protocol.DecodeRecipe(data)
			if err != nil {
				return fmt.Errorf("recipe %s: %w", file, err)
			}
			level, _ := config.ParseLogLevel(cmd.String("log-level"))
			if cmd.String("log-level") == "" {
				level = slog.LevelWarn
			}
			log := slog.New(slog.NewTextHandler(cmd.Root().ErrWriter, &slog.HandlerOptions{Level: level}))
			ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			w := cmd.Root().Writer
			asJSON, test := cmd.Bool("json"), cmd.Bool("test")
			start := time.Now()
			opts := agent.ApplyOptions{Root: p.root, ConfigFile: p.configFile, Recipe: recipe, Test: test, Logger: log}
			if !asJSON {
				opts.OnResult = func(r agent.ApplyResult) { printApplied(w, r, test) }
			}
			results, err := agent.Apply(ctx, opts)
			if err != nil {
				return err
			}
			sum := summarize(results, test, time.Since(start))
			if asJSON {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				if err := enc.Encode(appliedJSON{RecipeVersion: recipe.RecipeVersion, Test: test, States: results, Summary: sum}); err != nil {
					return err
				}
			} else {
				fmt.Fprintln(w, sum.line)
			}
			if sum.Failed > 0 {
				return cli.Exit("", exitFailure)
			}
			return nil
		},
	}
}

type appliedJSON struct {
	RecipeVersion int64               `json:"recipe_version"`
	Test          bool                `json:"test"`
	States        []agent.ApplyResult `json:"states"`
	Summary       applySummary        `json:"summary"`
}

type applySummary struct {
	States     int    `json:"states"`
	Changed    int    `json:"changed"`
	Unchanged  int    `json:"unchanged"`
	Failed     int    `json:"failed"`
	NotRun     int    `json:"not_run"`
	DurationMS int64  `json:"duration_ms"`
	line       string // the text form
}

func summarize(results []agent.ApplyResult, test bool, took time.Duration) applySummary {
	s := applySummary{States: len(results), DurationMS: took.Milliseconds()}
	for _, r := range results {
		switch {
		case r.NotRun:
			s.NotRun++
		case !r.Result:
			s.Failed++
		case r.Changed:
			s.Changed++
		default:
			s.Unchanged++
		}
	}
	verb := "changed"
	if test {
		verb = "would change"
	}
	s.line = fmt.Sprintf("%d states: %d %s, %d unchanged, %d failed", s.States, s.Changed, verb, s.Unchanged, s.Failed)
	if s.NotRun > 0 {
		s.line += fmt.Sprintf(", %d not run", s.NotRun)
	}
	s.line += fmt.Sprintf(" (%.2f s)", took.Seconds())
	return s
}

// printApplied prints one state's result on a line: a mark, the state,
// its module and its comment; its output indented below when it failed.
func printApplied(w io.Writer, r agent.ApplyResult, test bool) {
	mark := "ok     "
	switch {
	case r.NotRun:
		mark = "not run"
	case !r.Result:
		mark = "FAILED "
	case r.Changed && test:
		mark = "would  "
	case r.Changed:
		mark = "changed"
	}
	fmt.Fprintf(w, "%s  %s  %s: %s\n", mark, textcut.Printable(r.StateID), r.Module, textcut.Printable(r.Comment))
	if !r.Result && !r.NotRun && r.Stdout != "" {
		for _, line := range strings.Split(strings.TrimRight(r.Stdout, "\n"), "\n") {
			fmt.Fprintf(w, "           | %s\n", textcut.Printable(line))
		}
	}
}
