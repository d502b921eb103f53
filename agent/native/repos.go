package native

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"path"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// Where repository definitions live.
const (
	aptSourcesDir = "/etc/apt/sources.list.d"
	yumReposDir   = "/etc/yum.repos.d"
)

// aptRepo is linux.apt.repo: /etc/apt/sources.list.d/NAME.list (".list"
// appended unless there) holds content. The file is rewritten only when
// its content differs; the package index is then older than its sources,
// so the next package state that needs it refreshes it first
// (system.Apt.IndexStale) — the 2014 recipes ran apt-get update after
// every repository instead.
func (e *Executor) aptRepo(_ context.Context, s *stateRun) (state.Result, error) {
	file, err := repoFileName(s.p, ".list")
	if err != nil {
		return state.Result{}, err
	}
	content, err := s.p.required("content")
	if err != nil {
		return state.Result{}, err
	}
	if _, err := s.sys.PackagesFor(system.FamilyDebian, "linux.apt.repo"); err != nil {
		return state.Result{}, err
	}
	p := path.Join(aptSourcesDir, file)
	ch, err := s.manageContent(p, []byte(content), 0o644)
	if err != nil {
		return state.Result{}, failf("linux.apt.repo: %s: %v", p, err)
	}
	return s.result("Repository file "+p, ch), nil
}

// repoFileName reads name as the file name of a repository definition
// with ext appended unless it ends with it already.
func repoFileName(p params, ext string) (string, error) {
	name, err := p.required("name")
	if err != nil {
		return "", err
	}
	name = strings.TrimSpace(name)
	if strings.ContainsAny(name, "/\x00") || name == "." || name == ".." || strings.HasPrefix(name, ".") {
		return "", &badParam{"name", fmt.Sprintf("%q must be a plain file name (no / and not starting with a dot)", name)}
	}
	if !strings.HasSuffix(name, ext) {
		name += ext
	}
	return name, nil
}

// manageContent makes path (inside the root) hold data with mode, as
// linux.file does with content: created with its directories when
// missing, rewritten only when the content differs, the mode set when it
// differs. In check mode it only reports.
func (s *stateRun) manageContent(p string, data []byte, mode uint32) (changes, error) {
	var ch changes
	target, fi, err := fileTarget(s.fs, p)
	if err != nil {
		return nil, err
	}
	a := attrs{mode: mode, haveMode: true, uid: -1, gid: -1}
	if fi == nil {
		ch.add("created")
		if s.test {
			return ch, nil
		}
		return ch, s.createFile(p, target, data, a)
	}
	differs, err := contentDiffers(s.fs, target, fi, data)
	if err != nil {
		return nil, err
	}
	if differs {
		ch.add("content")
		if !s.test {
			if err := rewriteFile(s.fs, target, fi, data); err != nil {
				return nil, err
			}
		}
	}
	return ch, s.applyAttrs(target, a, &ch)
}

// yumRepo is linux.yum.repo: /etc/yum.repos.d/NAME.repo holds content,
// rewritten only when it differs. Without content, rpm-url names a
// repository package (epel-release…) installed when NAME.repo is absent:
// the file the package provides is what tells it is in place, so a round
// that finds it downloads nothing. Salt 2014 ran `rpm -U --force URL`
// every round instead.
func (e *Executor) yumRepo(ctx context.Context, s *stateRun) (state.Result, error) {
	file, err := repoFileName(s.p, ".repo")
	if err != nil {
		return state.Result{}, err
	}
	content, err := s.p.str("content")
	if err != nil {
		return state.Result{}, err
	}
	rpmURL, err := s.p.str("rpm-url")
	if err != nil {
		return state.Result{}, err
	}
	content, rpmURL = strings.TrimRight(content, " \t"), strings.TrimSpace(rpmURL)
	if strings.TrimSpace(content) == "" && rpmURL == "" {
		return state.Result{}, &badParam{"content", "is required when rpm-url is not given"}
	}
	pm, err := s.sys.PackagesFor(system.FamilyRHEL, "linux.yum.repo")
	if err != nil {
		return state.Result{}, err
	}
	p := path.Join(yumReposDir, file)
	if strings.TrimSpace(content) != "" {
		ch, err := s.manageContent(p, []byte(content), 0o644)
		if err != nil {
			return state.Result{}, failf("linux.yum.repo: %s: %v", p, err)
		}
		return s.result("Repository file "+p, ch), nil
	}

	if _, err := s.fs.Lstat(p); err == nil {
		return unchanged(fmt.Sprintf("Repository file %s is already in place (rpm-url %s is not fetched)", p, rpmURL)), nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return state.Result{}, failf("linux.yum.repo: %s: %v", p, err)
	}
	if s.test {
		return changed(fmt.Sprintf("Repository file %s would be installed from %s", p, rpmURL)), nil
	}
	rpm, ok := pm.(*system.RPM)
	if !ok {
		return state.Result{}, failf("linux.yum.repo: %s is not rpm", pm.Name())
	}
	local, cleanup, err := e.localPackageFile(ctx, s, "rpm-url", rpmURL, "repository.rpm")
	if err != nil {
		return state.Result{}, failf("linux.yum.repo: rpm-url: %v", err)
	}
	defer cleanup()
	name, err := rpm.PackageFileName(ctx, local)
	if err != nil {
		return state.Result{}, failf("linux.yum.repo: rpm-url %s: %v", rpmURL, err)
	}
	out, err := rpm.InstallFiles(ctx, local)
	if err != nil {
		return state.Result{Stdout: out}, failf("linux.yum.repo: installing %s: %v", rpmURL, err)
	}
	if _, err := s.fs.Lstat(p); err != nil {
		// Without the file, every round would fetch and install again.
		provided, _, _ := rpm.Rpm(ctx, "-ql", "--", name)
		var repos []string
		for _, f := range strings.Fields(provided) {
			if path.Dir(f) == yumReposDir {
				repos = append(repos, strings.TrimSuffix(path.Base(f), ".repo"))
			}
		}
		hint := "it provides no .repo file"
		if len(repos) > 0 {
			hint = "name the state " + strings.Join(repos, " or ") + ", the repository it provides"
		}
		return state.Result{Stdout: out}, failf("linux.yum.repo: package %s from %s is installed but provides no %s: %s", name, rpmURL, p, hint)
	}
	res := changed(fmt.Sprintf("Repository file %s installed from %s (package %s)", p, rpmURL, name))
	res.Stdout = out
	return res, nil
}

// localPackageFile is a package file given as an http(s) or file URL or
// an absolute path inside the root: downloaded into the root's package
// cache when it is a URL (as base, removed by cleanup).
func (e *Executor) localPackageFile(ctx context.Context, s *stateRun, param, ref, base string) (string, func(), error) {
	noop := func() {}
	if u, err := url.Parse(ref); err == nil && u.Scheme == "file" {
		ref = u.Path
	}
	if strings.HasPrefix(ref, "/") {
		if fi, err := s.fs.Stat(ref); err != nil || !fi.Mode().IsRegular() {
			return "", noop, fmt.Errorf("package file %s does not exist (or is not a file)", ref)
		}
		// The tools get the file's own path, its links resolved inside
		// the root (the host's rpm, acting on a test root, would follow
		// them on the host).
		p, err := s.fs.ResolveLinks(ref)
		if err != nil {
			return "", noop, fmt.Errorf("package file %s: %w", ref, err)
		}
		return p, noop, nil
	}
	data, err := e.fetchBytes(ctx, param, ref)
	if err != nil {
		return "", noop, err
	}
	if err := s.fs.MkdirAll(pkgCacheDir, 0o700, nil); err != nil {
		return "", noop, err
	}
	p := path.Join(pkgCacheDir, base)
	if err := s.fs.WriteFileAtomic(p, data, 0o600, -1, -1); err != nil {
		return "", noop, err
	}
	return p, func() { _ = s.fs.Remove(p) }, nil
}

// maxKeyFile bounds a key file read (real ones are a few KiB).
const maxKeyFile = 1 << 20

// rpmKey is linux.rpm.key: `rpm --import PATH` only when a key of the
// file is not imported yet. The file's key ids are read from the file
// itself (system.ParsePGPPublicKeys) and compared with rpm's gpg-pubkey
// entries, so a round with the keys in place runs one rpm query (Salt
// 2014 imported the file every round).
func (e *Executor) rpmKey(ctx context.Context, s *stateRun) (state.Result, error) {
	p, err := absPath(s.p, "path")
	if err != nil {
		return state.Result{}, err
	}
	pm, err := s.sys.PackagesFor(system.FamilyRHEL, "linux.rpm.key")
	if err != nil {
		return state.Result{}, err
	}
	rpm, ok := pm.(*system.RPM)
	if !ok {
		return state.Result{}, failf("linux.rpm.key: %s is not rpm", pm.Name())
	}
	data, err := s.fs.ReadFile(p, maxKeyFile)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return state.Result{}, failf("linux.rpm.key: key file %s does not exist (put it there first, e.g. with linux.file)", p)
		}
		return state.Result{}, failf("linux.rpm.key: %s: %v", p, err)
	}
	keys, err := system.ParsePGPPublicKeys(data)
	if err != nil {
		return state.Result{}, failf("linux.rpm.key: %s: %v", p, err)
	}
	have, err := rpm.ImportedKeys(ctx)
	if err != nil {
		return state.Result{}, failf("linux.rpm.key: %v", err)
	}
	var missing []string
	for _, k := range keys {
		if !have[k.RPMVersion()] {
			missing = append(missing, k.KeyID)
		}
	}
	what := fmt.Sprintf("RPM key %s (%s)", p, keyIDs(keys))
	if len(missing) == 0 {
		return unchanged(what + " is already imported"), nil
	}
	if s.test {
		return changed(what + " would be imported"), nil
	}
	resolved, err := s.fs.ResolveLinks(p) // what was read is what rpm imports
	if err != nil {
		return state.Result{}, failf("linux.rpm.key: %s: %v", p, err)
	}
	out, err := rpm.ImportKey(ctx, resolved)
	if err != nil {
		return state.Result{Stdout: out}, failf("linux.rpm.key: %v", err)
	}
	if have, err = rpm.ImportedKeys(ctx); err != nil {
		return state.Result{Stdout: out}, failf("linux.rpm.key: %v", err)
	}
	for _, k := range keys {
		if !have[k.RPMVersion()] {
			return state.Result{Stdout: out}, failf("linux.rpm.key: rpm --import %s left key %s out (rpm imports one key per file: give each key a file and a state)", p, k.KeyID)
		}
	}
	res := changed(what + " imported")
	res.Stdout = out
	return res, nil
}

func keyIDs(keys []system.PGPKey) string {
	ids := make([]string, len(keys))
	for i, k := range keys {
		ids[i] = k.KeyID
	}
	return strings.Join(ids, ", ")
}
