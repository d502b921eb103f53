// Package release builds, signs and publishes opsagent.tgz
// (spec/install-update.md, "Release tarball"): reproducible multi-arch
// tarballs with a SHA-256 file and a minisign signature that `minisign -V`
// accepts, uploaded to any S3-compatible store with latest.json written
// last. What a release is (names, keys, signatures, latest.json) is defined
// in internal/dist, which the self-updater verifies with.
package release

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/userdata"
)

// Runner runs a command in dir and returns its standard output: the seam
// tests replace to answer git and go without running them.
type Runner func(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error)

// maxCommandOutput bounds what is kept of a git or go command's output.
const maxCommandOutput = 4 << 20

// ProcRunner adapts the agent's one process runner (internal/proc) to
// Runner: standard output is returned, standard error goes into the error.
func ProcRunner(r proc.Runner) Runner {
	return func(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error) {
		var stderr bytes.Buffer
		res, err := r.Run(ctx, proc.Cmd{
			Path: name, Args: args, Dir: dir, Env: append(os.Environ(), env...),
			Stderr: &stderr, OutputLimit: maxCommandOutput, KillGrace: 5 * time.Second,
		})
		if err == nil && res.ExitCode != 0 {
			err = fmt.Errorf("exit code %d", res.ExitCode)
		}
		if err != nil {
			return []byte(res.Output), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return []byte(res.Output), nil
	}
}

// BuildOptions configures Build.
type BuildOptions struct {
	Version    string
	SourceDir  string // the repository root (has go.mod and cmd/opsagent)
	OutDir     string // default "dist"
	KeyFile    string // minisign secret key; "" = no signature
	Passphrase string
	AllowDirty bool
	// SourceDateEpoch fixes every timestamp; 0 = $SOURCE_DATE_EPOCH, else
	// the commit time.
	SourceDateEpoch int64
	Run             Runner // default ProcRunner(proc.New())
}

// Artifacts is what Build produced.
type Artifacts struct {
	Tarball, Checksum, Signature string // paths ("" when not signed)
	SHA256                       string
	Size                         int64
	Commit                       string
}

// Build cross-compiles the static binaries, packs opsagent.tgz
// reproducibly, and writes its checksum and signature. When it signs, it
// also compiles the signing key's public half into the binaries
// (dist.EmbeddedPublicKey), so the agents it builds can verify the next
// release signed with the same key without any configuration.
func Build(ctx context.Context, o BuildOptions) (*Artifacts, error) {
	if err := dist.CheckVersion(o.Version); err != nil {
		return nil, err
	}
	if o.Run == nil {
		o.Run = ProcRunner(proc.New())
	}
	if o.OutDir == "" {
		o.OutDir = "dist"
	}
	src, err := filepath.Abs(o.SourceDir)
	if err != nil {
		return nil, fmt.Errorf("release build: source %s: %w", o.SourceDir, err)
	}
	key, err := loadKey(o)
	if err != nil {
		return nil, err
	}
	commit, epoch, err := gitState(ctx, o, src)
	if err != nil {
		return nil, err
	}
	tgz, err := pack(ctx, o, src, key, commit, epoch)
	if err != nil {
		return nil, err
	}
	a, err := writeArtifacts(o.OutDir, tgz)
	if err != nil {
		return nil, err
	}
	a.Commit = commit
	if err := writeSignature(a, o.OutDir, key, tgz, epoch, o.Version); err != nil {
		return nil, err
	}
	return a, nil
}

// loadKey loads the signing key, or returns nil for an unsigned build.
func loadKey(o BuildOptions) (*minisign.PrivateKey, error) {
	if o.KeyFile == "" {
		return nil, nil
	}
	k, err := dist.LoadSecretKey(o.KeyFile, o.Passphrase)
	if err != nil {
		return nil, err
	}
	return &k, nil
}

// pack builds the binaries and returns opsagent.tgz, every timestamp in it
// set to epoch so that the same commit always packs the same bytes.
func pack(ctx context.Context, o BuildOptions, src string, key *minisign.PrivateKey, commit string, epoch int64) ([]byte, error) {
	entries := []archive.Entry{{Name: "VERSION", Mode: 0o644, Data: []byte(o.Version + "\n")}}
	bins, err := buildBinaries(ctx, o, src, ldflags(o.Version, commit, key))
	if err != nil {
		return nil, err
	}
	entries = append(entries, bins...)
	// The copy in the tarball carries placeholders; `opsagent userdata`
	// renders the real one with the app's values and this tarball's hash.
	ud, err := userdata.Render(userdata.Params{WSURI: "@{ws_uri}", AppID: "@{app_id}", Version: o.Version, BaseRemote: "@{base_remote}", PubKey: "@{pubkey}"})
	if err != nil {
		return nil, err
	}
	entries = append(entries, archive.Entry{Name: "userdata.sh", Mode: 0o755, Data: ud})
	var tgz bytes.Buffer
	if err := archive.Create(ctx, &tgz, entries, time.Unix(epoch, 0)); err != nil {
		return nil, fmt.Errorf("release build: pack %s: %w", dist.TarballName, err)
	}
	return tgz.Bytes(), nil
}

// ldflags stamps the version and commit, and the public key of a signed
// build.
func ldflags(version, commit string, key *minisign.PrivateKey) string {
	flags := []string{
		"-s", "-w",
		"-X", "github.com/visualops/opsagent/internal/version.Version=" + version,
		"-X", "github.com/visualops/opsagent/internal/version.Commit=" + commit,
	}
	if key != nil {
		flags = append(flags, dist.EmbedKeyFlag(dist.PublicKeyOf(*key)))
	}
	return strings.Join(flags, " ")
}

// buildBinaries cross-compiles one static binary per dist.Arches.
func buildBinaries(ctx context.Context, o BuildOptions, src, flags string) ([]archive.Entry, error) {
	tmp, err := os.MkdirTemp("", "opsagent-release-")
	if err != nil {
		return nil, fmt.Errorf("release build: %w", err)
	}
	defer os.RemoveAll(tmp)
	var entries []archive.Entry
	for _, arch := range dist.Arches() {
		name := dist.BinaryName(arch)
		out := filepath.Join(tmp, name)
		env := []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + arch, "GOFLAGS=-buildvcs=false"}
		if _, err := o.Run(ctx, src, env, "go", "build", "-trimpath", "-ldflags", flags, "-o", out, "./cmd/opsagent"); err != nil {
			return nil, fmt.Errorf("release build %s: %w", arch, err)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			return nil, fmt.Errorf("release build %s: %w", arch, err)
		}
		entries = append(entries, archive.Entry{Name: name, Mode: 0o755, Data: data})
	}
	return entries, nil
}

// writeArtifacts writes the tarball and its checksum into outDir.
func writeArtifacts(outDir string, tgz []byte) (*Artifacts, error) {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, fmt.Errorf("release build: output directory: %w", err)
	}
	sum := sha256.Sum256(tgz)
	a := &Artifacts{
		Tarball:  filepath.Join(outDir, dist.TarballName),
		Checksum: filepath.Join(outDir, dist.ChecksumName),
		SHA256:   hex.EncodeToString(sum[:]),
		Size:     int64(len(tgz)),
	}
	if err := fsutil.WriteFileAtomic(a.Tarball, tgz, 0o644); err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(a.Checksum, []byte(a.SHA256+"  "+dist.TarballName+"\n"), 0o644); err != nil {
		return nil, err
	}
	return a, nil
}

// writeSignature signs tgz into outDir, or removes a stale signature for
// an unsigned build so that none sits beside a tarball it does not cover.
func writeSignature(a *Artifacts, outDir string, key *minisign.PrivateKey, tgz []byte, epoch int64, version string) error {
	sigPath := filepath.Join(outDir, dist.SignatureName)
	if key == nil {
		if err := os.Remove(sigPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("release build: remove the stale %s: %w", sigPath, err)
		}
		return nil
	}
	// A fixed trusted comment (no wall clock) keeps a rebuild's signature
	// identical; minisign -V prints it.
	trusted := fmt.Sprintf("timestamp:%d\tfile:%s\tversion:%s", epoch, dist.TarballName, version)
	if err := fsutil.WriteFileAtomic(sigPath, dist.Sign(*key, tgz, trusted), 0o644); err != nil {
		return err
	}
	a.Signature = sigPath
	return nil
}

// gitState returns the commit and the timestamp to use, refusing a dirty
// tree unless allowed.
func gitState(ctx context.Context, o BuildOptions, src string) (commit string, epoch int64, err error) {
	out, err := o.Run(ctx, src, nil, "git", "status", "--porcelain", "--untracked-files=no")
	switch {
	case err != nil && !o.AllowDirty:
		return "", 0, fmt.Errorf("release build: %s is not a git checkout (%v); pass --allow-dirty to build anyway", src, err)
	case err == nil && len(bytes.TrimSpace(out)) > 0 && !o.AllowDirty:
		return "", 0, fmt.Errorf("release build: the tree has uncommitted changes:\n%s\ncommit them, or pass --allow-dirty", strings.TrimSpace(string(out)))
	}
	commit = "unknown"
	if out, err := o.Run(ctx, src, nil, "git", "rev-parse", "--short=12", "HEAD"); err == nil {
		commit = strings.TrimSpace(string(out))
	}
	epoch = o.SourceDateEpoch
	if epoch == 0 {
		if v := os.Getenv("SOURCE_DATE_EPOCH"); v != "" {
			if epoch, err = strconv.ParseInt(v, 10, 64); err != nil {
				return "", 0, fmt.Errorf("SOURCE_DATE_EPOCH=%q: not a Unix time", v)
			}
		}
	}
	if epoch == 0 {
		out, err := o.Run(ctx, src, nil, "git", "log", "-1", "--format=%ct")
		if err == nil {
			epoch, _ = strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
		}
	}
	if epoch == 0 {
		return "", 0, errors.New("release build: no timestamp: set SOURCE_DATE_EPOCH or build from a git checkout")
	}
	return commit, epoch, nil
}
