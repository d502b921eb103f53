// Package updater is the agent's self-update (spec/install-update.md,
// "Self-update"), in two steps. Prepare downloads a release (in the
// background while rounds go on: it may take long on a slow link),
// verifies its minisign signature before anything is extracted, takes the
// binary for this architecture with the safe extractor and smoke-tests it.
// Install, called between rounds, swaps it in with minio/selfupdate
// (keeping the previous binary as opsagent.old) and asks the caller to
// re-execute it. It never execs or exits by itself.
//
// Rollback is done by something that is not the new binary: before the
// swap the updater records "confirming" with a deadline in the update
// state and starts the watchdog (cron.sh watch, plain shell) detached; the
// new version confirms after its first successful Handshake. Until then
// the watchdog, cron and the systemd unit restore opsagent.old when the
// deadline passes or the new binary keeps exiting.
package updater

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/minio/selfupdate"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/service"
)

// Options configures an Updater.
type Options struct {
	Layout  config.Layout
	Current string // the running version
	// Target is the binary to replace: the running executable, resolved
	// once at start (a later rename of the file must not redirect it).
	Target string
	// Settings returns the config's current values (base_remote, pubkey):
	// a function, since userdata may change them while the agent runs.
	Settings func() *config.Config
	// EmbeddedKey is the release key compiled into this binary
	// (dist.EmbeddedPublicKey); trusted besides [userdata] pubkey.
	EmbeddedKey   string
	HealthTimeout time.Duration // [agent] update_health_timeout; default 120 s
	MaxDownload   int64         // default 256 MiB
	// Retries is how many download attempts in a row may get nothing
	// more before the download is given up; an attempt that made progress
	// resets the count. Default 5.
	Retries    int
	RetryDelay time.Duration // first pause between attempts, doubled each time (30 s cap); default 1 s
	// StallWindow and StallMinBytes are the stall rule: an attempt is
	// aborted (and the next one resumes with Range) when fewer than
	// StallMinBytes arrive in a StallWindow. Defaults DefaultStallWindow
	// and DefaultStallMinBytes.
	StallWindow   time.Duration
	StallMinBytes int64
	// HTTPClient fetches releases; default one without a flat timeout
	// (the stall rule bounds each attempt).
	HTTPClient *http.Client
	Clock      clock.Clock // the stall windows and the pauses between attempts; default the wall clock
	Runner     proc.Runner
	Logger     *slog.Logger
	// OnStep is told of each step (status, progress bar).
	OnStep func(Step)
	// NoWatchdog does not start `cron.sh watch` before the swap (tests
	// that run the watchdog themselves).
	NoWatchdog bool
}

// Step is where an update stands.
type Step struct {
	Phase   string // downloading, verifying, extracting, smoke-testing, ready, swapping, confirming, refused
	Version string
	Bytes   int64  // downloaded so far
	Total   int64  // -1 when unknown
	Reason  string // why it was refused; while downloading, why the last attempt was interrupted
}

// Request is one update: an AgentUpdate, or `opsagent update` by hand,
// which may force a downgrade or (never from the backend) skip the
// signature check.
type Request struct {
	Version string
	URL     string // "": <base_remote>/<version>/opsagent.tgz
	// Force allows a version that is not newer (by hand only).
	Force bool
	// InsecureSkipSignature applies an unsigned release (by hand only).
	InsecureSkipSignature bool
}

// Restart asks the caller to re-execute Binary, now Version.
type Restart struct {
	Binary  string
	Version string
}

// Updater applies updates.
type Updater struct {
	opts Options
	log  *slog.Logger
}

// New returns an Updater.
func New(opts Options) *Updater {
	if opts.HealthTimeout <= 0 {
		opts.HealthTimeout = 2 * time.Minute
	}
	if opts.MaxDownload <= 0 {
		opts.MaxDownload = 256 << 20
	}
	if opts.Retries <= 0 {
		opts.Retries = 5
	}
	if opts.RetryDelay <= 0 {
		opts.RetryDelay = time.Second
	}
	if opts.StallWindow <= 0 {
		opts.StallWindow = DefaultStallWindow
	}
	if opts.StallMinBytes <= 0 {
		opts.StallMinBytes = DefaultStallMinBytes
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{}
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	if opts.Runner == nil {
		opts.Runner = proc.New()
	}
	if opts.OnStep == nil {
		opts.OnStep = func(Step) {}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Updater{opts: opts, log: log}
}

// Refusal is an update the updater would not apply; the running binary is
// unchanged.
type Refusal struct{ Reason string }

func (r *Refusal) Error() string { return r.Reason }

func refuse(format string, a ...any) error { return &Refusal{Reason: fmt.Sprintf(format, a...)} }

// Do runs one update to the point where the new binary is in place (Prepare
// then Install), and returns the Restart that the caller performs once it
// has unwound. `opsagent update` with no agent running uses it.
func (u *Updater) Do(ctx context.Context, req Request) (*Restart, error) {
	p, err := u.Prepare(ctx, req)
	if err != nil {
		return nil, err
	}
	return p.Install()
}

// Prepared is a release downloaded, verified, extracted and smoke-tested,
// waiting to be swapped in: Install it between rounds, or Discard it.
type Prepared struct {
	u       *Updater
	bin     string // the new binary, Layout.NewBinary
	Version string
}

// Prepare downloads req's release, checks its signature and VERSION,
// extracts this architecture's binary and runs its `version --json`. It
// changes nothing that runs: the agent calls it on a goroutine of its own
// while rounds go on. Cancelled, it keeps the partial download so that
// the next Prepare of the same url resumes it.
func (u *Updater) Prepare(ctx context.Context, req Request) (*Prepared, error) {
	v := req.Version
	if err := dist.CheckVersion(v); err != nil {
		return nil, refuse("update to %q: %v", v, err)
	}
	if !req.Force && !dist.Newer(v, u.opts.Current) {
		return nil, refuse("update to %s refused: not newer than the running %s (by hand: opsagent update --version %s --force)", v, u.opts.Current, v)
	}
	// A version this instance already rolled back is not tried again on
	// the backend's word: it would fail the same way, in a loop. A fixed
	// release gets a new version; by hand, --force tries it anyway.
	if st, err := service.ReadUpdateState(service.UpdateStatePath(u.opts.Layout)); err == nil && !req.Force &&
		st.Phase == service.PhaseRolledBack && st.To == v {
		return nil, refuse("update to %s refused: it was rolled back here (%s); publish a fixed version (by hand: opsagent update --version %s --force)", v, st.Reason, v)
	}
	settings := u.opts.Settings()
	url := req.URL
	if url == "" {
		if settings.Userdata.BaseRemote == "" {
			return nil, refuse("update to %s: no url and no [userdata] base_remote to build one from", v)
		}
		url = strings.TrimRight(settings.Userdata.BaseRemote, "/") + "/" + v + "/" + dist.TarballName
	}
	// A malformed [userdata] pubkey is skipped, not fatal: the release key
	// compiled into this binary still verifies (the agent reports the bad
	// key once, at start).
	verifier, keyErr := dist.NewVerifier(settings.Userdata.PubKey, u.opts.EmbeddedKey)
	if keyErr != nil {
		u.log.Warn("update: a configured release key is malformed and ignored", "err", keyErr)
	}
	if verifier.Len() == 0 && !req.InsecureSkipSignature {
		if keyErr != nil {
			return nil, refuse("update to %s refused: no usable key to verify its signature: [userdata] pubkey: %v", v, keyErr)
		}
		return nil, refuse("update to %s refused: no trusted key to verify its signature (set [userdata] pubkey)", v)
	}
	l := u.opts.Layout
	dir := l.DownloadDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("update to %s: %w", v, err)
	}
	tarball := filepath.Join(dir, dist.TarballName+".unverified")
	sig := filepath.Join(dir, dist.SignatureName)
	defer removePartial(sig)
	defer func() {
		// Kept while cancelled, for the next Prepare to resume; a refusal
		// or a finished preparation leaves nothing behind.
		if ctx.Err() == nil {
			removePartial(tarball)
		}
	}()
	u.step(Step{Phase: "downloading", Version: v, Total: -1})
	if err := u.download(ctx, fetchSpec{url: url, path: tarball, version: v, what: dist.TarballName,
		limit: u.opts.MaxDownload, progress: true, resume: true}); err != nil {
		return nil, err
	}
	if !req.InsecureSkipSignature {
		// Capped while it downloads: a signature is a few hundred bytes,
		// and an endless one must not fill the disk first.
		if err := u.download(ctx, fetchSpec{url: url + ".minisig", path: sig, version: v, what: "the signature",
			limit: dist.MaxSignatureSize}); err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			return nil, refuse("update to %s refused: no signature at %s.minisig: %v", v, url, err)
		}
		u.step(Step{Phase: "verifying", Version: v})
		if err := verifier.VerifyFile(tarball, sig); err != nil {
			return nil, refuse("update to %s refused: signature check failed: %v", v, err)
		}
	} else {
		u.log.Warn("update: signature NOT checked (--insecure-skip-signature, by hand)", "version", v)
	}
	u.step(Step{Phase: "extracting", Version: v})
	newBin := l.NewBinary()
	if err := extractRelease(ctx, tarball, newBin, v); err != nil {
		return nil, err
	}
	u.step(Step{Phase: "smoke-testing", Version: v})
	if err := u.smokeTest(ctx, newBin, v); err != nil {
		_ = os.Remove(newBin)
		return nil, err
	}
	u.step(Step{Phase: "ready", Version: v})
	return &Prepared{u: u, bin: newBin, Version: v}, nil
}

// Install swaps the prepared binary in (between rounds: it takes well
// under a second) and returns the Restart to perform.
func (p *Prepared) Install() (*Restart, error) {
	defer p.Discard()
	return p.u.swap(p.bin, p.Version)
}

// Discard removes the prepared binary (a newer update replaced it, or the
// agent stops before the round ends: the persisted pending update is
// prepared again at the next start).
func (p *Prepared) Discard() { _ = os.Remove(p.bin) }

func (u *Updater) step(s Step) {
	u.log.Info("update: "+s.Phase, "version", s.Version, "bytes", s.Bytes)
	u.opts.OnStep(s)
}

// extractRelease takes this architecture's binary and the VERSION file out
// of the verified tarball; the VERSION must be the one asked for.
func extractRelease(ctx context.Context, tarball, dst, version string) error {
	lim := archive.DefaultLimits()
	var ver bytes.Buffer
	if err := extractEntry(ctx, tarball, "VERSION", &ver, lim); err != nil {
		return refuse("update to %s refused: the tarball has no usable VERSION: %v", version, err)
	}
	if got := strings.TrimSpace(ver.String()); got != version {
		return refuse("update to %s refused: the tarball says VERSION %s", version, got)
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return fmt.Errorf("update to %s: %w", version, err)
	}
	name := dist.BinaryName(runtime.GOARCH)
	err = extractEntry(ctx, tarball, name, f, lim)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(dst)
		return refuse("update to %s refused: %s: %v", version, name, err)
	}
	return nil
}

func extractEntry(ctx context.Context, tarball, name string, w io.Writer, lim archive.Limits) error {
	f, err := os.Open(tarball)
	if err != nil {
		return err
	}
	defer f.Close()
	return archive.ExtractFile(ctx, f, name, w, lim)
}

// smokeTest runs the new binary's `version --json`: a binary for another
// architecture, a corrupt one, or one of another version fails here,
// before the swap.
func (u *Updater) smokeTest(ctx context.Context, bin, version string) error {
	res, err := u.opts.Runner.Run(ctx, proc.Cmd{Path: bin, Args: []string{"version", "--json"}, Timeout: 30 * time.Second, Env: []string{"PATH=/usr/bin:/bin"}})
	if err != nil || res.ExitCode != 0 {
		return refuse("update to %s refused: the new binary does not run (%v, exit %d: %s)", version, err, res.ExitCode, firstLine(res.Output))
	}
	var info struct{ Version string }
	if err := json.Unmarshal([]byte(res.Output), &info); err != nil || info.Version != version {
		return refuse("update to %s refused: the new binary says it is version %q", version, info.Version)
	}
	return nil
}

// swap records the update as confirming, starts the watchdog, and swaps
// the binary; from here on a failure to start or to handshake is rolled
// back by the watchdog.
func (u *Updater) swap(newBin, version string) (*Restart, error) {
	l := u.opts.Layout
	u.step(Step{Phase: "swapping", Version: version})
	st := service.UpdateState{Phase: service.PhaseConfirming, From: u.opts.Current, To: version,
		Deadline: time.Now().Add(u.opts.HealthTimeout), Updated: time.Now()}
	if err := service.WriteUpdateState(service.UpdateStatePath(l), st); err != nil {
		return nil, fmt.Errorf("update to %s: %w", version, err)
	}
	data, err := os.ReadFile(newBin)
	if err != nil {
		return nil, fmt.Errorf("update to %s: %w", version, err)
	}
	old := l.OldBinary()
	if u.opts.Target != l.Binary() {
		old = u.opts.Target + ".old"
	}
	if !u.opts.NoWatchdog {
		// Before the swap and before the caller hands its lock over: the
		// watchdog must not inherit the lock descriptor.
		if err := service.StartWatch(l); err != nil {
			u.log.Warn("update: cannot start the watchdog; cron and systemd will roll back if needed", "err", err)
		}
	}
	err = selfupdate.Apply(bytes.NewReader(data), selfupdate.Options{TargetPath: u.opts.Target, TargetMode: 0o755, OldSavePath: old})
	if err != nil {
		if rerr := selfupdate.RollbackError(err); rerr != nil {
			u.log.Error("update: the swap failed and so did putting the old binary back; the watchdog restores opsagent.old", "err", err, "rollback_err", rerr)
		}
		_ = service.WriteUpdateState(service.UpdateStatePath(l), service.UpdateState{Phase: service.PhaseFailed, From: u.opts.Current, To: version,
			Reason: "swap failed: " + err.Error(), Updated: time.Now()})
		return nil, fmt.Errorf("update to %s: swap: %w", version, err)
	}
	u.step(Step{Phase: "confirming", Version: version})
	u.log.Info("update: new binary in place; re-executing", "from", u.opts.Current, "to", version, "old", old)
	return &Restart{Binary: u.opts.Target, Version: version}, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}
