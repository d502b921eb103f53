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

// Info is the build identity in a printable, JSON-friendly form.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	GoVersion string `json:"go_version"`
	OS        string `json:"os"`
	Arch      string `json:"arch"`
}

// Get returns the identity of the running binary.
func Get() Info {
	return Info{Version: Version, Commit: Commit, GoVersion: runtime.Version(), OS: runtime.GOOS, Arch: runtime.GOARCH}
}

// String renders the identity on one line.
func (i Info) String() string {
	return fmt.Sprintf("opsagent %s (commit %s, %s, %s/%s)", i.Version, i.Commit, i.GoVersion, i.OS, i.Arch)
}
