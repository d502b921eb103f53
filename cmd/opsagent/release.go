package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync/atomic"

	"github.com/urfave/cli/v3"

	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/release"
)

func releaseCommand() *cli.Command {
	return &cli.Command{
		Name:  "release",
		Usage: "build, sign and publish opsagent.tgz",
		Commands: []*cli.Command{
			{
				Name:  "keygen",
				Usage: "create a minisign key pair (minisign.pub, minisign.key) for signing releases",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "out", Usage: "directory for the key files", Required: true},
					&cli.BoolFlag{Name: "unencrypted", Usage: "store the secret key without a passphrase (CI keys)"},
				},
				Action: func(ctx context.Context, c *cli.Command) error {
					pass := ""
					if !c.Bool("unencrypted") {
						var err error
						if pass, err = passphrase(c, true); err != nil {
							return err
						}
					}
					pub, err := dist.Keygen(c.String("out"), pass, c.Bool("unencrypted"))
					if err != nil {
						return err
					}
					fmt.Fprintf(c.Root().Writer, "public key (put it in [userdata] pubkey / --pubkey):\n%s\n", pub)
					return nil
				},
			},
			{
				Name:  "build",
				Usage: "cross-compile linux/amd64 and linux/arm64 and pack dist/opsagent.tgz (+ .sha256, .minisig)",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "version", Usage: "MAJOR.MINOR[.PATCH]", Required: true},
					&cli.StringFlag{Name: "out", Value: "dist", Usage: "output directory"},
					&cli.StringFlag{Name: "key", Usage: "minisign secret key (passphrase from OPSAGENT_SIGNING_PASSPHRASE or a prompt)"},
					&cli.StringFlag{Name: "source", Value: ".", Usage: "repository root to build from"},
					&cli.BoolFlag{Name: "allow-dirty", Usage: "build even with uncommitted changes"},
				},
				Action: func(ctx context.Context, c *cli.Command) error {
					if err := dist.CheckVersion(c.String("version")); err != nil {
						return usageErrorf("%v", err)
					}
					pass := ""
					if key := c.String("key"); key != "" {
						encrypted, err := dist.IsEncryptedKeyFile(key)
						if err != nil {
							return err
						}
						if encrypted {
							if pass, err = passphrase(c, false); err != nil {
								return err
							}
						}
					}
					a, err := release.Build(ctx, release.BuildOptions{
						Version: c.String("version"), SourceDir: c.String("source"), OutDir: c.String("out"),
						KeyFile: c.String("key"), Passphrase: pass, AllowDirty: c.Bool("allow-dirty"),
					})
					if err != nil {
						return err
					}
					fmt.Fprintf(c.Root().Writer, "%s  %d bytes  sha256 %s  commit %s\n", a.Tarball, a.Size, a.SHA256, a.Commit)
					if a.Signature == "" {
						fmt.Fprintln(c.Root().ErrWriter, "opsagent: warning: not signed (no --key); instances will refuse it as an update")
					}
					return nil
				},
			},
			{
				Name:  "publish",
				Usage: "upload dist/ to S3 as <prefix><version>/… and then <prefix>latest.json",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "bucket", Required: true},
					&cli.StringFlag{Name: "version", Required: true},
					&cli.StringFlag{Name: "endpoint", Value: "https://s3.amazonaws.com", Usage: "S3-compatible endpoint URL"},
					&cli.StringFlag{Name: "region", Value: "us-east-1"},
					&cli.StringFlag{Name: "prefix", Usage: "key prefix, e.g. opsagent/"},
					&cli.StringFlag{Name: "dist", Value: "dist"},
					&cli.StringFlag{Name: "acl", Value: "public-read", Usage: "canned ACL of the objects, or none"},
					&cli.BoolFlag{Name: "force", Usage: "overwrite an existing version"},
				},
				Action: func(ctx context.Context, c *cli.Command) error {
					if err := dist.CheckVersion(c.String("version")); err != nil {
						return usageErrorf("%v", err)
					}
					opts := release.PublishOptions{
						Bucket: c.String("bucket"), Version: c.String("version"), Endpoint: c.String("endpoint"),
						Region: c.String("region"), Prefix: c.String("prefix"), Dist: c.String("dist"),
						ACL: c.String("acl"), Force: c.Bool("force"),
					}
					if f := terminalOrNil(c.Root().ErrWriter); f != nil {
						opts.Progress = func(name string, size int64) io.Reader { return &progressBar{w: f, name: name, size: size} }
					}
					l, err := release.Publish(ctx, opts)
					if err != nil {
						return err
					}
					fmt.Fprintf(c.Root().Writer, "published %s (sha256 %s); latest.json updated\n", l.Version, l.SHA256)
					return nil
				},
			},
		},
	}
}

// passphrase reads the signing passphrase from OPSAGENT_SIGNING_PASSPHRASE,
// else from the command's input (asking twice when confirm).
func passphrase(c *cli.Command, confirm bool) (string, error) {
	if p := os.Getenv("OPSAGENT_SIGNING_PASSPHRASE"); p != "" {
		return p, nil
	}
	in := bufio.NewReader(c.Root().Reader)
	fmt.Fprint(c.Root().ErrWriter, "passphrase for the signing key: ")
	p, err := in.ReadString('\n')
	if err != nil && p == "" {
		return "", fmt.Errorf("no passphrase: set OPSAGENT_SIGNING_PASSPHRASE, or pass --unencrypted for a CI key")
	}
	p = strings.TrimRight(p, "\r\n")
	if confirm {
		fmt.Fprint(c.Root().ErrWriter, "again: ")
		q, _ := in.ReadString('\n')
		if strings.TrimRight(q, "\r\n") != p {
			return "", fmt.Errorf("the two passphrases differ")
		}
	}
	return p, nil
}

// progressBar draws one line per upload on a terminal; minio-go reads from
// it as it sends.
type progressBar struct {
	w    io.Writer
	name string
	size int64
	done atomic.Int64
}

func (p *progressBar) Read(b []byte) (int, error) {
	n := p.done.Add(int64(len(b)))
	width := 30
	filled := width
	if p.size > 0 {
		filled = int(min(n, p.size) * int64(width) / p.size)
	}
	fmt.Fprintf(p.w, "\r%-40s [%s%s] %3d%%", p.name, strings.Repeat("#", filled), strings.Repeat(" ", width-filled), filled*100/width)
	if n >= p.size {
		fmt.Fprintln(p.w)
	}
	return len(b), nil
}
