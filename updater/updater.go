// Package updater owns the agent's self-update (spec/install-update.md,
// "Self-update"): every flow of it, whoever starts it.
//
//   - The agent path: an AgentUpdate, or a request left by `opsagent
//     update` (WriteRequest, TakeRequest), is prepared in the background
//     while rounds go on (PrepareDelivered: download, minisign
//     verification before anything is extracted, this architecture's
//     binary taken with the safe extractor, smoke test) and installed
//     between rounds (Prepared.Install: the swap, with the previous binary
//     kept as opsagent.old), which returns the Restart the caller performs
//     once it has unwound. It never execs or exits by itself.
//   - The new version's side: Confirmation records the update as done
//     after its first accepted Handshake, or reports a rollback.
//   - `opsagent update` (ByHand): asks a running agent, or with none
//     running updates the binary itself and starts the agent.
//
// Rollback is done by something that is not the new binary: before the
// swap the updater records "confirming" with a deadline in the update
// state and starts the watchdog (cron.sh watch, plain shell) detached; the
// new version confirms after its first successful Handshake. Until then
// the watchdog, cron and the systemd unit restore opsagent.old when the
// deadline passes or the new binary keeps exiting. The phases are
// internal/updatephase's; the update-state file and the watchdog script
// are internal/service's, shared with the installer.
//
// Components get what they need of the config as values (Source), never
// the config itself.
package updater

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/minio/selfupdate"

	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/internal/updatephase"
	"github.com/visualops/opsagent/internal/version"
)

// Options configures an Updater.
type Options struct {
	Layout  config.Layout
	Current string // the running version
	// Target is the binary to replace: the running executable, resolved
	// once at start (a later rename of the file must not redirect it).
	Target string
	// Source returns where releases come from and the keys they must be
	// signed with, as they are now: a function, since userdata may change
	// them while the agent runs. Nil: no base_remote and no key.
	Source func() Source
	// EmbeddedKey is the release key compiled into this binary
	// (dist.EmbeddedPublicKey); trusted besides Source's keys.
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

// Source is where releases come from and whom they must be signed by:
// [userdata] base_remote and pubkey, as values.
type Source struct {
	// BaseRemote is the release bucket: <BaseRemote>/<version>/opsagent.tgz.
	BaseRemote string
	// TrustedKeys are minisign public keys (the base64 line of
	// minisign.pub, or the whole file) trusted besides the compiled-in
	// key. One that does not parse is skipped with a warning (KeyProblem
	// says so once, at start).
	TrustedKeys []string
}

// SourceOf converts the config's [userdata] base_remote and pubkey into a
// Source: the one conversion, for the agent and `opsagent update` alike.
func SourceOf(c *config.Config) Source {
	return Source{BaseRemote: c.Userdata.BaseRemote, TrustedKeys: []string{c.Userdata.PubKey}}
}

// Step is where an update stands.
type Step struct {
	Phase   updatephase.Phase // up to Confirming, or Refused
	Version string
	Bytes   int64  // downloaded so far
	Total   int64  // -1 when unknown
	Reason  string // why it was refused; while downloading, why the last attempt was interrupted
}

// Request is one update: an AgentUpdate, or `opsagent update` by hand,
// which may force a downgrade or (never from the backend) skip the
// signature check. It is also what `opsagent update` leaves for a running
// agent (WriteRequest), hence the JSON names.
type Request struct {
	Version string `json:"version"`
	URL     string `json:"url,omitempty"` // "": <base_remote>/<version>/opsagent.tgz
	// Force allows a version that is not newer (by hand only).
	Force bool `json:"force,omitempty"`
	// InsecureSkipSignature applies an unsigned release (by hand only).
	InsecureSkipSignature bool `json:"insecure_skip_signature,omitempty"`
}

// Restart asks the process to re-execute Binary, the new version, with
// the same arguments and environment plus Env: the one restart request,
// from Prepared.Install through the round engine to `opsagent run`, which
// adds the handed-over lock to Env and execs as its very last step.
type Restart struct {
	Binary  string   // the path to exec
	Version string   // the version it is
	Env     []string // added to the environment (the lock handed over)
}

// Updater applies updates.
type Updater struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	last   Step               // what status shows: the current or last step
	byHand map[string]Request // version → a person's request (force, …)
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
	if opts.Source == nil {
		opts.Source = func() Source { return Source{} }
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Updater{opts: opts, log: log, byHand: map[string]Request{}}
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

// ByHand records a person's request (`opsagent update` with an agent
// running, read by TakeRequest): the caller hands r.Version and r.URL to
// the round engine like an AgentUpdate, so that it waits for the round to
// end, and when the engine prepares that version, PrepareDelivered gives
// it the permissions only a person at the instance may give (Force,
// InsecureSkipSignature).
func (u *Updater) ByHand(r Request) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.byHand[r.Version] = r
}

// PrepareDelivered is the agent path's Prepare: the update the round
// engine delivers (an AgentUpdate, or a request by hand for that version),
// prepared in the background. A refusal shows in Status; a cancellation (a
// newer update replaced it, the agent stops) does not.
func (u *Updater) PrepareDelivered(ctx context.Context, version, url string) (*Prepared, error) {
	req := Request{Version: version, URL: url}
	u.mu.Lock()
	if m, ok := u.byHand[version]; ok {
		req.Force, req.InsecureSkipSignature = m.Force, m.InsecureSkipSignature
		if m.URL != "" {
			req.URL = m.URL
		}
		delete(u.byHand, version)
	}
	u.mu.Unlock()
	p, err := u.Prepare(ctx, req)
	if err != nil && ctx.Err() == nil {
		u.refused(version, err)
	}
	return p, err
}

// Status is the current or last step of this process's updates (the
// status file shows it); the zero Step when there was none.
func (u *Updater) Status() Step {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.last
}

func (u *Updater) refused(version string, err error) {
	u.mu.Lock()
	u.last = Step{Phase: updatephase.Refused, Version: version, Reason: err.Error()}
	u.mu.Unlock()
}

// Prepared is a release downloaded, verified, extracted and smoke-tested,
// waiting to be swapped in: Install it between rounds, or Discard it.
type Prepared struct {
	u       *Updater
	bin     string // the new binary, staged beside the target (stagedBinary)
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
	if st, err := service.ReadUpdateState(u.opts.Layout.UpdateStateFile()); err == nil && !req.Force &&
		st.Phase == updatephase.RolledBack && st.To == v {
		return nil, refuse("update to %s refused: it was rolled back here (%s); publish a fixed version (by hand: opsagent update --version %s --force)", v, st.Reason, v)
	}
	src := u.opts.Source()
	url := req.URL
	if url == "" {
		if src.BaseRemote == "" {
			return nil, refuse("update to %s: no url and no [userdata] base_remote to build one from", v)
		}
		url = strings.TrimRight(src.BaseRemote, "/") + "/" + v + "/" + dist.TarballName
	}
	// A malformed [userdata] pubkey is skipped, not fatal: the release key
	// compiled into this binary still verifies (the agent reports the bad
	// key once, at start).
	verifier, keyErr := dist.NewVerifier(append(append([]string(nil), src.TrustedKeys...), u.opts.EmbeddedKey)...)
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
	if err := fsutil.EnsureDir(dir, 0o700); err != nil {
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
	u.step(Step{Phase: updatephase.Downloading, Version: v, Total: -1})
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
		u.step(Step{Phase: updatephase.Verifying, Version: v})
		if err := verifier.VerifyFile(tarball, sig); err != nil {
			return nil, refuse("update to %s refused: signature check failed: %v", v, err)
		}
	} else {
		u.log.Warn("update: signature NOT checked (--insecure-skip-signature, by hand)", "version", v)
	}
	u.step(Step{Phase: updatephase.Extracting, Version: v})
	newBin := stagedBinary(u.opts.Target)
	if err := extractRelease(ctx, tarball, newBin, v); err != nil {
		return nil, err
	}
	u.step(Step{Phase: updatephase.SmokeTesting, Version: v})
	if err := u.smokeTest(ctx, newBin, v); err != nil {
		_ = os.Remove(newBin)
		return nil, err
	}
	u.step(Step{Phase: updatephase.Ready, Version: v})
	return &Prepared{u: u, bin: newBin, Version: v}, nil
}

// stagedBinary is where a prepared binary waits beside target for the
// swap: the name minio/selfupdate's CommitBinary renames into place
// (".<name>.new" in target's directory), so that the swap is two renames
// in one directory and no copy.
func stagedBinary(target string) string {
	return filepath.Join(filepath.Dir(target), "."+filepath.Base(target)+".new")
}

// Install swaps the prepared binary in (between rounds: two renames, well
// under a second) and returns the Restart to perform. A failure shows in
// Status as a refusal; the update state records it as failed.
func (p *Prepared) Install() (*Restart, error) {
	defer p.Discard()
	r, err := p.u.swap(p.bin, p.Version)
	if err != nil {
		p.u.refused(p.Version, err)
	}
	return r, err
}

// Discard removes the prepared binary (a newer update replaced it, or the
// agent stops before the round ends: the persisted pending update is
// prepared again at the next start).
func (p *Prepared) Discard() { _ = os.Remove(p.bin) }

func (u *Updater) step(s Step) {
	u.log.Info("update: "+s.Phase.String(), "version", s.Version, "bytes", s.Bytes)
	u.report(s)
}

// report records s as the current step and tells OnStep.
func (u *Updater) report(s Step) {
	u.mu.Lock()
	u.last = s
	u.mu.Unlock()
	u.opts.OnStep(s)
}

// smokeTest runs the new binary's `version --json` (version.Query, as the
// installer asks a binary it keeps): a binary for another architecture, a
// corrupt one, or one of another version fails here, before the swap.
func (u *Updater) smokeTest(ctx context.Context, bin, v string) error {
	got, err := version.Query(ctx, u.opts.Runner, bin)
	if err != nil {
		return refuse("update to %s refused: the new binary does not run as opsagent: %v", v, err)
	}
	if got != v {
		return refuse("update to %s refused: the new binary says it is version %q", v, got)
	}
	return nil
}

// swap records the update as confirming, starts the watchdog, and swaps
// the binaries: the prepared one, already beside the target, is renamed
// over it and the target to opsagent.old (minio/selfupdate's
// CommitBinary), with no copy and no fsync of the binary. From here on a
// failure to start or to handshake is rolled back by the watchdog.
func (u *Updater) swap(newBin, v string) (*Restart, error) {
	l := u.opts.Layout
	u.step(Step{Phase: updatephase.Swapping, Version: v})
	st := service.UpdateState{Phase: updatephase.Confirming, From: u.opts.Current, To: v,
		Deadline: time.Now().Add(u.opts.HealthTimeout), Updated: time.Now()}
	if err := service.WriteUpdateState(l.UpdateStateFile(), st); err != nil {
		return nil, fmt.Errorf("update to %s: %w", v, err)
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
	err := selfupdate.CommitBinary(selfupdate.Options{TargetPath: u.opts.Target, OldSavePath: old})
	if err != nil {
		if rerr := selfupdate.RollbackError(err); rerr != nil {
			u.log.Error("update: the swap failed and so did putting the old binary back; the watchdog restores opsagent.old", "err", err, "rollback_err", rerr)
		}
		_ = service.WriteUpdateState(l.UpdateStateFile(), service.UpdateState{Phase: updatephase.Failed, From: u.opts.Current, To: v,
			Reason: "swap failed: " + err.Error(), Updated: time.Now()})
		return nil, fmt.Errorf("update to %s: swap: %w", v, err)
	}
	u.step(Step{Phase: updatephase.Confirming, Version: v})
	u.log.Info("update: new binary in place; re-executing", "from", u.opts.Current, "to", v, "old", old)
	return &Restart{Binary: u.opts.Target, Version: v}, nil
}
