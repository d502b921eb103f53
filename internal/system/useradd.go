package system

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
)

// Accounts are changed with the root's own shadow tools (useradd,
// usermod, groupadd, groupmod, chpasswd), run chrooted into the root:
// they lock and update passwd, group, shadow and gshadow together, the
// way the distribution expects, and they read the root's login.defs.
// What the agent needs to know of accounts it reads from the files
// directly (accounts.go, shadow.go), so an unchanged account costs no
// process.

// NewUser is a user for useradd; zero fields are left to useradd's
// defaults.
type NewUser struct {
	Name   string
	UID    int    // -1: the next free one
	Group  string // primary group, a name or number; "": useradd's default
	Gecos  string
	Home   string // created with the skeleton files when missing (-m)
	Shell  string
	System bool     // -r: a system account (its id range, no aging)
	Groups []string // supplementary groups
}

// AddUser creates a user with useradd.
func (h *Host) AddUser(ctx context.Context, u NewUser) error {
	if err := CheckAccountName(u.Name); err != nil {
		return err
	}
	args := []string{"-m"}
	if u.Home != "" {
		args = append(args, "-d", u.Home)
	}
	if u.UID >= 0 {
		args = append(args, "-u", strconv.Itoa(u.UID))
	}
	if u.Group != "" {
		args = append(args, "-g", u.Group)
	}
	if u.Gecos != "" {
		args = append(args, "-c", u.Gecos)
	}
	if u.Shell != "" {
		args = append(args, "-s", u.Shell)
	}
	if u.System {
		args = append(args, "-r")
	}
	if len(u.Groups) > 0 {
		args = append(args, "-G", strings.Join(u.Groups, ","))
	}
	_, err := h.Check(ctx, Cmd{Tool: "useradd", Args: append(args, "--", u.Name)})
	return err
}

// UserChange is what usermod changes of an existing user; nil fields are
// left as they are.
type UserChange struct {
	UID    *int
	Group  *string // primary group, a name or number
	Gecos  *string
	Home   *string // the new home is not created or moved here
	Shell  *string
	Groups *[]string // the supplementary groups, exactly ([]: none)
}

// Empty reports whether c changes nothing.
func (c UserChange) Empty() bool {
	return c.UID == nil && c.Group == nil && c.Gecos == nil && c.Home == nil && c.Shell == nil && c.Groups == nil
}

// ModifyUser changes an existing user with one usermod.
func (h *Host) ModifyUser(ctx context.Context, name string, c UserChange) error {
	if err := CheckAccountName(name); err != nil {
		return err
	}
	if c.Empty() {
		return nil
	}
	var args []string
	if c.UID != nil {
		args = append(args, "-u", strconv.Itoa(*c.UID))
	}
	if c.Group != nil {
		args = append(args, "-g", *c.Group)
	}
	if c.Gecos != nil {
		args = append(args, "-c", *c.Gecos)
	}
	if c.Home != nil {
		args = append(args, "-d", *c.Home)
	}
	if c.Shell != nil {
		args = append(args, "-s", *c.Shell)
	}
	if c.Groups != nil {
		args = append(args, "-G", strings.Join(*c.Groups, ","))
	}
	_, err := h.Check(ctx, Cmd{Tool: "usermod", Args: append(args, "--", name)})
	return err
}

// AddGroup creates a group with groupadd; gid < 0 lets it choose.
func (h *Host) AddGroup(ctx context.Context, name string, gid int, system bool) error {
	if err := CheckAccountName(name); err != nil {
		return err
	}
	var args []string
	if gid >= 0 {
		args = append(args, "-g", strconv.Itoa(gid))
	}
	if system {
		args = append(args, "-r")
	}
	_, err := h.Check(ctx, Cmd{Tool: "groupadd", Args: append(args, "--", name)})
	return err
}

// SetGroupID changes a group's id with groupmod.
func (h *Host) SetGroupID(ctx context.Context, name string, gid int) error {
	if err := CheckAccountName(name); err != nil {
		return err
	}
	_, err := h.Check(ctx, Cmd{Tool: "groupmod", Args: []string{"-g", strconv.Itoa(gid), "--", name}})
	return err
}

// CheckAccountName refuses user and group names that the account files
// or the tools' command lines cannot carry. The distribution's tools
// apply their own, stricter rules after it (Debian's and RHEL's accept
// upper case; a leading '-', '+' or '~', ':', ',', '/', white space or
// control characters are refused by every one of them).
func CheckAccountName(name string) error {
	switch {
	case name == "":
		return errors.New("an account name cannot be empty")
	case len(name) > 256:
		return fmt.Errorf("account name %.40q… is too long", name)
	case strings.ContainsAny(name[:1], "-+~"):
		return fmt.Errorf("account name %q cannot start with %q", name, name[:1])
	case name == "." || name == "..":
		return fmt.Errorf("account name %q is not allowed", name)
	}
	for _, r := range name {
		if r <= ' ' || r == 0x7f || strings.ContainsRune(":,/", r) {
			return fmt.Errorf("account name %q cannot contain %q", name, r)
		}
	}
	return nil
}

// NologinShell is the root's shell that refuses logins: /usr/sbin/nologin
// or /sbin/nologin, whichever it has.
func (h *Host) NologinShell() (string, error) {
	for _, p := range []string{"/usr/sbin/nologin", "/sbin/nologin"} {
		if h.HasTool(p) {
			return p, nil
		}
	}
	return "", fmt.Errorf("neither /usr/sbin/nologin nor /sbin/nologin exists below %s", h.opts.Root.Dir())
}

// IsNologinShell reports whether shell refuses logins (nologin in any
// directory, or false).
func IsNologinShell(shell string) bool {
	base := shell[strings.LastIndexByte(shell, '/')+1:]
	return base == "nologin" || base == "false"
}

// DefaultShell is the shell useradd gives a new user (SHELL in the
// root's /etc/default/useradd, else /bin/sh).
func (h *Host) DefaultShell() string {
	data, err := h.readFile("/etc/default/useradd", 1<<20)
	if err == nil {
		sh := ""
		eachLine(data, func(line string) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "SHELL="); ok {
				sh = strings.Trim(strings.TrimSpace(v), `"'`)
			}
		})
		if strings.HasPrefix(sh, "/") {
			return sh
		}
	}
	return "/bin/sh"
}

// HomeMode is the mode useradd gives a home directory it creates:
// HOME_MODE of the root's /etc/login.defs, else 0777 without UMASK,
// else 0755.
func (h *Host) HomeMode() uint32 {
	defs := h.loginDefs()
	if v, ok := defs["HOME_MODE"]; ok {
		if m, err := strconv.ParseUint(v, 8, 32); err == nil && m <= 0o7777 {
			return uint32(m)
		}
	}
	if v, ok := defs["UMASK"]; ok {
		if m, err := strconv.ParseUint(v, 8, 32); err == nil && m <= 0o777 {
			return 0o777 &^ uint32(m)
		}
	}
	return 0o755
}

func (h *Host) loginDefs() map[string]string {
	out := map[string]string{}
	data, err := h.readFile("/etc/login.defs", 1<<20)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			h.log.Debug("cannot read login.defs", "err", err)
		}
		return out
	}
	eachLine(data, func(line string) {
		f := strings.Fields(line)
		if len(f) >= 2 {
			out[f[0]] = f[1]
		}
	})
	return out
}
