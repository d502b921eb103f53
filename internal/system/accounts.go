package system

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/internal/rootfs"
)

// User is one line of /etc/passwd.
type User struct {
	Name  string
	UID   int
	GID   int
	Gecos string
	Home  string
	Shell string
}

// Group is one line of /etc/group.
type Group struct {
	Name    string
	GID     int
	Members []string
}

// maxAccountsFile bounds what is read of passwd, group and shadow.
const maxAccountsFile = 64 << 20

// Users reads the root's /etc/passwd (none: no users, so that numeric
// ids still work in a bare root).
func (h *Host) Users() ([]User, error) {
	data, err := h.readFile("/etc/passwd", maxAccountsFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return ParsePasswd(data), nil
}

// Groups reads the root's /etc/group (none: no groups).
func (h *Host) Groups() ([]Group, error) {
	data, err := h.readFile("/etc/group", maxAccountsFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return ParseGroup(data), nil
}

// LookupUser finds a user of the root by name, or by number when name is
// all digits and no user has that name.
func (h *Host) LookupUser(name string) (User, error) {
	users, err := h.Users()
	if err != nil {
		return User{}, err
	}
	for _, u := range users {
		if u.Name == name {
			return u, nil
		}
	}
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		for _, u := range users {
			if u.UID == n {
				return u, nil
			}
		}
		return User{Name: name, UID: n, GID: -1}, nil
	}
	return User{}, fmt.Errorf("user %q does not exist on this instance", name)
}

// LookupGroup finds a group of the root by name, or by number.
func (h *Host) LookupGroup(name string) (Group, error) {
	groups, err := h.Groups()
	if err != nil {
		return Group{}, err
	}
	for _, g := range groups {
		if g.Name == name {
			return g, nil
		}
	}
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		for _, g := range groups {
			if g.GID == n {
				return g, nil
			}
		}
		return Group{Name: name, GID: n}, nil
	}
	return Group{}, fmt.Errorf("group %q does not exist on this instance", name)
}

// ParsePasswd reads passwd(5) lines; malformed lines and NIS "+" entries
// are skipped.
func ParsePasswd(data []byte) []User {
	var out []User
	eachLine(data, func(line string) {
		f := strings.Split(line, ":")
		if len(f) != 7 || f[0] == "" || f[0][0] == '+' || f[0][0] == '-' {
			return
		}
		uid, err1 := strconv.Atoi(f[2])
		gid, err2 := strconv.Atoi(f[3])
		if err1 != nil || err2 != nil {
			return
		}
		out = append(out, User{Name: f[0], UID: uid, GID: gid, Gecos: f[4], Home: f[5], Shell: f[6]})
	})
	return out
}

// ParseGroup reads group(5) lines; malformed lines are skipped.
func ParseGroup(data []byte) []Group {
	var out []Group
	eachLine(data, func(line string) {
		f := strings.Split(line, ":")
		if len(f) != 4 || f[0] == "" || f[0][0] == '+' || f[0][0] == '-' {
			return
		}
		gid, err := strconv.Atoi(f[2])
		if err != nil {
			return
		}
		g := Group{Name: f[0], GID: gid}
		if f[3] != "" {
			g.Members = strings.Split(f[3], ",")
		}
		out = append(out, g)
	})
	return out
}

func eachLine(data []byte, fn func(string)) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if line == "" || line[0] == '#' {
			continue
		}
		fn(line)
	}
}

// readFile reads a file of the root, resolved inside it.
func (h *Host) readFile(p string, max int64) ([]byte, error) {
	fsys, err := rootfs.Open(h.opts.Root.Dir())
	if err != nil {
		return nil, err
	}
	defer fsys.Close()
	return fsys.ReadFile(p, max)
}
