package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/crypt"
	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/system"
)

// user is linux.user: the account exists with what the state asks for.
//
// The root's passwd, group and shadow files are read directly, so a
// round that changes nothing runs no process and leaves them untouched.
// Changes go through the root's useradd, usermod and chpasswd, run
// chrooted. password is taken as a crypt(3) hash when it has the shape
// of one (module.json documents a hash) and set as given; any other value
// is a plaintext, hashed with SHA-512 crypt only when the current hash
// does not already match it, so the next round changes nothing (Salt 2014
// hashed it again, with a new salt, every round). The password reaches
// chpasswd on its standard input, never on a command line.
func (e *Executor) user(ctx context.Context, s *stateRun) (state.Result, error) {
	spec, err := readUserSpec(s.p)
	if err != nil {
		return state.Result{}, err
	}
	what := "User " + spec.name
	groups, err := s.sys.Groups()
	if err != nil {
		return state.Result{}, failf("%s: cannot read /etc/group: %v", what, err)
	}
	byName := map[string]system.Group{}
	for _, g := range groups {
		if _, dup := byName[g.Name]; !dup {
			byName[g.Name] = g
		}
	}
	if spec.groups != nil {
		var missing []string
		for _, g := range *spec.groups {
			if _, ok := byName[g]; !ok {
				missing = append(missing, g)
			}
		}
		if len(missing) > 0 {
			return state.Result{}, failf("%s: group(s) %s do not exist: create them first (linux.group)", what, strings.Join(missing, ", "))
		}
	}
	primary := -1 // the primary group asked for (gid), as a number
	if spec.gid != "" {
		g, ok := findGroup(groups, byName, spec.gid)
		if !ok {
			return state.Result{}, failf("%s: gid %s: no such group: create it first (linux.group)", what, spec.gid)
		}
		primary = g.GID
	}
	cur, err := findUser(s.sys, spec.name)
	if err != nil {
		return state.Result{}, failf("%s: cannot read /etc/passwd: %v", what, err)
	}
	shell, err := spec.shell(s.sys, cur)
	if err != nil {
		return state.Result{}, failf("%s: %v", what, err)
	}

	var ch changes
	created := cur == nil
	if created {
		ch.add("created")
		if !s.test {
			if err := s.createUser(ctx, spec, byName, primary, shell); err != nil {
				return state.Result{}, failf("%s: %v", what, err)
			}
			if cur, err = rereadUser(s.sys, spec.name, "useradd"); err != nil {
				return state.Result{}, failf("%s: %v", what, err)
			}
		}
	} else {
		if err := s.modifyUser(ctx, spec, cur, groups, byName, primary, shell, &ch); err != nil {
			return state.Result{}, failf("%s: %v", what, err)
		}
		if !s.test && len(ch) > 0 {
			if cur, err = rereadUser(s.sys, spec.name, "usermod"); err != nil {
				return state.Result{}, failf("%s: %v", what, err)
			}
		}
	}
	// The home is managed when the state names one, or for the user it
	// creates; an existing account's home is not moved to the default
	// /home/NAME (root's /root, nobody's /nonexistent stay).
	if cur != nil && (spec.homeGiven || created) {
		uid, gid := cur.UID, cur.GID
		if s.test { // what usermod would make them
			if spec.uid >= 0 {
				uid = spec.uid
			}
			if primary >= 0 {
				gid = primary
			}
		}
		if err := s.userHome(spec.home, uid, gid, &ch); err != nil {
			return state.Result{}, failf("%s: home %s: %v", what, spec.home, err)
		}
	}
	if err := s.userPassword(ctx, spec, cur != nil, &ch); err != nil {
		return state.Result{}, failf("%s: %v", what, err)
	}
	return s.result(what, ch), nil
}

// maxPassword is the longest plaintext password: PAM hands a login at
// most 512 bytes (PAM_MAX_RESP_SIZE), and SHA-crypt's cost grows with the
// square of the length.
const maxPassword = 512

// userSpec is what a linux.user state asks for; nil and -1 mean "leave
// as it is" (or useradd's default for a new user).
type userSpec struct {
	name      string
	password  string
	fullname  *string
	uid       int
	gid       string // a group name or number
	home      string
	homeGiven bool
	system    bool
	nologin   *bool
	groups    *[]string
}

func readUserSpec(p params) (userSpec, error) {
	var u userSpec
	var err error
	if u.name, err = p.required("username"); err != nil {
		return u, err
	}
	u.name = strings.TrimSpace(u.name)
	if err := system.CheckAccountName(u.name); err != nil {
		return u, &badParam{"username", err.Error()}
	}
	if u.password, err = p.str("password"); err != nil {
		return u, err
	}
	if len(u.password) > maxPassword && !crypt.IsHash(u.password) {
		return u, &badParam{"password", fmt.Sprintf("is %d bytes long: a login reads at most %d (PAM's limit), and hashing it would take long", len(u.password), maxPassword)}
	}
	if p.has("fullname") {
		f, err := p.str("fullname")
		if err != nil {
			return u, err
		}
		if strings.ContainsAny(f, ":,\n\r") {
			return u, &badParam{"fullname", fmt.Sprintf("%q cannot contain ':', ',' or a line break (they separate the fields of /etc/passwd and of its GECOS field)", f)}
		}
		u.fullname = &f
	}
	if u.uid, err = optionalID(p, "uid"); err != nil {
		return u, err
	}
	if u.gid, err = p.str("gid"); err != nil {
		return u, err
	}
	u.gid = strings.TrimSpace(u.gid)
	if u.home, err = p.str("home"); err != nil {
		return u, err
	}
	if u.home = strings.TrimSpace(u.home); u.home == "" {
		u.home = "/home/" + u.name
	} else {
		u.homeGiven = true
	}
	if !strings.HasPrefix(u.home, "/") || strings.ContainsAny(u.home, ":\n") {
		return u, &badParam{"home", fmt.Sprintf("must be an absolute path, got %q", u.home)}
	}
	u.home = rootfs.Clean(u.home)
	if u.system, err = p.boolean("system-account", false); err != nil {
		return u, err
	}
	if p.has("no-login") {
		b, err := p.boolean("no-login", false)
		if err != nil {
			return u, err
		}
		u.nologin = &b
	}
	if p.has("groups") {
		l, err := p.list("groups")
		if err != nil {
			return u, err
		}
		set := []string{}
		for _, g := range l {
			if g = strings.TrimSpace(g); g != "" && !slices.Contains(set, g) {
				set = append(set, g)
			}
		}
		u.groups = &set
	}
	return u, nil
}

// optionalID reads a user or group id: -1 when absent or empty.
func optionalID(p params, name string) (int, error) {
	s, err := p.str(name)
	if err != nil || strings.TrimSpace(s) == "" {
		return -1, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 0 || n > 1<<31-2 {
		return -1, &badParam{name, fmt.Sprintf("must be a number from 0, got %q", s)}
	}
	return n, nil
}

// shell is the login shell to set ("" none): nologin asked and not in
// place, or a login shell again when no-login is explicitly false and the
// account has a nologin shell.
func (u userSpec) shell(sys *system.Host, cur *system.User) (string, error) {
	switch {
	case u.nologin == nil:
		return "", nil
	case *u.nologin:
		if cur != nil && system.IsNologinShell(cur.Shell) {
			return "", nil
		}
		return sys.NologinShell()
	case cur != nil && system.IsNologinShell(cur.Shell):
		return sys.DefaultShell(), nil
	}
	return "", nil
}

// findUser is the user of the root's /etc/passwd with exactly that name
// (nil: none).
func findUser(sys *system.Host, name string) (*system.User, error) {
	users, err := sys.Users()
	if err != nil {
		return nil, err
	}
	for _, u := range users {
		if u.Name == name {
			return &u, nil
		}
	}
	return nil, nil
}

// rereadUser is the user after tool changed it.
func rereadUser(sys *system.Host, name, tool string) (*system.User, error) {
	u, err := findUser(sys, name)
	switch {
	case err != nil:
		return nil, fmt.Errorf("cannot read /etc/passwd after %s: %w", tool, err)
	case u == nil:
		return nil, fmt.Errorf("%s succeeded but the user is not in /etc/passwd", tool)
	}
	return u, nil
}

// findGroup finds a group by name, else by number.
func findGroup(groups []system.Group, byName map[string]system.Group, nameOrID string) (system.Group, bool) {
	if g, ok := byName[nameOrID]; ok {
		return g, true
	}
	if n, err := strconv.Atoi(nameOrID); err == nil {
		for _, g := range groups {
			if g.GID == n {
				return g, true
			}
		}
	}
	return system.Group{}, false
}

func (s *stateRun) createUser(ctx context.Context, spec userSpec, byName map[string]system.Group, primary int, shell string) error {
	u := system.NewUser{Name: spec.name, UID: spec.uid, Home: spec.home, Shell: shell, System: spec.system}
	switch {
	case spec.gid != "":
		u.Group = strconv.Itoa(primary)
	case byName[spec.name].Name != "":
		// useradd refuses to create the user's own group when a group of
		// that name exists ("use -g"): the user joins it instead.
		u.Group = spec.name
	}
	if spec.fullname != nil {
		u.Gecos = *spec.fullname
	}
	if spec.groups != nil {
		for _, g := range *spec.groups {
			if primary < 0 || byName[g].GID != primary {
				u.Groups = append(u.Groups, g)
			}
		}
	}
	// useradd -m creates the home but not the directories above it
	// (module.json: they are created); they belong to root, like /home.
	if err := s.fs.MkdirAll(path.Dir(spec.home), defaultDirMode, nil); err != nil {
		return fmt.Errorf("cannot create the directory of home %s: %w", spec.home, err)
	}
	return s.sys.AddUser(ctx, u)
}

func (s *stateRun) modifyUser(ctx context.Context, spec userSpec, cur *system.User, groups []system.Group, byName map[string]system.Group, primary int, shell string, ch *changes) error {
	var c system.UserChange
	if spec.uid >= 0 && cur.UID != spec.uid {
		c.UID = &spec.uid
		ch.add("uid %d", spec.uid)
	}
	gid := cur.GID
	if primary >= 0 && cur.GID != primary {
		g := strconv.Itoa(primary)
		c.Group, gid = &g, primary
		ch.add("gid %d", primary)
	}
	if spec.fullname != nil {
		name, rest, _ := strings.Cut(cur.Gecos, ",")
		if name != *spec.fullname {
			gecos := *spec.fullname
			if strings.Trim(rest, ",") != "" {
				gecos += "," + rest // room, phones: kept
			}
			c.Gecos = &gecos
			ch.add("fullname")
		}
	}
	if spec.homeGiven && cur.Home != spec.home {
		c.Home = &spec.home
		ch.add("home %s", spec.home)
	}
	if shell != "" && cur.Shell != shell {
		c.Shell = &shell
		ch.add("shell %s", shell)
	}
	if spec.groups != nil {
		// The primary group is no supplementary group, on either side.
		var have, want []string
		for _, g := range groups {
			if g.GID != gid && slices.Contains(g.Members, spec.name) && !slices.Contains(have, g.Name) {
				have = append(have, g.Name)
			}
		}
		for _, name := range *spec.groups {
			if g, ok := byName[name]; !ok || g.GID != gid {
				want = append(want, name)
			}
		}
		if !sameSet(have, want) {
			c.Groups = &want
			if len(want) == 0 {
				ch.add("groups (none)")
			} else {
				ch.add("groups %s", strings.Join(want, ","))
			}
		}
	}
	if s.test || c.Empty() {
		return nil
	}
	return s.sys.ModifyUser(ctx, spec.name, c)
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

// userHome makes the home directory exist and belong to the user
// (module.json: an existing directory is given to the user; a missing one
// is created, with its parents). A directory created here is empty and
// gets the mode useradd would give it; its parents belong to root.
func (s *stateRun) userHome(home string, uid, gid int, ch *changes) error {
	fi, err := s.fs.Stat(home)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		ch.add("home %s created", home)
		if s.test {
			return nil
		}
		if err := s.fs.MkdirAll(path.Dir(home), defaultDirMode, nil); err != nil {
			return err
		}
		if err := s.fs.Mkdir(home, 0o700); err != nil {
			return err
		}
		if err := s.fs.Chown(home, uid, gid, true); err != nil {
			return err
		}
		return s.fs.Chmod(home, rootfs.FileMode(s.sys.HomeMode()), true)
	case err != nil:
		return err
	case !fi.IsDir():
		return fmt.Errorf("exists and is not a directory")
	}
	if u, g, ok := rootfs.Owner(fi); ok && (u != uid || g != gid) {
		ch.add("home owner %d:%d", uid, gid)
		if !s.test {
			return s.fs.Chown(home, uid, gid, true)
		}
	}
	return nil
}

// userPassword sets the password when it differs (see user).
func (s *stateRun) userPassword(ctx context.Context, spec userSpec, exists bool, ch *changes) error {
	if spec.password == "" {
		return nil // nothing asked: the password is left alone
	}
	current := ""
	if exists {
		h, _, err := s.sys.PasswordHash(spec.name)
		if err != nil {
			return fmt.Errorf("cannot read /etc/shadow: %w", err)
		}
		current = h
	}
	want := ""
	if crypt.IsHash(spec.password) {
		if current == spec.password {
			return nil
		}
		want = spec.password
	} else if ok, _ := crypt.Verify(current, spec.password); ok {
		return nil
	}
	ch.add("password")
	if s.test {
		return nil
	}
	if want == "" {
		h, err := crypt.NewSHA512(spec.password)
		if err != nil {
			return err
		}
		want = h
	}
	return s.sys.SetPasswordHash(ctx, spec.name, want)
}

// group is linux.group: the group exists, with gid when one is asked
// for (changed with groupmod when it differs). It reads the root's
// /etc/group and runs groupadd or groupmod only to change something.
func (e *Executor) group(ctx context.Context, s *stateRun) (state.Result, error) {
	name, err := s.p.required("groupname")
	if err != nil {
		return state.Result{}, err
	}
	name = strings.TrimSpace(name)
	if err := system.CheckAccountName(name); err != nil {
		return state.Result{}, &badParam{"groupname", err.Error()}
	}
	gid, err := optionalID(s.p, "gid")
	if err != nil {
		return state.Result{}, err
	}
	sys, err := s.p.boolean("system-group", false)
	if err != nil {
		return state.Result{}, err
	}
	what := "Group " + name
	groups, err := s.sys.Groups()
	if err != nil {
		return state.Result{}, failf("%s: cannot read /etc/group: %v", what, err)
	}
	var cur *system.Group
	for _, g := range groups {
		if g.Name == name {
			cur = &g
			break
		}
	}
	if gid >= 0 && (cur == nil || cur.GID != gid) {
		for _, g := range groups {
			if g.GID == gid && g.Name != name {
				return state.Result{}, failf("%s: gid %d already belongs to group %s", what, gid, g.Name)
			}
		}
	}
	var ch changes
	switch {
	case cur == nil:
		ch.add("created")
		if !s.test {
			if err := s.sys.AddGroup(ctx, name, gid, sys); err != nil {
				return state.Result{}, failf("%s: %v", what, err)
			}
		}
	case gid >= 0 && cur.GID != gid:
		ch.add("gid %d", gid)
		if !s.test {
			if err := s.sys.SetGroupID(ctx, name, gid); err != nil {
				return state.Result{}, failf("%s: %v", what, err)
			}
		}
	}
	return s.result(what, ch), nil
}
