// Package system is what the agent knows of the operating system below
// its root, and how it acts on it: the distribution (os-release), its
// package manager, users and groups, crontabs, services, and running one
// of the system's own tools against the root.
//
// The native catalogue modules and the installer both go through it, so
// that one rule decides how a tool runs. With the root "/" (production) a
// tool runs as it is. Below any other root (tests, demos) it runs chrooted
// into that root, found in the root's own PATH, never the host's: a test
// that points the agent at a debootstrapped Debian root runs that root's
// apt-get and useradd, and nothing happens to the machine running the
// test. The one exception is an RPM install root that holds no tools of
// its own: the host's rpm and dnf act on it through their root options
// (see rpm.go), which is how such roots are built in the first place.
package system

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/rootfs"
)

// Options configures a Host.
type Options struct {
	Root   fsutil.Root
	Runner proc.Runner // default proc.New()
	Logger *slog.Logger
	// KillGrace is the SIGTERM → SIGKILL grace when a tool is stopped;
	// default 10 s.
	KillGrace time.Duration
	// OutputLimit bounds the output kept of one tool run; default 64 KiB.
	OutputLimit int
	// Env is added to every tool's environment (tests: proxies, locale).
	Env []string
	// HostPID1 tells whether PID 1 of the machine is systemd; nil reads
	// /run/systemd/system on the host, as sd_booted(3) does. Tests set it.
	HostPID1 func() InitSystem
}

// Host is the system below one root. Its distribution and init system
// are detected once, on first use; it is safe for concurrent use.
type Host struct {
	opts Options
	log  *slog.Logger

	once   sync.Once
	distro Distro
	dErr   error
	init   InitSystem

	pkgOnce sync.Once
	aptMgr  *Apt
	rpmOnce sync.Once
	rpmMgr  *RPM
}

// New returns a Host for opts.Root.
func New(opts Options) *Host {
	if opts.Runner == nil {
		opts.Runner = proc.New()
	}
	if opts.KillGrace <= 0 {
		opts.KillGrace = 10 * time.Second
	}
	if opts.OutputLimit <= 0 {
		opts.OutputLimit = 64 << 10
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Host{opts: opts, log: log}
}

// Root is the root the host acts below.
func (h *Host) Root() fsutil.Root { return h.opts.Root }

// Chrooted reports whether tools run chrooted (the root is not "/").
func (h *Host) Chrooted() bool { return !h.opts.Root.IsHost() }

// InitSystem is how services are managed.
type InitSystem string

// The init systems the service module drives.
const (
	InitSystemd InitSystem = "systemd"
	InitSysV    InitSystem = "sysv" // init scripts, through service(8) when present
)

func (h *Host) detect() {
	h.once.Do(func() {
		h.distro, h.dErr = h.readDistro()
		h.init = InitSysV
		// systemd manages services only on the machine it booted: below
		// another root there is no systemd to talk to (systemctl would
		// drive the host's), so init scripts are used there.
		if !h.Chrooted() {
			pid1 := h.opts.HostPID1
			if pid1 == nil {
				pid1 = bootedWithSystemd
			}
			h.init = pid1()
		}
	})
}

func bootedWithSystemd() InitSystem {
	if fi, err := os.Lstat("/run/systemd/system"); err == nil && fi.IsDir() {
		return InitSystemd
	}
	return InitSysV
}

func (h *Host) readDistro() (Distro, error) {
	fsys, err := rootfs.Open(h.opts.Root.Dir())
	if err != nil {
		return Distro{}, err
	}
	defer fsys.Close()
	var firstErr error
	for _, p := range []string{"/etc/os-release", "/usr/lib/os-release"} {
		data, err := fsys.ReadFile(p, maxOSRelease)
		if err != nil {
			if firstErr == nil && !errors.Is(err, fs.ErrNotExist) {
				firstErr = err
			}
			continue
		}
		d, err := ParseOSRelease(data)
		if err != nil {
			return Distro{}, fmt.Errorf("%s: %w", p, err)
		}
		return d, nil
	}
	if firstErr != nil {
		return Distro{}, firstErr
	}
	return Distro{}, fmt.Errorf("no /etc/os-release or /usr/lib/os-release below %s: cannot tell the distribution", h.opts.Root.Dir())
}

// Distro is the distribution below the root, read once.
func (h *Host) Distro() (Distro, error) {
	h.detect()
	return h.distro, h.dErr
}

// Init is the init system that manages services below the root.
func (h *Host) Init() InitSystem {
	h.detect()
	return h.init
}

// Info is what `opsagent status` shows of the system.
type Info struct {
	Distro         string     `json:"distro"`
	ID             string     `json:"id,omitempty"`
	Version        string     `json:"version,omitempty"`
	Family         Family     `json:"family,omitempty"`
	PackageManager string     `json:"package_manager,omitempty"`
	Init           InitSystem `json:"init"`
	Chroot         bool       `json:"chroot,omitempty"` // tools run chrooted into the root
	Error          string     `json:"error,omitempty"`
}

// Info describes the system for status.
func (h *Host) Info() Info {
	d, err := h.Distro()
	in := Info{Distro: d.String(), ID: d.ID, Version: d.VersionID, Family: d.Family(), Init: h.Init(), Chroot: h.Chrooted()}
	if err != nil {
		in.Error = err.Error()
	}
	if m, err := h.Packages(); err == nil {
		in.PackageManager = m.Name()
	}
	return in
}

// searchPath is where tools are looked for, inside the root: the usual
// PATH of a root shell. The agent's own PATH is not used, so a tool is
// the same whether the agent runs from systemd, cron or a terminal.
var searchPath = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// ToolMissingError says a tool is not installed below the root.
type ToolMissingError struct {
	Tool string
	Root string
}

func (e *ToolMissingError) Error() string {
	where := ""
	if e.Root != "/" {
		where = " below " + e.Root
	}
	return fmt.Sprintf("%s is not installed%s (looked in %v)", e.Tool, where, searchPath)
}

// LookTool finds an executable tool in the root's PATH and returns its
// path inside the root. Links are resolved inside the root, so a root's
// /usr/sbin/x -> /bin/x is found as the root's /bin/x.
func (h *Host) LookTool(name string) (string, error) {
	if path.IsAbs(name) {
		if h.executable(name) {
			return name, nil
		}
		return "", &ToolMissingError{Tool: name, Root: h.opts.Root.Dir()}
	}
	for _, dir := range searchPath {
		p := path.Join(dir, name)
		if h.executable(p) {
			return p, nil
		}
	}
	return "", &ToolMissingError{Tool: name, Root: h.opts.Root.Dir()}
}

// HasTool reports whether name is installed below the root.
func (h *Host) HasTool(name string) bool {
	_, err := h.LookTool(name)
	return err == nil
}

func (h *Host) executable(p string) bool {
	fsys, err := rootfs.Open(h.opts.Root.Dir())
	if err != nil {
		return false
	}
	defer fsys.Close()
	fi, err := fsys.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// Cmd is one run of a system tool.
type Cmd struct {
	Tool  string   // a name looked up in the root's PATH, or an absolute path inside the root
	Args  []string // without the tool
	Stdin io.Reader
	Env   []string // added to the environment
	Dir   string   // inside the root; default "/"
	// Timeout bounds the run (0: none; the state's own timeout and
	// cancellation still apply through ctx).
	Timeout time.Duration
	// Stderr, when set, receives the standard error apart (see proc.Cmd).
	Stderr io.Writer
	// Credential runs the tool as this uid/gid (nil: as the agent). Ids
	// are the root's: the process changes root first, then credentials.
	Credential *syscall.Credential
}

// ToolError is a tool that ran and failed; its output is kept for the
// state's comment.
type ToolError struct {
	Command  string // what ran, for the message
	ExitCode int
	Output   string
}

func (e *ToolError) Error() string {
	out := trimOutput(e.Output)
	if out == "" {
		return fmt.Sprintf("%s failed with exit code %d", e.Command, e.ExitCode)
	}
	return fmt.Sprintf("%s failed with exit code %d: %s", e.Command, e.ExitCode, out)
}

// Run runs a tool of the system below the root and returns its result. A
// tool that is not installed is a *ToolMissingError; one that exits
// non-zero is not an error here (see Check).
func (h *Host) Run(ctx context.Context, c Cmd) (proc.Result, error) {
	p, err := h.LookTool(c.Tool)
	if err != nil {
		return proc.Result{ExitCode: -1}, err
	}
	return h.run(ctx, p, c)
}

// Check runs a tool and turns a non-zero exit into a *ToolError.
func (h *Host) Check(ctx context.Context, c Cmd) (proc.Result, error) {
	res, err := h.Run(ctx, c)
	if err != nil {
		return res, err
	}
	if res.ExitCode != 0 {
		return res, &ToolError{Command: commandLine(c.Tool, c.Args), ExitCode: res.ExitCode, Output: res.Output}
	}
	return res, nil
}

func (h *Host) run(ctx context.Context, toolPath string, c Cmd) (proc.Result, error) {
	pc := h.procCmd(toolPath, c)
	start := time.Now()
	res, err := h.opts.Runner.Run(ctx, pc)
	h.log.Debug("system tool", "cmd", commandLine(c.Tool, c.Args), "exit", res.ExitCode, "took", time.Since(start).Round(time.Millisecond), "err", err)
	return res, err
}

// procCmd is the process that runs c with the tool at toolPath: chrooted
// into the root unless the root is "/".
func (h *Host) procCmd(toolPath string, c Cmd) proc.Cmd {
	dir := c.Dir
	if dir == "" {
		dir = "/"
	}
	pc := proc.Cmd{
		Path:        toolPath,
		Args:        c.Args,
		Dir:         dir,
		Env:         h.env(c.Env),
		Stdin:       c.Stdin,
		Stderr:      c.Stderr,
		OutputLimit: h.opts.OutputLimit,
		KillGrace:   h.opts.KillGrace,
		Timeout:     c.Timeout,
		Credential:  c.Credential,
	}
	if h.Chrooted() {
		pc.Chroot = h.opts.Root.Dir()
	}
	return pc
}

// env is the environment of a system tool: the agent's, with a PATH of
// the root's own and the settings that keep package managers from asking
// questions or translating the output the agent reads.
//
// Below a root other than "/" only the proxy settings pass from the
// agent's environment: the rest describes the machine running the agent
// (its HOME, its PIP_*, npm_config_* or GEM_* settings), not the system
// in the root, whose tools must read the root's own configuration.
func (h *Host) env(extra []string) []string {
	env := make([]string, 0, len(os.Environ())+8)
	for _, kv := range os.Environ() {
		key, _, _ := cutEnv(kv)
		switch key {
		case "PATH", "LANG", "LANGUAGE", "LC_ALL", "DEBIAN_FRONTEND", "DEBCONF_NONINTERACTIVE_SEEN", "APT_LISTCHANGES_FRONTEND", "NEEDRESTART_MODE":
			continue
		}
		if h.Chrooted() && !proxyVar(key) {
			continue
		}
		env = append(env, kv)
	}
	if h.Chrooted() {
		env = append(env, "HOME=/root")
	}
	env = append(env,
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LC_ALL=C",
		"DEBIAN_FRONTEND=noninteractive",
		"DEBCONF_NONINTERACTIVE_SEEN=true",
		"APT_LISTCHANGES_FRONTEND=none",
		"NEEDRESTART_MODE=a", // Ubuntu's needrestart would otherwise prompt
	)
	env = append(env, h.opts.Env...)
	return append(env, extra...)
}

// proxyVar reports whether key is a proxy setting, which holds for the
// network the tools reach whatever root they run in.
func proxyVar(key string) bool {
	switch strings.ToLower(key) {
	case "http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy":
		return true
	}
	return false
}

func cutEnv(kv string) (string, string, bool) {
	for i := 0; i < len(kv); i++ {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}
