package native

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// options reads a dict of a tool's options: what params.pairs reads,
// or text of "key: value" or "key=value" lines (the catalogue's examples
// for arguments). A key without a value is a switch.
func (p params) options(name string) ([]pair, error) {
	var text string
	if json.Unmarshal(p[name], &text) == nil && strings.ContainsAny(text, ":=\n") {
		var out []pair
		for _, line := range strings.Split(text, "\n") {
			line = strings.TrimSpace(line)
			if line == "" {
				continue
			}
			i := strings.IndexAny(line, ":=")
			if i < 0 {
				out = append(out, pair{key: line})
				continue
			}
			out = append(out, pair{strings.TrimSpace(line[:i]), strings.TrimSpace(line[i+1:])})
		}
		return out, nil
	}
	return p.pairs(name)
}

// longOptions turns pairs into GNU long options: --key=value, or --key
// for a switch. A key may be given with its dashes.
func longOptions(pairs []pair, sep string) []string {
	var out []string
	for _, kv := range pairs {
		k := "--" + strings.TrimLeft(kv.key, "-")
		if kv.value == "" {
			out = append(out, k)
		} else if sep == "" {
			out = append(out, k, kv.value)
		} else {
			out = append(out, k+sep+kv.value)
		}
	}
	return out
}
