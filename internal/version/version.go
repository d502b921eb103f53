// Package version holds the build identity stamped by the linker.
//
// The Makefile sets these with -ldflags "-X ...". They are written once at
// link time and never changed at run time, so they are constants in all but
// syntax.
package version

import (
	"fmt"
	"runtime"
)

var (
	// Version is the agent version, e.g. "2.1". "dev" for unstamped builds.
	Version = "dev"
	// Commit is the git commit the binary was built from.
	Commit = "unknown"
)

// StatesInterface is the version of the interface the agent offers to a
// states repository: the `opsagent` Python shim (opsagent.exception,
// opsagent.utils), the adaptor calls and the config keys its
// scripts/bootstrap.sh reads. It is the 2014 contract, so 1.x; compat.txt
// is checked against it, not against the release number (the 2014 fork
// says "< 2.0" and works). A repository that needs ">= 2.0" asks for a new
// interface.
const StatesInterface = "1.0"

// Info is the build identity in a printable, JSON-friendly form.
type Info struct {
	Version string `json:"version"`
	Commit  string `json:"commit"`
	// StatesInterface is what compat.txt is checked against.
	StatesInterface string `json:"states_interface"`
	GoVersion       string `json:"go_version"`
	OS              string `json:"os"`
	Arch            string `json:"arch"`
}

// Get returns the identity of the running binary.
func Get() Info {
	return Info{Version: Version, Commit: Commit, StatesInterface: StatesInterface, GoVersion: runtime.Version(), OS: runtime.GOOS, Arch: runtime.GOARCH}
}

// String renders the identity on one line.
func (i Info) String() string {
	return fmt.Sprintf("opsagent %s (commit %s, states interface %s, %s, %s/%s)", i.Version, i.Commit, i.StatesInterface, i.GoVersion, i.OS, i.Arch)
}
