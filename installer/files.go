package installer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/rootfs"
)

// files is how the installer and uninstall touch the file system. Every
// path they name is a host path from the layout; one below the root is
// resolved inside the root (rootfs: a symlink, wherever it sits, cannot
// lead out), one outside it (an explicit --config) on the host. A symlink
// at the final name is never followed: the fixed paths of an installation
// are real files and directories, and a link there is refused by name
// (checkPaths) rather than written, chmodded or removed through.
type files struct {
	root     fsutil.Root
	in       *rootfs.FS // nil when the root does not exist (a dry run)
	realRoot string     // the root with its own symlinks resolved (leadsOut)
	host     *rootfs.FS // "/", opened on first use for paths outside the root
}

// openFiles opens root; create makes the root directory first (it is
// what --root names, so it is taken as given). A dry run of a root that
// does not exist gets a files that sees nothing.
func openFiles(root fsutil.Root, create bool) (*files, error) {
	f := &files{root: root}
	if create {
		if err := os.MkdirAll(root.Dir(), 0o755); err != nil {
			return nil, fmt.Errorf("root %s: %w", root.Dir(), err)
		}
	}
	fsys, err := rootfs.Open(root.Dir())
	if err != nil {
		if !create {
			if _, statErr := os.Stat(root.Dir()); errors.Is(statErr, fs.ErrNotExist) {
				return f, nil
			}
		}
		return nil, err
	}
	f.in = fsys
	if f.realRoot, err = filepath.EvalSymlinks(root.Dir()); err != nil {
		fsys.Close()
		return nil, fmt.Errorf("root %s: %w", root.Dir(), err)
	}
	return f, nil
}

func (f *files) Close() {
	if f.in != nil {
		f.in.Close()
	}
	if f.host != nil {
		f.host.Close()
	}
}

// at maps a host path to the file system and instance path to use; nil
// when the root does not exist.
func (f *files) at(host string) (*rootfs.FS, string, error) {
	if inst, ok := f.root.Instance(host); ok {
		return f.in, inst, nil
	}
	if f.host == nil {
		h, err := rootfs.Open("/")
		if err != nil {
			return nil, "", err
		}
		f.host = h
	}
	return f.host, host, nil
}

// errNoRoot stands for "does not exist" when the root itself does not.
var errNoRoot = fs.ErrNotExist

// Lstat describes host itself (a final symlink is not followed).
func (f *files) Lstat(host string) (fs.FileInfo, error) {
	fsys, p, err := f.at(host)
	if err != nil {
		return nil, err
	}
	if fsys == nil {
		return nil, errNoRoot
	}
	return fsys.Lstat(p)
}

// ReadFile reads host, at most max bytes.
func (f *files) ReadFile(host string, max int64) ([]byte, error) {
	fsys, p, err := f.at(host)
	if err != nil {
		return nil, err
	}
	if fsys == nil {
		return nil, errNoRoot
	}
	return fsys.ReadFile(p, max)
}

// Open opens host for reading, never through a symlink at its name (that
// fails); the caller checks what it opened.
func (f *files) Open(host string) (*os.File, error) {
	fsys, p, err := f.at(host)
	if err != nil {
		return nil, err
	}
	if fsys == nil {
		return nil, errNoRoot
	}
	return fsys.OpenFile(p, os.O_RDONLY, 0)
}

// Chmod sets host's mode on the object itself, never through a symlink
// at its name (that fails).
func (f *files) Chmod(host string, mode fs.FileMode) error {
	fsys, p, err := f.at(host)
	if err != nil {
		return err
	}
	if err := fsys.Chmod(p, mode, false); err != nil {
		return fmt.Errorf("chmod %s: %w", host, unwrapPath(err))
	}
	return nil
}

// MkdirAll creates host and missing parents with mode (less the umask).
func (f *files) MkdirAll(host string, mode fs.FileMode) error {
	fsys, p, err := f.at(host)
	if err != nil {
		return err
	}
	if err := fsys.MkdirAll(p, mode, nil); err != nil {
		return fmt.Errorf("mkdir %s: %w", host, unwrapPath(err))
	}
	return nil
}

// WriteFileAtomic replaces host with data and mode (a symlink at the name
// is replaced, not followed).
func (f *files) WriteFileAtomic(host string, data []byte, mode fs.FileMode) error {
	fsys, p, err := f.at(host)
	if err != nil {
		return err
	}
	if err := fsys.WriteFileAtomic(p, data, mode, -1, -1); err != nil {
		return fmt.Errorf("write %s: %w", host, unwrapPath(err))
	}
	return nil
}

// Remove removes host (a file, a link itself, or an empty directory);
// RemoveAll removes a tree without following any link in it.
func (f *files) Remove(host string) error {
	fsys, p, err := f.at(host)
	if err != nil {
		return err
	}
	if fsys == nil {
		return errNoRoot
	}
	if err := fsys.Remove(p); err != nil {
		return fmt.Errorf("remove %s: %w", host, unwrapPath(err))
	}
	return nil
}

func (f *files) RemoveAll(host string) error {
	fsys, p, err := f.at(host)
	if err != nil || fsys == nil {
		return err
	}
	if err := fsys.RemoveAll(p); err != nil {
		return fmt.Errorf("remove %s: %w", host, unwrapPath(err))
	}
	return nil
}

// AppendLog opens host for appending (created 0640), a regular file in a
// directory that is no symlink (created 0750 when missing).
func (f *files) AppendLog(host string) (*os.File, error) {
	dir := filepath.Dir(host)
	switch st, err := f.Lstat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		if err := f.MkdirAll(dir, 0o750); err != nil {
			return nil, err
		}
		if err := f.Chmod(dir, 0o750); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case st.Mode()&fs.ModeSymlink != 0:
		return nil, fmt.Errorf("%s is a symbolic link: not writing %s through it", dir, filepath.Base(host))
	}
	fsys, p, err := f.at(host)
	if err != nil {
		return nil, err
	}
	file, err := fsys.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", host, unwrapPath(err))
	}
	if st, err := file.Stat(); err != nil || !st.Mode().IsRegular() {
		file.Close()
		return nil, fmt.Errorf("%s is not a regular file: move it away", host)
	}
	return file, nil
}

// unwrapPath drops a PathError's instance path, which the callers replace
// by the host path.
func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// leadsOut reports the part of host that, read by the host (as the
// config's writer, the token, the virtualenv and exec do), leads
// somewhere else than inside the root: a symlink on the way whose target
// is absolute or climbs out, so that the host and a chroot at the root
// would resolve it differently. It names that part ("" when all is well).
// The host's own root never leads out.
func (f *files) leadsOut(host string) (string, error) {
	inst, ok := f.root.Instance(host)
	if f.root.IsHost() || f.in == nil || !ok {
		return "", nil
	}
	q := "/"
	for _, name := range strings.Split(strings.Trim(inst, "/"), "/") {
		if name == "" {
			continue
		}
		q = path.Join(q, name)
		st, err := f.in.Lstat(q)
		if err != nil {
			return "", nil // nothing from here on exists
		}
		if st.Mode()&fs.ModeSymlink == 0 {
			continue
		}
		onHost, err := filepath.EvalSymlinks(f.root.Path(q))
		if err != nil {
			continue // dangling on the host too: it leads nowhere
		}
		if inRoot, err := f.in.ResolveLinks(q); err != nil || filepath.Join(f.realRoot, inRoot) != onHost {
			return f.root.Path(q), nil
		}
	}
	return "", nil
}

// pathKind is what a fixed path of the layout must be.
type pathKind int

const (
	aDir pathKind = iota
	aFile
)

// checkPath says what is wrong with a fixed path of the layout, or "": a
// symlink at its name, something else than the kind expected there, or a
// symlink on the way that leads out of the root.
func (f *files) checkPath(host string, kind pathKind, what string) (string, error) {
	st, err := f.Lstat(host)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return "", err
	case st.Mode()&fs.ModeSymlink != 0:
		target := ""
		if fsys, p, err := f.at(host); err == nil {
			if t, err := fsys.Readlink(p); err == nil {
				target = " (to " + t + ")"
			}
		}
		return fmt.Sprintf("%s is a symbolic link%s: %s must be a %s of its own there; remove the link (opsagent never follows a link at its fixed paths)",
			host, target, what, map[pathKind]string{aDir: "directory", aFile: "file"}[kind]), nil
	case kind == aDir && !st.IsDir():
		return fmt.Sprintf("%s (%s) is not a directory: move it away", host, what), nil
	case kind == aFile && !st.Mode().IsRegular():
		return fmt.Sprintf("%s (%s) is not a regular file (%s): move it away", host, what, st.Mode().Type()), nil
	}
	out, err := f.leadsOut(host)
	if err != nil || out == "" {
		return "", err
	}
	return fmt.Sprintf("%s (%s): %s leads out of the root %s through a symbolic link: opsagent installs only inside the root; remove the link",
		host, what, out, f.root.Dir()), nil
}

// fixedPath is a file or directory of an installation that the installer
// creates, writes, chmods or runs.
type fixedPath struct {
	host string
	kind pathKind
	what string
}

// fixedPaths are the installation's fixed paths: the layout's directories
// (Layout.Dirs), the others the installer writes into, and its files.
func fixedPaths(l config.Layout) []fixedPath {
	var out []fixedPath
	for _, d := range l.Dirs() {
		out = append(out, fixedPath{d.Path, aDir, d.What})
	}
	return append(out, []fixedPath{
		{l.VenvDir(), aDir, "the virtualenv ([global] envroot)"}, {l.ReposDir(), aDir, "[module] root"},
		{filepath.Dir(l.CronEntry()), aDir, "/etc/cron.d"}, {filepath.Dir(l.UnitFile()), aDir, "the systemd unit's directory"},
		{l.ConfigFile(), aFile, "the config"}, {l.TokenFile(), aFile, "the instance token"},
		{l.Binary(), aFile, "the agent's binary"}, {l.CronScript(), aFile, "the watchdog"},
		{l.CronEntry(), aFile, "the cron entry"}, {l.UnitFile(), aFile, "the systemd unit"},
		{l.BootstrapLog(), aFile, "bootstrap.log"}, {l.LogFile(), aFile, "the agent's log"},
		{l.LockFile(), aFile, "the agent's lock"},
	}...)
}

// checkPaths lists what is wrong with the layout's fixed paths, and with
// path keys that name something opsagent did not make (checkOwnedPaths).
func (f *files) checkPaths(l config.Layout, c, existing *config.Config) ([]string, error) {
	var problems []string
	seen := map[string]bool{}
	for _, p := range fixedPaths(l) {
		if seen[p.host] {
			continue
		}
		seen[p.host] = true
		msg, err := f.checkPath(p.host, p.kind, p.what)
		if err != nil {
			return nil, err
		}
		if msg != "" {
			problems = append(problems, msg)
		}
	}
	more, err := f.checkOwnedPaths(c, existing)
	return append(problems, more...), err
}

// checkOwnedPaths is the file-system half of the rule for the paths
// opsagent owns (config.CheckOwnedPath is the other): a path key whose
// value is new (neither the default nor what the existing config names,
// which an earlier install made or accepted) must not name something that
// exists, except an empty directory made ready for it. Otherwise install
// would chmod, write into, send (the token) or, at uninstall, remove a
// file or tree that is someone else's.
func (f *files) checkOwnedPaths(c, existing *config.Config) ([]string, error) {
	var problems []string
	for _, k := range config.OwnedPathKeys() {
		v := c.Get(k[0], k[1])
		if v == "" || path.Clean(v) == path.Clean(k[2]) || existing != nil && path.Clean(existing.Get(k[0], k[1])) == path.Clean(v) {
			continue
		}
		host := f.root.Path(v)
		st, err := f.Lstat(host)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue
		case err != nil:
			return nil, err
		case st.IsDir() && f.emptyDir(host):
			continue
		}
		problems = append(problems, fmt.Sprintf("[%s] %s = %s: %s exists and opsagent did not make it (it is neither the default nor what the existing config names): give a path that does not exist yet, or an empty directory",
			k[0], k[1], v, strings.TrimSuffix(host, "/")))
	}
	return problems, nil
}

func (f *files) emptyDir(host string) bool {
	fsys, p, err := f.at(host)
	if err != nil || fsys == nil {
		return false
	}
	empty := true
	_ = fsys.WalkDir(p, func(q string, _ fs.DirEntry, err error) error {
		if err != nil || q != rootfs.Clean(p) {
			empty = false
			return fs.SkipAll
		}
		return nil
	})
	return empty
}
