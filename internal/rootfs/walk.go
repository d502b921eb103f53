package rootfs

import (
	"io/fs"
	"os"
	"path"
	"sort"

	"golang.org/x/sys/unix"
)

// ResolveLinks is the in-root path that p names once every symlink in it,
// the final one included, is followed: what a chroot at the root would
// see. It is how callers get "follow" semantics for operations that act on
// a name (WriteFileAtomic, Remove). The final component may be missing (a
// dangling link's target is returned), but its directory must exist. More
// than 40 links fail with ELOOP.
//
// It reads links itself rather than asking the kernel to follow them, so
// magic links such as /proc/self/exe resolve to the path they print.
func (f *FS) ResolveLinks(p string) (string, error) {
	p = Clean(p)
	resolved := "/" // never contains a symlink, so ".." is textual
	rest := split(p)
	links := 0
	for len(rest) > 0 {
		name := rest[0]
		rest = rest[1:]
		if name == ".." {
			resolved = path.Dir(resolved)
			continue
		}
		next := path.Join(resolved, name)
		target, isLink, isDir, err := f.lookLink(next)
		switch {
		case err == unix.ENOENT && len(rest) == 0:
			return next, nil
		case err != nil:
			return "", pathErr("resolve", next, err)
		case isLink:
			if links++; links > maxLinks {
				return "", pathErr("resolve", p, unix.ELOOP)
			}
			if path.IsAbs(target) {
				resolved = "/"
			}
			rest = append(split(target), rest...)
		case !isDir && len(rest) > 0:
			return "", pathErr("resolve", next, unix.ENOTDIR)
		default:
			resolved = next
		}
	}
	return resolved, nil
}

// lookLink says what p (not followed) is, and the target if a symlink.
func (f *FS) lookLink(p string) (target string, isLink, isDir bool, err error) {
	fd, err := f.open(p, unix.O_PATH|unix.O_NOFOLLOW)
	if err != nil {
		return "", false, false, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "", false, false, err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		target, err = readlinkFD(fd)
		return target, true, false, err
	case unix.S_IFDIR:
		return "", false, true, nil
	}
	return "", false, false, nil
}

// WalkDir walks the tree at p like filepath.WalkDir, in lexical order,
// calling fn with instance paths. It never follows symlinks: p itself and
// entries that are links are reported as links and not descended into.
func (f *FS) WalkDir(p string, fn fs.WalkDirFunc) error {
	p = Clean(p)
	fi, err := f.Lstat(p)
	if err != nil {
		err = fn(p, nil, err)
	} else {
		err = f.walkDir(p, fs.FileInfoToDirEntry(fi), fn)
	}
	if err == fs.SkipDir || err == fs.SkipAll {
		return nil
	}
	return err
}

func (f *FS) walkDir(p string, d fs.DirEntry, fn fs.WalkDirFunc) error {
	if err := fn(p, d, nil); err != nil || !d.IsDir() {
		if err == fs.SkipDir && d.IsDir() {
			err = nil
		}
		return err
	}
	entries, err := f.readDir(p)
	if err != nil {
		if err = fn(p, d, err); err != nil {
			if err == fs.SkipDir {
				err = nil
			}
			return err
		}
	}
	for _, e := range entries {
		if err := f.walkDir(path.Join(p, e.Name()), e, fn); err != nil {
			if err == fs.SkipDir {
				break
			}
			return err
		}
	}
	return nil
}

// readDir lists directory p (not followed if a symlink), sorted by name.
// Entries are described with fstatat on the directory's descriptor, so
// their type is what is really there; entries removed meanwhile are left
// out.
func (f *FS) readDir(p string) ([]fs.DirEntry, error) {
	fd, err := f.open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	dir := os.NewFile(uintptr(fd), p)
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	sort.Strings(names)
	out := make([]fs.DirEntry, 0, len(names))
	for _, name := range names {
		fi := &fileInfo{name: name}
		err := unix.Fstatat(fd, name, &fi.st, unix.AT_SYMLINK_NOFOLLOW)
		if err == unix.ENOENT {
			continue
		}
		if err != nil {
			return nil, pathErr("lstat", path.Join(p, name), err)
		}
		out = append(out, fs.FileInfoToDirEntry(fi))
	}
	return out, nil
}
