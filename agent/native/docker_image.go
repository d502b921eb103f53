package native

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/dockerapi"
	"github.com/visualops/opsagent/internal/rootfs"
)

// pullOutcome is what pulling an image did.
type pullOutcome struct {
	changed bool   // the image is new or another one (in check mode: would be)
	oldID   string // the image the tag named before ("" if none)
	comment string
	output  string
}

// pullImage pulls ref when the registry names another image for it than
// the one here: the local image's repository digests are compared with
// the digest the registry gives for the tag (one manifest request, no
// download). An image named by digest is never pulled again.
func (s *stateRun) pullImage(ctx context.Context, c *dockerapi.Client, ref imageRef, auth *dockerapi.Auth) (pullOutcome, error) {
	var out pullOutcome
	local, err := c.ImageInspect(ctx, ref.String())
	switch {
	case dockerapi.IsNotFound(err):
		local = nil
	case err != nil:
		return out, dockerErr(err, "Image %s: cannot inspect it", ref)
	}
	why := "it is not here"
	if local != nil {
		out.oldID = local.ID
		if ref.digest != "" {
			out.comment = fmt.Sprintf("Image %s is already in the correct state", ref)
			return out, nil
		}
		remote, err := c.DistributionDigest(ctx, ref.String(), auth)
		if err != nil {
			return out, dockerErr(err, "Image %s: cannot ask its registry which image the tag names", ref)
		}
		for _, d := range local.RepoDigests {
			if strings.HasSuffix(d, "@"+remote) {
				out.comment = fmt.Sprintf("Image %s is already in the correct state (%s)", ref, remote)
				return out, nil
			}
		}
		why = "the registry has " + remote
	}
	out.changed = true
	if s.test {
		out.comment = fmt.Sprintf("Image %s would be pulled (%s)", ref, why)
		return out, nil
	}
	name, tag := ref.name, ref.tag
	if ref.digest != "" {
		name, tag = ref.String(), ""
	}
	prog, err := c.Pull(ctx, name, tag, auth)
	out.output = prog.Output
	if err != nil {
		return out, dockerErr(err, "Image %s: pull failed", ref)
	}
	after, err := c.ImageInspect(ctx, ref.String())
	if err != nil {
		return out, dockerErr(err, "Image %s: cannot inspect it after the pull", ref)
	}
	if local != nil && after.ID == local.ID {
		out.changed = false
		out.comment = fmt.Sprintf("Image %s is already in the correct state (%s)", ref, shortID(after.ID))
		return out, nil
	}
	if local == nil {
		out.comment = fmt.Sprintf("Image %s pulled (%s)", ref, shortID(after.ID))
	} else {
		out.comment = fmt.Sprintf("Image %s pulled: %s replaces %s", ref, shortID(after.ID), shortID(local.ID))
	}
	return out, nil
}

// dockerPulled is linux.docker.pulled: the image the registry names for
// repo:tag is here; a new one recreates the containers listed.
func (e *Executor) dockerPulled(ctx context.Context, s *stateRun) (state.Result, error) {
	ref, err := parseImageRef(s.p, "repo", "tag")
	if err != nil {
		return state.Result{}, err
	}
	auth, err := dockerAuth(s.p, ref.name)
	if err != nil {
		return state.Result{}, err
	}
	containers, err := containerNames(s.p, "containers")
	if err != nil {
		return state.Result{}, err
	}
	c, notes, err := s.dockerEngine(ctx)
	if err != nil {
		return state.Result{}, failf("Image %s: %v", ref, err)
	}
	if c == nil {
		return changed(fmt.Sprintf("Image %s would be pulled: %s", ref, strings.Join(notes, "; "))), nil
	}
	defer c.Close()
	pull, err := s.pullImage(ctx, c, ref, auth)
	comments := append(notes, pull.comment)
	if err != nil {
		res, err := dockerFailure(notes, err)
		res.Stdout = pull.output
		return res, err
	}
	if pull.changed && len(containers) > 0 {
		rc, err := s.renewContainers(ctx, c, containers, "image "+ref.String()+" changed")
		comments = append(comments, rc...)
		if err != nil {
			return changedFailure(comments, err)
		}
	}
	if pull.changed && !s.test {
		if note := removeOldImage(ctx, c, pull.oldID); note != "" {
			comments = append(comments, note)
		}
	}
	return state.Result{OK: true, Changed: pull.changed || len(notes) > 0, Comment: strings.Join(comments, "\n"), Stdout: pull.output}, nil
}

// maxContextFile bounds one file of a build context (it is read whole).
const maxContextFile = 1 << 30

// buildContext is a build's context directory and Dockerfile, read.
type buildContext struct {
	dir        string // instance path of the context
	dockerfile string // path of the Dockerfile in the context
	ignore     []ignoreRule
	watched    []watched
}

// dockerBuilt is linux.docker.built: the image tag is built from the
// Dockerfile in path. The image carries the digest of what it was built
// from (every file of the context that .dockerignore does not exclude:
// path, type, permissions, content, link target; and the watched files):
// a round whose digest matches the image's label builds nothing. A new
// image recreates the containers listed.
func (e *Executor) dockerBuilt(ctx context.Context, s *stateRun) (state.Result, error) {
	ref, err := parseImageRef(s.p, "tag", "")
	if err != nil {
		return state.Result{}, err
	}
	if ref.digest != "" {
		return state.Result{}, &badParam{"tag", "must be a name[:tag], not a digest"}
	}
	bc, err := s.buildContext()
	if err != nil {
		return state.Result{}, err
	}
	force, err := s.p.boolean("force", false)
	if err != nil {
		return state.Result{}, err
	}
	containers, err := containerNames(s.p, "containers")
	if err != nil {
		return state.Result{}, err
	}
	digest, err := bc.digest(s.fs)
	if err != nil {
		return state.Result{}, failf("Image %s: %v", ref, err)
	}
	c, notes, err := s.dockerEngine(ctx)
	if err != nil {
		return state.Result{}, failf("Image %s: %v", ref, err)
	}
	if c == nil {
		return changed(fmt.Sprintf("Image %s would be built from %s: %s", ref, bc.dir, strings.Join(notes, "; "))), nil
	}
	defer c.Close()
	local, err := c.ImageInspect(ctx, ref.String())
	switch {
	case dockerapi.IsNotFound(err):
		local = nil
	case err != nil:
		return dockerFailure(notes, dockerErr(err, "Image %s: cannot inspect it", ref))
	}
	why := "it is not here"
	if local != nil {
		have := local.Config.Labels[labelContext]
		switch {
		case force:
			why = "force is set"
		case have == digest:
			return state.Result{OK: true, Changed: len(notes) > 0, Comment: strings.Join(append(notes, fmt.Sprintf("Image %s is already in the correct state (built from %s)", ref, bc.dir)), "\n")}, nil
		case have == "":
			why = "it was not built by this agent (no context label)"
		default:
			why = "its build context changed"
		}
	}
	if s.test {
		return changed(strings.Join(append(notes, fmt.Sprintf("Image %s would be built from %s: %s", ref, bc.dir, why)), "\n")), nil
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(bc.writeTar(s.fs, pw)) }()
	prog, err := c.Build(ctx, pr, dockerapi.BuildOptions{Tag: ref.String(), Dockerfile: bc.dockerfile, Labels: map[string]string{labelContext: digest}})
	_ = pr.CloseWithError(errors.New("the build ended"))
	if err != nil {
		return state.Result{Comment: strings.Join(append(notes, fmt.Sprintf("Image %s: build from %s failed: %v", ref, bc.dir, err)), "\n"), Stdout: prog.Output}, err
	}
	after, err := c.ImageInspect(ctx, ref.String())
	if err != nil {
		return dockerFailure(notes, dockerErr(err, "Image %s: cannot inspect it after the build", ref))
	}
	comments := notes
	if local != nil && local.ID == after.ID {
		comments = append(comments, fmt.Sprintf("Image %s rebuilt from %s (%s): the same image %s", ref, bc.dir, why, shortID(after.ID)))
		return state.Result{OK: true, Changed: len(notes) > 0, Comment: strings.Join(comments, "\n"), Stdout: prog.Output}, nil
	}
	comments = append(comments, fmt.Sprintf("Image %s built from %s (%s): %s", ref, bc.dir, why, shortID(after.ID)))
	if len(containers) > 0 {
		rc, err := s.renewContainers(ctx, c, containers, "image "+ref.String()+" rebuilt")
		comments = append(comments, rc...)
		if err != nil {
			return changedFailure(comments, err)
		}
	}
	if local != nil {
		if note := removeOldImage(ctx, c, local.ID); note != "" {
			comments = append(comments, note)
		}
	}
	return state.Result{OK: true, Changed: true, Comment: strings.Join(comments, "\n"), Stdout: prog.Output}, nil
}

// buildContext reads path (the context directory, or the Dockerfile in
// it), the .dockerignore there, and watch.
func (s *stateRun) buildContext() (*buildContext, error) {
	p, err := absPath(s.p, "path")
	if err != nil {
		return nil, err
	}
	bc := &buildContext{dir: p, dockerfile: "Dockerfile"}
	fi, err := s.fs.Stat(p)
	if err != nil {
		return nil, &badParam{"path", fmt.Sprintf("%s does not exist: it must be the directory of the Dockerfile", p)}
	}
	if !fi.IsDir() {
		bc.dir, bc.dockerfile = path.Dir(p), path.Base(p)
	}
	if fi, err := s.fs.Stat(path.Join(bc.dir, bc.dockerfile)); err != nil || !fi.Mode().IsRegular() {
		return nil, &badParam{"path", fmt.Sprintf("there is no Dockerfile %s", path.Join(bc.dir, bc.dockerfile))}
	}
	if data, err := s.fs.ReadFile(path.Join(bc.dir, ".dockerignore"), 1<<20); err == nil {
		if bc.ignore, err = parseDockerignore(string(data)); err != nil {
			return nil, &badParam{"path", fmt.Sprintf("%s/.dockerignore: %v", bc.dir, err)}
		}
	}
	raw, ok := s.p["watch"]
	var b bool
	if ok && string(raw) != "null" && json.Unmarshal(raw, &b) != nil {
		// A boolean watch (the 2014 adaptor rebuilt on each round) adds
		// nothing: the whole context, Dockerfile included, is watched.
		if bc.watched, _, err = watchParam(s.p); err != nil {
			return nil, err
		}
	}
	return bc, nil
}

// walk calls fn with each context entry that is sent to the engine, in
// lexical order, with its path relative to the context. The Dockerfile
// and .dockerignore are always sent (as the docker command does).
func (bc *buildContext) walk(fsys *rootfs.FS, fn func(rel string, fi fs.FileInfo) error) error {
	return fsys.WalkDir(bc.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == bc.dir {
			return nil
		}
		rel := strings.TrimPrefix(p, strings.TrimSuffix(bc.dir, "/")+"/")
		if rel != bc.dockerfile && rel != ".dockerignore" && ignored(bc.ignore, rel) {
			if d.IsDir() && !hasNegation(bc.ignore) {
				return fs.SkipDir
			}
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		return fn(rel, fi)
	})
}

// digest is the digest of the context as the engine would receive it
// (modification times left out: touching a file rebuilds nothing) and of
// the watched files.
func (bc *buildContext) digest(fsys *rootfs.FS) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "dockerfile %s\n", bc.dockerfile)
	err := bc.walk(fsys, func(rel string, fi fs.FileInfo) error {
		p := path.Join(bc.dir, rel)
		switch {
		case fi.Mode().IsRegular():
			data, err := fsys.ReadFile(p, maxContextFile)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			fmt.Fprintf(h, "f %q %o %x\n", rel, fi.Mode().Perm(), sum)
		case fi.IsDir():
			fmt.Fprintf(h, "d %q %o\n", rel, fi.Mode().Perm())
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := fsys.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "l %q %q\n", rel, target)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("cannot read the build context %s: %w", bc.dir, err)
	}
	for _, w := range bc.watched {
		data, err := fsys.ReadFile(w.path, maxWatched)
		sum := ""
		if err == nil {
			s := sha256.Sum256(data)
			sum = hex.EncodeToString(s[:])
		}
		fmt.Fprintf(h, "w %q %s\n", w.path, sum)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// writeTar writes the context as the tar the build endpoint reads:
// directories, regular files and symlinks (other types are left out),
// owned by root.
func (bc *buildContext) writeTar(fsys *rootfs.FS, w io.Writer) error {
	tw := tar.NewWriter(w)
	err := bc.walk(fsys, func(rel string, fi fs.FileInfo) error {
		p := path.Join(bc.dir, rel)
		hdr := &tar.Header{Name: rel, Mode: int64(fi.Mode().Perm()), ModTime: fi.ModTime(), Format: tar.FormatPAX}
		var data []byte
		switch {
		case fi.Mode().IsRegular():
			var err error
			if data, err = fsys.ReadFile(p, maxContextFile); err != nil {
				return err
			}
			hdr.Typeflag, hdr.Size = tar.TypeReg, int64(len(data))
		case fi.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := fsys.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		default:
			return nil
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// ignoreRule is one .dockerignore pattern.
type ignoreRule struct {
	re     *regexp.Regexp
	negate bool
}

// parseDockerignore reads .dockerignore: one pattern a line (# comments),
// Go's filepath.Match syntax plus ** for any number of directories, and
// ! to include again what an earlier pattern excluded; a later line wins.
func parseDockerignore(text string) ([]ignoreRule, error) {
	var rules []ignoreRule
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		r := ignoreRule{}
		if line[0] == '!' {
			r.negate, line = true, strings.TrimSpace(line[1:])
		}
		line = strings.TrimPrefix(path.Clean("/"+line), "/")
		if line == "" {
			continue
		}
		re, err := globRegexp(line)
		if err != nil {
			return nil, fmt.Errorf("pattern %q: %w", line, err)
		}
		r.re = re
		rules = append(rules, r)
	}
	return rules, nil
}

// globRegexp turns a .dockerignore pattern into an anchored regexp.
func globRegexp(pattern string) (*regexp.Regexp, error) {
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(pattern); i++ {
		ch := pattern[i]
		switch {
		case ch == '*' && strings.HasPrefix(pattern[i:], "**/"):
			b.WriteString("(.*/)?")
			i += 2
		case ch == '*' && strings.HasPrefix(pattern[i:], "**"):
			b.WriteString(".*")
			i++
		case ch == '*':
			b.WriteString("[^/]*")
		case ch == '?':
			b.WriteString("[^/]")
		case ch == '\\' && i+1 < len(pattern):
			i++
			b.WriteString(regexp.QuoteMeta(string(pattern[i])))
		case ch == '[':
			j := strings.IndexByte(pattern[i:], ']')
			if j < 0 {
				return nil, errors.New("unterminated [")
			}
			class := pattern[i+1 : i+j]
			if strings.HasPrefix(class, "!") {
				class = "^" + class[1:]
			}
			b.WriteString("[" + class + "]")
			i += j
		default:
			b.WriteString(regexp.QuoteMeta(string(ch)))
		}
	}
	b.WriteString("$")
	return regexp.Compile(b.String())
}

// ignored reports whether the context path rel is excluded: the last
// pattern that matches it or one of its parent directories decides.
func ignored(rules []ignoreRule, rel string) bool {
	out := false
	for _, r := range rules {
		for p := rel; p != "." && p != ""; p = path.Dir(p) {
			if r.re.MatchString(p) {
				out = !r.negate
				break
			}
		}
	}
	return out
}

func hasNegation(rules []ignoreRule) bool {
	for _, r := range rules {
		if r.negate {
			return true
		}
	}
	return false
}
