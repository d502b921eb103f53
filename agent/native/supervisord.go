package native

import (
	"bufio"
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
	"golang.org/x/sys/unix"
)

// supervisordWait bounds how long the state waits for supervisord to
// answer after a start or a reload, and for a program to leave STARTING.
const supervisordWait = 60 * time.Second

// supervisord is linux.supervisord: supervisord runs with config, and
// every program (or group) of name runs under it.
//
// supervisor comes from the distribution's package (Debian's
// "supervisor"; the 2014 fork installed it with pip). The state of the
// programs is read from supervisord itself, over its XML-RPC interface
// (the unix socket or http server of the [supervisorctl] section), so a
// round with everything running starts no process; supervisord and
// supervisorctl run only to change something: supervisord -c config
// when it is not running, supervisorctl start for a program that is not
// running (reread and add first when supervisord does not know it, as
// Salt 2014 did), supervisorctl restart for a running program whose
// watched file changed since the last round, and supervisorctl reload
// when config itself changed ("supervisord will be restarted" —
// module.json), which restarts every program. A watched file seen for the
// first time restarts a program that was already running (the 2014
// adaptor's tfirst); config seen for the first time does not reload.
// The state waits for the programs to leave STARTING and fails naming
// any that does not reach RUNNING.
func (e *Executor) supervisord(ctx context.Context, s *stateRun) (state.Result, error) {
	const module = "linux.supervisord"
	p := s.p
	conf, err := absPath(p, "config")
	if err != nil {
		return state.Result{}, err
	}
	names, err := p.list("name")
	if err != nil {
		return state.Result{}, err
	}
	if len(names) == 0 {
		return state.Result{}, &badParam{"name", "is required: the programs (or groups) to run"}
	}
	watch, watchNote, err := watchParam(p)
	if err != nil {
		return state.Result{}, err
	}
	what := "Supervisor programs " + strings.Join(names, ", ")
	if len(names) == 1 {
		what = "Supervisor program " + names[0]
	}
	var ch, pre changes
	missing, err := s.need(ctx, preSupervd, &pre)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	data, err := s.fs.ReadFile(conf, 1<<20)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return state.Result{}, failf("%s: the configuration %s does not exist: write it first (linux.file)", module, conf)
		}
		return state.Result{}, failf("%s: %s: %v", module, conf, err)
	}
	ini := parseIni(data)
	if b, _ := strconv.ParseBool(ini.get("supervisord", "nodaemon")); b {
		return state.Result{}, failf("%s: %s sets nodaemon = true: supervisord would not return to the agent; remove it (the agent starts supervisord as a daemon)", module, conf)
	}
	client, err := s.supervisorClient(conf, ini)
	if err != nil {
		return state.Result{}, failf("%s: %s: %v", module, conf, err)
	}

	// Watched files (and config itself) against the last round's
	// checksums, kept as linux.service keeps its own.
	sums := map[string]string{}
	conf0, err := e.watchCheck(s, watched{given: conf, path: conf}, sums)
	if err != nil {
		return state.Result{}, failf("%s: %v", module, err)
	}
	confChanged, confSeen := conf0.changed, conf0.seen
	watchChanged := false
	for _, w := range watch {
		c, err := e.watchCheck(s, w, sums)
		if err != nil {
			return state.Result{}, failf("%s: %v", module, err)
		}
		if c.changed || !c.seen {
			watchChanged = true
		}
	}

	procs, up := client.processes(ctx)
	started := false // supervisord (re)started by this state: its programs start with it
	switch {
	case !up:
		ch.add("supervisord started")
		started = true
		if !s.test && !missing {
			if _, err := s.sys.Check(ctx, system.Cmd{Tool: "supervisord", Args: []string{"-c", conf}}); err != nil {
				return state.Result{}, failf("%s: %v", module, err)
			}
			if procs, err = client.await(ctx, nil); err != nil {
				return state.Result{}, failf("%s: supervisord -c %s started but does not answer on %s: %v", module, conf, client.url, err)
			}
		}
	case confChanged && confSeen:
		ch.add("supervisord restarted (%s changed)", conf)
		started = true
		if !s.test {
			if err := s.supervisorctl(ctx, conf, "reload"); err != nil {
				return state.Result{}, failf("%s: %v", module, err)
			}
			if procs, err = client.await(ctx, nil); err != nil {
				return state.Result{}, failf("%s: supervisord did not answer after its reload: %v", module, err)
			}
		}
	}

	var waitFor []string
	for _, name := range names {
		if s.test && (started || missing) {
			break // what runs depends on supervisord, which is not running yet
		}
		mine := matchProcesses(procs, name)
		if len(mine) == 0 {
			// Not known to supervisord: reread the configuration and add
			// it, as Salt 2014 did.
			ch.add("%s added", name)
			if s.test {
				continue
			}
			if err := s.supervisorctl(ctx, conf, "reread"); err != nil {
				return state.Result{}, failf("%s: %v", module, err)
			}
			if err := s.supervisorctl(ctx, conf, "add", name); err != nil {
				return state.Result{}, failf("%s: no program or group %s in %s (%v)", module, name, conf, err)
			}
			if procs, err = client.await(ctx, nil); err != nil {
				return state.Result{}, failf("%s: %v", module, err)
			}
			if mine = matchProcesses(procs, name); len(mine) == 0 {
				return state.Result{}, failf("%s: no program or group %s in %s", module, name, conf)
			}
		}
		target := name
		if mine[0].Group == name && mine[0].Name != name {
			target = name + ":*"
		}
		stopped, starting := false, false
		for _, pr := range mine {
			switch pr.State {
			case "RUNNING":
			case "STARTING", "BACKOFF":
				starting = true
			default:
				stopped = true
			}
		}
		switch {
		case stopped:
			ch.add("%s started", name)
			if !s.test {
				if err := s.supervisorctl(ctx, conf, "start", target); err != nil {
					return state.Result{}, failf("%s: %v", module, err)
				}
			}
			waitFor = append(waitFor, name)
		case starting:
			waitFor = append(waitFor, name)
		case watchChanged && !started:
			ch.add("%s restarted (watched file changed)", name)
			if !s.test {
				if err := s.supervisorctl(ctx, conf, "restart", target); err != nil {
					return state.Result{}, failf("%s: %v", module, err)
				}
			}
			waitFor = append(waitFor, name)
		}
	}
	ch = append(ch, pre...)
	if s.test {
		return s.result(what, ch), nil
	}
	if len(waitFor) > 0 {
		if _, err := client.await(ctx, func(procs []supervisorProcess) (bool, error) {
			for _, name := range waitFor {
				for _, pr := range matchProcesses(procs, name) {
					switch pr.State {
					case "RUNNING":
					case "STARTING", "BACKOFF":
						return false, nil
					default:
						return false, fmt.Errorf("%s is %s%s", pr.full(), pr.State, pr.why())
					}
				}
			}
			return true, nil
		}); err != nil {
			return state.Result{}, failf("%s: %v (see its log, and %s)", module, err, conf)
		}
	}
	if err := e.storeWatchSums(sums); err != nil {
		return state.Result{}, failf("%s: cannot record the checksums of the watched files: %v", module, err)
	}
	res := s.result(what, ch)
	if watchNote != "" {
		res.Comment += " " + watchNote
	}
	return res, nil
}

// supervisorctl runs supervisorctl -c conf with args; its "ERROR" lines
// fail it even with exit code 0 (supervisor 3 exits 0 on them).
func (s *stateRun) supervisorctl(ctx context.Context, conf string, args ...string) error {
	res, err := s.sys.Check(ctx, system.Cmd{Tool: "supervisorctl", Args: append([]string{"-c", conf}, args...)})
	if err != nil {
		return err
	}
	if strings.Contains(res.Output, "ERROR") {
		return fmt.Errorf("supervisorctl %s: %s", strings.Join(args, " "), strings.TrimSpace(res.Output))
	}
	return nil
}

// supervisorProcess is one entry of supervisor.getAllProcessInfo.
type supervisorProcess struct {
	Name, Group, State, Description, SpawnErr string
	ExitStatus                                int
}

func (p supervisorProcess) full() string {
	if p.Group == "" || p.Group == p.Name {
		return p.Name
	}
	return p.Group + ":" + p.Name
}

func (p supervisorProcess) why() string {
	switch {
	case p.SpawnErr != "":
		return " (" + p.SpawnErr + ")"
	case p.Description != "":
		return " (" + p.Description + ")"
	}
	return ""
}

// matchProcesses finds name among the processes: a program by its full
// name, or every process of a group.
func matchProcesses(procs []supervisorProcess, name string) []supervisorProcess {
	var out []supervisorProcess
	for _, p := range procs {
		if p.full() == name || p.Name == name && (p.Group == "" || p.Group == name) {
			return []supervisorProcess{p}
		}
		if p.Group == name {
			out = append(out, p)
		}
	}
	return out
}

// supervisorRPC talks to supervisord's XML-RPC interface.
type supervisorRPC struct {
	url        string // as configured, for messages
	endpoint   string
	user, pass string
	hc         *http.Client
}

// supervisorClient reads where supervisorctl would connect: [supervisorctl]
// serverurl (default http://localhost:9001, supervisor's own), unix:// paths
// taken inside the root.
func (s *stateRun) supervisorClient(conf string, ini iniFile) (*supervisorRPC, error) {
	url := ini.get("supervisorctl", "serverurl")
	if url == "" {
		url = "http://localhost:9001"
	}
	url = strings.ReplaceAll(url, "%(here)s", path.Dir(conf))
	c := &supervisorRPC{url: url, user: ini.get("supervisorctl", "username"), pass: ini.get("supervisorctl", "password")}
	if sock, ok := strings.CutPrefix(url, "unix://"); ok {
		fsys := s.fs
		dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
			real, err := fsys.ResolveLinks(sock)
			if err != nil {
				return nil, err
			}
			host := fsys.HostPath(real)
			if len(host) < 100 {
				var d net.Dialer
				return d.DialContext(ctx, "unix", host)
			}
			// Longer than a socket address holds: connect through a
			// descriptor of the socket file.
			fd, err := unix.Open(host, unix.O_PATH|unix.O_CLOEXEC, 0)
			if err != nil {
				return nil, err
			}
			defer unix.Close(fd)
			var d net.Dialer
			return d.DialContext(ctx, "unix", fmt.Sprintf("/proc/self/fd/%d", fd))
		}
		c.hc = &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}, Timeout: 10 * time.Second}
		c.endpoint = "http://localhost/RPC2"
		return c, nil
	}
	if !strings.HasPrefix(url, "http://") {
		return nil, fmt.Errorf("[supervisorctl] serverurl %q is neither unix:// nor http://", url)
	}
	c.hc = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	c.endpoint = strings.TrimSuffix(url, "/") + "/RPC2"
	return c, nil
}

// processes asks supervisord for its processes; up is false when it does
// not answer (not running).
func (c *supervisorRPC) processes(ctx context.Context) ([]supervisorProcess, bool) {
	procs, err := c.getAllProcessInfo(ctx)
	return procs, err == nil
}

// await polls supervisord until it answers and done (nil: answering is
// enough) says so, or fails.
func (c *supervisorRPC) await(ctx context.Context, done func([]supervisorProcess) (bool, error)) ([]supervisorProcess, error) {
	deadline := time.Now().Add(supervisordWait)
	var last error
	for {
		procs, err := c.getAllProcessInfo(ctx)
		if err == nil {
			if done == nil {
				return procs, nil
			}
			ok, err := done(procs)
			if err != nil {
				return nil, err
			}
			if ok {
				return procs, nil
			}
			last = errors.New("programs still starting")
		} else {
			last = err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("gave up after %v: %w", supervisordWait, last)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *supervisorRPC) getAllProcessInfo(ctx context.Context) ([]supervisorProcess, error) {
	body := `<?xml version="1.0"?><methodCall><methodName>supervisor.getAllProcessInfo</methodName><params></params></methodCall>`
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.endpoint, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "text/xml")
	if c.user != "" {
		req.SetBasicAuth(c.user, c.pass)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s answered %s", c.url, resp.Status)
	}
	return parseProcessInfo(data)
}

// xrValue is an XML-RPC value, enough of it for supervisor's answers.
type xrValue struct {
	String *string   `xml:"string"`
	Int    *int      `xml:"int"`
	I4     *int      `xml:"i4"`
	Struct *xrStruct `xml:"struct"`
	Array  *struct {
		Values []xrValue `xml:"data>value"`
	} `xml:"array"`
	Text string `xml:",chardata"`
}

type xrStruct struct {
	Members []struct {
		Name  string  `xml:"name"`
		Value xrValue `xml:"value"`
	} `xml:"member"`
}

func (v xrValue) str() string {
	if v.String != nil {
		return *v.String
	}
	if v.Int != nil {
		return strconv.Itoa(*v.Int)
	}
	if v.I4 != nil {
		return strconv.Itoa(*v.I4)
	}
	return strings.TrimSpace(v.Text)
}

// parseProcessInfo reads supervisor.getAllProcessInfo's answer.
func parseProcessInfo(data []byte) ([]supervisorProcess, error) {
	var resp struct {
		Params []xrValue `xml:"params>param>value"`
		Fault  *xrValue  `xml:"fault>value"`
	}
	if err := xml.Unmarshal(data, &resp); err != nil {
		return nil, fmt.Errorf("supervisord's answer is not XML-RPC: %w", err)
	}
	if resp.Fault != nil {
		msg := ""
		if resp.Fault.Struct != nil {
			for _, m := range resp.Fault.Struct.Members {
				if m.Name == "faultString" {
					msg = m.Value.str()
				}
			}
		}
		return nil, fmt.Errorf("supervisord answered a fault: %s", msg)
	}
	if len(resp.Params) != 1 || resp.Params[0].Array == nil {
		return nil, errors.New("supervisord's answer holds no process list")
	}
	var out []supervisorProcess
	for _, v := range resp.Params[0].Array.Values {
		if v.Struct == nil {
			continue
		}
		var p supervisorProcess
		for _, m := range v.Struct.Members {
			switch m.Name {
			case "name":
				p.Name = m.Value.str()
			case "group":
				p.Group = m.Value.str()
			case "statename":
				p.State = m.Value.str()
			case "description":
				p.Description = m.Value.str()
			case "spawnerr":
				p.SpawnErr = m.Value.str()
			case "exitstatus":
				p.ExitStatus, _ = strconv.Atoi(m.Value.str())
			}
		}
		out = append(out, p)
	}
	return out, nil
}

// iniFile is a supervisor configuration, as much as the agent reads.
type iniFile map[string]map[string]string

// parseIni reads the sections and keys of a supervisor configuration
// (ConfigParser syntax: "; " comments, key = value or key: value).
func parseIni(data []byte) iniFile {
	ini := iniFile{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == ';' || line[0] == '#' {
			continue
		}
		if line[0] == '[' && strings.HasSuffix(line, "]") {
			section = strings.TrimSpace(line[1 : len(line)-1])
			continue
		}
		i := strings.IndexAny(line, "=:")
		if i < 0 {
			continue
		}
		k, v := strings.ToLower(strings.TrimSpace(line[:i])), strings.TrimSpace(line[i+1:])
		if j := strings.Index(v, " ;"); j >= 0 {
			v = strings.TrimSpace(v[:j])
		}
		if ini[section] == nil {
			ini[section] = map[string]string{}
		}
		ini[section][k] = v
	}
	return ini
}

func (f iniFile) get(section, key string) string { return f[section][key] }
