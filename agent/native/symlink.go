package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/visualops/opsagent/agent/state"
)

// symlink is linux.symlink: target is the link, source what it points to.
// The link is created, replaced, chowned and removed inside the root (its
// parent directory resolved there); source is stored as given.
func (e *Executor) symlink(_ context.Context, s *stateRun) (state.Result, error) {
	p, fsys := s.p, s.fs
	target, err := absPath(p, "target")
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	if absent {
		return s.removeSymlink(target)
	}
	source, err := p.required("source")
	if err != nil {
		return state.Result{}, err
	}
	uid, gid, err := s.owner()
	if err != nil {
		return state.Result{}, err
	}
	parent := parentDir(target)
	if st, err := fsys.Stat(parent); err != nil || !st.IsDir() {
		return state.Result{}, failf("Symlink %s: parent directory %s does not exist (create it first, e.g. with linux.dir)", target, parent)
	}
	var ch changes
	created, err := s.ensureSymlink(target, source, &ch)
	if err != nil {
		return state.Result{}, err
	}
	if !(created && s.test) {
		if err := s.applyAttrs(target, attrs{uid: uid, gid: gid}, &ch); err != nil {
			return state.Result{}, failf("Symlink %s: %v", target, err)
		}
	}
	return s.result("Symlink "+target, ch), nil
}

func (s *stateRun) removeSymlink(target string) (state.Result, error) {
	fi, err := s.fs.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return unchanged(fmt.Sprintf("Symlink %s is already absent", target)), nil
	case err != nil:
		return state.Result{}, failf("Symlink %s: %v", target, err)
	case fi.Mode()&fs.ModeSymlink == 0:
		return state.Result{}, failf("Symlink %s: is not a symlink, not removed", target)
	}
	if !s.test {
		if err := s.fs.Remove(target); err != nil {
			return state.Result{}, failf("Symlink %s: %v", target, err)
		}
	}
	return changed(fmt.Sprintf("Symlink %s %s", target, s.did("removed"))), nil
}

// ensureSymlink makes target a symlink to source; it reports whether the
// link was created (in check mode: would be).
func (s *stateRun) ensureSymlink(target, source string, ch *changes) (bool, error) {
	fsys := s.fs
	fi, err := fsys.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		ch.add("created -> %s", source)
		if s.test {
			return true, nil
		}
		if err := fsys.Symlink(source, target); err != nil {
			return false, failf("Symlink %s: %v", target, err)
		}
		return true, nil
	case err != nil:
		return false, failf("Symlink %s: %v", target, err)
	case fi.Mode()&fs.ModeSymlink == 0:
		return false, failf("Symlink %s: a file or directory is in the way", target)
	}
	cur, err := fsys.Readlink(target)
	if err != nil {
		return false, failf("Symlink %s: %v", target, err)
	}
	if cur == source {
		return false, nil
	}
	ch.add("now -> %s (was -> %s)", source, cur)
	if s.test {
		return false, nil
	}
	// Replace atomically: a new link beside it, renamed over it.
	tmp := target + ".opsagent-tmp"
	_ = fsys.Remove(tmp)
	if err := fsys.Symlink(source, tmp); err != nil {
		return false, failf("Symlink %s: %v", target, err)
	}
	if err := fsys.Rename(tmp, target); err != nil {
		_ = fsys.Remove(tmp)
		return false, failf("Symlink %s: %v", target, err)
	}
	return false, nil
}
