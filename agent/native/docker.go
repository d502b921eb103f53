package native

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/dockerapi"
	"github.com/visualops/opsagent/internal/system"
)

// The linux.docker.* modules talk to the Docker engine through its API on
// the instance's socket (package dockerapi), never through the docker
// command: no credential ever appears in a process's arguments, and a
// round that changes nothing costs a couple of local API calls.
//
// The engine itself holds the state that decides what to change, so it
// survives agent restarts and reinstalls:
//   - a container made by linux.docker.running carries labelSpec, the
//     configuration it was created with (image, command, environment,
//     ports, volumes, devices, limits, files); a different desired
//     configuration recreates it, nothing else does;
//   - an image built by linux.docker.built carries labelContext, a digest
//     of its build context, so an unchanged context is not rebuilt;
//   - linux.docker.pulled compares the local image's repository digests
//     with the digest the registry names for the tag now.
//
// linux.docker.pushed keeps what it pushed last in the watch directory.

// dockerSocket is the engine's socket, as an instance path.
const dockerSocket = "/var/run/docker.sock"

// Labels the modules put on containers and images.
const (
	labelSpec    = "io.visualops.opsagent.spec"    // a container's desired configuration (JSON)
	labelState   = "io.visualops.opsagent.state"   // the state that manages a container
	labelContext = "io.visualops.opsagent.context" // a built image's context digest
)

// dockerPrerequisite is the engine, as the 2014 adaptor required it
// (docker's package, then the docker service).
var dockerPrerequisite = system.Prerequisite{
	Tool: "dockerd",
	Packages: map[system.Family]string{
		system.FamilyDebian: "docker.io",
		system.FamilyRHEL:   "docker",
	},
}

// Engine timings: how long a freshly started engine may take to answer,
// and how long a container is given to stop before it is killed.
const (
	engineStartWait = 60 * time.Second
	stopTimeout     = 10 * time.Second
)

// dockerEngine connects to the engine below the root. When none answers,
// the engine is installed (dockerd through the package layer) and the
// docker service started, as the 2014 adaptor's implicit requirements
// did; notes say so. In check mode nothing is installed or started: the
// client is nil and the notes say what would be done.
func (s *stateRun) dockerEngine(ctx context.Context) (*dockerapi.Client, []string, error) {
	c, err := s.dialEngine(ctx)
	if err == nil {
		return c, nil, nil
	}
	reason := err
	if errors.Is(err, dockerapi.ErrTooOld) {
		return nil, nil, fmt.Errorf("%w: upgrade it", err) // installing or starting would not help
	}
	if s.test {
		what := "the docker service would be started"
		if !s.sys.HasTool(dockerPrerequisite.Tool) {
			what = "the Docker engine would be installed and started"
		}
		return nil, []string{fmt.Sprintf("no Docker engine answers on %s (%v): %s", dockerSocket, reason, what)}, nil
	}
	var notes []string
	pkg, err := s.sys.EnsureTool(ctx, dockerPrerequisite)
	if err != nil {
		return nil, nil, fmt.Errorf("no Docker engine answers on %s, and %w", dockerSocket, err)
	}
	if pkg != "" {
		notes = append(notes, fmt.Sprintf("package %s installed (Docker engine)", pkg))
		// A distribution that starts what it installs may have done so.
		if c, err := s.dialEngine(ctx); err == nil {
			return c, notes, nil
		}
	}
	if err := s.sys.ServiceAvailable("docker"); err != nil {
		return nil, nil, fmt.Errorf("no Docker engine answers on %s (%v), and it cannot be started: %w", dockerSocket, reason, err)
	}
	if err := s.sys.ServiceDo(ctx, "docker", system.ServiceStart); err != nil {
		return nil, nil, fmt.Errorf("no Docker engine answers on %s, and starting the docker service failed: %w", dockerSocket, err)
	}
	notes = append(notes, "service docker started")
	wait, cancel := context.WithTimeout(ctx, engineStartWait)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := s.dialEngine(wait)
		if err == nil {
			return c, notes, nil
		}
		select {
		case <-wait.Done():
			return nil, nil, fmt.Errorf("the docker service was started but no engine answers on %s after %s (%v): see the engine's log", dockerSocket, engineStartWait, err)
		case <-tick.C:
		}
	}
}

// dialEngine pings the engine at the root's socket, resolved inside the
// root (on Debian /var/run is a link to /run).
func (s *stateRun) dialEngine(ctx context.Context) (*dockerapi.Client, error) {
	p, err := s.fs.ResolveLinks(dockerSocket)
	if err != nil {
		return nil, err
	}
	if _, err := s.fs.Stat(p); err != nil {
		return nil, errors.New("the socket does not exist")
	}
	c := dockerapi.New(s.fs.HostPath(p))
	if err := c.Ping(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// dockerAuth reads username, password and email: a login for the
// registry of image, or nil. The password goes only into the
// X-Registry-Auth header.
func dockerAuth(p params, image string) (*dockerapi.Auth, error) {
	user, err := p.str("username")
	if err != nil {
		return nil, err
	}
	pass, err := p.str("password")
	if err != nil {
		return nil, err
	}
	email, err := p.str("email")
	if err != nil {
		return nil, err
	}
	if user == "" {
		if pass != "" {
			return nil, &badParam{"username", "is required when a password is given"}
		}
		return nil, nil
	}
	if pass == "" {
		return nil, &badParam{"password", "is required when a username is given"}
	}
	return &dockerapi.Auth{Username: user, Password: pass, Email: email, ServerAddress: registryOf(image)}, nil
}

// registryOf is the registry an image name lives on, as the engine's
// credential store names it.
func registryOf(name string) string {
	first, _, ok := strings.Cut(name, "/")
	if ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return first
	}
	return "https://index.docker.io/v1/"
}

// imageRef is an image reference split into its name and tag (or
// digest).
type imageRef struct {
	name   string // 127.0.0.1:5000/ns/app
	tag    string // latest; "" for a digest reference
	digest string // sha256:…, for name@digest
}

func (r imageRef) String() string {
	if r.digest != "" {
		return r.name + "@" + r.digest
	}
	return r.name + ":" + r.tag
}

// refNameRe is what the engine accepts as a repository name (lower case
// components, an optional registry host[:port] first).
var refNameRe = regexp.MustCompile(`^([a-zA-Z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+|__[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+|__[a-z0-9]+)*)*$`)
var tagRe = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// parseImageRef reads an image parameter and its optional tag parameter
// (default latest). A tag may be written in the image itself
// ("ns/app:1.0"); the two must then agree.
func parseImageRef(p params, imageParam, tagParam string) (imageRef, error) {
	image, err := p.required(imageParam)
	if err != nil {
		return imageRef{}, err
	}
	tag, err := p.str(tagParam)
	if err != nil {
		return imageRef{}, err
	}
	image, tag = strings.TrimSpace(image), strings.TrimSpace(tag)
	r := imageRef{name: image}
	if name, digest, ok := strings.Cut(image, "@"); ok {
		if tag != "" {
			return imageRef{}, &badParam{tagParam, fmt.Sprintf("cannot be used with an image named by digest (%s)", image)}
		}
		r = imageRef{name: name, digest: digest}
	} else {
		slash := strings.LastIndex(image, "/")
		if i := strings.LastIndex(image, ":"); i > slash {
			r.name, r.tag = image[:i], image[i+1:]
			if tag != "" && tag != r.tag {
				return imageRef{}, &badParam{tagParam, fmt.Sprintf("is %q but %s names tag %q: give the tag once", tag, imageParam, r.tag)}
			}
		}
		if r.tag == "" {
			r.tag = tag
		}
		if r.tag == "" {
			r.tag = "latest"
		}
		if !tagRe.MatchString(r.tag) {
			return imageRef{}, &badParam{tagParam, fmt.Sprintf("%q is not a valid tag (letters, digits, _ . -)", r.tag)}
		}
	}
	if !refNameRe.MatchString(r.name) {
		return imageRef{}, &badParam{imageParam, fmt.Sprintf("%q is not a valid image name (lower case, e.g. namespace/image or host:5000/image)", r.name)}
	}
	return r, nil
}

// containerNameRe is what the engine accepts as a container name.
var containerNameRe = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`)

// containerNames reads a list parameter of container names.
func containerNames(p params, name string) ([]string, error) {
	l, err := p.list(name)
	if err != nil {
		return nil, err
	}
	var out []string
	for i, n := range l {
		n = strings.TrimSpace(n)
		if !containerNameRe.MatchString(n) {
			return nil, &badParam{fmt.Sprintf("%s[%d]", name, i), fmt.Sprintf("%q is not a container name (two or more letters, digits, _ . -)", n)}
		}
		out = append(out, n)
	}
	return out, nil
}

// familyRegexp matches a container name and the name_N of its count
// (the 2014 fork's names), as the engine's name filter sees them.
func familyRegexp(name string) string {
	return "^/" + regexp.QuoteMeta(name) + "(_[0-9]+)?$"
}

// renewContainers recreates the named containers (and their name_N
// siblings) after their image changed: one created by
// linux.docker.running is recreated from the configuration on its label,
// so the new image runs at once; one made otherwise (by hand, or by the
// 2014 agent) is removed, as the 2014 fork removed them, for its running
// state to create again. A container not there is left to its running
// state.
func (s *stateRun) renewContainers(ctx context.Context, c *dockerapi.Client, names []string, why string) ([]string, error) {
	var comments []string
	for _, name := range names {
		found, err := c.ListByName(ctx, familyRegexp(name))
		if err != nil {
			return comments, fmt.Errorf("cannot list container %s: %w", name, err)
		}
		sort.Slice(found, func(i, j int) bool { return found[i].Name() < found[j].Name() })
		for _, ct := range found {
			spec, ok := decodeSpec(ct.Labels[labelSpec])
			if !ok {
				if s.test {
					comments = append(comments, fmt.Sprintf("Container %s would be removed (%s; a linux.docker.running state creates it again)", ct.Name(), why))
					continue
				}
				if err := c.Remove(ctx, ct.ID, true); err != nil && !dockerapi.IsNotFound(err) {
					return comments, fmt.Errorf("cannot remove container %s: %w", ct.Name(), err)
				}
				comments = append(comments, fmt.Sprintf("Container %s removed (%s; a linux.docker.running state creates it again)", ct.Name(), why))
				continue
			}
			if s.test {
				comments = append(comments, fmt.Sprintf("Container %s would be recreated (%s)", ct.Name(), why))
				continue
			}
			stateID := ct.Labels[labelState]
			if err := recreateContainer(ctx, c, ct.ID, ct.Name(), spec, stateID, nil); err != nil {
				return comments, err
			}
			comments = append(comments, fmt.Sprintf("Container %s recreated (%s)", ct.Name(), why))
		}
	}
	return comments, nil
}

// removeOldImage removes the image a pull or build replaced when nothing
// uses it any more and no tag is left on it (Salt 2014 removed every
// untagged image of the engine after a pull; only this one is removed
// here). An image still used or tagged stays.
func removeOldImage(ctx context.Context, c *dockerapi.Client, oldID string) string {
	if oldID == "" {
		return ""
	}
	img, err := c.ImageInspect(ctx, oldID)
	if err != nil || len(img.RepoTags) > 0 {
		return ""
	}
	if err := c.RemoveImage(ctx, oldID); err != nil {
		return ""
	}
	return fmt.Sprintf("Previous image %s removed", shortID(oldID))
}

// shortID is an image or container id as the docker command prints it.
func shortID(id string) string {
	id = strings.TrimPrefix(id, "sha256:")
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// dockerFailure is a failed state: the comments of what was done before
// the failure, then the failure.
func dockerFailure(done []string, err error) (state.Result, error) {
	return state.Result{Comment: strings.Join(append(done, err.Error()), "\n")}, err
}

// changedFailure is dockerFailure after something was changed.
func changedFailure(done []string, err error) (state.Result, error) {
	res, err := dockerFailure(done, err)
	res.Changed = true
	return res, err
}

// dockerError is a failure whose message is a state's comment
// ("Container web cannot be created: …"), wrapping its cause.
type dockerError struct {
	msg string
	err error
}

func (e *dockerError) Error() string { return e.msg + ": " + e.err.Error() }
func (e *dockerError) Unwrap() error { return e.err }

func dockerErr(err error, format string, a ...any) error {
	return &dockerError{msg: fmt.Sprintf(format, a...), err: err}
}
