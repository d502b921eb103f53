package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/rootfs"
)

// dir is linux.dir.
//
// A symlink to a directory is followed (inside the root): the directory
// it points to is managed and the link stays; a dangling one fails rather
// than creating a directory where the link says (it may name a mount
// point not mounted yet). Recursive mode and owner changes never follow
// symlinks inside the tree. absent removes a symlink itself, not its
// target, and never follows links inside the tree it removes.
func (e *Executor) dir(_ context.Context, s *stateRun) (state.Result, error) {
	p := s.p
	paths, err := dirPaths(p)
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	if absent {
		return s.removeDirs(paths)
	}
	a, err := s.attrs()
	if err != nil {
		return state.Result{}, err
	}
	recursive, err := p.boolean("recursive", true)
	if err != nil {
		return state.Result{}, err
	}
	var comments []string
	any := false
	for _, d := range paths {
		r, err := s.manageDir(d, a, recursive)
		if err != nil {
			return state.Result{}, err
		}
		comments = append(comments, r.Comment)
		any = any || r.Changed
	}
	return state.Result{OK: true, Changed: any, Comment: strings.Join(comments, "\n")}, nil
}

// dirPaths reads the path list; each must be absolute.
func dirPaths(p params) ([]string, error) {
	paths, err := p.list("path")
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, &badParam{"path", "is required: a list of directory paths"}
	}
	for i, d := range paths {
		if !strings.HasPrefix(d, "/") {
			return nil, &badParam{fmt.Sprintf("path[%d]", i), fmt.Sprintf("must be an absolute path, got %q", d)}
		}
		paths[i] = rootfs.Clean(d)
	}
	return paths, nil
}

func (s *stateRun) removeDirs(paths []string) (state.Result, error) {
	var removed, already []string
	for _, d := range paths {
		if _, err := s.fs.Lstat(d); errors.Is(err, fs.ErrNotExist) {
			already = append(already, d)
			continue
		}
		if d == "/" {
			return state.Result{}, failf("Directory %s: refusing to remove the root", d)
		}
		if !s.test {
			if err := s.fs.RemoveAll(d); err != nil {
				return state.Result{}, failf("Directory %s: %v", d, err)
			}
		}
		removed = append(removed, d)
	}
	if len(removed) == 0 {
		return unchanged(fmt.Sprintf("Directory %s is already absent", strings.Join(already, ", "))), nil
	}
	return changed(fmt.Sprintf("Directory %s %s", strings.Join(removed, ", "), s.did("removed"))), nil
}

// manageDir makes directory d exist with attributes a.
func (s *stateRun) manageDir(d string, a attrs, recursive bool) (state.Result, error) {
	var ch changes
	target, created, err := s.dirTarget(d, a, &ch)
	if err != nil {
		return state.Result{}, err
	}
	if created && s.test {
		return s.result("Directory "+d, ch), nil // nothing there to look at
	}
	if err := s.applyAttrs(target, a, &ch); err != nil {
		return state.Result{}, failf("Directory %s: %v", d, err)
	}
	if recursive && a.any() {
		err := s.fs.WalkDir(target, func(sub string, de fs.DirEntry, err error) error {
			if err != nil || sub == target || !de.IsDir() {
				return err // a symlink's entry is not a directory: not followed
			}
			return s.applyAttrs(sub, a, &ch)
		})
		if err != nil {
			return state.Result{}, failf("Directory %s: %v", d, err)
		}
	}
	return s.result("Directory "+d, dedupe(ch)), nil
}

// dirTarget is the in-root directory linux.dir manages for d, created
// (with its missing parents, given a's attributes, 0755 by default) when
// d does not exist (in check mode only reported as created).
func (s *stateRun) dirTarget(d string, a attrs, ch *changes) (string, bool, error) {
	fsys := s.fs
	target := d
	fi, err := fsys.Lstat(d)
	if err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		if target, err = fsys.ResolveLinks(d); err != nil {
			return "", false, failf("Directory %s: is a symlink that cannot be followed: %v", d, err)
		}
		if fi, err = fsys.Lstat(target); errors.Is(err, fs.ErrNotExist) {
			return "", false, failf("Directory %s: is a symlink to %s, which does not exist (create it first)", d, target)
		}
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		ch.add("created")
		if !s.test {
			if err := s.mkdirParents(d, a.orMode(defaultDirMode)); err != nil {
				return "", false, failf("Directory %s: %v", d, err)
			}
		}
		return d, true, nil
	case err != nil:
		return "", false, failf("Directory %s: %v", d, err)
	case !fi.IsDir():
		return "", false, failf("Directory %s: a file is in the way", d)
	}
	return target, false, nil
}

func dedupe(c changes) changes {
	seen := map[string]bool{}
	var out changes
	for _, s := range c {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}
