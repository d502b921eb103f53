package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/rootfs"
)

// symlink is linux.symlink: target is the link, source what it points to.
// The link is created, replaced, chowned and removed inside the root (its
// parent directory resolved there); source is stored as given.
func (e *Executor) symlink(_ context.Context, fsys *rootfs.FS, p params) (state.Result, error) {
	target, err := absPath(p, "target")
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	if absent {
		return removeSymlink(fsys, target)
	}
	source, err := p.required("source")
	if err != nil {
		return state.Result{}, err
	}
	uid, gid, err := owner(p)
	if err != nil {
		return state.Result{}, err
	}
	parent := parentDir(target)
	if st, err := fsys.Stat(parent); err != nil || !st.IsDir() {
		return state.Result{}, failf("Symlink %s: parent directory %s does not exist (create it first, e.g. with linux.dir)", target, parent)
	}
	var ch changes
	if err := ensureSymlink(fsys, target, source, &ch); err != nil {
		return state.Result{}, err
	}
	if err := applyAttrs(fsys, target, attrs{uid: uid, gid: gid}, &ch); err != nil {
		return state.Result{}, failf("Symlink %s: %v", target, err)
	}
	return ch.result("Symlink " + target), nil
}

func removeSymlink(fsys *rootfs.FS, target string) (state.Result, error) {
	fi, err := fsys.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return state.Result{OK: true, Comment: fmt.Sprintf("Symlink %s is already absent", target)}, nil
	case err != nil:
		return state.Result{}, failf("Symlink %s: %v", target, err)
	case fi.Mode()&fs.ModeSymlink == 0:
		return state.Result{}, failf("Symlink %s: is not a symlink, not removed", target)
	}
	if err := fsys.Remove(target); err != nil {
		return state.Result{}, failf("Symlink %s: %v", target, err)
	}
	return state.Result{OK: true, Comment: fmt.Sprintf("Symlink %s removed", target)}, nil
}

// ensureSymlink makes target a symlink to source.
func ensureSymlink(fsys *rootfs.FS, target, source string, ch *changes) error {
	fi, err := fsys.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := fsys.Symlink(source, target); err != nil {
			return failf("Symlink %s: %v", target, err)
		}
		ch.add("created -> %s", source)
		return nil
	case err != nil:
		return failf("Symlink %s: %v", target, err)
	case fi.Mode()&fs.ModeSymlink == 0:
		return failf("Symlink %s: a file or directory is in the way", target)
	}
	cur, err := fsys.Readlink(target)
	if err != nil {
		return failf("Symlink %s: %v", target, err)
	}
	if cur == source {
		return nil
	}
	// Replace atomically: a new link beside it, renamed over it.
	tmp := target + ".opsagent-tmp"
	_ = fsys.Remove(tmp)
	if err := fsys.Symlink(source, tmp); err != nil {
		return failf("Symlink %s: %v", target, err)
	}
	if err := fsys.Rename(tmp, target); err != nil {
		_ = fsys.Remove(tmp)
		return failf("Symlink %s: %v", target, err)
	}
	ch.add("now -> %s (was -> %s)", source, cur)
	return nil
}
