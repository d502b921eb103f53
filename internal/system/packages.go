package system

import (
	"context"
	"fmt"
	"strings"

	"github.com/visualops/opsagent/internal/textcut"
)

// PackageManager is the distribution's package manager below the root.
type PackageManager interface {
	// Name is the manager's name as users know it: "apt", "dnf", "yum".
	Name() string
	// Family is the family of distributions it serves.
	Family() Family
	// Installed returns the installed version of each of names that is
	// installed; names not installed are absent from the map. It reads
	// the package database and changes nothing.
	Installed(ctx context.Context, names ...string) (map[string]string, error)
	// EnsureInstalled installs those of names that are not installed, at
	// the version the repositories offer, refreshing the package index
	// first only when it is older than its sources or does not know a
	// package. It returns the names it installed (none: nothing ran).
	EnsureInstalled(ctx context.Context, names ...string) ([]string, error)
}

// NoPackageManagerError says no known package manager is installed below
// the root.
type NoPackageManagerError struct{ Distro Distro }

func (e *NoPackageManagerError) Error() string {
	return fmt.Sprintf("no package manager found on %s (looked for apt-get, dnf and yum)", e.Distro)
}

// Packages returns the package manager of the system below the root: apt
// on the Debian family, dnf (else yum) on the RHEL family. A root whose
// os-release names no known family is judged by the tools it holds.
func (h *Host) Packages() (PackageManager, error) {
	d, err := h.Distro()
	if err != nil {
		return nil, err
	}
	switch d.Family() {
	case FamilyDebian:
		return h.apt(), nil
	case FamilyRHEL:
		if m := h.rpmManager(); m != nil {
			return m, nil
		}
		return nil, &NoPackageManagerError{Distro: d}
	}
	if h.HasTool("apt-get") {
		return h.apt(), nil
	}
	if m := h.rpmManager(); m != nil {
		return m, nil
	}
	return nil, &NoPackageManagerError{Distro: d}
}

// PackagesFor returns the package manager when it serves family, else an
// error that says which module family this system needs: an apt module on
// an RPM system fails with one clear line.
func (h *Host) PackagesFor(family Family, module string) (PackageManager, error) {
	m, err := h.Packages()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", module, err)
	}
	if m.Family() != family {
		d, _ := h.Distro()
		return nil, &WrongFamilyError{Module: module, Distro: d, Manager: m.Name()}
	}
	return m, nil
}

// WrongFamilyError is a package module of one family on a system of
// another (linux.apt.package on RHEL).
type WrongFamilyError struct {
	Module  string
	Distro  Distro
	Manager string
}

func (e *WrongFamilyError) Error() string {
	alt := map[string]string{"apt": "linux.apt.*", "dnf": "linux.yum.*", "yum": "linux.yum.*"}[e.Manager]
	return fmt.Sprintf("%s cannot run on %s, which uses %s: use %s modules here", e.Module, e.Distro, e.Manager, alt)
}

// Prerequisite is a tool a module needs and the package that provides it
// in each family (the 2014 adaptor's implicit requirements).
type Prerequisite struct {
	Tool     string
	Packages map[Family]string
}

// EnsureTool makes sure the prerequisite's tool is installed below the
// root, installing its package when it is missing. It returns the package
// it installed, "" when the tool was already there.
func (h *Host) EnsureTool(ctx context.Context, pre Prerequisite) (string, error) {
	if h.HasTool(pre.Tool) {
		return "", nil
	}
	m, err := h.Packages()
	if err != nil {
		return "", fmt.Errorf("%s is not installed and cannot be: %w", pre.Tool, err)
	}
	pkg := pre.Packages[m.Family()]
	if pkg == "" {
		d, _ := h.Distro()
		return "", fmt.Errorf("%s is not installed, and no package is known to provide it on %s: install it first", pre.Tool, d)
	}
	if _, err := m.EnsureInstalled(ctx, pkg); err != nil {
		return "", fmt.Errorf("%s is not installed, and installing package %s failed: %w", pre.Tool, pkg, err)
	}
	if !h.HasTool(pre.Tool) {
		return "", fmt.Errorf("package %s is installed but %s is still missing", pkg, pre.Tool)
	}
	return pkg, nil
}

// commandLine renders a tool run for messages.
func commandLine(tool string, args []string) string {
	return strings.TrimSpace(tool + " " + strings.Join(args, " "))
}

// maxToolOutput bounds the tool output quoted in an error message: the
// whole output stays in the state's stdout.
const maxToolOutput = 2 << 10

// trimOutput keeps the end of a tool's output (where the reason is) for a
// one-line message.
func trimOutput(out string) string {
	out = strings.TrimSpace(out)
	if cut := textcut.Suffix(out, maxToolOutput); cut != out {
		return "…" + cut
	}
	return out
}
