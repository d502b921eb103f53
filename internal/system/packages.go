package system

import (
	"context"
	"errors"
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

	// CompareVersions compares two versions as the manager does (<0: a
	// is older).
	CompareVersions(a, b string) int
	// VersionMatches reports whether installed is the version a recipe
	// asks for (see DebVersionMatches and RPMVersionMatches).
	VersionMatches(requested, installed string) bool
	// Leftovers returns those of names that are removed but whose
	// configuration files remain (dpkg's config-files state): what a
	// purge still has to do. RPM keeps no such state.
	Leftovers(ctx context.Context, names ...string) (map[string]bool, error)
	// IndexStale reports whether the package index is older than its
	// sources, so that what it offers must be refreshed before it is
	// trusted.
	IndexStale() (bool, error)
	// Offers asks the package index what the repositories offer of each
	// of names; a name absent from the map is unknown to it. It changes
	// nothing.
	Offers(ctx context.Context, o PackageOptions, names ...string) (map[string]Offer, error)
	// RefreshIndex fetches the repositories' indexes again (apt-get
	// update; dnf makecache --refresh).
	RefreshIndex(ctx context.Context, o PackageOptions) error
	// Apply makes the changes of c in as few runs of the package manager
	// as it can: one removal run, one purge run, one install run. It
	// returns the managers' output.
	Apply(ctx context.Context, c PackageChange) (string, error)
	// PackageFileName reads the name of the package a package file holds
	// (path is inside the root).
	PackageFileName(ctx context.Context, path string) (string, error)
}

// PackageOptions are a package state's options that reach the manager.
type PackageOptions struct {
	// Repo restricts installs to one repository: apt's target release
	// (-t), dnf's and yum's only enabled repository.
	Repo string
	// NoVerify installs packages whose signatures cannot be verified
	// (apt --allow-unauthenticated, dnf --nogpgcheck).
	NoVerify bool
}

// Offer is what the repositories offer of one package.
type Offer struct {
	// Candidate is the version a plain install would install ("" when
	// none would be).
	Candidate string
	// Versions is every version offered.
	Versions []string
	// Virtual: the index knows the name but offers no version of it:
	// other packages provide it (apt installs one of them).
	Virtual bool
}

// PackageTarget is one package to install: from a repository (Version is
// an exact version, or "" for the candidate) or from a package file
// (File, a path inside the root).
type PackageTarget struct {
	Name    string
	Version string
	File    string
	// Downgrade: Version is older than the installed one.
	Downgrade bool
}

// PackageChange is what one package state changes.
type PackageChange struct {
	PackageOptions
	Install []PackageTarget
	Remove  []string
	Purge   []string
	// DebconfFile (apt) is loaded with debconf-set-selections before
	// anything is installed (a path inside the root).
	DebconfFile string
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

// PackageError is a run of the package manager that failed: the reasons
// it gave (its error lines) on one line for the state's comment, its
// whole output apart for the state's output.
type PackageError struct {
	Command  string // "apt-get install", "dnf remove"
	ExitCode int
	Reason   string
	Output   string
}

func (e *PackageError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("%s failed with exit code %d", e.Command, e.ExitCode)
	}
	return fmt.Sprintf("%s failed: %s", e.Command, e.Reason)
}

// maxReason bounds the reasons quoted in a PackageError.
const maxReason = 600

// packageError turns a failed run (a *ToolError) of tool doing action
// into a *PackageError; other errors are returned as they are.
func packageError(tool, action string, err error) error {
	var te *ToolError
	if !errors.As(err, &te) {
		return err
	}
	var reasons []string
	first := ""
	for _, l := range strings.Split(te.Output, "\n") {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if first == "" {
			first = l
		}
		if strings.HasPrefix(l, "You have enabled checking of packages via GPG keys") {
			// dnf's explanation, followed by a dump of the repository.
			reasons = append(reasons, "packages are to be checked against GPG keys, and no key is imported (import the repository's key first, e.g. with linux.rpm.key)")
			break
		}
		for _, prefix := range []string{"E: ", "Error: ", "error: ", "No match for argument", "Problem: ", "Error:"} {
			if strings.HasPrefix(l, prefix) {
				reasons = append(reasons, strings.TrimPrefix(l, "E: "))
				break
			}
		}
	}
	reason := strings.Join(reasons, "; ")
	if reason == "" {
		reason = first
	}
	if len(reason) > maxReason {
		reason = textcut.Prefix(reason, maxReason) + "…"
	}
	return &PackageError{Command: strings.TrimSpace(tool + " " + action), ExitCode: te.ExitCode, Reason: reason, Output: te.Output}
}
