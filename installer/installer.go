// Package installer is `opsagent install`, `opsagent uninstall` and
// `opsagent userdata`: it lays out an instance as spec/install-update.md
// describes (directories and modes, /etc/opsagent.conf, the token, the
// binary), installs the OS prerequisites that are missing, builds the
// virtualenv and clones the states repository, installs the supervision
// (a systemd unit when systemd runs, and in all cases the cron watchdog)
// and starts the agent.
//
// Every step first checks what is there and changes only what differs, so
// re-running it (the userdata again, by hand on a custom AMI) repairs and
// never duplicates; with nothing to do it writes nothing and says
// "already installed, nothing to do". --dry-run prints the plan.
package installer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/metadata"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/token"
	"github.com/visualops/opsagent/internal/userdata"
	"github.com/visualops/opsagent/internal/version"
)

// Options configures Install.
type Options struct {
	Root       fsutil.Root
	ConfigFile string // host path of the config; "" = /etc/opsagent.conf below Root
	Flags      Params
	Sets       []string // --set section.key=value
	Env        func(string) string
	// Self is the running binary, copied to /opt/visualops/bin/opsagent.
	Self string
	// SkipPackages never calls a package manager. A root other than the
	// host's always skips them.
	SkipPackages bool
	// Start starts (or restarts) the agent even below a root other than
	// the host's, where it is otherwise left stopped.
	Start bool
	// OutputLogged: Out already goes to the bootstrap log (the userdata
	// script logs what install prints), so the log is not written twice.
	OutputLogged bool
	// Downgrade installs the requested version even when the instance runs
	// a newer one (it updated itself since its userdata was written).
	Downgrade bool
	DryRun    bool
	Out       io.Writer
	// Terminal: lines with ✓ and ✗ instead of timestamps.
	Terminal bool
	Runner   proc.Runner
	Logger   *slog.Logger
	// MetadataTimeout bounds the userdata lookup; default 20 s.
	MetadataTimeout time.Duration
	// StartTimeout bounds the wait for a started agent to hold its lock;
	// default 15 s.
	StartTimeout time.Duration

	// treatAsHost makes a temporary root take the host's decisions
	// (systemctl without --root, start through systemd): tests record
	// the host's systemctl calls with a fake runner, never running them.
	treatAsHost bool
}

// Result is what Install did.
type Result struct {
	Lines   []Line
	Changed bool // anything was created, repaired or updated
	PID     int  // the running agent, when known
	Layout  config.Layout
	Params  Params
	Summary string // the closing line
}

// ErrStepsFailed is wrapped by Install's error when steps failed but the
// install went on (the agent retries what it can, e.g. the states
// repository at every round).
var ErrStepsFailed = errors.New("install finished with failed steps")

// ErrUnsafePath is wrapped by Install's error when a fixed path of the
// layout is a symlink, leads out of the root, is not the kind of file
// expected, or a path key names something opsagent did not make: nothing
// was written.
var ErrUnsafePath = errors.New("refusing to install")

// host reports whether this install acts for the host's own system: its
// systemd, its packages.
func (in *installation) host() bool { return in.opts.Root.IsHost() || in.opts.treatAsHost }

// installation carries one run's state between steps.
type installation struct {
	opts   Options
	rep    *reporter
	fs     *files
	layout config.Layout
	cfg    *config.Config // as it will be written (a throwaway copy)
	// keepBinary: the installed binary is newer than this one; keep it.
	keepBinary bool
	apply      func(*config.Config) error
	params     Params
	prevApp    string // the app id of an earlier install
	existing   bool   // a config that loads was there

	binaryChanged bool
	configChanged bool
	tokenChanged  bool
}

// Install lays out, configures and starts the agent. The error is a
// parameter or config problem that stopped it before anything was
// written, or ErrStepsFailed after a complete run with failures.
func Install(ctx context.Context, opts Options) (*Result, error) {
	if opts.ConfigFile == "" {
		opts.ConfigFile = opts.Root.Path(config.DefaultPath)
	}
	if opts.Out == nil {
		opts.Out = io.Discard
	}
	if opts.Runner == nil {
		opts.Runner = proc.New()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Env == nil {
		opts.Env = func(string) string { return "" }
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 15 * time.Second
	}
	if !opts.Root.IsHost() && !opts.treatAsHost {
		opts.SkipPackages = true
	}
	fsys, err := openFiles(opts.Root, !opts.DryRun)
	if err != nil {
		return nil, err
	}
	defer fsys.Close()
	in := &installation{opts: opts, fs: fsys}
	existing := in.loadExisting()
	in.existing = existing != nil
	if existing != nil {
		in.prevApp = existing.Userdata.AppID
	}
	in.layout = config.NewLayout(opts.Root, opts.ConfigFile, existing)
	in.rep = &reporter{out: opts.Out, terminal: opts.Terminal, now: time.Now}
	if !opts.DryRun && !opts.OutputLogged {
		in.rep.logTo = in.appendBootstrapLog
	}

	sets, err := config.ParseSettings(opts.Sets)
	if err != nil {
		return nil, err
	}
	var meta *metadata.Client
	if m := metadataURL(existing, sets); m != "" {
		meta = metadata.New(metadata.Options{BaseURL: m, Logger: opts.Logger, Attempts: 2})
	}
	p, from, err := Resolve(ctx, Sources{Flags: opts.Flags, Env: opts.Env, Metadata: meta, Existing: existing})
	if err != nil {
		in.rep.add("parameters", Failed, "%v", err)
		return nil, err
	}
	if err := in.keepNewer(ctx, existing, &p); err != nil {
		in.rep.add("paths", Failed, "%v", err)
		return nil, err
	}
	in.params = p
	in.rep.add("parameters", Unchanged, "app %s, backend %s, version %s (from %s)", p.AppID, p.WSURI, p.Version, describeSources(from))
	if err := in.buildConfig(sets); err != nil {
		in.rep.add("config", Failed, "%v", err)
		return nil, err
	}
	in.layout = config.NewLayout(opts.Root, opts.ConfigFile, in.cfg)
	// Nothing is written before every fixed path is known to be what it
	// should be: a link planted at one, or leading out of the root, stops
	// the install with its name.
	problems, err := in.fs.checkPaths(in.layout, in.cfg, existing)
	if err == nil && len(problems) > 0 {
		err = fmt.Errorf("%w: %s", ErrUnsafePath, strings.Join(problems, "; "))
	}
	if err != nil {
		in.rep.add("paths", Failed, "%v", err)
		return nil, err
	}

	in.stepLayout()
	in.stepConfig()
	in.stepToken()
	in.stepBinary()
	in.stepPackages(ctx)
	in.stepSaltPath(ctx)
	in.stepService(ctx)
	pid := in.stepStart(ctx)

	res := &Result{Lines: in.rep.lines, PID: pid, Layout: in.layout, Params: p}
	failed := in.rep.count(Failed)
	res.Changed = in.rep.count(Changed) > 0
	switch {
	case opts.DryRun:
		res.Summary = fmt.Sprintf("dry run: %d steps would change something; nothing was written", in.rep.count(Planned))
	case failed > 0:
		res.Summary = fmt.Sprintf("installed, but %d steps failed (see above; the agent retries what it can)", failed)
	case !res.Changed:
		res.Summary = "already installed, nothing to do"
	default:
		res.Summary = fmt.Sprintf("installed: %d steps changed something", in.rep.count(Changed))
	}
	in.rep.note(res.Summary)
	if failed > 0 && !opts.DryRun {
		return res, fmt.Errorf("%w: %d (see %s)", ErrStepsFailed, failed, in.layout.BootstrapLog())
	}
	return res, nil
}

// keepNewer keeps the version the instance runs when it is newer than the
// one asked for: the userdata names the version an instance was first
// given, and re-running it after a self-update must not downgrade. The
// binary kept must prove it: it runs, and `version --json` says the
// version the config names; otherwise (a 0-byte or corrupt file, another
// version) this installer's version is installed over it. A binary that
// is a symlink or leads out of the root is never run.
func (in *installation) keepNewer(ctx context.Context, existing *config.Config, p *Params) error {
	if existing == nil || in.opts.Downgrade || !userdata.KeepsVersion(existing.Userdata.Version, p.Version) {
		return nil
	}
	bin := in.layout.Binary()
	if _, err := in.fs.Lstat(bin); err != nil {
		return nil
	}
	switch problem, err := in.fs.checkPath(bin, aFile, "the agent's binary"); {
	case err != nil:
		return err
	case problem != "":
		return fmt.Errorf("%w: %s", ErrUnsafePath, problem)
	}
	want := existing.Userdata.Version
	if got, err := version.Query(ctx, in.opts.Runner, bin); err != nil || got != want {
		why := fmt.Sprintf("it says it is version %q", got)
		if err != nil {
			why = err.Error()
		}
		in.rep.add("version", Unchanged, "the config names %s, but %s does not run as %s (%s): installing %s over it", want, bin, want, why, p.Version)
		return nil
	}
	in.rep.add("version", Unchanged, "keeping %s, which this instance updated itself to, over %s (install --downgrade to go back)", want, p.Version)
	p.Version = want
	in.keepBinary = true
	return nil
}

// loadExisting loads the config an earlier install wrote, if it loads.
func (in *installation) loadExisting() *config.Config {
	c, err := config.Load(in.opts.ConfigFile)
	if err != nil {
		return nil
	}
	return c
}

// appendBootstrapLog appends a line to bootstrap.log, never through a
// link (the reporter's sink).
func (in *installation) appendBootstrapLog(line string) {
	f, err := in.fs.AppendLog(in.layout.BootstrapLog())
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = f.WriteString(line + "\n")
}

// metadataURL is where userdata is looked up: --set network.metadata, else
// the existing config's, else the default. A fixed instance id means a
// host without a metadata service: none.
func metadataURL(existing *config.Config, sets []config.Setting) string {
	url, fixedID := config.Default().Network.Metadata, ""
	if existing != nil {
		url, fixedID = existing.Network.Metadata, existing.Network.InstanceID
	}
	for _, s := range sets {
		switch s.Section + "." + s.Key {
		case "network.metadata":
			url = s.Value
		case "network.instance_id":
			fixedID = s.Value
		}
	}
	if fixedID != "" {
		return ""
	}
	return url
}

func describeSources(from map[string]string) string {
	seen := map[string]bool{}
	var out []string
	for _, k := range []string{"WS_URI", "APP_ID", "VERSION", "BASE_REMOTE"} {
		if f := from[k]; f != "" && !seen[f] {
			seen[f] = true
			out = append(out, f)
		}
	}
	if len(out) == 0 {
		return "nowhere"
	}
	s := out[0]
	for _, o := range out[1:] {
		s += ", " + o
	}
	return s
}

// buildConfig decides the config's values: the parameters and --set, on
// top of the existing file (unknown keys and comments kept). It checks
// them on a throwaway copy as the agent will read them (checkConfig);
// stepConfig saves them through the config's Owner, the one writer of the
// file.
func (in *installation) buildConfig(sets []config.Setting) error {
	platform := ""
	if in.host() {
		platform = detectPlatform()
	}
	in.apply = applier(in.params, sets, platform)
	c := in.freshConfig()
	if err := in.apply(c); err != nil {
		return err
	}
	if err := checkConfig(c); err != nil {
		return err
	}
	in.cfg = c
	return nil
}

// applier returns the change that puts the parameters and --set items
// into a config: what install saves and what userdata checks it would.
func applier(p Params, sets []config.Setting, platform string) func(*config.Config) error {
	return func(c *config.Config) error {
		for _, q := range params {
			v := *q.field(&p)
			if v == "" {
				continue
			}
			if err := c.Set(q.section, q.key, v); err != nil {
				return fmt.Errorf("%s (or %s): %w", q.flag, q.env, err)
			}
		}
		for _, s := range sets {
			if err := s.Apply(c); err != nil {
				return err
			}
		}
		if c.Global.Platform == "" && platform != "" {
			c.Global.Platform = platform
		}
		return nil
	}
}

// checkConfig is what a config must pass before install writes it or
// userdata promises it: every value as the agent reads it, the whole file
// within what the agent loads (config.Check), and a [userdata] pubkey the
// updater can use (dist.ParsePublicKey: a malformed one would disable
// every update, even those signed by the compiled-in key).
func checkConfig(c *config.Config) error {
	if k := c.Userdata.PubKey; k != "" {
		if _, err := dist.ParsePublicKey(k); err != nil {
			return fmt.Errorf("[userdata] pubkey %q (--pubkey or PUBKEY): %w; give the last line of minisign.pub ('opsagent release keygen' prints it)", k, err)
		}
	}
	return c.Check()
}

// freshConfig loads the config file anew (or starts a new one): each call
// gives a separate copy.
func (in *installation) freshConfig() *config.Config {
	if c := in.loadExisting(); c != nil {
		return c
	}
	return config.New(in.opts.ConfigFile)
}

func (in *installation) stepLayout() {
	var changes []string
	for _, d := range in.layout.Dirs() {
		what, err := in.ensureDir(d.Path, d.Mode)
		if err != nil {
			in.rep.add("layout", Failed, "%v (is the root writable? run as root)", err)
			return
		}
		if what != "" {
			changes = append(changes, what)
		}
	}
	in.report("layout", changes, "directories present with their modes")
}

// ensureDir creates dir with mode, or repairs its mode; it returns what it
// did ("" for nothing). A symlink at dir is refused, never followed.
func (in *installation) ensureDir(dir string, mode fs.FileMode) (string, error) {
	st, err := in.fs.Lstat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if in.opts.DryRun {
			return fmt.Sprintf("create %s (%04o)", dir, mode), nil
		}
		if err := in.fs.MkdirAll(dir, mode); err != nil {
			return "", err
		}
		if err := in.fs.Chmod(dir, mode); err != nil { // umask
			return "", err
		}
		return fmt.Sprintf("created %s (%04o)", dir, mode), nil
	case err != nil:
		return "", err
	case st.Mode()&fs.ModeSymlink != 0:
		return "", fmt.Errorf("%s is a symbolic link: remove it (opsagent never follows a link at its fixed paths)", dir)
	case !st.IsDir():
		return "", fmt.Errorf("%s is not a directory: move it away", dir)
	case st.Mode().Perm() != mode:
		if in.opts.DryRun {
			return fmt.Sprintf("set %s to %04o (is %04o)", dir, mode, st.Mode().Perm()), nil
		}
		if err := in.fs.Chmod(dir, mode); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s mode %04o (was %04o)", dir, mode, st.Mode().Perm()), nil
	}
	return "", nil
}

// ensureFile writes data with mode when the file differs; it returns what
// it did ("" for nothing). A symlink or anything but a regular file at
// path is refused, never followed.
func (in *installation) ensureFile(path string, data []byte, mode fs.FileMode) (string, error) {
	st, statErr := in.fs.Lstat(path)
	switch {
	case errors.Is(statErr, fs.ErrNotExist):
	case statErr != nil:
		return "", statErr
	case st.Mode()&fs.ModeSymlink != 0:
		return "", fmt.Errorf("%s is a symbolic link: remove it (opsagent never follows a link at its fixed paths)", path)
	case !st.Mode().IsRegular():
		return "", fmt.Errorf("%s is not a regular file (%s): move it away", path, st.Mode().Type())
	}
	var old []byte
	if statErr == nil {
		var err error
		if old, err = in.fs.ReadFile(path, 64<<20); err != nil {
			return "", fmt.Errorf("%s: %w", path, unwrapPath(err))
		}
	}
	switch {
	case statErr == nil && bytes.Equal(old, data) && st.Mode().Perm() == mode:
		return "", nil
	case statErr == nil && bytes.Equal(old, data):
		if in.opts.DryRun {
			return fmt.Sprintf("set %s to %04o", path, mode), nil
		}
		if err := in.fs.Chmod(path, mode); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s mode %04o (was %04o)", path, mode, st.Mode().Perm()), nil
	}
	verb := "updated"
	if statErr != nil {
		verb = "created"
	}
	if in.opts.DryRun {
		return fmt.Sprintf("%s %s", map[string]string{"updated": "update", "created": "create"}[verb], path), nil
	}
	if err := in.fs.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	if err := in.fs.WriteFileAtomic(path, data, mode); err != nil {
		return "", err
	}
	return verb + " " + path, nil
}

// chmodFile gives a regular file at path mode, on the file itself (a
// symlink at path is refused); it returns what it did ("" for nothing).
func (in *installation) chmodFile(path string, mode fs.FileMode) (string, error) {
	st, err := in.fs.Lstat(path)
	switch {
	case err != nil:
		return "", err
	case !st.Mode().IsRegular():
		return "", fmt.Errorf("%s is not a regular file (%s): remove it", path, st.Mode().Type())
	case st.Mode().Perm() == mode:
		return "", nil
	}
	if !in.opts.DryRun {
		if err := in.fs.Chmod(path, mode); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("%s mode %04o (was %04o)", path, mode, st.Mode().Perm()), nil
}

// report adds a step's line: what changed, or that it was already right.
func (in *installation) report(step string, changes []string, unchanged string) {
	if len(changes) == 0 {
		in.rep.add(step, Unchanged, "%s", unchanged)
		return
	}
	o := Changed
	if in.opts.DryRun {
		o = Planned
	}
	in.rep.add(step, o, "%s", joinChanges(changes))
}

func joinChanges(c []string) string {
	s := c[0]
	for _, x := range c[1:] {
		s += "; " + x
	}
	return s
}

func (in *installation) stepConfig() {
	path := in.layout.ConfigFile()
	var changes []string
	if in.opts.DryRun {
		old, _ := in.fs.ReadFile(path, config.MaxFileSize)
		data, err := in.cfg.Bytes()
		if err != nil {
			in.rep.add("config", Failed, "%v", err)
			return
		}
		if !bytes.Equal(old, data) {
			changes = append(changes, "write "+path)
		}
		in.report("config", changes, path+" is current")
		return
	}
	if !in.existing {
		if _, err := in.fs.Lstat(path); err == nil {
			changes = append(changes, "replaced "+path+", which did not load")
		}
	}
	changed, err := config.NewOwner(in.freshConfig()).Update(in.apply)
	if err != nil {
		in.rep.add("config", Failed, "%v", err)
		return
	}
	if changed {
		in.configChanged = true
		if len(changes) == 0 {
			changes = append(changes, "wrote "+path)
		}
	}
	what, err := in.chmodFile(path, config.FileMode)
	if err != nil {
		in.rep.add("config", Failed, "%v", err)
		return
	}
	if what != "" {
		changes = append(changes, what)
	}
	in.report("config", changes, path+" is current")
}

func (in *installation) stepToken() {
	p := in.layout.TokenFile()
	var changes []string
	appChanged := userdata.NewToken(in.prevApp, in.params.AppID)
	switch err := token.Problem(p); {
	case errors.Is(err, token.ErrMissing) || appChanged:
		why := "created " + p
		if appChanged {
			why = "replaced " + p + " (the app id changed)"
		}
		if in.opts.DryRun {
			changes = append(changes, "create "+p)
			break
		}
		if err := token.Create(p); err != nil {
			in.rep.add("token", Failed, "%v", err)
			return
		}
		in.tokenChanged = true
		changes = append(changes, why)
	case errors.Is(err, token.ErrTooOpen):
		what, err := in.chmodFile(p, token.Mode)
		if err != nil {
			in.rep.add("token", Failed, "%v", err)
			return
		}
		changes = append(changes, what)
	case err != nil:
		in.rep.add("token", Failed, "%v", err)
		return
	}
	in.report("token", changes, p+" kept")
}

func (in *installation) stepBinary() {
	dst := in.layout.Binary()
	if in.opts.Self == "" {
		in.rep.add("binary", Skipped, "the running binary is unknown; not copied to %s", dst)
		return
	}
	if in.keepBinary {
		in.report("binary", in.chmodOnly(dst), dst+" is kept (newer)")
		return
	}
	if in.same(in.opts.Self, dst) {
		in.report("binary", in.chmodOnly(dst), dst+" is this binary")
		return
	}
	if same, err := in.sameBytes(in.opts.Self, dst); err == nil && same {
		in.report("binary", in.chmodOnly(dst), dst+" is current")
		return
	}
	data, err := os.ReadFile(in.opts.Self)
	if err != nil {
		in.rep.add("binary", Failed, "cannot read the running binary %s: %v", in.opts.Self, err)
		return
	}
	what, err := in.ensureFile(dst, data, 0o755)
	if err != nil {
		in.rep.add("binary", Failed, "%v", err)
		return
	}
	var changes []string
	if what != "" {
		in.binaryChanged = true
		sum := sha256.Sum256(data)
		changes = append(changes, fmt.Sprintf("%s (sha256 %x…)", what, sum[:6]))
	}
	in.report("binary", changes, dst+" is current")
}

// chmodOnly makes the kept binary 0755 (on the file itself, never
// through a link).
func (in *installation) chmodOnly(path string) []string {
	what, err := in.chmodFile(path, 0o755)
	if err != nil {
		in.rep.add("binary", Failed, "%v", err)
		return nil
	}
	if what == "" {
		return nil
	}
	return []string{what}
}

// same reports whether the running binary a is the installed b itself
// (b not followed: a link there is never "the same").
func (in *installation) same(a, b string) bool {
	sa, err1 := os.Stat(a)
	sb, err2 := in.fs.Lstat(b)
	if err1 != nil || err2 != nil || !sb.Mode().IsRegular() {
		return false
	}
	return sameInode(sa, sb)
}

// sameBytes reports whether the installed file at path (in the root, a
// link there never followed) holds exactly what the running binary self
// holds. It reads both a block at a time: a re-run finds the 30 MB binary
// current without holding two copies of it (reading both whole cost more
// than half a second a re-run). An error says only that it cannot tell.
func (in *installation) sameBytes(self, path string) (bool, error) {
	a, err := os.Open(self)
	if err != nil {
		return false, err
	}
	defer a.Close()
	b, err := in.fs.Open(path)
	if err != nil {
		return false, err
	}
	defer b.Close()
	sa, err1 := a.Stat()
	sb, err2 := b.Stat()
	if err := errors.Join(err1, err2); err != nil {
		return false, err
	}
	if !sb.Mode().IsRegular() || sa.Size() != sb.Size() {
		return false, nil
	}
	const block = 256 << 10
	bufA, bufB := make([]byte, block), make([]byte, block)
	for {
		na, errA := io.ReadFull(a, bufA)
		nb, errB := io.ReadFull(b, bufB)
		if na != nb || !bytes.Equal(bufA[:na], bufB[:nb]) {
			return false, nil
		}
		endA := errA == io.EOF || errA == io.ErrUnexpectedEOF
		endB := errB == io.EOF || errB == io.ErrUnexpectedEOF
		switch {
		case endA && endB:
			return true, nil
		case endA != endB:
			return false, nil
		case errA != nil:
			return false, errA
		case errB != nil:
			return false, errB
		}
	}
}

// sameInode compares the device and inode of two FileInfos, from package
// os or from rootfs (whose Sys types differ, so os.SameFile cannot).
func sameInode(a, b fs.FileInfo) bool {
	devIno := func(fi fs.FileInfo) (uint64, uint64, bool) {
		switch st := fi.Sys().(type) {
		case *unix.Stat_t:
			return st.Dev, st.Ino, true
		case *syscall.Stat_t:
			return st.Dev, st.Ino, true
		}
		return 0, 0, false
	}
	da, ia, oka := devIno(a)
	db, ib, okb := devIno(b)
	return oka && okb && da == db && ia == ib
}
