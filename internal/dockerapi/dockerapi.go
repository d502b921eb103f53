// Package dockerapi is a small client of the Docker Engine API over the
// engine's local unix socket: the dozen endpoints the linux.docker.*
// modules need (ping, image inspect/pull/build/tag/push/remove, registry
// distribution inspect, container list/inspect/create/start/stop/restart/
// remove/logs, commit), as plain HTTP.
//
// Why not the engine's own Go client: it brings a large dependency tree
// (moby, containerd, OpenTelemetry, gRPC …) into a one-binary agent for a
// few JSON calls, while the API is versioned and stable. Requests name an
// API version (/v1.41/…), negotiated once per client with GET /_ping the
// way the official client does: the lower of the engine's version and the
// newest this package was checked against (maxVersion), so Debian 12's
// engine (20.10, API 1.41) and engines that no longer accept old versions
// (Engine 29 needs at least 1.44) are both spoken to.
//
// Registry credentials travel only in the X-Registry-Auth header, never in
// a URL, an error or a log line.
package dockerapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/textcut"
	"golang.org/x/sys/unix"
)

// Versions: maxVersion is the newest API version whose request and
// response fields this package uses as documented (1.41 … 1.47 changed
// none of them); minVersion is the oldest engine API it accepts (the
// /distribution endpoint appeared in 1.30).
const (
	maxVersion = "1.47"
	minVersion = "1.30"
)

// maxOutput bounds the progress text kept from a pull, build or push.
const maxOutput = 64 << 10

// Client talks to one engine. It is not safe to use before Ping.
type Client struct {
	socket  string
	http    *http.Client
	version string
}

// New returns a client of the engine listening on socket (a host path).
// A path longer than a unix socket address allows is reached through its
// directory's descriptor (/proc/self/fd/N/name), so deep test roots work.
func New(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialUnix(ctx, socket)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// sunPathMax is the usable length of a unix socket address on Linux.
const sunPathMax = 107

func dialUnix(ctx context.Context, socket string) (net.Conn, error) {
	var d net.Dialer
	if len(socket) <= sunPathMax {
		return d.DialContext(ctx, "unix", socket)
	}
	fd, err := unix.Open(filepath.Dir(socket), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: filepath.Dir(socket), Err: err}
	}
	defer unix.Close(fd)
	return d.DialContext(ctx, "unix", fmt.Sprintf("/proc/self/fd/%d/%s", fd, filepath.Base(socket)))
}

// Version is the negotiated API version ("1.41").
func (c *Client) Version() string { return c.version }

// ErrTooOld is an engine that answers but whose API is too old to use.
var ErrTooOld = errors.New("the Docker engine is too old")

// Error is a request the engine refused.
type Error struct {
	Status   int
	Endpoint string // "POST /containers/create"
	Message  string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s (HTTP %d)", e.Endpoint, e.Message, e.Status)
}

// IsNotFound reports whether err is the engine's 404 (no such image,
// container or manifest).
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

// IsConflict reports whether err is the engine's 409 (an image in use, a
// name taken).
func IsConflict(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusConflict
}

// Ping checks that the engine answers and negotiates the API version.
func (c *Client) Ping(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<10))
	if resp.StatusCode != http.StatusOK {
		return &Error{Status: resp.StatusCode, Endpoint: "GET /_ping", Message: "the engine is not ready"}
	}
	v := resp.Header.Get("Api-Version")
	switch {
	case v == "":
		v = minVersion // engines before 1.25 do not say; the calls below fail clearly if too old
	case versionLess(v, minVersion):
		return fmt.Errorf("%w: it speaks API %s; at least %s (Docker 17.06) is needed", ErrTooOld, v, minVersion)
	case versionLess(maxVersion, v):
		v = maxVersion
	}
	c.version = v
	return nil
}

// versionLess compares API versions "1.41" < "1.47".
func versionLess(a, b string) bool {
	pa, pb := strings.SplitN(a, ".", 2), strings.SplitN(b, ".", 2)
	for i := 0; i < 2; i++ {
		var x, y int
		if i < len(pa) {
			x, _ = strconv.Atoi(pa[i])
		}
		if i < len(pb) {
			y, _ = strconv.Atoi(pb[i])
		}
		if x != y {
			return x < y
		}
	}
	return false
}

// Auth is a registry login, sent as X-Registry-Auth.
type Auth struct {
	Username      string `json:"username,omitempty"`
	Password      string `json:"password,omitempty"`
	Email         string `json:"email,omitempty"`
	ServerAddress string `json:"serveraddress,omitempty"`
}

// header is the X-Registry-Auth value: base64url JSON. An empty login is
// "{}" (push requires the header to be present).
func (a *Auth) header() string {
	if a == nil {
		a = &Auth{}
	}
	b, _ := json.Marshal(a)
	return base64.URLEncoding.EncodeToString(b)
}

// request is one API call.
type request struct {
	method, path string
	query        url.Values
	body         io.Reader
	contentType  string
	auth         *Auth
	withAuth     bool
}

func (c *Client) do(ctx context.Context, r request) (*http.Response, error) {
	u := "http://docker/v" + c.version + r.path
	if len(r.query) > 0 {
		u += "?" + r.query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, r.method, u, r.body)
	if err != nil {
		return nil, err
	}
	if r.contentType != "" {
		req.Header.Set("Content-Type", r.contentType)
	}
	if r.withAuth {
		req.Header.Set("X-Registry-Auth", r.auth.header())
	}
	endpoint := r.method + " " + r.path
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", endpoint, err)
	}
	// 304: a container already started or stopped, which is what was asked.
	if resp.StatusCode >= 300 && resp.StatusCode != http.StatusNotModified {
		defer resp.Body.Close()
		return nil, &Error{Status: resp.StatusCode, Endpoint: endpoint, Message: errorMessage(resp.Body)}
	}
	return resp, nil
}

// errorMessage reads the engine's {"message": …} error body.
func errorMessage(body io.Reader) string {
	data, _ := io.ReadAll(io.LimitReader(body, 8<<10))
	var m struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(data, &m) == nil && m.Message != "" {
		return m.Message
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "no message"
	}
	return textcut.Printable(s)
}

// call runs a request and decodes a JSON answer into out (nil: discard).
func (c *Client) call(ctx context.Context, r request, out any) error {
	resp, err := c.do(ctx, r)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: cannot read the answer: %w", r.method, r.path, err)
	}
	return nil
}

// esc escapes a name for a path segment; image references keep their '/'
// (the engine's router takes the rest of the path as the name).
func esc(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return strings.Join(parts, "/")
}

// Image is what the modules read of an image.
type Image struct {
	ID          string   `json:"Id"`
	RepoTags    []string `json:"RepoTags"`
	RepoDigests []string `json:"RepoDigests"`
	Config      struct {
		Labels map[string]string `json:"Labels"`
	} `json:"Config"`
}

// ImageInspect describes a local image by reference or id (IsNotFound
// when absent).
func (c *Client) ImageInspect(ctx context.Context, ref string) (*Image, error) {
	var img Image
	if err := c.call(ctx, request{method: http.MethodGet, path: "/images/" + esc(ref) + "/json"}, &img); err != nil {
		return nil, err
	}
	return &img, nil
}

// DistributionDigest asks the registry (through the engine, with auth)
// for the digest the reference names there now: the manifest's, or the
// manifest list's for a multi-platform image. IsNotFound when the
// registry has no such tag.
func (c *Client) DistributionDigest(ctx context.Context, ref string, auth *Auth) (string, error) {
	var d struct {
		Descriptor struct {
			Digest string `json:"digest"`
		} `json:"Descriptor"`
	}
	if err := c.call(ctx, request{method: http.MethodGet, path: "/distribution/" + esc(ref) + "/json", auth: auth, withAuth: true}, &d); err != nil {
		return "", err
	}
	return d.Descriptor.Digest, nil
}

// Progress is what a pull, build or push printed, and the id or digest
// it reported.
type Progress struct {
	Output string // progress text, its last maxOutput bytes
	ID     string // build: the image id (aux.ID)
	Digest string // push: the manifest digest (aux.Digest)
}

// readStream reads the engine's JSON message stream; a message with an
// error fails the call with that error (its last lines of output kept).
func readStream(endpoint string, body io.Reader) (Progress, error) {
	var p Progress
	var out bytes.Buffer
	keep := func(s string) {
		out.WriteString(s)
		if out.Len() > 2*maxOutput {
			tail := textcut.Suffix(out.String(), maxOutput)
			out.Reset()
			out.WriteString(tail)
		}
	}
	dec := json.NewDecoder(bufio.NewReader(body))
	for {
		var m struct {
			Stream      string `json:"stream"`
			Status      string `json:"status"`
			ID          string `json:"id"`
			Progress    string `json:"progress"`
			Error       string `json:"error"`
			ErrorDetail struct {
				Message string `json:"message"`
			} `json:"errorDetail"`
			Aux json.RawMessage `json:"aux"`
		}
		if err := dec.Decode(&m); err == io.EOF {
			break
		} else if err != nil {
			return p, fmt.Errorf("%s: the engine's progress stream broke off: %w", endpoint, err)
		}
		switch {
		case m.Error != "" || m.ErrorDetail.Message != "":
			msg := m.ErrorDetail.Message
			if msg == "" {
				msg = m.Error
			}
			p.Output = textcut.Suffix(out.String(), maxOutput)
			return p, &Error{Status: http.StatusOK, Endpoint: endpoint, Message: strings.TrimSpace(msg)}
		case m.Stream != "":
			keep(m.Stream)
		case m.Status != "" && m.Progress == "":
			// Progress bars are left out: one line per layer event.
			if m.ID != "" {
				keep(m.ID + ": ")
			}
			keep(m.Status + "\n")
		}
		if len(m.Aux) > 0 {
			var aux struct {
				ID     string `json:"ID"`
				Digest string `json:"Digest"`
			}
			if json.Unmarshal(m.Aux, &aux) == nil {
				if aux.ID != "" {
					p.ID = aux.ID
				}
				if aux.Digest != "" {
					p.Digest = aux.Digest
				}
			}
		}
	}
	p.Output = textcut.Suffix(out.String(), maxOutput)
	return p, nil
}

// Pull pulls image:tag (POST /images/create) with auth. With tag "",
// image must name its tag or digest itself (an image name alone would
// pull every tag).
func (c *Client) Pull(ctx context.Context, image, tag string, auth *Auth) (Progress, error) {
	q := url.Values{"fromImage": {image}}
	if tag != "" {
		q.Set("tag", tag)
	}
	resp, err := c.do(ctx, request{method: http.MethodPost, path: "/images/create", query: q, auth: auth, withAuth: true})
	if err != nil {
		return Progress{}, err
	}
	defer resp.Body.Close()
	return readStream("POST /images/create", resp.Body)
}

// BuildOptions are the build's parameters.
type BuildOptions struct {
	Tag        string
	Dockerfile string // path in the context; "" is Dockerfile
	Labels     map[string]string
}

// Build builds an image from a tar of the build context.
func (c *Client) Build(ctx context.Context, context io.Reader, o BuildOptions) (Progress, error) {
	q := url.Values{"t": {o.Tag}, "rm": {"1"}, "forcerm": {"1"}}
	if o.Dockerfile != "" {
		q.Set("dockerfile", o.Dockerfile)
	}
	if len(o.Labels) > 0 {
		b, _ := json.Marshal(o.Labels)
		q.Set("labels", string(b))
	}
	resp, err := c.do(ctx, request{method: http.MethodPost, path: "/build", query: q, body: context, contentType: "application/x-tar"})
	if err != nil {
		return Progress{}, err
	}
	defer resp.Body.Close()
	return readStream("POST /build", resp.Body)
}

// Push pushes image:tag with auth; Digest is the manifest's.
func (c *Client) Push(ctx context.Context, image, tag string, auth *Auth) (Progress, error) {
	resp, err := c.do(ctx, request{method: http.MethodPost, path: "/images/" + esc(image) + "/push", query: url.Values{"tag": {tag}}, auth: auth, withAuth: true})
	if err != nil {
		return Progress{}, err
	}
	defer resp.Body.Close()
	return readStream("POST /images/push", resp.Body)
}

// Tag tags an image (id or reference) as repo:tag.
func (c *Client) Tag(ctx context.Context, image, repo, tag string) error {
	return c.call(ctx, request{method: http.MethodPost, path: "/images/" + esc(image) + "/tag", query: url.Values{"repo": {repo}, "tag": {tag}}}, nil)
}

// RemoveImage removes an image by id without force: an image a container
// uses, or that has tags left, stays (IsConflict).
func (c *Client) RemoveImage(ctx context.Context, id string) error {
	return c.call(ctx, request{method: http.MethodDelete, path: "/images/" + esc(id)}, nil)
}

// Commit makes an image of a container's filesystem, tagged repo:tag.
func (c *Client) Commit(ctx context.Context, container, repo, tag, comment, author string) (string, error) {
	q := url.Values{"container": {container}, "repo": {repo}, "tag": {tag}}
	if comment != "" {
		q.Set("comment", comment)
	}
	if author != "" {
		q.Set("author", author)
	}
	var out struct {
		ID string `json:"Id"`
	}
	if err := c.call(ctx, request{method: http.MethodPost, path: "/commit", query: q, contentType: "application/json", body: strings.NewReader("{}")}, &out); err != nil {
		return "", err
	}
	return out.ID, nil
}

// Container is a container as the list endpoint shows it.
type Container struct {
	ID      string            `json:"Id"`
	Names   []string          `json:"Names"`
	Image   string            `json:"Image"`
	ImageID string            `json:"ImageID"`
	State   string            `json:"State"` // running, exited, created …
	Labels  map[string]string `json:"Labels"`
}

// Name is the container's name without the leading '/'.
func (c Container) Name() string {
	for _, n := range c.Names {
		n = strings.TrimPrefix(n, "/")
		if !strings.Contains(n, "/") { // links show as /other/alias
			return n
		}
	}
	return ""
}

// ListByName lists every container (running or not) whose name matches
// the regular expression (the engine matches it against "/name").
func (c *Client) ListByName(ctx context.Context, nameRegexp string) ([]Container, error) {
	f, _ := json.Marshal(map[string][]string{"name": {nameRegexp}})
	var out []Container
	if err := c.call(ctx, request{method: http.MethodGet, path: "/containers/json", query: url.Values{"all": {"1"}, "filters": {string(f)}}}, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// ContainerState is what the modules read of an inspected container.
type ContainerState struct {
	ID    string `json:"Id"`
	Image string `json:"Image"` // the image id
	State struct {
		Running   bool   `json:"Running"`
		OOMKilled bool   `json:"OOMKilled"`
		Status    string `json:"Status"`
		ExitCode  int    `json:"ExitCode"`
		Error     string `json:"Error"`
	} `json:"State"`
	Config struct {
		Labels map[string]string `json:"Labels"`
	} `json:"Config"`
}

// Inspect describes a container (IsNotFound when absent).
func (c *Client) Inspect(ctx context.Context, nameOrID string) (*ContainerState, error) {
	var st ContainerState
	if err := c.call(ctx, request{method: http.MethodGet, path: "/containers/" + url.PathEscape(nameOrID) + "/json"}, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// CreateBody is the body of POST /containers/create (the fields the
// modules set).
type CreateBody struct {
	Image        string              `json:"Image"`
	Cmd          []string            `json:"Cmd,omitempty"`
	Env          []string            `json:"Env,omitempty"`
	Hostname     string              `json:"Hostname,omitempty"`
	Labels       map[string]string   `json:"Labels,omitempty"`
	ExposedPorts map[string]struct{} `json:"ExposedPorts,omitempty"`
	HostConfig   HostConfig          `json:"HostConfig"`
}

// HostConfig is the host side of a container.
type HostConfig struct {
	Binds        []string                 `json:"Binds,omitempty"`
	PortBindings map[string][]PortBinding `json:"PortBindings,omitempty"`
	Devices      []Device                 `json:"Devices,omitempty"`
	Memory       int64                    `json:"Memory,omitempty"`
	CPUShares    int64                    `json:"CpuShares,omitempty"`
	CpusetCpus   string                   `json:"CpusetCpus,omitempty"`
}

// PortBinding is a host address a container port is published on.
type PortBinding struct {
	HostIP   string `json:"HostIp"`
	HostPort string `json:"HostPort"`
}

// Device is a host device mapped into a container.
type Device struct {
	PathOnHost        string `json:"PathOnHost"`
	PathInContainer   string `json:"PathInContainer"`
	CgroupPermissions string `json:"CgroupPermissions"`
}

// Create creates a container named name.
func (c *Client) Create(ctx context.Context, name string, body CreateBody) (string, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return "", err
	}
	var out struct {
		ID string `json:"Id"`
	}
	if err := c.call(ctx, request{method: http.MethodPost, path: "/containers/create", query: url.Values{"name": {name}}, body: bytes.NewReader(b), contentType: "application/json"}, &out); err != nil {
		return "", err
	}
	return out.ID, nil
}

// Start starts a container (a running one is left alone: 304).
func (c *Client) Start(ctx context.Context, id string) error {
	return c.call(ctx, request{method: http.MethodPost, path: "/containers/" + url.PathEscape(id) + "/start"}, nil)
}

// Restart restarts a container, waiting timeout for it to stop first.
func (c *Client) Restart(ctx context.Context, id string, timeout time.Duration) error {
	return c.call(ctx, request{method: http.MethodPost, path: "/containers/" + url.PathEscape(id) + "/restart", query: url.Values{"t": {strconv.Itoa(int(timeout.Seconds()))}}}, nil)
}

// Stop stops a container, waiting timeout before killing it.
func (c *Client) Stop(ctx context.Context, id string, timeout time.Duration) error {
	return c.call(ctx, request{method: http.MethodPost, path: "/containers/" + url.PathEscape(id) + "/stop", query: url.Values{"t": {strconv.Itoa(int(timeout.Seconds()))}}}, nil)
}

// Remove removes a container (stopped or, with force, running). Its
// anonymous volumes are kept: data is never removed with a container.
func (c *Client) Remove(ctx context.Context, id string, force bool) error {
	q := url.Values{}
	if force {
		q.Set("force", "1")
	}
	return c.call(ctx, request{method: http.MethodDelete, path: "/containers/" + url.PathEscape(id), query: q}, nil)
}

// LogsTail is the last lines of a container's output (stdout and stderr
// interleaved), for a message about a container that stopped.
func (c *Client) LogsTail(ctx context.Context, id string, lines int) (string, error) {
	q := url.Values{"stdout": {"1"}, "stderr": {"1"}, "tail": {strconv.Itoa(lines)}}
	resp, err := c.do(ctx, request{method: http.MethodGet, path: "/containers/" + url.PathEscape(id) + "/logs", query: q})
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<10))
	if err != nil {
		return "", err
	}
	return demux(data), nil
}

// demux strips the 8-byte frame headers of a non-TTY log stream (stream
// type, 3 zero bytes, big-endian length); a TTY stream has none.
func demux(data []byte) string {
	var out bytes.Buffer
	for len(data) >= 8 && data[0] <= 2 && data[1] == 0 && data[2] == 0 && data[3] == 0 {
		n := int(data[4])<<24 | int(data[5])<<16 | int(data[6])<<8 | int(data[7])
		data = data[8:]
		if n > len(data) {
			n = len(data)
		}
		out.Write(data[:n])
		data = data[n:]
	}
	out.Write(data)
	return out.String()
}
