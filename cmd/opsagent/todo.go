package main

import "github.com/urfave/cli/v3"

// Verbs being built in this change; replaced by their real files.
func installCommand() *cli.Command   { return &cli.Command{Name: "install", Hidden: true} }
func uninstallCommand() *cli.Command { return &cli.Command{Name: "uninstall", Hidden: true} }
func userdataCommand() *cli.Command  { return &cli.Command{Name: "userdata", Hidden: true} }
func updateCommand() *cli.Command    { return &cli.Command{Name: "update", Hidden: true} }
