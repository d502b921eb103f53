package native

import (
	"io/fs"

	"github.com/visualops/opsagent/internal/rootfs"
)

// Default modes of newly created files and directories (module.json).
const (
	defaultFileMode = 0o644
	defaultDirMode  = 0o755
)

// attrs is the mode and owner a state asks for; what it does not ask for
// is left as it is.
type attrs struct {
	mode     uint32 // octal as a recipe writes it, special bits included (04755)
	haveMode bool
	uid, gid int // -1: unchanged
}

// stateAttrs reads the mode, user and group parameters.
func (s *stateRun) attrs() (attrs, error) {
	mode, haveMode, err := s.p.mode("mode")
	if err != nil {
		return attrs{}, err
	}
	uid, gid, err := s.owner()
	if err != nil {
		return attrs{}, err
	}
	return attrs{mode: mode, haveMode: haveMode, uid: uid, gid: gid}, nil
}

// orMode is a with mode def when it asks for none (a new file or
// directory gets the module's default mode).
func (a attrs) orMode(def uint32) attrs {
	if !a.haveMode {
		a.mode, a.haveMode = def, true
	}
	return a
}

// any reports whether a asks for anything.
func (a attrs) any() bool { return a.haveMode || a.uid >= 0 || a.gid >= 0 }

// applyAttrs gives path the owner and then the mode that a asks for and
// notes what changed in ch (in check mode it only notes). It never follows
// a final symlink (callers pass the resolved target when they mean the
// target); a symlink gets only its owner, since Linux links have no mode.
//
// It is the one place where modes and owners are set, for files and
// directories alike, whether just created or already there: so a mode
// with setuid, setgid or sticky bits is set the same way in every round,
// and the second round finds it in place. The owner goes first because
// chown(2) clears setuid and setgid; the mode is compared after it.
func (s *stateRun) applyAttrs(path string, a attrs, ch *changes) error {
	fsys := s.fs
	fi, err := fsys.Lstat(path)
	if err != nil {
		return err
	}
	bits := rootfs.ModeBits(fi.Mode())
	if uid, gid, ok := rootfs.Owner(fi); ok && ((a.uid >= 0 && uid != a.uid) || (a.gid >= 0 && gid != a.gid)) {
		ch.add("owner")
		if s.test {
			bits &^= 0o6000 // what chown(2) will clear
		} else {
			if err := fsys.Chown(path, a.uid, a.gid, false); err != nil {
				return err
			}
			if fi, err = fsys.Lstat(path); err != nil {
				return err
			}
			bits = rootfs.ModeBits(fi.Mode())
		}
	}
	if a.haveMode && fi.Mode()&fs.ModeSymlink == 0 && bits != a.mode {
		ch.add("mode %04o", a.mode)
		if s.test {
			return nil
		}
		if err := fsys.Chmod(path, rootfs.FileMode(a.mode), false); err != nil {
			return err
		}
	}
	return nil
}

// mkdirParents creates dir and its missing parents, each given a right
// after it is created (module.json: missing parents get the attributes of
// the state's own directory). They are created 0700, so none is ever
// open to others before it has its final mode.
func (s *stateRun) mkdirParents(dir string, a attrs) error {
	return s.fs.MkdirAll(dir, 0o700, func(p string) error {
		var ignored changes // a created directory reports "created" only
		return s.applyAttrs(p, a, &ignored)
	})
}
