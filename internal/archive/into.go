package archive

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// Source is an archive file: tar formats are read as a stream from its
// start, zip at offsets. *os.File is one.
type Source interface {
	io.Reader
	io.ReaderAt
	io.Seeker
}

// Extracted is what ExtractInto did.
type Extracted struct {
	Entries  int      // archive entries extracted (files, links, directories)
	Replaced int      // existing files or links the archive replaced
	Top      []string // the archive's top-level names in dest, sorted
}

// Names of ExtractInto's working directories inside dest; archives whose
// top level holds such a name are refused.
const (
	stagePrefix  = ".opsagent-extract-"
	backupPrefix = ".opsagent-backup-"
)

// ExtractInto unpacks the archive read from src, of format f (see
// Detect), into dest, an existing directory that may already hold files,
// all or nothing, with the rules and limits Extract applies.
//
// The archive is first unpacked whole into a private directory inside
// dest (the same file system, so that moves are renames). Then each of
// its paths is matched against dest: a directory the archive has and dest
// lacks is moved in whole; one both have is merged; a file or symlink
// replaces dest's file or symlink of the same name, whose old version is
// kept aside until the end. A path that is a directory on one side and
// not on the other, a symlink included, fails the whole extraction
// before dest is touched: nothing is ever written through a symlink of
// dest, nor is a directory of dest replaced. If moving in fails, the
// moves already made are undone and the replaced files put back. Paths
// of dest the archive does not name are left alone, as tar leaves them.
func ExtractInto(ctx context.Context, src Source, f Format, dest string, lim Limits) (Extracted, error) {
	var out Extracted
	st, err := os.Lstat(dest)
	switch {
	case err != nil:
		return out, fmt.Errorf("archive: destination %s: %w", dest, err)
	case !st.IsDir():
		return out, fmt.Errorf("archive: destination %s is not a directory (a symlink is not followed: pass the directory it points to)", dest)
	}
	root, err := os.OpenRoot(dest)
	if err != nil {
		return out, fmt.Errorf("archive: opening %s: %w", dest, err)
	}
	defer root.Close()
	removeStale(root)
	stageDir, err := os.MkdirTemp(dest, stagePrefix+"*")
	if err != nil {
		return out, fmt.Errorf("archive: making a working directory in %s: %w; it must be writable", dest, err)
	}
	stage := filepath.Base(stageDir)
	defer root.RemoveAll(stage)
	sroot, err := root.OpenRoot(stage)
	if err != nil {
		return out, fmt.Errorf("archive: opening %s: %w", stageDir, err)
	}
	defer sroot.Close()
	if out.Entries, err = fillFrom(ctx, src, f, sroot, lim); err != nil {
		return out, err
	}
	ops, err := planMerge(root, sroot, dest)
	if err != nil {
		return out, err
	}
	if out.Replaced, err = commit(ctx, root, stage, ops, dest); err != nil {
		return out, err
	}
	tops, err := fs.ReadDir(sroot.FS(), ".")
	if err != nil {
		return out, fmt.Errorf("archive: reading %s: %w", stageDir, err)
	}
	// What is left in the stage is the directories merged into dest's;
	// the rest moved in. Their names are the archive's top level.
	seen := map[string]bool{}
	for _, o := range ops {
		seen[strings.SplitN(o.path, "/", 2)[0]] = true
	}
	for _, t := range tops {
		seen[t.Name()] = true
	}
	for name := range seen {
		out.Top = append(out.Top, name)
	}
	sort.Strings(out.Top)
	return out, nil
}

// removeStale removes working directories an interrupted extraction left
// in dest (a backup directory is left: it may hold the only copy of
// replaced files).
func removeStale(root *os.Root) {
	entries, err := fs.ReadDir(root.FS(), ".")
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), stagePrefix) {
			_ = root.RemoveAll(e.Name())
		}
	}
}

// fillFrom unpacks the archive into root, a new empty directory, and
// returns the number of entries.
func fillFrom(ctx context.Context, src Source, f Format, root *os.Root, lim Limits) (int, error) {
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return 0, fmt.Errorf("archive: %w", err)
	}
	n := 0
	write := func(name string, hdr *tar.Header, body io.Reader) error {
		if err := write(root, name, hdr, body); err != nil {
			return fmt.Errorf("writing %q: %w", name, err)
		}
		n++
		return nil
	}
	var err error
	if f == Zip {
		err = walkZip(ctx, src, lim, write)
	} else {
		err = walkTar(ctx, src, f, lim, write)
	}
	return n, err
}

// mergeOp is one path of the unpacked archive to move into dest.
type mergeOp struct {
	path    string // slash-separated, relative to dest and to the stage
	replace bool   // dest has a file or symlink there
	// progress, for undoing: dest's version moved aside, the archive's in
	out, in bool
}

// planMerge matches the unpacked archive against dest and lists the
// moves, or fails on the first path that is a directory on one side and
// not on the other.
func planMerge(root, stage *os.Root, dest string) ([]*mergeOp, error) {
	var ops []*mergeOp
	err := fs.WalkDir(stage.FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == "." {
			return err
		}
		if !strings.Contains(p, "/") && (strings.HasPrefix(p, stagePrefix) || strings.HasPrefix(p, backupPrefix)) {
			return &Error{p, "the name is reserved for the extraction's own working directories"}
		}
		st, err := root.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			ops = append(ops, &mergeOp{path: p})
			if d.IsDir() {
				return fs.SkipDir // moved in whole
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("archive: %s: %w", filepath.Join(dest, p), err)
		}
		switch {
		case d.IsDir() && st.IsDir():
			return nil // merged: its entries are matched in turn
		case d.IsDir():
			return fmt.Errorf("archive: the archive has a directory %s where %s holds %s; nothing was extracted: remove or move it first", p, dest, kind(st.Mode()))
		case st.IsDir():
			return fmt.Errorf("archive: the archive has %s %s where %s holds a directory; nothing was extracted: remove or move it first", kind(d.Type()), p, dest)
		}
		ops = append(ops, &mergeOp{path: p, replace: true})
		return nil
	})
	return ops, err
}

// kind names a file type for messages.
func kind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "a symlink"
	case m.IsDir():
		return "a directory"
	case m.IsRegular():
		return "a file"
	}
	return "a special file"
}

// commit makes the moves, and undoes them all if one fails. It returns
// how many files it replaced.
func commit(ctx context.Context, root *os.Root, stage string, ops []*mergeOp, dest string) (int, error) {
	backup := ""
	replaced := 0
	var err error
	for _, o := range ops {
		if err = ctx.Err(); err != nil {
			break
		}
		if o.replace {
			if backup == "" {
				var dir string
				if dir, err = os.MkdirTemp(dest, backupPrefix+"*"); err != nil {
					break
				}
				backup = filepath.Base(dir)
			}
			if err = root.MkdirAll(path.Join(backup, path.Dir(o.path)), 0o700); err != nil {
				break
			}
			if err = root.Rename(o.path, path.Join(backup, o.path)); err != nil {
				break
			}
			o.out = true
		}
		if err = root.Rename(path.Join(stage, o.path), o.path); err != nil {
			break
		}
		o.in = true
		if o.replace {
			replaced++
		}
	}
	if err == nil {
		if backup != "" {
			if rmErr := root.RemoveAll(backup); rmErr != nil {
				return replaced, fmt.Errorf("archive: extracted into %s, but removing the replaced files kept in %s failed: %w; remove it by hand", dest, filepath.Join(dest, backup), rmErr)
			}
		}
		return replaced, nil
	}
	err = fmt.Errorf("archive: moving the extracted files into %s: %w", dest, err)
	if undoErr := undo(root, stage, backup, ops); undoErr != nil {
		return 0, errors.Join(err, fmt.Errorf("archive: undoing the partial extraction failed: %w; the replaced files are kept in %s", undoErr, filepath.Join(dest, backup)))
	}
	if backup != "" {
		_ = root.RemoveAll(backup)
	}
	return 0, fmt.Errorf("%w; nothing was changed", err)
}

// undo reverses the moves commit made, last first.
func undo(root *os.Root, stage, backup string, ops []*mergeOp) error {
	var errs []error
	for i := len(ops) - 1; i >= 0; i-- {
		o := ops[i]
		if o.in {
			if err := root.Rename(o.path, path.Join(stage, o.path)); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		if o.out {
			if err := root.Rename(path.Join(backup, o.path), o.path); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
