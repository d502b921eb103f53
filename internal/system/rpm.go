package system

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"

	"github.com/visualops/opsagent/internal/proc"
)

// RPM is the RHEL family's package manager: rpm to query, dnf (or yum
// where there is no dnf) to change things.
//
// An install root being built holds no rpm or dnf of its own yet; below
// such a root (never below "/") the host's tools act on it through their
// root options, `rpm --root` and `dnf --installroot`, which is what they
// are for. Below "/" the system's own tools run as they are.
type RPM struct {
	h       *Host
	manager string // "dnf" or "yum"
	// hostTools: the root has no rpm tools; the host's act on it.
	hostTools bool
}

func (h *Host) rpmManager() *RPM {
	h.rpmOnce.Do(func() {
		for _, name := range []string{"dnf", "yum"} {
			if h.HasTool(name) && h.HasTool("rpm") {
				h.rpmMgr = &RPM{h: h, manager: name}
				return
			}
		}
		if !h.Chrooted() {
			return
		}
		for _, name := range []string{"dnf", "yum"} {
			_, err1 := exec.LookPath(name)
			_, err2 := exec.LookPath("rpm")
			if err1 == nil && err2 == nil {
				h.rpmMgr = &RPM{h: h, manager: name, hostTools: true}
				return
			}
		}
	})
	return h.rpmMgr
}

// Name is "dnf" or "yum".
func (r *RPM) Name() string { return r.manager }

// Family is the RHEL family.
func (r *RPM) Family() Family { return FamilyRHEL }

// Rpm runs rpm against the root.
func (r *RPM) Rpm(ctx context.Context, args ...string) (string, int, error) {
	c := Cmd{Tool: "rpm", Args: args}
	if r.hostTools {
		c.Args = append([]string{"--root", r.h.opts.Root.Dir()}, args...)
		res, err := r.h.runHostTool(ctx, c)
		return res.Output, res.ExitCode, err
	}
	res, err := r.h.Run(ctx, c)
	return res.Output, res.ExitCode, err
}

// Manager runs dnf or yum against the root, non-interactively, and
// returns an error naming the command when it fails.
func (r *RPM) Manager(ctx context.Context, args ...string) (string, error) {
	full := append([]string{"-y", "-q"}, args...)
	c := Cmd{Tool: r.manager, Args: full}
	if r.hostTools {
		d, _ := r.h.Distro()
		pre := []string{"--installroot", r.h.opts.Root.Dir()}
		if d.VersionID != "" {
			// An install root has no system-release package to tell
			// $releasever; os-release does.
			pre = append(pre, "--releasever", majorVersion(d.VersionID))
		}
		c.Args = append(pre, full...)
		res, err := r.h.runHostTool(ctx, c)
		if err == nil && res.ExitCode != 0 {
			err = &ToolError{Command: commandLine(r.manager, full), ExitCode: res.ExitCode, Output: res.Output}
		}
		return res.Output, err
	}
	res, err := r.h.Check(ctx, c)
	return res.Output, err
}

func majorVersion(v string) string {
	major, _, _ := strings.Cut(v, ".")
	return major
}

// rpmQueryFormat prints one line per installed package: name, then
// [epoch:]version-release.
const rpmQueryFormat = `%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n`

// Installed queries the rpm database.
func (r *RPM) Installed(ctx context.Context, names ...string) (map[string]string, error) {
	out := map[string]string{}
	if len(names) == 0 {
		return out, nil
	}
	text, code, err := r.Rpm(ctx, append([]string{"-q", "--qf", rpmQueryFormat, "--"}, names...)...)
	if err != nil {
		return nil, err
	}
	// rpm exits with the number of packages not installed; those print
	// "package x is not installed" and are simply absent here.
	for _, line := range strings.Split(text, "\n") {
		name, ver, ok := strings.Cut(line, "\t")
		if ok && name != "" && ver != "" {
			out[name] = ver
		}
	}
	if code != 0 && len(out) == 0 && !strings.Contains(text, "is not installed") {
		return nil, &ToolError{Command: "rpm -q", ExitCode: code, Output: text}
	}
	return out, nil
}

// EnsureInstalled installs the names that are not installed. dnf and yum
// refresh expired metadata themselves.
func (r *RPM) EnsureInstalled(ctx context.Context, names ...string) ([]string, error) {
	have, err := r.Installed(ctx, names...)
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, n := range names {
		if _, ok := have[n]; !ok {
			missing = append(missing, n)
		}
	}
	if len(missing) == 0 {
		return nil, nil
	}
	if _, err := r.Manager(ctx, append([]string{"install", "--"}, missing...)...); err != nil {
		return nil, err
	}
	return missing, nil
}

// runHostTool runs one of the host's own tools (found in the agent's
// PATH), never chrooted: only for tools that act on the root through an
// option of their own, and only below a root other than "/".
func (h *Host) runHostTool(ctx context.Context, c Cmd) (proc.Result, error) {
	if !h.Chrooted() {
		return proc.Result{ExitCode: -1}, errors.New("system: host tools act on a root other than / only")
	}
	p, err := exec.LookPath(c.Tool)
	if err != nil {
		return proc.Result{ExitCode: -1}, fmt.Errorf("%s: %w", c.Tool, err)
	}
	pc := h.procCmd(p, c)
	pc.Chroot = ""
	return h.opts.Runner.Run(ctx, pc)
}
