package native

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/textcut"
)

// Defaults of linux.cmd (module.json).
const (
	defaultShell   = "/bin/sh"
	defaultTimeout = 600 // seconds
)

// cmd is linux.cmd: run a shell command; exit status ≠ 0 fails.
//
// Its paths are taken inside the root: if-path-present and if-path-absent
// look a path up there (a final symlink counts as present, dangling or
// not), and cwd is created there. The command itself runs as the agent
// (or the state's user) with no confinement: running arbitrary commands
// is what the module is for.
//
// In check mode the conditions are evaluated and the command is reported
// as one that would run; nothing runs (Salt's cmd.run with test=True).
func (e *Executor) cmd(ctx context.Context, s *stateRun) (state.Result, error) {
	p, fsys := s.p, s.fs
	command, err := p.required("cmd")
	if err != nil {
		return state.Result{}, err
	}
	shell, err := p.str("shell")
	if err != nil {
		return state.Result{}, err
	}
	if strings.TrimSpace(shell) == "" {
		shell = defaultShell
	}
	cwd, err := p.str("cwd")
	if err != nil {
		return state.Result{}, err
	}
	if strings.TrimSpace(cwd) == "" {
		cwd = config.CmdCwd
	}
	timeout, err := p.integer("timeout", defaultTimeout)
	if err != nil {
		return state.Result{}, err
	}
	if timeout < 0 {
		return state.Result{}, &badParam{"timeout", "must not be negative"}
	}
	env, err := p.env("env")
	if err != nil {
		return state.Result{}, err
	}
	present, err := p.list("if-path-present")
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.list("if-path-absent")
	if err != nil {
		return state.Result{}, err
	}
	cred, err := s.credential()
	if err != nil {
		return state.Result{}, err
	}
	label := fmt.Sprintf("Command %q", abbreviate(command, maxLabelCommand))

	// The command runs only if all if-path-present paths exist, and not if
	// any if-path-absent path exists. Not running is a success.
	for _, path := range present {
		if _, err := fsys.Lstat(path); err != nil {
			return state.Result{OK: true, Comment: fmt.Sprintf("%s skipped: %s does not exist (if-path-present)", label, path)}, nil
		}
	}
	for _, path := range absent {
		if _, err := fsys.Lstat(path); err == nil {
			return state.Result{OK: true, Comment: fmt.Sprintf("%s skipped: %s exists (if-path-absent)", label, path)}, nil
		}
	}
	if s.test {
		return changed(fmt.Sprintf("%s would be run", label)), nil
	}
	dir, err := prepareCwd(fsys, cwd, cred)
	if err != nil {
		return state.Failed(fmt.Sprintf("%s not run: cannot create cwd %s: %v", label, cwd, err)), nil
	}
	pc := proc.Cmd{
		Path:        shell,
		Args:        []string{"-c", command},
		Dir:         fsys.HostPath(dir),
		Env:         append(os.Environ(), env...),
		Credential:  cred,
		OutputLimit: e.opts.OutputLimit,
		KillGrace:   e.opts.KillGrace,
		Timeout:     time.Duration(timeout) * time.Second,
	}
	// Below a root that holds a system (its own shell), the command runs
	// chrooted into it, as every other tool of the system does: its
	// paths are the instance's. A bare root (a test's temporary
	// directory) has no shell: the command then runs on the machine in
	// the cwd taken inside the root, as before.
	if s.sys.Chrooted() && s.sys.HasTool(shell) {
		pc.Chroot, pc.Dir = fsys.Dir(), dir
		if pc.Path, err = s.sys.LookTool(shell); err != nil {
			return state.Result{}, err
		}
	}
	res, err := e.opts.Runner.Run(ctx, pc)
	out := state.Result{Stdout: res.Output}
	switch {
	case errors.Is(err, proc.ErrTimeout):
		out.Comment = fmt.Sprintf("%s timed out after %ds and was killed (parameter timeout)", label, timeout)
	case err != nil && ctx.Err() != nil:
		out.Comment = fmt.Sprintf("%s stopped: %v", label, ctx.Err())
	case err != nil:
		out.Comment = fmt.Sprintf("%s could not run: %v (parameter shell = %s)", label, err, shell)
	case res.ExitCode != 0:
		if res.ExitCode < 0 {
			out.Comment = fmt.Sprintf("%s was killed by a signal", label)
		} else {
			out.Comment = fmt.Sprintf("%s failed with exit code %d", label, res.ExitCode)
		}
	default:
		out.OK, out.Changed = true, true
		out.Comment = fmt.Sprintf("%s run", label)
	}
	return out, nil
}

// prepareCwd creates the command's working directory inside the root and
// returns it as an instance path with every symlink already resolved
// inside the root: the child process changes into it by name, and the
// host's own resolution of the unresolved text could follow a planted link
// out of the root. With a user, the directory is given to that user, who must be
// able to enter it.
func prepareCwd(fsys *rootfs.FS, cwd string, cred *syscall.Credential) (string, error) {
	if err := fsys.MkdirAll(cwd, 0o755, nil); err != nil {
		return "", err
	}
	real, err := fsys.ResolveLinks(cwd)
	if err != nil {
		return "", err
	}
	if cred != nil {
		_ = fsys.Chown(real, int(cred.Uid), int(cred.Gid), false) // as before: best effort
	}
	return real, nil
}

// maxLabelCommand bounds the command quoted in a comment, so that the
// reason after it survives the StateLog's size cap.
const maxLabelCommand = 200

// abbreviate keeps the first limit bytes of s, on a rune boundary, marking
// the cut.
func abbreviate(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	return fmt.Sprintf("%s… (%d bytes)", textcut.Prefix(s, limit), len(s))
}
