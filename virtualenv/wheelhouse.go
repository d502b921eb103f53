package virtualenv

import (
	"archive/zip"
	"bufio"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
)

// InstallFromWheelhouse installs everything a local directory holds,
// offline:
//   - wheels (.whl): with pip --no-index --find-links when the environment
//     has its own pip (and then source archives too); otherwise, and always
//     for a minimal Python 2 environment, the wheels that fit its Python are
//     unpacked into SitePackages, as pip would;
//   - plain package directories (with __init__.py), .dist-info/.egg-info
//     directories and single modules (.py, .so, .pth): copied into
//     SitePackages, replacing what is there (testdata/fixtures/salt-py2-libs
//     is such a directory).
//
// Anything else (a README) is skipped.
func (e Env) InstallFromWheelhouse(ctx context.Context, dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("wheelhouse %s: %w", dir, err)
	}
	if e.SitePackages == "" {
		return fmt.Errorf("wheelhouse %s: the environment %s has no site-packages (build it with Ensure)", dir, e.Dir)
	}
	var wheels, sdists []string
	for _, ent := range entries {
		name := ent.Name()
		full := filepath.Join(dir, name)
		isDir := ent.IsDir()
		if ent.Type()&fs.ModeSymlink != 0 {
			st, err := os.Stat(full)
			if err != nil {
				return fmt.Errorf("wheelhouse %s: %w", dir, err)
			}
			isDir = st.IsDir()
		}
		switch {
		case strings.HasPrefix(name, ".") || name == "__pycache__":
		case isDir && (isFile(filepath.Join(full, "__init__.py")) || strings.HasSuffix(name, ".dist-info") || strings.HasSuffix(name, ".egg-info")):
			if err := copyInto(full, filepath.Join(e.SitePackages, name)); err != nil {
				return fmt.Errorf("wheelhouse %s: copying %s: %w", dir, name, err)
			}
			e.log.Info("installed from the wheelhouse", "package", name, "into", e.SitePackages)
		case isDir:
			e.log.Debug("wheelhouse: skipping a directory that is not a Python package", "dir", full)
		case strings.HasSuffix(name, ".whl"):
			wheels = append(wheels, full)
		case strings.HasSuffix(name, ".tar.gz") || strings.HasSuffix(name, ".tar.bz2") || strings.HasSuffix(name, ".zip"):
			sdists = append(sdists, full)
		case strings.HasSuffix(name, ".py") || strings.HasSuffix(name, ".so") || strings.HasSuffix(name, ".pth"):
			if err := copyFile(full, filepath.Join(e.SitePackages, name)); err != nil {
				return fmt.Errorf("wheelhouse %s: copying %s: %w", dir, name, err)
			}
			e.log.Info("installed from the wheelhouse", "module", name, "into", e.SitePackages)
		default:
			e.log.Debug("wheelhouse: skipping", "file", full)
		}
	}
	if len(wheels)+len(sdists) == 0 {
		return nil
	}
	if !e.Minimal && e.hasPip(ctx) {
		// Only the wheels for this Python: pip refuses the others outright,
		// and one wheelhouse may serve Python 2 and 3 alike.
		args := []string{"--no-index", "--find-links", dir}
		for _, f := range wheels {
			if w, err := parseWheelName(f); err == nil && w.fits(e.Version) {
				args = append(args, f)
			}
		}
		if len(args) == 3 && len(sdists) == 0 {
			return nil
		}
		return e.pip(ctx, "from the wheelhouse "+dir, append(args, sdists...)...)
	}
	if len(sdists) > 0 {
		return fmt.Errorf("wheelhouse %s: %s is a source archive, which needs pip to build; python %s in %s has none: put a wheel there instead", dir, filepath.Base(sdists[0]), e.Version, e.Dir)
	}
	return e.unpackWheels(dir, wheels)
}

// wheelName is a wheel file name's fields (PEP 427).
type wheelName struct {
	file, dist, version string
	pythons             []string // py2, py27, cp27, py3, …
	abi                 string
	platforms           []string
}

func parseWheelName(file string) (wheelName, error) {
	parts := strings.Split(strings.TrimSuffix(filepath.Base(file), ".whl"), "-")
	if len(parts) != 5 && len(parts) != 6 {
		return wheelName{}, fmt.Errorf("%s is not a wheel name (dist-version[-build]-python-abi-platform.whl)", filepath.Base(file))
	}
	n := len(parts)
	return wheelName{
		file: file, dist: parts[0], version: parts[1],
		pythons: strings.Split(parts[n-3], "."), abi: parts[n-2], platforms: strings.Split(parts[n-1], "."),
	}, nil
}

// fits tells whether the wheel installs on this Python (version "2.7.18")
// and machine.
func (w wheelName) fits(version string) bool {
	mm := strings.SplitN(majorMinor(version), ".", 2)
	if len(mm) != 2 {
		return false
	}
	major, minor := mm[0], mm[1]
	python := false
	for _, t := range w.pythons {
		switch {
		case t == "py"+major, t == "py"+major+minor, t == "cp"+major+minor:
			python = true
		case w.abi == "abi3" && strings.HasPrefix(t, "cp"+major) && len(t) > 3 && atoiOr(t[3:], 99) <= atoiOr(minor, 0):
			python = true
		}
	}
	if !python {
		return false
	}
	arch := map[string]string{"amd64": "x86_64", "arm64": "aarch64", "386": "i686"}[runtime.GOARCH]
	for _, p := range w.platforms {
		if p == "any" {
			return true
		}
		if arch != "" && (strings.HasPrefix(p, "linux_") || strings.HasPrefix(p, "manylinux")) && strings.HasSuffix(p, "_"+arch) {
			return true
		}
	}
	return false
}

func atoiOr(s string, def int) int {
	n := 0
	if s == "" {
		return def
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return def
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// normalize is PEP 503's project name normalisation.
func normalize(name string) string {
	r := strings.NewReplacer("-", "_", ".", "_")
	return strings.ToLower(r.Replace(name))
}

// unpackWheels installs the wheels that fit the environment's Python by
// unpacking them, one per project.
func (e Env) unpackWheels(dir string, files []string) error {
	chosen := map[string]wheelName{}
	for _, f := range files {
		w, err := parseWheelName(f)
		if err != nil {
			return fmt.Errorf("wheelhouse %s: %w", dir, err)
		}
		if !w.fits(e.Version) {
			e.log.Debug("wheelhouse: wheel is for another Python or machine", "wheel", filepath.Base(f), "python", e.Version)
			continue
		}
		key := normalize(w.dist)
		if other, ok := chosen[key]; ok {
			return fmt.Errorf("wheelhouse %s: %s and %s both fit Python %s: keep one", dir, filepath.Base(other.file), filepath.Base(f), e.Version)
		}
		chosen[key] = w
	}
	keys := make([]string, 0, len(chosen))
	for k := range chosen {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		w := chosen[k]
		if err := e.removeInstalled(w.dist); err != nil {
			return fmt.Errorf("wheelhouse %s: replacing %s: %w", dir, w.dist, err)
		}
		if err := e.unpackWheel(w); err != nil {
			return fmt.Errorf("wheelhouse %s: %s: %w", dir, filepath.Base(w.file), err)
		}
		e.log.Info("installed from the wheelhouse", "wheel", filepath.Base(w.file), "into", e.SitePackages)
	}
	return nil
}

// removeInstalled removes an installed version of a project: the files its
// RECORD lists, then its .dist-info, as pip does before an upgrade.
func (e Env) removeInstalled(dist string) error {
	infos, _ := filepath.Glob(filepath.Join(e.SitePackages, "*.dist-info"))
	for _, info := range infos {
		base := strings.TrimSuffix(filepath.Base(info), ".dist-info")
		name, _, _ := strings.Cut(base, "-")
		if normalize(name) != normalize(dist) {
			continue
		}
		if f, err := os.Open(filepath.Join(info, "RECORD")); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				rel, _, _ := strings.Cut(sc.Text(), ",")
				if p, ok := inside(e.SitePackages, rel); ok {
					_ = os.Remove(p)
				}
			}
			f.Close()
		}
		if err := os.RemoveAll(info); err != nil {
			return err
		}
	}
	return nil
}

// inside joins rel to base, refusing anything that leaves base.
func inside(base, rel string) (string, bool) {
	if rel == "" || path.IsAbs(rel) || filepath.IsAbs(rel) {
		return "", false
	}
	clean := path.Clean(rel)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return "", false
	}
	return filepath.Join(base, filepath.FromSlash(clean)), true
}

// unpackWheel lays a wheel out like pip: the root into site-packages,
// <dist>-<version>.data/{purelib,platlib} there too, scripts into bin/,
// data under the environment.
func (e Env) unpackWheel(w wheelName) error {
	z, err := zip.OpenReader(w.file)
	if err != nil {
		return err
	}
	defer z.Close()
	dataDir := w.dist + "-" + w.version + ".data/"
	for _, f := range z.File {
		if strings.HasSuffix(f.Name, "/") {
			continue
		}
		base, rel, mode := e.SitePackages, f.Name, fs.FileMode(0o644)
		if f.Mode()&0o111 != 0 {
			mode = 0o755
		}
		if strings.HasPrefix(f.Name, dataDir) {
			kind, rest, _ := strings.Cut(strings.TrimPrefix(f.Name, dataDir), "/")
			switch kind {
			case "purelib", "platlib":
				rel = rest
			case "scripts":
				base, rel, mode = filepath.Join(e.Dir, "bin"), rest, 0o755
			case "data":
				base, rel = e.Dir, rest
			default: // headers: nothing here compiles against them
				continue
			}
		}
		dst, ok := inside(base, rel)
		if !ok {
			return fmt.Errorf("entry %q leaves its directory", f.Name)
		}
		shebang := ""
		if base != e.SitePackages && mode == 0o755 {
			shebang = e.Python // "#!python" in a wheel's script means "this environment's"
		}
		if err := extract(f, dst, mode, shebang); err != nil {
			return err
		}
	}
	info := filepath.Join(e.SitePackages, w.dist+"-"+w.version+".dist-info")
	if isDir(info) {
		return os.WriteFile(filepath.Join(info, "INSTALLER"), []byte("opsagent\n"), 0o644)
	}
	return nil
}

func extract(f *zip.File, dst string, mode fs.FileMode, python string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	r, err := f.Open()
	if err != nil {
		return err
	}
	defer r.Close()
	var src io.Reader = r
	if python != "" {
		br := bufio.NewReader(r)
		first, err := br.ReadString('\n')
		if err != nil && err != io.EOF {
			return err
		}
		if first == "#!python\n" || first == "#!pythonw\n" {
			first = "#!" + python + "\n"
		}
		src = io.MultiReader(strings.NewReader(first), br)
	}
	_ = os.Remove(dst) // a read-only file of an earlier install
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, src); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// copyInto replaces dst with a copy of the directory src (modes 0755 and
// 0644, executables 0755: the fixture is read-only), leaving out byte code.
func copyInto(src, dst string) error {
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir() && d.Name() == "__pycache__":
			return filepath.SkipDir
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case strings.HasSuffix(p, ".pyc") || strings.HasSuffix(p, ".pyo"):
			return nil
		}
		return copyFile(p, target)
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	mode := fs.FileMode(0o644)
	if st.Mode()&0o111 != 0 {
		mode = 0o755
	}
	_ = os.Remove(dst)
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}
