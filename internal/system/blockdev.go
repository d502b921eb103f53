package system

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/internal/rootfs"
	"golang.org/x/sys/unix"
)

// Signature is what blkid finds at the start of a block device: a
// filesystem, an LVM physical volume, a RAID member, swap, a partition
// table. The storage modules read it before they write anything to a
// device, so that nothing that holds data is formatted over.
type Signature struct {
	Type   string // TYPE: ext4, xfs, LVM2_member, linux_raid_member, swap, …; "" when none
	Usage  string // USAGE: filesystem, raid, crypto, other
	Label  string
	UUID   string
	PTType string // PTTYPE: the partition table (gpt, dos) when the device holds one
	// Ambivalent is set when blkid found more than one signature and
	// would not choose (its exit code 8).
	Ambivalent bool
}

// Empty reports whether the device holds no signature at all.
func (s Signature) Empty() bool { return s.Type == "" && s.PTType == "" && !s.Ambivalent }

// Describe names what the device holds, for a refusal: "an ext4
// filesystem (label data, UUID 0f…)", "an LVM physical volume (UUID …)".
func (s Signature) Describe() string {
	var what string
	switch {
	case s.Ambivalent:
		return "more than one signature (blkid will not choose; see wipefs -n)"
	case s.Type == "" && s.PTType != "":
		return "a " + s.PTType + " partition table"
	case s.Type == "LVM2_member":
		what = "an LVM physical volume"
	case s.Type == "linux_raid_member":
		what = "a RAID member (mdadm)"
	case s.Type == "swap":
		what = "a swap area"
	case s.Type == "crypto_LUKS":
		what = "a LUKS encrypted volume"
	case s.Usage == "filesystem" || s.Usage == "":
		what = article(s.Type) + " " + s.Type + " filesystem"
	default:
		what = article(s.Type) + " " + s.Type + " signature"
	}
	var attrs []string
	if s.Label != "" {
		attrs = append(attrs, "label "+s.Label)
	}
	if s.UUID != "" {
		attrs = append(attrs, "UUID "+s.UUID)
	}
	if s.PTType != "" {
		attrs = append(attrs, "and a "+s.PTType+" partition table")
	}
	if len(attrs) > 0 {
		what += " (" + strings.Join(attrs, ", ") + ")"
	}
	return what
}

func article(word string) string {
	// "an xfs": said ex-eff-ess.
	if word != "" && strings.ContainsRune("aeiouxAEIOUX", rune(word[0])) {
		return "an"
	}
	return "a"
}

// NotBlockDeviceError says a path the storage modules were given is not a
// block device below the root.
type NotBlockDeviceError struct {
	Path   string
	Reason string
}

func (e *NotBlockDeviceError) Error() string {
	return fmt.Sprintf("%s %s", e.Path, e.Reason)
}

// BlockDevice checks that dev is a block device node below the root and
// returns its device number.
func (h *Host) BlockDevice(dev string) (uint64, error) {
	fsys, err := rootfs.Open(h.opts.Root.Dir())
	if err != nil {
		return 0, err
	}
	defer fsys.Close()
	fi, err := fsys.Stat(dev)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, &NotBlockDeviceError{Path: dev, Reason: "does not exist"}
	}
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*unix.Stat_t)
	if !ok || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, &NotBlockDeviceError{Path: dev, Reason: "is not a block device"}
	}
	return st.Rdev, nil
}

// ProbeDevice reads the signature at the start of dev with blkid's low
// level probe (blkid -p: the device itself, never blkid's cache), run
// as every system tool is, below the root. It changes nothing.
func (h *Host) ProbeDevice(ctx context.Context, dev string) (Signature, error) {
	if _, err := h.BlockDevice(dev); err != nil {
		return Signature{}, err
	}
	res, err := h.Run(ctx, Cmd{Tool: "blkid", Args: []string{"-p", "-o", "export", dev}})
	if err != nil {
		return Signature{}, err
	}
	switch res.ExitCode {
	case 0:
		return ParseBlkidExport(res.Output), nil
	case 2: // nothing found
		return Signature{}, nil
	case 8:
		return Signature{Ambivalent: true}, nil
	}
	return Signature{}, &ToolError{Command: "blkid -p -o export " + dev, ExitCode: res.ExitCode, Output: res.Output}
}

// ParseBlkidExport reads `blkid -o export` output (KEY=value lines).
func ParseBlkidExport(out string) Signature {
	var s Signature
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok {
			continue
		}
		switch k {
		case "TYPE":
			s.Type = v
		case "USAGE":
			s.Usage = v
		case "LABEL":
			s.Label = v
		case "UUID":
			s.UUID = v
		case "PTTYPE":
			s.PTType = v
		}
	}
	return s
}

// Mount is one mounted filesystem, from /proc/self/mountinfo.
type Mount struct {
	Major, Minor uint32 // the device number st_dev of files on it
	Root         string // the directory of the filesystem mounted (not "/" for a bind mount)
	Point        string // mount point, inside the root
	Opts         []string
	FSType       string
	Source       string
	SuperOpts    []string
}

// Options is every option of the mount: per-mount and superblock ones.
func (m Mount) Options() []string { return append(append([]string(nil), m.Opts...), m.SuperOpts...) }

// Mounts returns the filesystems mounted below the root, in mount order
// (a later one at the same point hides an earlier one), their mount
// points as paths inside the root. The agent reads its own mount table:
// a tool run chrooted into the root mounts in the agent's namespace.
func (h *Host) Mounts() ([]Mount, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	dir := h.opts.Root.Dir()
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	return ParseMountInfo(data, dir)
}

// MountAt returns the filesystem mounted at point (inside the root), the
// topmost one when several are stacked.
func (h *Host) MountAt(point string) (*Mount, error) {
	ms, err := h.Mounts()
	if err != nil {
		return nil, err
	}
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].Point == point {
			return &ms[i], nil
		}
	}
	return nil, nil
}

// ParseMountInfo parses proc(5)'s mountinfo and keeps the mounts at or
// below rootDir (a host path), their points made relative to it.
func ParseMountInfo(data []byte, rootDir string) ([]Mount, error) {
	rootDir = filepath.Clean(rootDir)
	var out []Mount
	for n, line := range strings.Split(string(data), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 10 || sep < 0 || sep+3 > len(f) {
			return nil, fmt.Errorf("mountinfo line %d: malformed: %q", n+1, line)
		}
		maj, min, ok := strings.Cut(f[2], ":")
		ma, err1 := strconv.ParseUint(maj, 10, 32)
		mi, err2 := strconv.ParseUint(min, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("mountinfo line %d: bad device number %q", n+1, f[2])
		}
		point, inside := insideRoot(unescapeMount(f[4]), rootDir)
		if !inside {
			continue
		}
		m := Mount{
			Major: uint32(ma), Minor: uint32(mi),
			Root:   unescapeMount(f[3]),
			Point:  point,
			Opts:   strings.Split(f[5], ","),
			FSType: f[sep+1],
			Source: unescapeMount(f[sep+2]),
		}
		if sep+3 < len(f) {
			m.SuperOpts = strings.Split(f[sep+3], ",")
		}
		out = append(out, m)
	}
	return out, nil
}

func insideRoot(p, rootDir string) (string, bool) {
	if rootDir == "/" {
		return p, true
	}
	if p == rootDir {
		return "/", true
	}
	if rest, ok := strings.CutPrefix(p, rootDir+"/"); ok {
		return "/" + rest, true
	}
	return "", false
}

// unescapeMount undoes the octal escapes of mountinfo and fstab (\040 for
// a space, \011, \012, \134).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// escapeMount escapes what fstab's fields cannot hold as is.
func escapeMount(s string) string {
	r := strings.NewReplacer(`\`, `\134`, " ", `\040`, "\t", `\011`, "\n", `\012`)
	return r.Replace(s)
}
