package native

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/dockerapi"
)

// containerSpec is the configuration a container is created with. Its
// JSON (field order fixed, lists sorted) is the label labelSpec: the
// container is recreated exactly when the JSON of the desired
// configuration differs from it.
type containerSpec struct {
	Image      string                           `json:"image"`
	Cmd        []string                         `json:"command,omitempty"`
	Env        []string                         `json:"environment,omitempty"`
	Ports      map[string]dockerapi.PortBinding `json:"port_bindings,omitempty"`
	Binds      []string                         `json:"volumes,omitempty"`
	Devices    []string                         `json:"devices,omitempty"` // host:container:permissions
	Memory     int64                            `json:"mem_limit,omitempty"`
	CPUShares  int64                            `json:"cpu_shares,omitempty"`
	CpusetCpus string                           `json:"cpuset,omitempty"`
	Files      string                           `json:"files,omitempty"` // linux.docker.deploy: digest of the files' contents
}

func (c containerSpec) encode() string {
	b, _ := json.Marshal(c)
	return string(b)
}

func decodeSpec(label string) (containerSpec, bool) {
	var c containerSpec
	if label == "" || json.Unmarshal([]byte(label), &c) != nil || c.Image == "" {
		return containerSpec{}, false
	}
	return c, true
}

// diff names the parameters that differ from an earlier configuration,
// for the comment of a recreation.
func (c containerSpec) diff(old containerSpec) []string {
	var out []string
	a, b := map[string]json.RawMessage{}, map[string]json.RawMessage{}
	_ = json.Unmarshal([]byte(c.encode()), &a)
	_ = json.Unmarshal([]byte(old.encode()), &b)
	for _, k := range []string{"image", "command", "environment", "port_bindings", "volumes", "devices", "mem_limit", "cpu_shares", "cpuset", "files"} {
		name := k
		if k == "cpuset" {
			name = "cpu_shares" // one parameter sets both
		}
		if string(a[k]) != string(b[k]) && !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	return out
}

// body is the create request of container name.
func (c containerSpec) body(name, stateID string) dockerapi.CreateBody {
	b := dockerapi.CreateBody{
		Image:    c.Image,
		Cmd:      c.Cmd,
		Env:      c.Env,
		Hostname: name, // as the 2014 fork did
		Labels:   map[string]string{labelSpec: c.encode(), labelState: stateID},
		HostConfig: dockerapi.HostConfig{
			Binds:      c.Binds,
			Memory:     c.Memory,
			CPUShares:  c.CPUShares,
			CpusetCpus: c.CpusetCpus,
		},
	}
	if len(c.Ports) > 0 {
		b.ExposedPorts = map[string]struct{}{}
		b.HostConfig.PortBindings = map[string][]dockerapi.PortBinding{}
		for port, pb := range c.Ports {
			b.ExposedPorts[port] = struct{}{}
			b.HostConfig.PortBindings[port] = []dockerapi.PortBinding{pb}
		}
	}
	for _, d := range c.Devices {
		f := strings.SplitN(d, ":", 3)
		b.HostConfig.Devices = append(b.HostConfig.Devices, dockerapi.Device{PathOnHost: f[0], PathInContainer: f[1], CgroupPermissions: f[2]})
	}
	return b
}

// wantContainer is one container a state wants.
type wantContainer struct {
	name string
	spec containerSpec
}

// runningPlan is a linux.docker.running state, read.
type runningPlan struct {
	base    string // container, as given
	count   int
	ref     imageRef
	auth    *dockerapi.Auth
	force   bool
	want    []wantContainer
	watched []watched
	notes   []string
}

// maxCount bounds count (the 2014 fork looked for at most 1000).
const maxCount = 1000

// parseRunning reads the parameters of linux.docker.running (and of
// linux.docker.deploy, which adds its files as binds and their digest).
func parseRunning(p params, extraBinds []string, filesDigest string) (*runningPlan, error) {
	base, err := p.required("container")
	if err != nil {
		return nil, err
	}
	base = strings.TrimSpace(base)
	if !containerNameRe.MatchString(base) {
		return nil, &badParam{"container", fmt.Sprintf("%q is not a container name (two or more letters, digits, _ . -)", base)}
	}
	ref, err := parseImageRef(p, "image", "tag")
	if err != nil {
		return nil, err
	}
	plan := &runningPlan{base: base, ref: ref}
	if plan.auth, err = dockerAuth(p, ref.name); err != nil {
		return nil, err
	}
	count, err := p.integer("count", 0)
	if err != nil {
		return nil, err
	}
	if count < 0 || count > maxCount {
		return nil, &badParam{"count", fmt.Sprintf("must be between 0 and %d, got %d", maxCount, count)}
	}
	plan.count = int(count)
	if plan.force, err = p.boolean("force", false); err != nil {
		return nil, err
	}
	spec := containerSpec{Image: ref.String(), Files: filesDigest}
	if spec.Cmd, err = commandParam(p, "command"); err != nil {
		return nil, err
	}
	if spec.Env, err = p.env("environment"); err != nil {
		return nil, err
	}
	sort.Strings(spec.Env)
	if spec.Binds, err = bindsParam(p); err != nil {
		return nil, err
	}
	spec.Binds = append(spec.Binds, extraBinds...)
	sort.Strings(spec.Binds)
	if spec.Devices, err = devicesParam(p); err != nil {
		return nil, err
	}
	mem, err := p.str("mem_limit")
	if err != nil {
		return nil, err
	}
	if spec.Memory, err = memLimit(mem); err != nil {
		return nil, err
	}
	cpu, err := p.str("cpu_shares")
	if err != nil {
		return nil, err
	}
	if spec.CPUShares, spec.CpusetCpus, err = cpuParam(cpu); err != nil {
		return nil, err
	}
	ports, err := portsParam(p, plan.count)
	if err != nil {
		return nil, err
	}
	if plan.watched, plan.notes, err = dockerWatch(p); err != nil {
		return nil, err
	}
	n := max(plan.count, 1)
	for i := 0; i < n; i++ {
		s := spec
		name := base
		if plan.count > 0 {
			name = fmt.Sprintf("%s_%d", base, i+1)
		}
		if len(ports) > 0 {
			s.Ports = map[string]dockerapi.PortBinding{}
			for _, pb := range ports {
				port := ""
				if pb.hostPort > 0 {
					port = strconv.Itoa(pb.hostPort + i)
				}
				s.Ports[pb.container] = dockerapi.PortBinding{HostIP: pb.hostIP, HostPort: port}
			}
		}
		plan.want = append(plan.want, wantContainer{name: name, spec: s})
	}
	return plan, nil
}

// dockerWatch reads watch: files whose change restarts the containers.
func dockerWatch(p params) ([]watched, []string, error) {
	w, note, err := watchParam(p)
	if err != nil || note == "" {
		return w, nil, err
	}
	return w, []string{note}, nil
}

// commandParam reads the command: a list of arguments, or one line split
// into words as a shell would (quotes, backslashes; nothing expanded),
// as the 2014 fork's docker library did.
func commandParam(p params, name string) ([]string, error) {
	raw, ok := p[name]
	if !ok || string(raw) == "null" {
		return nil, nil
	}
	var line string
	if json.Unmarshal(raw, &line) == nil {
		words, err := splitWords(line)
		if err != nil {
			return nil, &badParam{name, err.Error()}
		}
		return words, nil
	}
	return p.list(name)
}

// splitWords splits a command line into words like a POSIX shell, with
// no expansion.
func splitWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == ' ' || ch == '\t' || ch == '\n':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case ch == '\\':
			inWord = true
			if i+1 < len(s) {
				i++
				cur.WriteByte(s[i])
			}
		case ch == '\'':
			inWord = true
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("has an unterminated ' quote")
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
		case ch == '"':
			inWord = true
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && strings.IndexByte("\"\\$`", s[i+1]) >= 0 {
					i++
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("has an unterminated \" quote")
			}
		default:
			inWord = true
			cur.WriteByte(ch)
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// bindsParam reads volumes (host path or volume name → container
// path[:ro|:rw]) and files (container path → host path) as binds.
func bindsParam(p params) ([]string, error) {
	vols, err := p.pairs("volumes")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, v := range vols {
		ctr, mode := v.value, ""
		if i := strings.LastIndex(ctr, ":"); i >= 0 {
			ctr, mode = ctr[:i], ctr[i+1:]
		}
		ctr = strings.TrimSpace(ctr)
		if !strings.HasPrefix(ctr, "/") {
			return nil, &badParam{"volumes." + v.key, fmt.Sprintf("the container path must be absolute (e.g. /data or /data:ro), got %q", v.value)}
		}
		switch mode {
		case "", "rw":
			mode = ""
		case "ro":
			mode = ":ro"
		default:
			return nil, &badParam{"volumes." + v.key, fmt.Sprintf("%q: the mode after the container path is ro or rw", mode)}
		}
		if strings.Contains(v.key, ":") {
			return nil, &badParam{"volumes", fmt.Sprintf("the host path %q cannot contain ':'", v.key)}
		}
		out = append(out, v.key+":"+path.Clean(ctr)+mode)
	}
	files, err := p.pairs("files")
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		host := strings.TrimSpace(f.value)
		if !strings.HasPrefix(f.key, "/") || !strings.HasPrefix(host, "/") || strings.Contains(host+f.key, ":") {
			return nil, &badParam{"files." + f.key, fmt.Sprintf("must map an absolute container path to an absolute host path, got %q: %q", f.key, f.value)}
		}
		out = append(out, host+":"+path.Clean(f.key))
	}
	return out, nil
}

var devicePermRe = regexp.MustCompile(`^[rwm]{1,3}$`)

// devicesParam reads devices: host device → container path[:rwm].
func devicesParam(p params) ([]string, error) {
	devs, err := p.pairs("devices")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, d := range devs {
		ctr, perm, _ := strings.Cut(strings.TrimSpace(d.value), ":")
		if perm == "" {
			perm = "rwm"
		}
		if !strings.HasPrefix(d.key, "/") || !strings.HasPrefix(ctr, "/") || !devicePermRe.MatchString(perm) || strings.Contains(d.key, ":") {
			return nil, &badParam{"devices." + d.key, fmt.Sprintf("must map a host device to a container path with optional permissions (/dev/xvdf: /dev/xvdf:r), got %q", d.value)}
		}
		out = append(out, d.key+":"+ctr+":"+perm)
	}
	sort.Strings(out)
	return out, nil
}

// memLimit reads a memory size: bytes, or a number with b, k, m, g or t.
func memLimit(s string) (int64, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "" || s == "0" {
		return 0, nil
	}
	shift := 0
	if n := len(s); n > 1 {
		switch s[n-1] {
		case 'b':
			s = s[:n-1]
		case 'k':
			shift, s = 10, s[:n-1]
		case 'm':
			shift, s = 20, s[:n-1]
		case 'g':
			shift, s = 30, s[:n-1]
		case 't':
			shift, s = 40, s[:n-1]
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)>>shift {
		return 0, &badParam{"mem_limit", fmt.Sprintf("must be a size such as 512m or 2g, got %q", s)}
	}
	return n << shift, nil
}

var cpusetRe = regexp.MustCompile(`^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$`)

// cpuParam reads cpu_shares: a whole number is a relative weight (CPU
// shares); a CPU list such as "0-3" or "0,2" (the reference's examples)
// pins the container to those CPUs.
func cpuParam(s string) (int64, string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, "", nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n < 0 || n > 262144 {
			return 0, "", &badParam{"cpu_shares", fmt.Sprintf("must be between 2 and 262144 shares, got %d", n)}
		}
		return n, "", nil
	}
	if cpusetRe.MatchString(s) {
		return 0, s, nil
	}
	return 0, "", &badParam{"cpu_shares", fmt.Sprintf("must be a number of shares (1024) or a CPU list (0-3), got %q", s)}
}

// portSpec is one port binding as given.
type portSpec struct {
	container string // 80/tcp
	hostIP    string
	hostPort  int // 0: a port the engine picks
}

// portsParam reads port_bindings: container port[/protocol] → [ip:]host
// port. With count, container i (from 0) gets host port + i, so the
// ranges of two bindings on one address must not overlap.
func portsParam(p params, count int) ([]portSpec, error) {
	pairs, err := p.pairs("port_bindings")
	if err != nil {
		return nil, err
	}
	var out []portSpec
	for _, pr := range pairs {
		param := "port_bindings." + pr.key
		num, proto, _ := strings.Cut(pr.key, "/")
		if proto == "" {
			proto = "tcp"
		}
		if n, err := strconv.Atoi(num); err != nil || n < 1 || n > 65535 || (proto != "tcp" && proto != "udp" && proto != "sctp") {
			return nil, &badParam{param, "the container port must be a port number with an optional /tcp, /udp or /sctp"}
		}
		ps := portSpec{container: num + "/" + proto, hostIP: "0.0.0.0"}
		v := strings.TrimSpace(pr.value)
		if i := strings.LastIndex(v, ":"); i >= 0 {
			ps.hostIP, v = strings.Trim(v[:i], "[]"), v[i+1:]
		}
		if v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n+max(count, 1)-1 > 65535 {
				return nil, &badParam{param, fmt.Sprintf("the host port must be a port number (with count %d, port+count-1 at most 65535), got %q", count, pr.value)}
			}
			ps.hostPort = n
		}
		out = append(out, ps)
	}
	// Two bindings must not claim one host port (for any of count).
	seen := map[string]string{}
	for _, ps := range out {
		if ps.hostPort == 0 {
			continue
		}
		proto := ps.container[strings.Index(ps.container, "/")+1:]
		for i := 0; i < max(count, 1); i++ {
			k := fmt.Sprintf("%s:%d/%s", ps.hostIP, ps.hostPort+i, proto)
			if other, dup := seen[k]; dup {
				return nil, &badParam{"port_bindings", fmt.Sprintf("%s and %s both use host port %s (with count %d, each binding takes %d consecutive host ports)", other, ps.container, k, count, max(count, 1))}
			}
			seen[k] = ps.container
		}
	}
	return out, nil
}

// dockerRunning is linux.docker.running: the containers run with the
// given configuration.
func (e *Executor) dockerRunning(ctx context.Context, s *stateRun) (state.Result, error) {
	plan, err := parseRunning(s.p, nil, "")
	if err != nil {
		return state.Result{}, err
	}
	c, notes, err := s.dockerEngine(ctx)
	if err != nil {
		return state.Result{}, failf("Container %s: %v", plan.base, err)
	}
	if c == nil {
		return changed(fmt.Sprintf("Container %s would be created: %s", plan.base, strings.Join(notes, "; "))), nil
	}
	defer c.Close()
	comments, ch, err := e.converge(ctx, s, c, plan, false)
	comments = append(notes, comments...)
	if err != nil {
		res, err := dockerFailure(comments, err)
		res.Changed = ch || len(notes) > 0
		return res, err
	}
	return state.Result{OK: true, Changed: ch || len(notes) > 0, Comment: strings.Join(comments, "\n")}, nil
}

// converge brings the plan's containers to their configuration: missing
// ones created, those with another configuration (or, with renew, all)
// recreated, stopped ones started, the name_N beyond count removed, and
// running ones restarted when a watched file changed.
func (e *Executor) converge(ctx context.Context, s *stateRun, c *dockerapi.Client, plan *runningPlan, renew bool) ([]string, bool, error) {
	found, err := c.ListByName(ctx, familyRegexp(plan.base))
	if err != nil {
		return nil, false, dockerErr(err, "Container %s: cannot list containers", plan.base)
	}
	byName := map[string]dockerapi.Container{}
	for _, ct := range found {
		byName[ct.Name()] = ct
	}
	var comments, fine []string
	changedAny := false
	acted := map[string]bool{} // created, recreated or started this round
	wanted := map[string]bool{}
	for _, w := range plan.want {
		wanted[w.name] = true
		ct, exists := byName[w.name]
		have := ct.Labels[labelSpec]
		switch {
		case !exists:
			changedAny, acted[w.name] = true, true
			if s.test {
				comments = append(comments, fmt.Sprintf("Container %s would be created from %s", w.name, w.spec.Image))
				continue
			}
			pulled, err := createContainer(ctx, c, w.name, w.spec, s.id, plan.auth)
			if err != nil {
				return comments, true, err
			}
			comments = append(comments, fmt.Sprintf("Container %s created from %s and started%s", w.name, w.spec.Image, pulled))
		case renew || plan.force || have != w.spec.encode():
			why := "image " + w.spec.Image + " changed"
			if !renew {
				why = recreateReason(have, w.spec, plan.force)
			}
			changedAny, acted[w.name] = true, true
			if s.test {
				comments = append(comments, fmt.Sprintf("Container %s would be recreated: %s", w.name, why))
				continue
			}
			if err := recreateContainer(ctx, c, ct.ID, w.name, w.spec, s.id, plan.auth); err != nil {
				return comments, true, err
			}
			comments = append(comments, fmt.Sprintf("Container %s recreated: %s", w.name, why))
		case ct.State != "running":
			changedAny, acted[w.name] = true, true
			if s.test {
				comments = append(comments, fmt.Sprintf("Container %s would be started (it is %s)", w.name, ct.State))
				continue
			}
			crashed, err := crashReport(ctx, c, ct.ID, w.name)
			if err != nil {
				return comments, true, err
			}
			if crashed != "" {
				// Started again, but the failure is the user's to see.
				if err := c.Start(ctx, ct.ID); err != nil {
					return comments, true, dockerErr(err, "%s; starting it again failed", crashed)
				}
				return comments, true, failf("%s; it was started again", crashed)
			}
			if err := startContainer(ctx, c, ct.ID, w.name); err != nil {
				return comments, true, err
			}
			comments = append(comments, fmt.Sprintf("Container %s started (it was %s)", w.name, ct.State))
		default:
			fine = append(fine, w.name)
		}
	}
	extra := make([]string, 0, len(found))
	for _, ct := range found {
		if !wanted[ct.Name()] {
			extra = append(extra, ct.Name())
		}
	}
	sort.Strings(extra)
	for _, name := range extra {
		changedAny = true
		why := fmt.Sprintf("the state runs %s", plan.describe())
		if s.test {
			comments = append(comments, fmt.Sprintf("Container %s would be removed (%s)", name, why))
			continue
		}
		if err := c.Remove(ctx, byName[name].ID, true); err != nil && !dockerapi.IsNotFound(err) {
			return comments, true, dockerErr(err, "Container %s: cannot remove it", name)
		}
		comments = append(comments, fmt.Sprintf("Container %s removed (%s)", name, why))
	}

	if len(plan.watched) > 0 {
		restarted, err := e.restartOnWatch(ctx, s, c, plan, acted, byName)
		comments = append(comments, restarted...)
		if len(restarted) > 0 {
			changedAny = true
		}
		if err != nil {
			return comments, true, err
		}
	}
	if len(fine) > 0 && len(comments) == 0 {
		what := "Container " + fine[0]
		if len(fine) > 1 {
			what = "Containers " + strings.Join(fine, ", ")
		}
		comments = append(comments, what+" "+map[bool]string{true: "are", false: "is"}[len(fine) > 1]+" already in the correct state")
	}
	comments = append(comments, plan.notes...)
	return comments, changedAny, nil
}

// describe is what containers a plan runs, for a comment.
func (p *runningPlan) describe() string {
	if p.count == 0 {
		return p.base + " with no count"
	}
	return fmt.Sprintf("%s_1…%s_%d (count %d)", p.base, p.base, p.count, p.count)
}

// recreateReason says why a container is recreated.
func recreateReason(have string, want containerSpec, force bool) string {
	if force {
		return "force is set"
	}
	old, ok := decodeSpec(have)
	if !ok {
		return "it was not created by this agent (it has no configuration label)"
	}
	d := want.diff(old)
	if len(d) == 0 {
		return "its configuration label differs"
	}
	return strings.Join(d, ", ") + " changed"
}

// restartOnWatch restarts the running containers that were not created,
// recreated or started this round when a watched file changed since the
// last round (the 2014 watch map for docker.running: a file seen for the
// first time is recorded, not acted on). A container that fails to
// restart is recreated. Checksums are stored once every action
// succeeded, so a failed restart is tried again next round.
func (e *Executor) restartOnWatch(ctx context.Context, s *stateRun, c *dockerapi.Client, plan *runningPlan, acted map[string]bool, byName map[string]dockerapi.Container) ([]string, error) {
	sums, changedFiles, err := e.watchSums(s, plan.watched)
	if err != nil {
		return nil, dockerErr(err, "Container %s", plan.base)
	}
	isChanged := map[string]bool{}
	for _, f := range changedFiles {
		isChanged[f] = true
	}
	var files []string
	for _, w := range plan.watched {
		if _, err := os.Stat(e.watchFile(s.id, w.given)); err == nil && isChanged[w.path] {
			files = append(files, w.path)
		}
	}
	var comments []string
	if len(files) > 0 {
		why := strings.Join(files, ", ") + " changed"
		for _, w := range plan.want {
			if acted[w.name] {
				continue
			}
			if s.test {
				comments = append(comments, fmt.Sprintf("Container %s would be restarted: %s", w.name, why))
				continue
			}
			ct := byName[w.name]
			if err := c.Restart(ctx, ct.ID, stopTimeout); err != nil {
				if err := recreateContainer(ctx, c, ct.ID, w.name, w.spec, s.id, plan.auth); err != nil {
					return comments, err
				}
				comments = append(comments, fmt.Sprintf("Container %s recreated (restart failed): %s", w.name, why))
				continue
			}
			comments = append(comments, fmt.Sprintf("Container %s restarted: %s", w.name, why))
		}
	}
	if !s.test {
		if err := e.storeWatchSums(sums); err != nil {
			return comments, dockerErr(err, "Container %s: cannot store the checksums of the watched files", plan.base)
		}
	}
	return comments, nil
}

// createContainer creates and starts a container. An image that is not
// here is pulled first (with the state's login), as `docker run` does;
// the returned note says so.
func createContainer(ctx context.Context, c *dockerapi.Client, name string, spec containerSpec, stateID string, auth *dockerapi.Auth) (string, error) {
	note := ""
	id, err := c.Create(ctx, name, spec.body(name, stateID))
	if dockerapi.IsNotFound(err) {
		if _, perr := c.Pull(ctx, spec.Image, "", auth); perr != nil {
			return "", dockerErr(perr, "Container %s: image %s is not here and cannot be pulled", name, spec.Image)
		}
		note = " (image pulled)"
		id, err = c.Create(ctx, name, spec.body(name, stateID))
	}
	if err != nil {
		return "", dockerErr(err, "Container %s cannot be created", name)
	}
	return note, startContainer(ctx, c, id, name)
}

// recreateContainer replaces a container by a new one: the old one is
// stopped (stopTimeout, then killed) and removed, its anonymous volumes
// kept.
func recreateContainer(ctx context.Context, c *dockerapi.Client, oldID, name string, spec containerSpec, stateID string, auth *dockerapi.Auth) error {
	if err := c.Stop(ctx, oldID, stopTimeout); err != nil && !dockerapi.IsNotFound(err) {
		return dockerErr(err, "Container %s: cannot stop it", name)
	}
	if err := c.Remove(ctx, oldID, true); err != nil && !dockerapi.IsNotFound(err) {
		return dockerErr(err, "Container %s: cannot remove it", name)
	}
	_, err := createContainer(ctx, c, name, spec, stateID, auth)
	return err
}

// crashReport describes a stopped container that failed (a non-zero exit
// code, or killed for memory) with its last output; "" for one that was
// stopped or finished cleanly. A container that crashes is started again
// by each round, and each such round fails saying why.
func crashReport(ctx context.Context, c *dockerapi.Client, id, name string) (string, error) {
	st, err := c.Inspect(ctx, id)
	if err != nil {
		return "", dockerErr(err, "Container %s: cannot inspect it", name)
	}
	if st.State.ExitCode == 0 && !st.State.OOMKilled {
		return "", nil
	}
	msg := fmt.Sprintf("Container %s had stopped (%s, exit code %d", name, st.State.Status, st.State.ExitCode)
	if st.State.OOMKilled {
		msg += ", killed for lack of memory: see mem_limit"
	}
	msg += ")"
	if logs, err := c.LogsTail(ctx, id, 20); err == nil && strings.TrimSpace(logs) != "" {
		msg += ", its last output:\n" + strings.TrimRight(logs, "\n") + "\n"
	}
	return msg, nil
}

// startContainer starts a container and checks that it runs; one that
// stopped at once fails with its exit code and last output (one that
// stops a moment later is reported by the next round).
func startContainer(ctx context.Context, c *dockerapi.Client, id, name string) error {
	if err := c.Start(ctx, id); err != nil {
		return dockerErr(err, "Container %s does not start", name)
	}
	st, err := c.Inspect(ctx, id)
	if err != nil {
		return dockerErr(err, "Container %s: cannot inspect it after starting it", name)
	}
	if st.State.Running {
		return nil
	}
	msg := fmt.Sprintf("Container %s stopped right after it started (%s, exit code %d)", name, st.State.Status, st.State.ExitCode)
	if st.State.Error != "" {
		msg += ": " + st.State.Error
	}
	if logs, err := c.LogsTail(ctx, id, 20); err == nil && strings.TrimSpace(logs) != "" {
		msg += "; its last output:\n" + strings.TrimRight(logs, "\n")
	}
	return failf("%s", msg)
}

// deployFilesDir is where linux.docker.deploy writes its files, as the
// 2014 fork did: <conf_path>/docker-config/<container>/<path, '/' as '-'>
// (the default conf_path: the native executor is not told another).
const deployFilesDir = "/var/lib/visualops/opsagent/docker-config"

// maxDeployFile bounds one deploy file's content.
const maxDeployFile = 16 << 20

// deployFile is one file of linux.docker.deploy.
type deployFile struct {
	container string // where it is seen in the container
	path      string // instance path it is written to
	content   []byte
}

// dockerDeploy is linux.docker.deploy, composed as the 2014 adaptor
// split it: its files written (linux.file), the image pulled
// (linux.docker.pulled) and the containers run with the files bound
// (linux.docker.running). The files' contents are part of the
// containers' configuration: a change of a file recreates them (the 2014
// watch map's rerun), once, with the image pulled in the same round.
func (e *Executor) dockerDeploy(ctx context.Context, s *stateRun) (state.Result, error) {
	base, err := s.p.required("container")
	if err != nil {
		return state.Result{}, err
	}
	base = strings.TrimSpace(base)
	if !containerNameRe.MatchString(base) {
		return state.Result{}, &badParam{"container", fmt.Sprintf("%q is not a container name (two or more letters, digits, _ . -)", base)}
	}
	pairs, err := s.p.pairs("files")
	if err != nil {
		return state.Result{}, err
	}
	var files []deployFile
	var binds []string
	h := sha256.New()
	for _, f := range pairs {
		if !strings.HasPrefix(f.key, "/") || strings.Contains(f.key, ":") {
			return state.Result{}, &badParam{"files." + f.key, "the key must be the absolute path of the file in the container"}
		}
		if len(f.value) > maxDeployFile {
			return state.Result{}, &badParam{"files." + f.key, fmt.Sprintf("the content is larger than %d MiB", maxDeployFile>>20)}
		}
		df := deployFile{container: path.Clean(f.key), path: path.Join(deployFilesDir, base, strings.ReplaceAll(f.key, "/", "-")), content: []byte(f.value)}
		files = append(files, df)
		fmt.Fprintf(h, "%d:%s\n%d:%s\n", len(df.container), df.container, len(df.content), df.content)
		// The engine sees the instance as the agent does (in production the
		// root is "/"; a test's engine runs beside a test root).
		binds = append(binds, s.fs.HostPath(df.path)+":"+df.container)
	}
	digest := ""
	if len(files) > 0 {
		digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
	}
	// deploy's files are written, not bound from host paths as running's are.
	p := params{}
	for k, v := range s.p {
		if k != "files" {
			p[k] = v
		}
	}
	plan, err := parseRunning(p, binds, digest)
	if err != nil {
		return state.Result{}, err
	}
	c, notes, err := s.dockerEngine(ctx)
	if err != nil {
		return state.Result{}, failf("Container %s: %v", base, err)
	}
	if c == nil {
		return changed(fmt.Sprintf("Container %s would be deployed from %s: %s", base, plan.ref, strings.Join(notes, "; "))), nil
	}
	defer c.Close()
	comments := notes
	ch := len(notes) > 0
	for _, f := range files {
		old, err := s.fs.ReadFile(f.path, maxDeployFile)
		if err == nil && string(old) == string(f.content) {
			continue
		}
		ch = true
		if s.test {
			comments = append(comments, fmt.Sprintf("File %s (%s in the container) would be written", f.path, f.container))
			continue
		}
		if err := s.fs.MkdirAll(path.Dir(f.path), 0o755, nil); err != nil {
			return dockerFailure(comments, dockerErr(err, "Container %s: cannot create %s", base, path.Dir(f.path)))
		}
		if err := s.fs.WriteFileAtomic(f.path, f.content, 0o644, -1, -1); err != nil {
			return dockerFailure(comments, dockerErr(err, "Container %s", base))
		}
		comments = append(comments, fmt.Sprintf("File %s (%s in the container) written", f.path, f.container))
	}
	pull, err := s.pullImage(ctx, c, plan.ref, plan.auth)
	if pull.comment != "" && pull.changed {
		comments = append(comments, pull.comment)
	}
	if err != nil {
		res, err := dockerFailure(comments, err)
		res.Changed, res.Stdout = ch, pull.output
		return res, err
	}
	cc, cch, err := e.converge(ctx, s, c, plan, pull.changed && pull.oldID != "")
	comments = append(comments, cc...)
	if err != nil {
		res, err := dockerFailure(comments, err)
		res.Changed = ch || pull.changed || cch
		return res, err
	}
	if pull.changed && !s.test {
		if note := removeOldImage(ctx, c, pull.oldID); note != "" {
			comments = append(comments, note)
		}
	}
	return state.Result{OK: true, Changed: ch || pull.changed || cch, Comment: strings.Join(comments, "\n"), Stdout: pull.output}, nil
}
