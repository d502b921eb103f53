package native

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"path"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/rootfs"
)

// file is linux.file.
//
// A symlink at path is followed, as Salt's file.managed does: content,
// mode and owner apply to the file it names (resolved inside the root,
// like a chroot) and the link stays. A dangling link's target is created
// in its directory, which must exist. A link to a directory fails as a
// directory would. absent removes the link itself, never its target.
func (e *Executor) file(ctx context.Context, s *stateRun) (state.Result, error) {
	p := s.p
	path, err := absPath(p, "path")
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	if absent {
		return s.removeFile(path)
	}
	a, err := s.attrs()
	if err != nil {
		return state.Result{}, err
	}
	want, haveContent, err := e.content(ctx, p)
	if err != nil {
		return state.Result{}, err
	}
	target, fi, err := fileTarget(s.fs, path)
	if err != nil {
		return state.Result{}, err
	}
	var ch changes
	switch {
	case fi == nil:
		ch.add("created")
		if s.test {
			return s.result("File "+path, ch), nil
		}
		if err := s.createFile(path, target, want, a); err != nil {
			return state.Result{}, err
		}
	case haveContent:
		differs, err := contentDiffers(s.fs, target, fi, want)
		if err != nil {
			return state.Result{}, failf("File %s: %v", path, err)
		}
		if differs {
			ch.add("content")
			if !s.test {
				if err := rewriteFile(s.fs, target, fi, want); err != nil {
					return state.Result{}, failf("File %s: %v", path, err)
				}
			}
		}
	}
	if err := s.applyAttrs(target, a, &ch); err != nil {
		return state.Result{}, failf("File %s: %v", path, err)
	}
	return s.result("File "+path, ch), nil
}

// removeFile is linux.file with absent: a symlink at path is removed, not
// what it points to.
func (s *stateRun) removeFile(path string) (state.Result, error) {
	fi, err := s.fs.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return unchanged(fmt.Sprintf("File %s is already absent", path)), nil
	case err != nil:
		return state.Result{}, failf("File %s: %v", path, err)
	case fi.IsDir():
		return state.Result{}, failf("File %s: is a directory, not removed (use linux.dir with absent)", path)
	}
	if !s.test {
		if err := s.fs.Remove(path); err != nil {
			return state.Result{}, failf("File %s: %v", path, err)
		}
	}
	return changed(fmt.Sprintf("File %s %s", path, s.did("removed"))), nil
}

// fileTarget is the in-root path linux.file manages for path: path
// itself, or where its chain of symlinks leads. fi describes the target,
// nil when it does not exist yet.
func fileTarget(fsys *rootfs.FS, path string) (string, fs.FileInfo, error) {
	target := path
	fi, err := fsys.Lstat(path)
	if err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		if target, err = fsys.ResolveLinks(path); err != nil {
			return "", nil, failf("File %s: is a symlink that cannot be followed: %v (the directory of the file it points to must exist; create it first, e.g. with linux.dir)", path, err)
		}
		fi, err = fsys.Lstat(target)
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return target, nil, nil
	case err != nil:
		return "", nil, failf("File %s: %v", path, err)
	case fi.IsDir():
		return "", nil, failf("File %s: a directory is in the way", path)
	case !fi.Mode().IsRegular():
		return "", nil, failf("File %s: is not a regular file (%v), not managed", path, fi.Mode().Type())
	}
	return target, fi, nil
}

// createFile creates target with the content and attributes asked for
// (0644 by default): the file appears with them at once, never with a
// wider mode, whatever a symlink's own 0777 says. When path itself was
// missing its directories are created like linux.dir would (0755 and the
// state's owner); a dangling link's target directory already exists.
func (s *stateRun) createFile(path, target string, data []byte, a attrs) error {
	if target == path {
		dirs := attrs{uid: a.uid, gid: a.gid}.orMode(defaultDirMode)
		if err := s.mkdirParents(parentDir(path), dirs); err != nil {
			return failf("File %s: cannot create its directory: %v", path, err)
		}
	}
	a = a.orMode(defaultFileMode)
	if err := s.fs.WriteFileAtomic(target, data, rootfs.FileMode(a.mode), a.uid, a.gid); err != nil {
		return failf("File %s: %v", path, err)
	}
	return nil
}

// contentDiffers reports whether target's content differs from data
// (module.json compares MD5 sums; comparing the bytes is the same test).
func contentDiffers(fsys *rootfs.FS, target string, fi fs.FileInfo, data []byte) (bool, error) {
	if fi.Size() != int64(len(data)) {
		return true, nil
	}
	old, err := fsys.ReadFile(target, int64(len(data)))
	if err != nil && !errors.Is(err, rootfs.ErrTooLarge) {
		return false, err
	}
	return err != nil || !bytes.Equal(old, data), nil
}

// rewriteFile replaces target's content with data; the new inode keeps
// the old one's mode and owner.
func rewriteFile(fsys *rootfs.FS, target string, fi fs.FileInfo, data []byte) error {
	uid, gid, ok := rootfs.Owner(fi)
	if !ok {
		uid, gid = -1, -1
	}
	return fsys.WriteFileAtomic(target, data, fi.Mode(), uid, gid)
}

// content is the file content a state asks for: remote_uri, else content.
func (e *Executor) content(ctx context.Context, p params) ([]byte, bool, error) {
	if p.has("remote_uri") {
		uri, err := p.str("remote_uri")
		if err != nil {
			return nil, false, err
		}
		if uri != "" {
			data, err := e.download(ctx, uri)
			return data, err == nil, err
		}
	}
	if p.has("content") {
		s, err := p.str("content")
		if err != nil {
			return nil, false, err
		}
		return []byte(s), true, nil
	}
	return nil, false, nil
}

// download fetches remote_uri (http or https).
func (e *Executor) download(ctx context.Context, uri string) ([]byte, error) {
	return e.fetchBytes(ctx, "remote_uri", uri)
}

// fetchBytes downloads the http or https URL given by parameter param
// into memory, at most MaxDownload bytes, within the HTTP client's
// timeout (a small file: a stalled server must not hold the round).
func (e *Executor) fetchBytes(ctx context.Context, param, uri string) ([]byte, error) {
	u, err := url.Parse(uri)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, &badParam{param, fmt.Sprintf("must be an http or https URL, got %q", uri)}
	}
	if t := e.opts.HTTPClient.Timeout; t > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t)
		defer cancel()
	}
	var buf bytes.Buffer
	if err := e.fetch(ctx, uri, &buf, e.opts.MaxDownload); err != nil {
		return nil, fmt.Errorf("cannot download %s: %w", param, err)
	}
	return buf.Bytes(), nil
}

// parentDir is the directory holding an instance path.
func parentDir(p string) string { return path.Dir(p) }
