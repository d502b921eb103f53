package release

import (
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"text/template"
	"time"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/fsutil"
)

// Artifact names in the output directory.
const (
	TarballName   = "opsagent.tgz"
	ChecksumName  = "opsagent.tgz.sha256"
	SignatureName = "opsagent.tgz.minisig"
)

// Arches are the architectures every release carries.
var Arches = []string{"amd64", "arm64"}

var versionPattern = regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)?$`)

// CheckVersion refuses anything but MAJOR.MINOR[.PATCH].
func CheckVersion(v string) error {
	if !versionPattern.MatchString(v) {
		return fmt.Errorf("version %q: use MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. 2.1 or 2.1.3", v)
	}
	return nil
}

// Runner runs a command in dir and returns its standard output.
type Runner func(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error)

// ExecRunner is the real Runner.
func ExecRunner(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
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
	Run             Runner // default ExecRunner
}

// Artifacts is what Build produced.
type Artifacts struct {
	Tarball, Checksum, Signature string // paths ("" when not signed)
	SHA256                       string
	Size                         int64
	Commit                       string
}

//go:embed userdata.sh.tmpl
var userdataTemplate string

// UserdataParams fill userdata.sh.
type UserdataParams struct {
	WSURI, AppID, Version, BaseRemote, PubKey, SHA256 string
}

// RenderUserdata renders the bootstrap script, quoting every value for
// bash.
func RenderUserdata(p UserdataParams) ([]byte, error) {
	t, err := template.New("userdata").Funcs(template.FuncMap{"sh": shellQuote}).Parse(userdataTemplate)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, p); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Build cross-compiles the static binaries, packs opsagent.tgz
// reproducibly, and writes its checksum and signature.
func Build(ctx context.Context, o BuildOptions) (*Artifacts, error) {
	if err := CheckVersion(o.Version); err != nil {
		return nil, err
	}
	if o.Run == nil {
		o.Run = ExecRunner
	}
	if o.OutDir == "" {
		o.OutDir = "dist"
	}
	src, err := filepath.Abs(o.SourceDir)
	if err != nil {
		return nil, err
	}
	var key *keyHolder
	if o.KeyFile != "" {
		k, err := LoadSecretKey(o.KeyFile, o.Passphrase)
		if err != nil {
			return nil, err
		}
		key = &keyHolder{k}
	}
	commit, epoch, err := gitState(ctx, o, src)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "opsagent-release-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)

	ldflags := fmt.Sprintf("-s -w -X github.com/visualops/opsagent/internal/version.Version=%s -X github.com/visualops/opsagent/internal/version.Commit=%s", o.Version, commit)
	entries := []archive.Entry{{Name: "VERSION", Mode: 0o644, Data: []byte(o.Version + "\n")}}
	for _, arch := range Arches {
		out := filepath.Join(tmp, "opsagent-linux-"+arch)
		env := []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + arch, "GOFLAGS=-buildvcs=false"}
		if _, err := o.Run(ctx, src, env, "go", "build", "-trimpath", "-ldflags", ldflags, "-o", out, "./cmd/opsagent"); err != nil {
			return nil, fmt.Errorf("release build %s: %w", arch, err)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			return nil, err
		}
		entries = append(entries, archive.Entry{Name: "opsagent-linux-" + arch, Mode: 0o755, Data: data})
	}
	// The copy in the tarball carries placeholders; `opsagent userdata`
	// renders the real one with the app's values and this tarball's hash.
	ud, err := RenderUserdata(UserdataParams{WSURI: "@{ws_uri}", AppID: "@{app_id}", Version: o.Version, BaseRemote: "@{base_remote}", PubKey: "@{pubkey}"})
	if err != nil {
		return nil, err
	}
	entries = append(entries, archive.Entry{Name: "userdata.sh", Mode: 0o755, Data: ud})

	var tgz bytes.Buffer
	if err := archive.Create(ctx, &tgz, entries, time.Unix(epoch, 0)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(tgz.Bytes())
	a := &Artifacts{
		Tarball:  filepath.Join(o.OutDir, TarballName),
		Checksum: filepath.Join(o.OutDir, ChecksumName),
		SHA256:   hex.EncodeToString(sum[:]),
		Size:     int64(tgz.Len()),
		Commit:   commit,
	}
	if err := fsutil.WriteFileAtomic(a.Tarball, tgz.Bytes(), 0o644); err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(a.Checksum, []byte(a.SHA256+"  "+TarballName+"\n"), 0o644); err != nil {
		return nil, err
	}
	sigPath := filepath.Join(o.OutDir, SignatureName)
	if key != nil {
		trusted := fmt.Sprintf("timestamp:%d\tfile:%s\tversion:%s", epoch, TarballName, o.Version)
		if err := fsutil.WriteFileAtomic(sigPath, Sign(key.k, tgz.Bytes(), trusted), 0o644); err != nil {
			return nil, err
		}
		a.Signature = sigPath
	} else {
		_ = os.Remove(sigPath) // never leave a stale signature beside a new tarball
	}
	return a, nil
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

type keyHolder struct{ k minisign.PrivateKey }
