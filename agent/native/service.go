package native

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/rootfs"
	"github.com/visualops/opsagent/internal/system"
)

// maxWatched bounds what is read of a watched file to checksum it.
const maxWatched = 64 << 20

// service is linux.service: each named service runs, and when a watched
// file changed since the last round, each one's action runs.
//
// Services are driven through the init system (system.Host: systemctl
// where systemd is PID 1, else service(8) or the init script). A service
// not running is started, and must then report running. Watched files
// are compared with the checksums of the last round, kept in the
// [global] watch directory under the Salt bridge's names
// (<state id>-<path, '/' as '-'>.cksum, MD5), so switching engines does
// not trigger an action. A file with no checksum yet counts as changed
// (the 2014 watch map's tfirst): a service already running may have read
// it before an earlier state wrote it. A service this state has just
// started read its files now, so no action runs for it. New checksums
// are stored only once every action succeeded, so a failed reload is
// tried again next round.
func (e *Executor) service(ctx context.Context, s *stateRun) (state.Result, error) {
	svcs, err := serviceParams(s.p)
	if err != nil {
		return state.Result{}, err
	}
	watched, watchNote, err := watchParam(s.p)
	if err != nil {
		return state.Result{}, err
	}
	for _, sv := range svcs {
		if err := s.sys.ServiceAvailable(sv.name); err != nil {
			return state.Result{}, failf("Service %s: %v", sv.name, err)
		}
	}
	var comments, out []string
	changed := false
	started := map[string]bool{}
	for _, sv := range svcs {
		running, err := s.sys.ServiceRunning(ctx, sv.name)
		if err != nil {
			return state.Result{}, failf("Service %s: cannot tell whether it runs: %v", sv.name, err)
		}
		if running {
			comments = append(comments, fmt.Sprintf("Service %s is already running", sv.name))
			continue
		}
		changed, started[sv.name] = true, true
		if s.test {
			comments = append(comments, fmt.Sprintf("Service %s would be started", sv.name))
			continue
		}
		if err := s.sys.ServiceDo(ctx, sv.name, system.ServiceStart); err != nil {
			return state.Result{}, failf("Service %s failed to start: %v", sv.name, err)
		}
		if ok, err := s.sys.ServiceRunning(ctx, sv.name); err != nil || !ok {
			return state.Result{}, failf("Service %s was started but does not run (its status says it is stopped): see its logs", sv.name)
		}
		comments = append(comments, fmt.Sprintf("Service %s started", sv.name))
	}

	sums, changedFiles, err := e.watchSums(s, watched)
	if err != nil {
		return state.Result{}, failf("Service %s: %v", svcs[0].name, err)
	}
	if len(changedFiles) > 0 {
		why := strings.Join(changedFiles, ", ") + " changed"
		for _, sv := range svcs {
			if started[sv.name] {
				continue // it has just read its files
			}
			changed = true
			if s.test {
				comments = append(comments, fmt.Sprintf("Service %s would be %s: %s", sv.name, sv.actionDone(), why))
				continue
			}
			c, output, err := s.runServiceAction(ctx, sv)
			out = append(out, output...)
			if err != nil {
				return state.Result{Stdout: strings.Join(out, "\n")}, failf("Service %s: %s, and %v", sv.name, why, err)
			}
			comments = append(comments, fmt.Sprintf("Service %s %s: %s", sv.name, c, why))
		}
	}
	if !s.test {
		if err := e.storeWatchSums(sums); err != nil {
			return state.Result{}, failf("Service %s: cannot store the checksums of the watched files: %v", svcs[0].name, err)
		}
	}
	if watchNote != "" {
		comments = append(comments, watchNote)
	}
	return state.Result{OK: true, Changed: changed, Comment: strings.Join(comments, "\n"), Stdout: strings.Join(out, "\n")}, nil
}

// serviceAction is one service of a state and what to do when a watched
// file changes: "" (reload, falling back to restart), "reload",
// "restart", or a command line.
type serviceAction struct{ name, action string }

func (sv serviceAction) actionDone() string {
	switch sv.action {
	case "":
		return "reloaded (or restarted)"
	case "reload":
		return "reloaded"
	case "restart":
		return "restarted"
	}
	return fmt.Sprintf("acted on with %q", abbreviate(sv.action, maxLabelCommand))
}

// runServiceAction runs sv's action and says what it did.
func (s *stateRun) runServiceAction(ctx context.Context, sv serviceAction) (string, []string, error) {
	switch sv.action {
	case "", "reload":
		err := s.sys.ServiceDo(ctx, sv.name, system.ServiceReload)
		if err == nil {
			return "reloaded", nil, nil
		}
		if sv.action == "reload" {
			return "", nil, fmt.Errorf("reload failed: %w", err)
		}
		if err2 := s.sys.ServiceDo(ctx, sv.name, system.ServiceRestart); err2 != nil {
			return "", nil, fmt.Errorf("reload failed (%v), then restart failed: %w", err, err2)
		}
		return "restarted (reload failed)", nil, nil
	case "restart":
		if err := s.sys.ServiceDo(ctx, sv.name, system.ServiceRestart); err != nil {
			return "", nil, fmt.Errorf("restart failed: %w", err)
		}
		return "restarted", nil, nil
	}
	output, err := s.sys.ShellCommand(ctx, sv.action)
	label := fmt.Sprintf("command %q", abbreviate(sv.action, maxLabelCommand))
	var lines []string
	if strings.TrimSpace(output) != "" {
		lines = []string{output}
	}
	if err != nil {
		var te *system.ToolError
		if errors.As(err, &te) {
			return "", lines, fmt.Errorf("%s failed with exit code %d", label, te.ExitCode)
		}
		return "", lines, fmt.Errorf("%s could not run: %w", label, err)
	}
	return label + " run", lines, nil
}

// serviceParams reads name: a list of services, a list of {"key":
// service, "value": action}, an object of service → action, or one name.
func serviceParams(p params) ([]serviceAction, error) {
	raw, ok := p["name"]
	if !ok || string(raw) == "null" {
		return nil, &badParam{"name", "is required: the services to run"}
	}
	var out []serviceAction
	add := func(param, name string, action any) error {
		name = strings.TrimSpace(name)
		if name == "" {
			return nil
		}
		if err := system.CheckServiceName(name); err != nil {
			return &badParam{param, err.Error()}
		}
		act := ""
		switch v := action.(type) {
		case nil:
		case string:
			act = strings.TrimSpace(v)
		default:
			return &badParam{param, fmt.Sprintf("the action of %s must be empty, reload, restart or a command, got %v", name, v)}
		}
		for _, sv := range out {
			if sv.name == name {
				return &badParam{param, fmt.Sprintf("service %s is named twice", name)}
			}
		}
		out = append(out, serviceAction{name: name, action: act})
		return nil
	}
	var one string
	var obj map[string]any
	var items []json.RawMessage
	switch {
	case json.Unmarshal(raw, &one) == nil:
		if err := add("name", one, nil); err != nil {
			return nil, err
		}
	case json.Unmarshal(raw, &obj) == nil:
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if err := add("name."+k, k, obj[k]); err != nil {
				return nil, err
			}
		}
	case json.Unmarshal(raw, &items) == nil:
		for i, it := range items {
			param := fmt.Sprintf("name[%d]", i)
			var s string
			var kv struct {
				Key   *string `json:"key"`
				Value any     `json:"value"`
			}
			switch {
			case json.Unmarshal(it, &s) == nil:
				if err := add(param, s, nil); err != nil {
					return nil, err
				}
			case json.Unmarshal(it, &kv) == nil && kv.Key != nil:
				if err := add(param, *kv.Key, kv.Value); err != nil {
					return nil, err
				}
			default:
				return nil, &badParam{param, "must be a service name or {\"key\": service, \"value\": action}, got " + kindOf(it)}
			}
		}
	default:
		return nil, &badParam{"name", "must be a list of services, got " + kindOf(raw)}
	}
	if len(out) == 0 {
		return nil, &badParam{"name", "is required: the services to run"}
	}
	return out, nil
}

// watched is one watched file: as the parameter wrote it (the checksum
// file is named after that, as the bridge names it) and cleaned.
type watched struct{ given, path string }

// watchParam reads watch: a list of absolute paths. A boolean (recipes
// written for the 2014 adaptor have "watch": true) watches nothing; the
// note says so.
func watchParam(p params) ([]watched, string, error) {
	raw, ok := p["watch"]
	if !ok || string(raw) == "null" {
		return nil, "", nil
	}
	var b bool
	if json.Unmarshal(raw, &b) == nil {
		return nil, "(parameter watch is a boolean, not a list of files: nothing is watched)", nil
	}
	l, err := p.list("watch")
	if err != nil {
		return nil, "", err
	}
	var out []watched
	for i, f := range l {
		f = strings.TrimSpace(f)
		if !strings.HasPrefix(f, "/") {
			return nil, "", &badParam{fmt.Sprintf("watch[%d]", i), fmt.Sprintf("must be an absolute path, got %q", f)}
		}
		out = append(out, watched{given: f, path: rootfs.Clean(f)})
	}
	return out, "", nil
}

// watchSums checksums the watched files (MD5, hex; "" for one that
// cannot be read, as the bridge does) and lists those that changed
// since the stored checksums: no stored checksum counts as a change.
func (e *Executor) watchSums(s *stateRun, files []watched) (map[string]string, []string, error) {
	sums := map[string]string{}
	var changed []string
	for _, f := range files {
		c, err := e.watchCheck(s, f, sums)
		if err != nil {
			return nil, nil, err
		}
		if c.changed || !c.seen {
			changed = append(changed, f.path)
		}
	}
	return sums, changed, nil
}

// watchCheck is one watched file against its stored checksum.
type watchCheck struct {
	changed bool // stored and different
	seen    bool // a checksum was stored
}

// watchCheck checksums one watched file into sums (keyed by its checksum
// file, for storeWatchSums) and compares it with the stored checksum. It
// is the one record of watched files: linux.service and
// linux.supervisord keep theirs alike, in [global] watch.
func (e *Executor) watchCheck(s *stateRun, f watched, sums map[string]string) (watchCheck, error) {
	sum := ""
	data, err := s.fs.ReadFile(f.path, maxWatched)
	switch {
	case errors.Is(err, rootfs.ErrTooLarge):
		return watchCheck{}, fmt.Errorf("watched file %s is larger than %d MiB: watch the configuration files instead", f.path, maxWatched>>20)
	case err == nil:
		h := md5.Sum(data)
		sum = hex.EncodeToString(h[:])
	}
	file := e.watchFile(s.id, f.given)
	sums[file] = sum
	old, err := os.ReadFile(file)
	if err != nil {
		return watchCheck{}, nil
	}
	return watchCheck{seen: true, changed: strings.TrimSpace(string(old)) != sum}, nil
}

// watchFile is the checksum file of a watched path: the name the Salt
// bridge gives it (a '/' in the state id, which the bridge would take
// for a directory, is a '-' too).
func (e *Executor) watchFile(stateID, given string) string {
	id := strings.ReplaceAll(stateID, "/", "-")
	return filepath.Join(e.opts.WatchDir, id+"-"+strings.ReplaceAll(given, "/", "-")+".cksum")
}

func (e *Executor) storeWatchSums(sums map[string]string) error {
	if len(sums) == 0 {
		return nil
	}
	if err := os.MkdirAll(e.opts.WatchDir, 0o755); err != nil {
		return err
	}
	for file, sum := range sums {
		if _, err := fsutil.WriteFileIfChanged(file, []byte(sum), 0o644); err != nil {
			return err
		}
	}
	return nil
}
