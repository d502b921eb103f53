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

// pkgModule is one of the two package modules: the family it serves and
// the package files it installs.
type pkgModule struct {
	name    string // "linux.apt.package"
	family  system.Family
	ext     string // package file extension: ".deb", ".rpm"
	debconf bool   // takes deb-conf-file
}

var (
	aptPackages = pkgModule{name: "linux.apt.package", family: system.FamilyDebian, ext: ".deb", debconf: true}
	yumPackages = pkgModule{name: "linux.yum.package", family: system.FamilyRHEL, ext: ".rpm"}
)

// aptPackage is linux.apt.package.
func (e *Executor) aptPackage(ctx context.Context, s *stateRun) (state.Result, error) {
	return e.packages(ctx, s, aptPackages)
}

// yumPackage is linux.yum.package (dnf where there is no yum).
func (e *Executor) yumPackage(ctx context.Context, s *stateRun) (state.Result, error) {
	return e.packages(ctx, s, yumPackages)
}

// wantKind is what a state asks of one package.
type wantKind int

const (
	wantAny     wantKind = iota // installed, at any version
	wantVersion                 // installed at this version
	wantLatest                  // installed at the newest version offered
	wantRemoved
	wantPurged // removed with its configuration (RPM: removed)
	wantFile   // installed from this package file or URL
)

// pkgWant is one entry of name: a package and what it should be.
type pkgWant struct {
	name string
	kind wantKind
	arg  string // the version, or the file's path or URL
}

// readPackageWants reads name: a list of {key: package, value: …}
// where the value is empty (installed), a version, latest, removed,
// purged, or the path or http(s) URL of a package file.
func readPackageWants(p params, m pkgModule) ([]pkgWant, error) {
	entries, err := p.pairs("name")
	if err != nil {
		return nil, err
	}
	if len(entries) == 0 {
		return nil, &badParam{"name", "is required and lists no package"}
	}
	seen := map[string]bool{}
	var wants []pkgWant
	for _, e := range entries {
		name := strings.TrimSpace(e.key)
		if !validPackageName(name) {
			return nil, &badParam{"name", fmt.Sprintf("%q is not a package name (letters, digits and . + - _ : ~, starting with a letter or digit)", e.key)}
		}
		if seen[name] {
			return nil, &badParam{"name", fmt.Sprintf("package %s is listed twice", name)}
		}
		seen[name] = true
		w := pkgWant{name: name}
		v := strings.TrimSpace(e.value)
		switch low := strings.ToLower(v); {
		case v == "" || low == "installed":
			w.kind = wantAny
		case low == "latest":
			w.kind = wantLatest
		case low == "removed":
			w.kind = wantRemoved
		case low == "purged":
			w.kind = wantPurged
		case strings.Contains(v, "://"):
			u, err := url.Parse(v)
			switch {
			case err == nil && u.Scheme == "file" && strings.HasPrefix(u.Path, "/"):
				w.kind, w.arg = wantFile, path.Clean(u.Path)
			case err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "":
				w.kind, w.arg = wantFile, v
			default:
				return nil, &badParam{"name", fmt.Sprintf("%s: %q is not an http, https or file URL", name, v)}
			}
		case strings.HasPrefix(v, "/"):
			w.kind, w.arg = wantFile, path.Clean(v)
		case strings.HasSuffix(low, ".deb") || strings.HasSuffix(low, ".rpm"):
			return nil, &badParam{"name", fmt.Sprintf("%s: package file %q must be an absolute path or an http(s) URL", name, v)}
		default:
			ver := strings.TrimPrefix(v, "=") // Salt's "=1.0" is 1.0
			if ver == "" || strings.ContainsAny(ver, " \t\n<>=*/") {
				return nil, &badParam{"name", fmt.Sprintf("%s: %q is not a version, latest, removed, purged, or a package file (version comparisons such as >=1.0 are not supported: give the version)", name, v)}
			}
			w.kind, w.arg = wantVersion, ver
		}
		if w.kind == wantFile && !strings.HasPrefix(w.arg, "/") && !strings.HasSuffix(strings.ToLower(urlPath(w.arg)), m.ext) {
			return nil, &badParam{"name", fmt.Sprintf("%s: %s does not name a %s file", name, w.arg, m.ext)}
		}
		wants = append(wants, w)
	}
	return wants, nil
}

func urlPath(s string) string {
	if u, err := url.Parse(s); err == nil {
		return u.Path
	}
	return s
}

// validPackageName accepts the names dpkg and rpm accept (an apt name may
// carry :arch, an rpm name .arch), and nothing a package manager could
// read as an option or a pattern.
func validPackageName(n string) bool {
	if n == "" || len(n) > 200 {
		return false
	}
	for i := 0; i < len(n); i++ {
		c := n[i]
		alnum := (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
		if i == 0 && !alnum {
			return false
		}
		if !alnum && !strings.ContainsRune(".+-_:~", rune(c)) {
			return false
		}
	}
	return true
}

// pkgPlan is what a package state has to do.
type pkgPlan struct {
	install []system.PackageTarget
	remove  []string
	purge   []string
	// files are the package files to install (wantFile, not installed).
	files []pkgWant
	// missing are the wants no repository offers (name or name=version).
	missing []string
	offered map[string][]string // for the message about a missing version
}

// packages runs linux.apt.package and linux.yum.package.
//
// A round first reads what is installed (apt: dpkg's status file; RPM:
// rpm's database, listed again only when its files change; no process
// while nothing changed). Only what is not in place needs the index: a
// missing package, a version that differs, latest (whose candidate is
// queried every round: a query, nothing changes). The index is refreshed
// only when it is older than its sources or does not offer what must be
// installed; then one run removes, one purges and one installs.
func (e *Executor) packages(ctx context.Context, s *stateRun, m pkgModule) (state.Result, error) {
	wants, err := readPackageWants(s.p, m)
	if err != nil {
		return state.Result{}, err
	}
	repo, err := s.p.str("repo")
	if err != nil {
		return state.Result{}, err
	}
	// module.json documents verification on by default for both modules
	// (its apt parameter default says false, its text says true): it is
	// on unless turned off.
	verify, err := s.p.boolean("verify-gpg", true)
	if err != nil {
		return state.Result{}, err
	}
	debconf := ""
	if m.debconf && s.p.has("deb-conf-file") {
		if debconf, err = s.p.str("deb-conf-file"); err != nil {
			return state.Result{}, err
		}
		if debconf = strings.TrimSpace(debconf); debconf != "" && !strings.HasPrefix(debconf, "/") {
			return state.Result{}, &badParam{"deb-conf-file", fmt.Sprintf("must be an absolute path, got %q", debconf)}
		}
	}
	opts := system.PackageOptions{Repo: strings.TrimSpace(repo), NoVerify: !verify}
	if strings.HasPrefix(opts.Repo, "-") {
		return state.Result{}, &badParam{"repo", fmt.Sprintf("%q is not a repository name", opts.Repo)}
	}

	pm, err := s.sys.PackagesFor(m.family, m.name)
	if err != nil {
		return state.Result{}, err
	}
	names := make([]string, len(wants))
	var purged []string
	for i, w := range wants {
		names[i] = w.name
		if w.kind == wantPurged {
			purged = append(purged, w.name)
		}
	}
	before, err := pm.Installed(ctx, names...)
	if err != nil {
		return state.Result{}, failf("%s: reading the installed packages: %v", m.name, err)
	}
	leftovers := map[string]bool{}
	if len(purged) > 0 {
		if leftovers, err = pm.Leftovers(ctx, purged...); err != nil {
			return state.Result{}, failf("%s: %v", m.name, err)
		}
	}

	var plan pkgPlan
	var query []pkgWant
	for _, w := range wants {
		have, ok := before[w.name]
		switch w.kind {
		case wantAny:
			if !ok {
				query = append(query, w)
			}
		case wantVersion:
			if !ok || !pm.VersionMatches(w.arg, have) {
				query = append(query, w)
			}
		case wantLatest:
			query = append(query, w)
		case wantRemoved:
			if ok {
				plan.remove = append(plan.remove, w.name)
			}
		case wantPurged:
			if ok || leftovers[w.name] {
				plan.purge = append(plan.purge, w.name)
			}
		case wantFile:
			if !ok {
				plan.files = append(plan.files, w)
			}
		}
	}

	var notes []string
	if len(query) > 0 {
		refreshed, err := resolveFromIndex(ctx, s, pm, opts, query, before, &plan)
		if err != nil {
			return packageFailed(m, opts, "", err)
		}
		if len(plan.missing) > 0 {
			if s.test {
				notes = append(notes, fmt.Sprintf("the package index would be refreshed first: it does not offer %s now", strings.Join(plan.missing, ", ")))
			} else {
				return state.Result{}, failf("%s: %s", m.name, missingMessage(pm, plan, refreshed))
			}
		} else if refreshed && s.test {
			notes = append(notes, "the package index would be refreshed first: it is older than its sources")
		}
	}

	for _, w := range plan.files {
		t, cleanup, err := e.packageFile(ctx, s, pm, m, w)
		defer cleanup()
		if err != nil {
			return state.Result{}, err
		}
		plan.install = append(plan.install, t)
	}

	if len(plan.install) == 0 && len(plan.remove) == 0 && len(plan.purge) == 0 && len(plan.missing) == 0 {
		return unchanged(packagesLabel(names, "are") + " already in the correct state"), nil
	}
	if debconf != "" && len(plan.install)+len(plan.missing) > 0 {
		if _, err := s.fs.Stat(debconf); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return state.Result{}, failf("%s: deb-conf-file %s does not exist", m.name, debconf)
			}
			return state.Result{}, failf("%s: deb-conf-file %s: %v", m.name, debconf, err)
		}
	}

	if s.test {
		items := planItems(pm, plan, before)
		items = append(items, notes...)
		return changed(fmt.Sprintf("%s would be updated: %s", packagesLabel(names, ""), strings.Join(items, ", "))), nil
	}

	change := system.PackageChange{PackageOptions: opts, Install: plan.install, Remove: plan.remove, Purge: plan.purge}
	if len(plan.install) > 0 {
		change.DebconfFile = debconf
	}
	out, err := pm.Apply(ctx, change)
	if err != nil {
		return packageFailed(m, opts, out, err)
	}
	after, err := pm.Installed(ctx, names...)
	if err != nil {
		return state.Result{Stdout: out}, failf("%s: reading the installed packages: %v", m.name, err)
	}
	if err := verifyPackages(pm, wants, plan, after); err != nil {
		return state.Result{Stdout: out}, failf("%s: %v", m.name, err)
	}
	res := changed(fmt.Sprintf("%s updated: %s", packagesLabel(names, ""), strings.Join(doneItems(pm, plan, before, after), ", ")))
	res.Stdout = out
	return res, nil
}

// packageFailed is the result of a package manager run that failed: its
// reasons in the comment, its output in the state's output, and a hint
// when what failed is a signature check verify-gpg could skip.
func packageFailed(m pkgModule, opts system.PackageOptions, out string, err error) (state.Result, error) {
	var pe *system.PackageError
	if errors.As(err, &pe) && out == "" {
		out = pe.Output
	}
	msg := err.Error()
	if !opts.NoVerify {
		for _, sign := range []string{"is not signed", "does not have a Release file", "NO_PUBKEY", "GPG check FAILED", "not signed", "GPG keys"} {
			if strings.Contains(msg, sign) {
				msg += " (signatures are verified: verify-gpg false would accept it)"
				break
			}
		}
	}
	return state.Result{Stdout: out}, failf("%s: %s", m.name, msg)
}

// resolveFromIndex turns the wants that need the package index into
// install targets (or missing entries), refreshing the index first when
// it is older than its sources, or when it does not offer something that
// must be installed (never in check mode). It reports whether the index
// was (in check mode: would be) refreshed.
func resolveFromIndex(ctx context.Context, s *stateRun, pm system.PackageManager, opts system.PackageOptions, query []pkgWant, before map[string]string, plan *pkgPlan) (bool, error) {
	names := make([]string, len(query))
	for i, w := range query {
		names[i] = w.name
	}
	stale, err := pm.IndexStale()
	if err != nil {
		return false, err
	}
	var offers map[string]system.Offer
	if !stale {
		if offers, err = pm.Offers(ctx, opts, names...); err != nil {
			return false, err
		}
	}
	targets, missing, offered := resolveWants(pm, query, offers, before)
	if !stale && len(missing) == 0 {
		plan.install = append(plan.install, targets...)
		return false, nil
	}
	if s.test {
		if stale && offers == nil {
			// What a stale index says is still the best guess of what
			// would be installed.
			if offers, err = pm.Offers(ctx, opts, names...); err != nil {
				return false, err
			}
			targets, missing, offered = resolveWants(pm, query, offers, before)
		}
		plan.install = append(plan.install, targets...)
		plan.missing, plan.offered = missing, offered
		return true, nil
	}
	if err := pm.RefreshIndex(ctx, opts); err != nil {
		return false, err
	}
	if offers, err = pm.Offers(ctx, opts, names...); err != nil {
		return true, err
	}
	targets, missing, offered = resolveWants(pm, query, offers, before)
	plan.install = append(plan.install, targets...)
	plan.missing, plan.offered = missing, offered
	return true, nil
}

// resolveWants matches wants against what the index offers: a bare name
// takes the candidate, a version the newest offered version it matches
// (any revision of it when it names none), latest the candidate when it
// is newer than what is installed.
func resolveWants(pm system.PackageManager, query []pkgWant, offers map[string]system.Offer, before map[string]string) (targets []system.PackageTarget, missing []string, offered map[string][]string) {
	offered = map[string][]string{}
	for _, w := range query {
		o := offers[w.name]
		have, installed := before[w.name]
		switch w.kind {
		case wantAny:
			switch {
			case o.Candidate != "":
				targets = append(targets, system.PackageTarget{Name: w.name, Version: o.Candidate})
			case o.Virtual:
				// apt-get installs its provider, or says which to choose.
				targets = append(targets, system.PackageTarget{Name: w.name})
			default:
				missing = append(missing, w.name)
			}
		case wantVersion:
			best := ""
			for _, v := range o.Versions {
				if pm.VersionMatches(w.arg, v) && (best == "" || pm.CompareVersions(v, best) > 0) {
					best = v
				}
			}
			if best == "" {
				missing = append(missing, w.name+"="+w.arg)
				offered[w.name] = o.Versions
				continue
			}
			targets = append(targets, system.PackageTarget{Name: w.name, Version: best, Downgrade: installed && pm.CompareVersions(best, have) < 0})
		case wantLatest:
			switch {
			case o.Candidate == "" && installed:
				// Nothing offered, nothing newer: it stays.
			case o.Candidate == "":
				missing = append(missing, w.name)
			case !installed || pm.CompareVersions(o.Candidate, have) > 0:
				targets = append(targets, system.PackageTarget{Name: w.name, Version: o.Candidate})
			}
		}
	}
	return targets, missing, offered
}

// missingMessage names what no repository offers, and what it offers of
// a package asked for at another version.
func missingMessage(pm system.PackageManager, plan pkgPlan, refreshed bool) string {
	var parts []string
	for _, name := range plan.missing {
		pkg, _, _ := strings.Cut(name, "=")
		if vs := plan.offered[pkg]; len(vs) > 0 {
			parts = append(parts, fmt.Sprintf("%s (offered: %s)", name, strings.Join(vs, ", ")))
		} else {
			parts = append(parts, name)
		}
	}
	how := "add its repository first, e.g. with linux.yum.repo"
	ran := pm.Name() + " makecache --refresh ran; "
	switch pm.Name() {
	case "apt":
		how = "add its repository first, e.g. with linux.apt.repo"
		ran = "apt-get update ran; "
	case "yum":
		ran = "yum clean expire-cache ran; "
	}
	if !refreshed {
		ran = ""
	}
	return fmt.Sprintf("no repository offers %s (%s%s)", strings.Join(parts, ", "), ran, how)
}

// pkgCacheDir holds downloaded package files inside the root until they
// are installed.
const pkgCacheDir = "/var/cache/opsagent/packages"

// packageFile makes the install target of a package file: downloaded
// into the root when it is a URL (not in check mode), and checked to
// hold the package its entry names, so that the next round, which finds
// that package installed, downloads nothing. cleanup removes a download.
func (e *Executor) packageFile(ctx context.Context, s *stateRun, pm system.PackageManager, m pkgModule, w pkgWant) (t system.PackageTarget, cleanup func(), err error) {
	t = system.PackageTarget{Name: w.name}
	if s.test && strings.Contains(w.arg, "://") {
		return t, func() {}, nil // reported as installed from the URL; nothing fetched
	}
	file, cleanup, err := e.localPackageFile(ctx, s, "name", w.arg, w.name+m.ext)
	if err != nil {
		return t, cleanup, failf("%s: %s: %v", m.name, w.name, err)
	}
	t.File = file
	name, err := pm.PackageFileName(ctx, file)
	if err != nil {
		return t, cleanup, failf("%s: %s: %v", m.name, w.name, err)
	}
	if name != w.name {
		return t, cleanup, failf("%s: %s holds package %s, not %s: name it %s, so that the next round finds it installed", m.name, w.arg, name, w.name, name)
	}
	return t, cleanup, nil
}

// verifyPackages checks the outcome: what was to be installed is, at the
// version asked for, and what was to be removed is gone.
func verifyPackages(pm system.PackageManager, wants []pkgWant, plan pkgPlan, after map[string]string) error {
	byName := map[string]pkgWant{}
	for _, w := range wants {
		byName[w.name] = w
	}
	for _, t := range plan.install {
		have, ok := after[t.Name]
		if !ok {
			return fmt.Errorf("%s is still not installed after the install", t.Name)
		}
		if w := byName[t.Name]; w.kind == wantVersion && !pm.VersionMatches(w.arg, have) {
			return fmt.Errorf("%s is at %s after the install, not %s as asked", t.Name, have, w.arg)
		}
	}
	for _, n := range append(append([]string{}, plan.remove...), plan.purge...) {
		if v, ok := after[n]; ok {
			return fmt.Errorf("%s %s is still installed after the removal", n, v)
		}
	}
	return nil
}

// planItems describes what a plan would do (check mode).
func planItems(pm system.PackageManager, plan pkgPlan, before map[string]string) []string {
	var items []string
	for _, n := range plan.remove {
		items = append(items, n+" "+before[n]+" removed")
	}
	for _, n := range plan.purge {
		items = append(items, strings.TrimSpace(n+" "+before[n])+" "+purgedWord(pm))
	}
	files := map[string]string{}
	for _, w := range plan.files {
		files[w.name] = w.arg
	}
	for _, t := range plan.install {
		if src, ok := files[t.Name]; ok {
			items = append(items, t.Name+" installed from "+src)
			continue
		}
		items = append(items, versionChange(pm, t.Name, before[t.Name], t.Version))
	}
	for _, n := range plan.missing {
		items = append(items, n+" installed")
	}
	return items
}

// doneItems describes what a plan did, with the versions found after.
func doneItems(pm system.PackageManager, plan pkgPlan, before, after map[string]string) []string {
	var items []string
	for _, n := range plan.remove {
		items = append(items, n+" "+before[n]+" removed")
	}
	for _, n := range plan.purge {
		items = append(items, strings.TrimSpace(n+" "+before[n])+" "+purgedWord(pm))
	}
	for _, t := range plan.install {
		item := versionChange(pm, t.Name, before[t.Name], after[t.Name])
		if t.File != "" {
			item += " from " + fileSource(plan, t.Name)
		}
		items = append(items, item)
	}
	return items
}

func fileSource(plan pkgPlan, name string) string {
	for _, w := range plan.files {
		if w.name == name {
			return w.arg
		}
	}
	return ""
}

// purgedWord says what purging did: rpm removes a package's
// configuration with it, so there purged is removed.
func purgedWord(pm system.PackageManager) string {
	if pm.Family() == system.FamilyDebian {
		return "purged"
	}
	return "removed (purged: rpm keeps no configuration of removed packages)"
}

// versionChange is "x 2.0-1 installed", "x upgraded from 1.0-1 to
// 2.0-1", "x downgraded from 2.0-1 to 1.0-1".
func versionChange(pm system.PackageManager, name, from, to string) string {
	switch {
	case from == "":
		return strings.TrimSpace(name+" "+to) + " installed"
	case to == "" || from == to:
		return name + " " + from + " reinstalled"
	case pm.CompareVersions(from, to) > 0:
		return fmt.Sprintf("%s downgraded from %s to %s", name, from, to)
	}
	return fmt.Sprintf("%s upgraded from %s to %s", name, from, to)
}

// packagesLabel is "Package x" or "Packages x, y", with the verb agreeing
// when one is given.
func packagesLabel(names []string, verb string) string {
	label := "Package " + names[0]
	if len(names) > 1 {
		label = "Packages " + strings.Join(names, ", ")
	} else if verb == "are" {
		verb = "is"
	}
	if verb != "" {
		label += " " + verb
	}
	return label
}
