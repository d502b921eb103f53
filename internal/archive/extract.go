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
	"syscall"
)

// Extract unpacks the .tar.gz read from r into dest, all or nothing.
//
// dest must not exist, or be an empty directory, which is then replaced (it
// keeps its permission bits; a new dest gets 0755). Its parent must exist
// and be writable: the archive is unpacked into a temporary sibling
// ".<base>.extract-*" that is renamed to dest only once every entry passed
// and the gzip stream checked out to its end. On any error the temporary
// directory is removed and dest is left as it was.
func Extract(ctx context.Context, r io.Reader, dest string, lim Limits) error {
	dest, mode, err := checkDest(dest)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dest), "."+filepath.Base(dest)+".extract-*")
	if err != nil {
		return fmt.Errorf("archive: making a temporary directory beside %s: %w; its parent must exist and be writable", dest, err)
	}
	if err := fill(ctx, r, tmp, lim); err != nil {
		return discard(tmp, err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return discard(tmp, fmt.Errorf("archive: setting the mode of %s: %w", tmp, err))
	}
	// rename(2) replaces only an empty directory, so a dest that filled up
	// since checkDest fails here instead of being clobbered. os.Rename
	// refuses any existing directory, hence the syscall.
	if err := syscall.Rename(tmp, dest); err != nil {
		err = &os.LinkError{Op: "rename", Old: tmp, New: dest, Err: err}
		return discard(tmp, fmt.Errorf("archive: moving the extracted files to %s: %w; it must be absent or an empty directory", dest, err))
	}
	return nil
}

// checkDest returns dest made absolute (so that its parent and base are
// well defined) and the mode the extracted directory should get, or why
// dest cannot be extracted to.
func checkDest(dest string) (string, fs.FileMode, error) {
	abs, err := filepath.Abs(dest)
	if err != nil {
		return "", 0, fmt.Errorf("archive: destination %s: %w", dest, err)
	}
	st, err := os.Lstat(abs)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return abs, 0o755, nil
	case err != nil:
		return "", 0, fmt.Errorf("archive: destination %s: %w", abs, err)
	case st.Mode()&fs.ModeSymlink != 0:
		return "", 0, fmt.Errorf("archive: destination %s is a symlink; pass the directory it points to", abs)
	case !st.IsDir():
		return "", 0, fmt.Errorf("archive: destination %s is not a directory; pass an absent or empty directory", abs)
	}
	empty, err := isEmptyDir(abs)
	if err != nil {
		return "", 0, fmt.Errorf("archive: destination %s: %w", abs, err)
	}
	if !empty {
		return "", 0, fmt.Errorf("archive: destination %s is not empty; extract to an absent or empty directory", abs)
	}
	return abs, st.Mode().Perm(), nil
}

func isEmptyDir(dir string) (bool, error) {
	f, err := os.Open(dir)
	if err != nil {
		return false, err
	}
	defer f.Close()
	_, err = f.Readdirnames(1)
	if err == io.EOF {
		return true, nil
	}
	return false, err
}

// discard removes the temporary directory of a failed extraction and
// returns err, with the removal's own failure if any.
func discard(tmp string, err error) error {
	if rmErr := os.RemoveAll(tmp); rmErr != nil {
		return errors.Join(err, fmt.Errorf("archive: removing the partial extraction %s: %w; remove it by hand", tmp, rmErr))
	}
	return err
}

// fill unpacks into dir, a new empty directory, through an os.Root: the
// rules already keep every path and link inside, and the root keeps even a
// missed case from writing outside.
func fill(ctx context.Context, r io.Reader, dir string, lim Limits) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("archive: opening %s: %w", dir, err)
	}
	defer root.Close()
	return walk(ctx, r, lim, func(name string, hdr *tar.Header, body io.Reader) error {
		if err := write(root, name, hdr, body); err != nil {
			return fmt.Errorf("writing %q: %w", name, err)
		}
		return nil
	})
}

// write makes one checked entry under root.
func write(root *os.Root, name string, hdr *tar.Header, body io.Reader) error {
	if hdr.Typeflag == tar.TypeDir {
		return root.MkdirAll(name, 0o755)
	}
	if dir := path.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	if hdr.Typeflag == tar.TypeSymlink {
		return root.Symlink(hdr.Linkname, name)
	}
	mode := fs.FileMode(hdr.Mode) & 0o777 // no setuid, setgid or sticky bits
	// O_EXCL: the directory is new and names are unique, so an existing
	// file here would mean the model and the disk disagree.
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, body); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return root.Chmod(name, mode) // the umask may have cleared bits
}

// ExtractFile copies the regular file called name out of the .tar.gz read
// from r into w. Every entry is checked as Extract checks it and the
// stream is read to its end, so a hostile or corrupt archive fails even
// when the file comes early; on error w may already hold part or all of
// the file, so write to a temporary file and use it only on success.
//
// It fails with an *Error naming the entry when that entry is a symlink,
// a directory or anything else but a regular file, and with ErrNotFound
// (wrapped) when the archive holds no entry of that name.
func ExtractFile(ctx context.Context, r io.Reader, name string, w io.Writer, lim Limits) error {
	if err := checkName(name); err != nil {
		return fmt.Errorf("archive: cannot look for %q: %w; pass the relative path stored in the archive", name, err)
	}
	want := cleanName(name)
	found := false
	err := walk(ctx, r, lim, func(n string, hdr *tar.Header, body io.Reader) error {
		if n != want {
			return nil
		}
		if hdr.Typeflag != tar.TypeReg {
			return &Error{hdr.Name, fmt.Sprintf("ExtractFile takes only a regular file, and this is %s", describe(hdr))}
		}
		found = true
		if _, err := io.Copy(w, body); err != nil {
			return fmt.Errorf("copying %q out: %w", hdr.Name, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("archive: %q: %w; check the name (e.g. the architecture suffix)", name, ErrNotFound)
	}
	return nil
}

// ExtractFiles copies the regular files named in want out of the .tar.gz
// read from r, each into its writer, and stops reading as soon as it has
// them all. Every entry up to the last one wanted is checked as Extract
// checks it; what follows is not read, so a corrupt or hostile tail goes
// unnoticed. It is for an archive whose integrity is already established
// (the updater's tarball, whose signature covers every byte and is
// verified first), laid out with what is wanted near its start (the
// release tarball: VERSION, then one binary per architecture), where
// reading on would only cost time.
//
// Like ExtractFile, it fails with an *Error naming an entry that is not a
// regular file, and with ErrNotFound (wrapped) naming the files the
// archive lacks; on error the writers may hold part of their file.
func ExtractFiles(ctx context.Context, r io.Reader, want map[string]io.Writer, lim Limits) error {
	left := make(map[string]io.Writer, len(want))
	for name, w := range want {
		if err := checkName(name); err != nil {
			return fmt.Errorf("archive: cannot look for %q: %w; pass the relative path stored in the archive", name, err)
		}
		left[cleanName(name)] = w
	}
	if len(left) == 0 {
		return nil
	}
	err := walk(ctx, r, lim, func(n string, hdr *tar.Header, body io.Reader) error {
		w, ok := left[n]
		if !ok {
			return nil
		}
		if hdr.Typeflag != tar.TypeReg {
			return &Error{hdr.Name, fmt.Sprintf("ExtractFiles takes only regular files, and this is %s", describe(hdr))}
		}
		delete(left, n)
		if _, err := io.Copy(w, body); err != nil {
			return fmt.Errorf("copying %q out: %w", hdr.Name, err)
		}
		if len(left) == 0 {
			return errEnough
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(left) > 0 {
		missing := make([]string, 0, len(left))
		for n := range left {
			missing = append(missing, n)
		}
		sort.Strings(missing)
		return fmt.Errorf("archive: %q: %w; check the names (e.g. the architecture suffix)", missing, ErrNotFound)
	}
	return nil
}

// describe names what a non-regular entry is, for error messages.
func describe(hdr *tar.Header) string {
	switch hdr.Typeflag {
	case tar.TypeSymlink:
		return fmt.Sprintf("a symlink to %q", hdr.Linkname)
	case tar.TypeDir:
		return "a directory"
	default:
		return fmt.Sprintf("an entry of type %q", hdr.Typeflag)
	}
}
