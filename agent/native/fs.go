package native

import (
	"context"
	"crypto/md5"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
)

// Default modes of newly created files and directories (module.json).
const (
	defaultFileMode = 0o644
	defaultDirMode  = 0o755
)

// changes collects what a state changed, for its comment.
type changes []string

func (c *changes) add(format string, a ...any) { *c = append(*c, fmt.Sprintf(format, a...)) }

func (c changes) result(what string) state.Result {
	if len(c) == 0 {
		return state.Result{OK: true, Comment: what + " is already in the correct state"}
	}
	return state.Result{OK: true, Comment: what + " updated: " + strings.Join(c, ", ")}
}

func absPath(p params, name string) (string, error) {
	v, err := p.required(name)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(v, "/") {
		return "", &badParam{name, fmt.Sprintf("must be an absolute path, got %q", v)}
	}
	return filepath.Clean(v), nil
}

// file is linux.file.
func (e *Executor) file(ctx context.Context, p params) (state.Result, error) {
	path, err := absPath(p, "path")
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	real := e.opts.Root.Path(path)
	if absent {
		st, err := os.Lstat(real)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return state.Result{OK: true, Comment: fmt.Sprintf("File %s is already absent", path)}, nil
		case err != nil:
			return state.Result{}, failf("File %s: %v", path, err)
		case st.IsDir():
			return state.Result{}, failf("File %s: is a directory, not removed (use linux.dir with absent)", path)
		}
		if err := os.Remove(real); err != nil {
			return state.Result{}, failf("File %s: %v", path, err)
		}
		return state.Result{OK: true, Comment: fmt.Sprintf("File %s removed", path)}, nil
	}
	mode, haveMode, err := p.mode("mode")
	if err != nil {
		return state.Result{}, err
	}
	uid, gid, err := owner(p)
	if err != nil {
		return state.Result{}, err
	}
	var want []byte
	haveContent := false
	if p.has("remote_uri") {
		uri, err := p.str("remote_uri")
		if err != nil {
			return state.Result{}, err
		}
		if uri != "" {
			if want, err = e.download(ctx, uri); err != nil {
				return state.Result{}, err
			}
			haveContent = true
		}
	}
	if !haveContent && p.has("content") {
		s, err := p.str("content")
		if err != nil {
			return state.Result{}, err
		}
		want, haveContent = []byte(s), true
	}

	var ch changes
	st, err := os.Lstat(real)
	exists := err == nil
	switch {
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return state.Result{}, failf("File %s: %v", path, err)
	case exists && st.IsDir():
		return state.Result{}, failf("File %s: a directory is in the way", path)
	}
	if !exists {
		if err := e.mkdirParents(filepath.Dir(real), defaultDirMode, uid, gid); err != nil {
			return state.Result{}, failf("File %s: cannot create its directory: %v", path, err)
		}
		m := uint32(defaultFileMode)
		if haveMode {
			m = mode
		}
		if err := fsutil.WriteFileAtomic(real, want, fs.FileMode(m)); err != nil {
			return state.Result{}, failf("File %s: %v", path, err)
		}
		ch.add("created")
	} else {
		if haveContent {
			old, err := os.ReadFile(real)
			if err != nil {
				return state.Result{}, failf("File %s: %v", path, err)
			}
			if md5.Sum(old) != md5.Sum(want) {
				if err := fsutil.WriteFileAtomic(real, want, st.Mode().Perm()); err != nil {
					return state.Result{}, failf("File %s: %v", path, err)
				}
				// The new inode must keep the old owner.
				if sys, ok := st.Sys().(*syscall.Stat_t); ok {
					_ = os.Lchown(real, int(sys.Uid), int(sys.Gid))
				}
				ch.add("content")
			}
		}
		if haveMode && modeBits(st.Mode()) != mode {
			if err := os.Chmod(real, fs.FileMode(mode&0o777)|specialBits(mode)); err != nil {
				return state.Result{}, failf("File %s: chmod: %v", path, err)
			}
			ch.add("mode %04o", mode)
		}
	}
	if err := chownIfNeeded(real, uid, gid, &ch); err != nil {
		return state.Result{}, failf("File %s: %v", path, err)
	}
	return ch.result("File " + path), nil
}

// download fetches remote_uri (http or https).
func (e *Executor) download(ctx context.Context, uri string) ([]byte, error) {
	u, err := url.Parse(uri)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, &badParam{"remote_uri", fmt.Sprintf("must be an http or https URL, got %q", uri)}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, uri, nil)
	if err != nil {
		return nil, &badParam{"remote_uri", err.Error()}
	}
	resp, err := e.opts.HTTPClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot download remote_uri %s: %w", uri, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("cannot download remote_uri %s: HTTP %s", uri, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, e.opts.MaxDownload+1))
	if err != nil {
		return nil, fmt.Errorf("cannot download remote_uri %s: %w", uri, err)
	}
	if int64(len(data)) > e.opts.MaxDownload {
		return nil, fmt.Errorf("remote_uri %s is larger than %d bytes", uri, e.opts.MaxDownload)
	}
	return data, nil
}

// mkdirParents creates dir and its missing parents with mode and owner
// (module.json: missing parents get the attributes of the state's own
// directory).
func (e *Executor) mkdirParents(dir string, mode uint32, uid, gid int) error {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) || d == e.opts.Root.Dir() {
			break
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], fs.FileMode(mode)); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		_ = os.Chmod(missing[i], fs.FileMode(mode)) // umask
		if uid >= 0 || gid >= 0 {
			if err := os.Lchown(missing[i], uid, gid); err != nil {
				return err
			}
		}
	}
	return nil
}

func chownIfNeeded(path string, uid, gid int, ch *changes) error {
	if uid < 0 && gid < 0 {
		return nil
	}
	st, err := os.Lstat(path)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if (uid < 0 || int(sys.Uid) == uid) && (gid < 0 || int(sys.Gid) == gid) {
		return nil
	}
	if err := os.Lchown(path, uid, gid); err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	ch.add("owner")
	return nil
}

// dir is linux.dir.
func (e *Executor) dir(_ context.Context, p params) (state.Result, error) {
	paths, err := p.list("path")
	if err != nil {
		return state.Result{}, err
	}
	if len(paths) == 0 {
		return state.Result{}, &badParam{"path", "is required: a list of directory paths"}
	}
	for i, d := range paths {
		if !strings.HasPrefix(d, "/") {
			return state.Result{}, &badParam{fmt.Sprintf("path[%d]", i), fmt.Sprintf("must be an absolute path, got %q", d)}
		}
		paths[i] = filepath.Clean(d)
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	if absent {
		var removed, already []string
		for _, d := range paths {
			real := e.opts.Root.Path(d)
			if _, err := os.Lstat(real); errors.Is(err, fs.ErrNotExist) {
				already = append(already, d)
				continue
			}
			if real == e.opts.Root.Dir() {
				return state.Result{}, failf("Directory %s: refusing to remove the root", d)
			}
			if err := os.RemoveAll(real); err != nil {
				return state.Result{}, failf("Directory %s: %v", d, err)
			}
			removed = append(removed, d)
		}
		if len(removed) == 0 {
			return state.Result{OK: true, Comment: fmt.Sprintf("Directory %s is already absent", strings.Join(already, ", "))}, nil
		}
		return state.Result{OK: true, Comment: fmt.Sprintf("Directory %s removed", strings.Join(removed, ", "))}, nil
	}
	mode, haveMode, err := p.mode("mode")
	if err != nil {
		return state.Result{}, err
	}
	recursive, err := p.boolean("recursive", true)
	if err != nil {
		return state.Result{}, err
	}
	uid, gid, err := owner(p)
	if err != nil {
		return state.Result{}, err
	}
	var comments []string
	allOK := true
	for _, d := range paths {
		real := e.opts.Root.Path(d)
		var ch changes
		st, err := os.Lstat(real)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			m := uint32(defaultDirMode)
			if haveMode {
				m = mode
			}
			if err := e.mkdirParents(real, m, uid, gid); err != nil {
				return state.Result{}, failf("Directory %s: %v", d, err)
			}
			ch.add("created")
		case err != nil:
			return state.Result{}, failf("Directory %s: %v", d, err)
		case !st.IsDir():
			return state.Result{}, failf("Directory %s: a file is in the way", d)
		}
		apply := func(path string) error {
			if haveMode {
				st, err := os.Lstat(path)
				if err != nil {
					return err
				}
				if modeBits(st.Mode()) != mode {
					if err := os.Chmod(path, fs.FileMode(mode&0o777)|specialBits(mode)); err != nil {
						return err
					}
					ch.add("mode %04o", mode)
				}
			}
			return chownIfNeeded(path, uid, gid, &ch)
		}
		if err := apply(real); err != nil {
			return state.Result{}, failf("Directory %s: %v", d, err)
		}
		if recursive && (haveMode || uid >= 0 || gid >= 0) {
			err := filepath.WalkDir(real, func(sub string, de fs.DirEntry, err error) error {
				if err != nil || sub == real || !de.IsDir() {
					return err
				}
				return apply(sub)
			})
			if err != nil {
				return state.Result{}, failf("Directory %s: %v", d, err)
			}
		}
		ch = dedupe(ch)
		r := ch.result("Directory " + d)
		allOK = allOK && r.OK
		comments = append(comments, r.Comment)
	}
	return state.Result{OK: allOK, Comment: strings.Join(comments, "\n")}, nil
}

// modeBits is m as the octal number a recipe writes (0755, 4755).
func modeBits(m fs.FileMode) uint32 {
	b := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

func specialBits(mode uint32) fs.FileMode {
	var m fs.FileMode
	if mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
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

// symlink is linux.symlink: target is the link, source what it points to.
func (e *Executor) symlink(_ context.Context, p params) (state.Result, error) {
	target, err := absPath(p, "target")
	if err != nil {
		return state.Result{}, err
	}
	absent, err := p.boolean("absent", false)
	if err != nil {
		return state.Result{}, err
	}
	real := e.opts.Root.Path(target)
	if absent {
		st, err := os.Lstat(real)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return state.Result{OK: true, Comment: fmt.Sprintf("Symlink %s is already absent", target)}, nil
		case err != nil:
			return state.Result{}, failf("Symlink %s: %v", target, err)
		case st.Mode()&fs.ModeSymlink == 0:
			return state.Result{}, failf("Symlink %s: is not a symlink, not removed", target)
		}
		if err := os.Remove(real); err != nil {
			return state.Result{}, failf("Symlink %s: %v", target, err)
		}
		return state.Result{OK: true, Comment: fmt.Sprintf("Symlink %s removed", target)}, nil
	}
	source, err := p.required("source")
	if err != nil {
		return state.Result{}, err
	}
	uid, gid, err := owner(p)
	if err != nil {
		return state.Result{}, err
	}
	parent := filepath.Dir(target)
	if st, err := os.Stat(e.opts.Root.Path(parent)); err != nil || !st.IsDir() {
		return state.Result{}, failf("Symlink %s: parent directory %s does not exist (create it first, e.g. with linux.dir)", target, parent)
	}
	var ch changes
	st, err := os.Lstat(real)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.Symlink(source, real); err != nil {
			return state.Result{}, failf("Symlink %s: %v", target, err)
		}
		ch.add("created -> %s", source)
	case err != nil:
		return state.Result{}, failf("Symlink %s: %v", target, err)
	case st.Mode()&fs.ModeSymlink == 0:
		return state.Result{}, failf("Symlink %s: a file or directory is in the way", target)
	default:
		cur, err := os.Readlink(real)
		if err != nil {
			return state.Result{}, failf("Symlink %s: %v", target, err)
		}
		if cur != source {
			// Replace atomically: a new link beside it, renamed over it.
			tmp := real + ".opsagent-tmp"
			_ = os.Remove(tmp)
			if err := os.Symlink(source, tmp); err != nil {
				return state.Result{}, failf("Symlink %s: %v", target, err)
			}
			if err := os.Rename(tmp, real); err != nil {
				_ = os.Remove(tmp)
				return state.Result{}, failf("Symlink %s: %v", target, err)
			}
			ch.add("now -> %s (was -> %s)", source, cur)
		}
	}
	if err := chownIfNeeded(real, uid, gid, &ch); err != nil {
		return state.Result{}, failf("Symlink %s: %v", target, err)
	}
	return ch.result("Symlink " + target), nil
}

// stateError is a failure whose message is the state's comment, written
// the way Salt writes them ("File /x: …").
type stateError struct{ msg string }

func (e *stateError) Error() string { return e.msg }

func failf(format string, a ...any) error { return &stateError{fmt.Sprintf(format, a...)} }
