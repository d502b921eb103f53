package system

import (
	"fmt"
	"strconv"
	"strings"
)

// FstabEntry is one line of fstab(5).
type FstabEntry struct {
	Device string // fs_spec: /dev/xvdf, UUID=…, LABEL=…
	Path   string // fs_file: the mount point
	FSType string
	Opts   string // fs_mntops, "defaults" when empty
	Dump   int
	Pass   int
}

// String is the entry as an fstab line (no newline).
func (e FstabEntry) String() string {
	opts := e.Opts
	if opts == "" {
		opts = "defaults"
	}
	return fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%d", escapeMount(e.Device), escapeMount(e.Path), e.FSType, opts, e.Dump, e.Pass)
}

// ParseFstabLine reads one fstab line; ok is false for comments, blank
// and malformed lines (which are kept as they are, never rewritten).
func ParseFstabLine(line string) (FstabEntry, bool) {
	t := strings.TrimSpace(line)
	if t == "" || strings.HasPrefix(t, "#") {
		return FstabEntry{}, false
	}
	f := strings.Fields(t)
	if len(f) < 2 {
		return FstabEntry{}, false
	}
	e := FstabEntry{Device: unescapeMount(f[0]), Path: unescapeMount(f[1]), Opts: "defaults"}
	if len(f) > 2 {
		e.FSType = f[2]
	}
	if len(f) > 3 {
		e.Opts = f[3]
	}
	if len(f) > 4 {
		e.Dump, _ = strconv.Atoi(f[4])
	}
	if len(f) > 5 {
		e.Pass, _ = strconv.Atoi(f[5])
	}
	return e, true
}

// SetFstabEntry returns fstab content with the entry for want.Path set to
// want: the first line whose mount point is want.Path is replaced when it
// differs, else want is appended. Every other line — comments, other
// mounts, a later duplicate — is kept byte for byte. old is the entry
// that was there (nil: none).
func SetFstabEntry(data []byte, want FstabEntry) (out []byte, old *FstabEntry, changed bool) {
	lines := strings.SplitAfter(string(data), "\n")
	for i, line := range lines {
		e, ok := ParseFstabLine(line)
		if !ok || e.Path != want.Path {
			continue
		}
		if sameFstabEntry(e, want) {
			return data, &e, false
		}
		nl := ""
		if strings.HasSuffix(line, "\n") {
			nl = "\n"
		}
		lines[i] = want.String() + nl
		return []byte(strings.Join(lines, "")), &e, true
	}
	s := string(data)
	if s != "" && !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return []byte(s + want.String() + "\n"), nil, true
}

func sameFstabEntry(a, b FstabEntry) bool {
	norm := func(o string) string {
		if o == "" {
			return "defaults"
		}
		return o
	}
	return a.Device == b.Device && a.Path == b.Path && a.FSType == b.FSType &&
		norm(a.Opts) == norm(b.Opts) && a.Dump == b.Dump && a.Pass == b.Pass
}
