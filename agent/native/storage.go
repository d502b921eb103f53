package native

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/visualops/opsagent/internal/system"
	"golang.org/x/sys/unix"
)

// Helpers shared by the storage modules (mkfs, mount, lvm, raid) and the
// tool-running ones (supervisord, chef, puppet).

// Prerequisites of the storage modules: the tools they run and the
// package that brings each (the 2014 adaptor's __get_require installed
// xfsprogs for mkfs and lvm2 for the LVM modules).
var (
	preBlkid   = system.Prerequisite{Tool: "blkid", Packages: map[system.Family]string{system.FamilyDebian: "util-linux", system.FamilyRHEL: "util-linux"}}
	preMke2fs  = system.Prerequisite{Tool: "mke2fs", Packages: map[system.Family]string{system.FamilyDebian: "e2fsprogs", system.FamilyRHEL: "e2fsprogs"}}
	preMkxfs   = system.Prerequisite{Tool: "mkfs.xfs", Packages: map[system.Family]string{system.FamilyDebian: "xfsprogs", system.FamilyRHEL: "xfsprogs"}}
	preMount   = system.Prerequisite{Tool: "mount", Packages: map[system.Family]string{system.FamilyDebian: "mount", system.FamilyRHEL: "util-linux"}}
	preLVM     = system.Prerequisite{Tool: "lvm", Packages: map[system.Family]string{system.FamilyDebian: "lvm2", system.FamilyRHEL: "lvm2"}}
	preMdadm   = system.Prerequisite{Tool: "mdadm", Packages: map[system.Family]string{system.FamilyDebian: "mdadm", system.FamilyRHEL: "mdadm"}}
	preSupervd = system.Prerequisite{Tool: "supervisord", Packages: map[system.Family]string{system.FamilyDebian: "supervisor", system.FamilyRHEL: "supervisor"}}
	prePuppet  = system.Prerequisite{Tool: "puppet", Packages: map[system.Family]string{system.FamilyDebian: "puppet", system.FamilyRHEL: "puppet"}}
)

// need makes sure a prerequisite tool is installed, installing its
// package when it is missing, and adds what it installed to ch. In check
// mode nothing is installed: a missing tool is reported as a package
// that would be installed, and missing is true so that the caller does
// not run the tool.
func (s *stateRun) need(ctx context.Context, pre system.Prerequisite, ch *changes) (missing bool, err error) {
	if s.sys.HasTool(pre.Tool) {
		return false, nil
	}
	if s.test {
		m, err := s.sys.Packages()
		if err != nil {
			return true, fmt.Errorf("%s is not installed and cannot be: %w", pre.Tool, err)
		}
		pkg := pre.Packages[m.Family()]
		if pkg == "" {
			return true, fmt.Errorf("%s is not installed, and no package is known to provide it here: install it first", pre.Tool)
		}
		ch.add("package %s would be installed (it provides %s)", pkg, pre.Tool)
		return true, nil
	}
	pkg, err := s.sys.EnsureTool(ctx, pre)
	if err != nil {
		return false, err
	}
	if pkg != "" {
		ch.add("installed package %s (prerequisite: %s)", pkg, pre.Tool)
	}
	return false, nil
}

// norm returns the parameters with their names normalised (lower case,
// spaces and underscores as dashes) for the modules whose real recipes
// wrote them several ways: the IDE produced "PE size", "metadata copies",
// "allocation policy", "PV-size" for the names module.json spells
// "pe-size", "metadata-copies", "allocation-policy", "pv-size". A name
// written both ways keeps the catalogue's spelling.
func (p params) norm() params {
	out := params{}
	for k, v := range p {
		n := normName(k)
		if _, dup := out[n]; dup && k != n {
			continue
		}
		out[n] = v
	}
	return out
}

func normName(k string) string {
	return strings.NewReplacer(" ", "-", "_", "-").Replace(strings.ToLower(strings.TrimSpace(k)))
}

// yn reads an LVM-style y/n switch (also true/false, yes/no): "y", "n",
// or "" when the parameter is absent.
func (p params) yn(name string) (string, error) {
	if !p.has(name) {
		return "", nil
	}
	s, err := p.str(name)
	if err != nil {
		return "", err
	}
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "y", "yes", "true", "1", "on":
		return "y", nil
	case "n", "no", "false", "0", "off":
		return "n", nil
	case "":
		return "", nil
	}
	return "", &badParam{name, fmt.Sprintf("must be y or n, got %q", s)}
}

// devicePath reads a device parameter: an absolute path (/dev/xvdf).
func devicePath(p params, name string) (string, error) {
	return absPath(p, name)
}

// devices reads a list of device paths.
func devices(p params, name string) ([]string, error) {
	l, err := p.list(name)
	if err != nil {
		return nil, err
	}
	var out []string
	seen := map[string]bool{}
	for _, d := range l {
		// "/dev/xvdf, /dev/xvdg" in one string, as the catalogue's examples show.
		for _, f := range strings.FieldsFunc(d, func(r rune) bool { return r == ',' || r == ' ' }) {
			if !strings.HasPrefix(f, "/") {
				return nil, &badParam{name, fmt.Sprintf("%q is not an absolute device path", f)}
			}
			if !seen[f] {
				seen[f] = true
				out = append(out, f)
			}
		}
	}
	if len(out) == 0 {
		return nil, &badParam{name, "is required: a list of devices"}
	}
	return out, nil
}

// mountedAt lists where the block device numbered rdev is mounted below
// the root.
func (s *stateRun) mountedAt(rdev uint64) ([]string, error) {
	ms, err := s.sys.Mounts()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range ms {
		if m.Major == unix.Major(rdev) && m.Minor == unix.Minor(rdev) {
			out = append(out, m.Point)
		}
	}
	return out, nil
}

// probe reads what a device holds; its failure is a state failure naming
// the module and the device.
func (s *stateRun) probe(ctx context.Context, module, dev string) (system.Signature, error) {
	sig, err := s.sys.ProbeDevice(ctx, dev)
	if err != nil {
		var nb *system.NotBlockDeviceError
		if errors.As(err, &nb) {
			return sig, failf("%s: %v below the root: give the path of a block device", module, err)
		}
		return sig, failf("%s: cannot read what %s holds: %v", module, dev, err)
	}
	return sig, nil
}

// toolFailed is the comment of a tool that failed, with its output.
func toolFailed(module string, err error) error {
	return failf("%s: %v", module, err)
}

// pairs reads a dict parameter as ordered key/value pairs: a JSON object
// (keys sorted), a list of {"key", "value"} (the IDE's shape), or text of
// "key: value" or "key=value" lines (the catalogue's examples). A key
// without a value is a switch.
func (p params) pairs(name string) ([][2]string, error) {
	v, ok := p[name]
	if !ok || string(v) == "null" {
		return nil, nil
	}
	var obj map[string]any
	if json.Unmarshal(v, &obj) == nil {
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		out := make([][2]string, 0, len(keys))
		for _, k := range keys {
			val := ""
			if obj[k] != nil {
				val = fmt.Sprint(obj[k])
			}
			out = append(out, [2]string{k, val})
		}
		return out, nil
	}
	var items []struct {
		Key   *string `json:"key"`
		Value any     `json:"value"`
	}
	if json.Unmarshal(v, &items) == nil {
		var out [][2]string
		for _, it := range items {
			if it.Key == nil || strings.TrimSpace(*it.Key) == "" {
				continue
			}
			val := ""
			if it.Value != nil {
				val = fmt.Sprint(it.Value)
			}
			out = append(out, [2]string{strings.TrimSpace(*it.Key), val})
		}
		return out, nil
	}
	s, err := p.str(name)
	if err != nil {
		return nil, &badParam{name, "must be an object of options or key: value lines, got " + kindOf(v)}
	}
	var out [][2]string
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		i := strings.IndexAny(line, ":=")
		if i < 0 {
			out = append(out, [2]string{line, ""})
			continue
		}
		out = append(out, [2]string{strings.TrimSpace(line[:i]), strings.TrimSpace(line[i+1:])})
	}
	return out, nil
}

// longOptions turns pairs into GNU long options: --key=value, or --key
// for a switch. A key may be given with its dashes.
func longOptions(pairs [][2]string, sep string) []string {
	var out []string
	for _, kv := range pairs {
		k := "--" + strings.TrimLeft(kv[0], "-")
		if kv[1] == "" {
			out = append(out, k)
		} else if sep == "" {
			out = append(out, k, kv[1])
		} else {
			out = append(out, k+sep+kv[1])
		}
	}
	return out
}
