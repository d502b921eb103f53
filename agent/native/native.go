// Package native executes the core Linux modules in Go, with no Python:
// linux.cmd, linux.file, linux.dir and linux.symlink, following the
// parameter semantics of spec/module.json. Every path is taken below the
// configured root, so tests run in a temporary directory, and is resolved
// inside it by package rootfs, as in a chroot: a symlink planted by an
// earlier state, absolute or relative, never leads a create, write,
// chmod, chown or remove outside the root. Comments follow Salt's style,
// and a state that finds everything in place says it is "already in the
// correct state".
package native

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/system"
)

// Options configures an Executor.
type Options struct {
	Root        fsutil.Root
	Runner      proc.Runner  // default proc.New()
	HTTPClient  *http.Client // for linux.file remote_uri; default a 5-minute client
	Logger      *slog.Logger
	OutputLimit int           // bytes of command output kept; default 64 KiB
	KillGrace   time.Duration // SIGTERM → SIGKILL when a command is stopped; default 10 s
	// MaxDownload bounds a remote_uri body; default 256 MiB.
	MaxDownload int64
	// System is the system below Root (distribution, package manager,
	// users, services); nil builds one. The agent shares its own, so
	// that status shows what the modules use.
	System *system.Host
	// WatchDir is the host directory of the watched files' checksums
	// ([global] watch, config.Layout.WatchDir); default the configuration
	// default below Root.
	WatchDir string
	// PPA is where linux.apt.ppa looks a PPA's signing key up; the zero
	// value is Launchpad's API and Ubuntu's keyserver (tests: loopback).
	PPA PPAEndpoints
	// StateDir is the agent's state directory (a host path, [global]
	// conf_path): common.archive keeps what it extracted there. Default:
	// the default conf_path below Root.
	StateDir string
	// S3 is how common.archive reads s3:// sources.
	S3 S3Options
}

// Executor runs the native modules.
type Executor struct {
	opts Options
	log  *slog.Logger
	sys  *system.Host
	// rootOpts opens the root for each state; tests set Legacy to cover
	// the resolver of kernels without openat2.
	rootOpts rootfs.Options
	// svnLocal remembers what svn info said of working copies.
	svnLocal svnInfoCache
	lang     langCache // what pip, npm and gem said of their layout (langpkg.go)
}

// New returns an Executor.
func New(opts Options) *Executor {
	if opts.Runner == nil {
		opts.Runner = proc.New()
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Timeout: 5 * time.Minute}
	}
	if opts.OutputLimit <= 0 {
		opts.OutputLimit = 64 << 10
	}
	if opts.KillGrace <= 0 {
		opts.KillGrace = 10 * time.Second
	}
	if opts.MaxDownload <= 0 {
		opts.MaxDownload = 256 << 20
	}
	if opts.WatchDir == "" {
		opts.WatchDir = config.NewLayout(opts.Root, "", nil).WatchDir()
	}
	if opts.StateDir == "" {
		opts.StateDir = config.NewLayout(opts.Root, "", nil).StateDir()
	}
	opts.S3 = opts.S3.withDefaults()
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sys := opts.System
	if sys == nil {
		sys = system.New(system.Options{Root: opts.Root, Runner: opts.Runner, Logger: log, KillGrace: opts.KillGrace, OutputLimit: opts.OutputLimit})
	}
	return &Executor{opts: opts, log: log, sys: sys}
}

// A module runs one state. In check mode (s.test) it reports what it
// would change and changes nothing: no file, package, user or service is
// touched, and no command of the state runs.
type module func(ctx context.Context, s *stateRun) (state.Result, error)

// stateRun is one state being run: its parameters, the root opened for
// it, and the system below that root.
type stateRun struct {
	id   string // the state's id (watch checksums are kept per state)
	p    params
	fs   *rootfs.FS
	sys  *system.Host
	test bool
}

// did is a past participle for a comment, or its check-mode form:
// "removed" or "would be removed".
func (s *stateRun) did(past string) string {
	if s.test {
		return "would be " + past
	}
	return past
}

// result is the comment of a state that made the changes ch to what
// (Salt's style): "File /x updated: content, mode 0644", "File /x would
// be updated: …" in check mode, or "… is already in the correct state".
func (s *stateRun) result(what string, ch changes) state.Result {
	if len(ch) == 0 {
		return state.Result{OK: true, Comment: what + " is already in the correct state"}
	}
	return state.Result{OK: true, Changed: true, Comment: what + " " + s.did("updated") + ": " + strings.Join(ch, ", ")}
}

// changed is a successful result that changed something (or would have).
func changed(comment string) state.Result {
	return state.Result{OK: true, Changed: true, Comment: comment}
}

// unchanged is a successful result that found everything in place.
func unchanged(comment string) state.Result {
	return state.Result{OK: true, Comment: comment}
}

func (e *Executor) modules() map[string]module {
	return map[string]module{
		"linux.cmd":            e.cmd,
		"linux.file":           e.file,
		"linux.dir":            e.dir,
		"linux.symlink":        e.symlink,
		"linux.user":           e.user,
		"linux.group":          e.group,
		"linux.cronjob":        e.cronjob,
		"common.timezone":      e.timezone,
		"linux.service":        e.service,
		"linux.apt.package":    e.aptPackage,
		"linux.yum.package":    e.yumPackage,
		"linux.apt.repo":       e.aptRepo,
		"linux.apt.ppa":        e.aptPPA,
		"linux.yum.repo":       e.yumRepo,
		"linux.rpm.key":        e.rpmKey,
		"common.git":           e.gitRepo,
		"common.archive":       e.archiveState,
		"common.hg":            e.hgRepo,
		"common.svn":           e.svnRepo,
		"common.pip.package":   e.pipPackage,
		"common.virtualenv":    e.virtualenv,
		"common.npm.package":   e.npmPackage,
		"common.gem.package":   e.gemPackage,
		"linux.docker.running": e.dockerRunning,
		"linux.docker.deploy":  e.dockerDeploy,
		"linux.docker.pulled":  e.dockerPulled,
		"linux.docker.built":   e.dockerBuilt,
		"linux.docker.pushed":  e.dockerPushed,
		"linux.mkfs":           e.mkfs,
		"linux.mount":          e.mount,
		"linux.lvm.pv":         e.lvmPV,
		"linux.lvm.vg":         e.lvmVG,
		"linux.lvm.lv":         e.lvmLV,
		"linux.raid":           e.raid,
		"linux.supervisord":    e.supervisord,
		"linux.puppet.apply":   e.puppetApply,
		"linux.puppet.agent":   e.puppetAgent,
		"linux.puppet.run":     e.puppetRunOnce,
		"linux.chef.client":    e.chefClient,
		"linux.chef.solo":      e.chefSolo,
		"linux.mesos.master":   e.refuse("linux.mesos.master"),
		"linux.mesos.slave":    e.refuse("linux.mesos.slave"),
	}
}

// Supports reports whether module is implemented natively.
func (e *Executor) Supports(module string) bool {
	_, ok := e.modules()[module]
	return ok
}

// Execute runs one state. Bad parameters fail the state with a comment
// naming the parameter.
func (e *Executor) Execute(ctx context.Context, req state.Request) state.Result {
	m, ok := e.modules()[req.Module]
	if !ok {
		return state.Failed(fmt.Sprintf("module %s is not implemented natively", req.Module))
	}
	p, err := parseParams(req.Parameter)
	if err != nil {
		return state.Failed(fmt.Sprintf("%s: %v", req.Module, err))
	}
	// The root is opened per state: no descriptor outlives a state, and a
	// root replaced between states is seen.
	fsys, err := rootfs.OpenWith(e.opts.Root.Dir(), e.rootOpts)
	if err != nil {
		return state.Failed(fmt.Sprintf("%s: %v", req.Module, err))
	}
	defer fsys.Close()
	s := &stateRun{id: req.StateID, p: p, fs: fsys, sys: e.sys, test: req.Test}
	res, err := m(ctx, s)
	if err != nil {
		var bp *badParam
		if errors.As(err, &bp) {
			return state.Failed(fmt.Sprintf("%s: %v", req.Module, err))
		}
		if res.Comment == "" {
			res.Comment = err.Error()
		}
		res.OK = false
	}
	return res
}

// owner resolves optional user and group names (or numeric ids) to ids,
// as the root's /etc/passwd and /etc/group know them; -1 means "leave
// unchanged".
func (s *stateRun) owner() (uid, gid int, err error) {
	uid, gid = -1, -1
	name, err := s.p.str("user")
	if err != nil {
		return 0, 0, err
	}
	if name != "" {
		u, err := s.sys.LookupUser(name)
		if err != nil {
			return 0, 0, &badParam{"user", err.Error()}
		}
		uid = u.UID
	}
	g, err := s.p.str("group")
	if err != nil {
		return 0, 0, err
	}
	if g != "" {
		grp, err := s.sys.LookupGroup(g)
		if err != nil {
			return 0, 0, &badParam{"group", err.Error()}
		}
		gid = grp.GID
	}
	return uid, gid, nil
}

// credential is the uid/gid to run a command as (nil: as the agent). A
// user without a group runs with that user's primary group.
func (s *stateRun) credential() (*syscall.Credential, error) {
	uid, gid, err := s.owner()
	if err != nil || (uid < 0 && gid < 0) {
		return nil, err
	}
	cred := &syscall.Credential{Uid: uint32(syscall.Getuid()), Gid: uint32(syscall.Getgid())}
	if uid >= 0 {
		cred.Uid = uint32(uid)
		if gid < 0 {
			name, _ := s.p.str("user")
			if u, err := s.sys.LookupUser(name); err == nil && u.GID >= 0 {
				cred.Gid = uint32(u.GID)
			}
		}
	}
	if gid >= 0 {
		cred.Gid = uint32(gid)
	}
	return cred, nil
}

// changes collects what a state changed, for its comment.
type changes []string

func (c *changes) add(format string, a ...any) { *c = append(*c, fmt.Sprintf(format, a...)) }

// stateError is a failure whose message is the state's comment, written
// the way Salt writes them ("File /x: …").
type stateError struct{ msg string }

func (e *stateError) Error() string { return e.msg }

func failf(format string, a ...any) error { return &stateError{fmt.Sprintf(format, a...)} }
