package native

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/system"
)

// cronMarker is the line Salt 2014's cron module put above the jobs it
// managed (salt/modules/cron.py, TAG): lines above it are the user's own,
// lines below it are the agent's. Keeping it means an instance first
// managed by the 2014 agent finds its jobs where they are and gets no
// duplicates.
const cronMarker = "# Lines below here are managed by Salt, do not edit"

// cronFields are the schedule parameters, in crontab's column order.
var cronFields = []string{"minute", "hour", "day-of-month", "month", "day-of-week"}

// cronjob is linux.cronjob: each command of cmd is a job in user's
// crontab with the schedule asked for.
//
// A job is identified by its command (white space runs count as one
// space, as in Salt 2014) among the lines below the marker; a job found
// with another schedule gets the new one in place; a missing one is
// added at the end, below the marker (which is added first when the
// crontab has none). Every other line is kept as it is. The crontab is
// read from cron's spool file and installed with crontab -u USER - only
// when it changes, so cron's daemon sees the change; when crontab is not
// installed, cron (cronie on RHEL) is installed first.
func (e *Executor) cronjob(ctx context.Context, s *stateRun) (state.Result, error) {
	user, err := s.p.str("user")
	if err != nil {
		return state.Result{}, err
	}
	if user = strings.TrimSpace(user); user == "" {
		user = "root"
	}
	if err := system.CheckAccountName(user); err != nil {
		return state.Result{}, &badParam{"user", err.Error()}
	}
	cmds, err := cronCommands(s.p)
	if err != nil {
		return state.Result{}, err
	}
	sched, err := cronSchedule(s.p)
	if err != nil {
		return state.Result{}, err
	}
	what := "Crontab of " + user
	if u, err := findUser(s.sys, user); err != nil || u == nil {
		if err == nil {
			err = fmt.Errorf("no such user in /etc/passwd (create it first with linux.user)")
		}
		return state.Result{}, failf("%s: %v", what, err)
	}
	var pre changes
	if _, err := s.need(ctx, system.CronPrerequisite, &pre); err != nil {
		return state.Result{}, failf("%s: %v", what, err)
	}
	note := strings.Join(pre, ", ")
	cur, err := s.sys.Crontab(user)
	if err != nil {
		return state.Result{}, failf("%s: cannot read it: %v", what, err)
	}
	next, ch := mergeCrontab(cur, cmds, sched)
	if len(ch) > 0 && !s.test {
		if err := s.sys.SetCrontab(ctx, user, next); err != nil {
			return state.Result{}, failf("%s: %v", what, err)
		}
	}
	res := s.result(what, ch)
	if note != "" {
		res.Comment = note + "; " + res.Comment
		res.Changed = true
	}
	return res, nil
}

// cronCommands reads cmd: a list of commands (or one string); a
// multi-line entry is one job per line. An empty entry is refused: it
// would be a job that runs nothing.
func cronCommands(p params) ([]string, error) {
	raw, ok := p["cmd"]
	if !ok || string(raw) == "null" {
		return nil, &badParam{"cmd", "is required: a list of commands, one job each"}
	}
	var items []json.RawMessage
	if json.Unmarshal(raw, &items) != nil {
		items = []json.RawMessage{raw}
	}
	var out []string
	for i, it := range items {
		name := fmt.Sprintf("cmd[%d]", i)
		var s string
		if json.Unmarshal(it, &s) != nil {
			var kv struct {
				Key *string `json:"key"`
			}
			if json.Unmarshal(it, &kv) != nil || kv.Key == nil {
				return nil, &badParam{name, "must be a command (a string), got " + kindOf(it)}
			}
			s = *kv.Key
		}
		if strings.TrimSpace(s) == "" {
			return nil, &badParam{name, "is empty: write the command the job runs, or remove the entry"}
		}
		for _, line := range strings.Split(s, "\n") {
			if line = strings.TrimSpace(strings.TrimSuffix(line, "\r")); line != "" {
				out = append(out, line)
			}
		}
	}
	if len(out) == 0 {
		return nil, &badParam{"cmd", "is required: a list of commands, one job each"}
	}
	return out, nil
}

// cronSchedule is the five schedule fields joined by spaces ("*" for
// each one not given), lower case as Salt 2014 wrote them.
func cronSchedule(p params) (string, error) {
	var f []string
	for _, name := range cronFields {
		v, err := p.str(name)
		if err != nil {
			return "", err
		}
		v = strings.ToLower(strings.TrimSpace(v))
		if v == "" {
			v = "*"
		}
		if strings.ContainsFunc(v, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			return "", &badParam{name, fmt.Sprintf("%q must be one crontab field, without spaces (e.g. */5 or 1,15)", v)}
		}
		f = append(f, v)
	}
	return strings.Join(f, " "), nil
}

// cronKey is a command as it identifies a job: white space runs as one
// space.
func cronKey(cmd string) string { return strings.Join(strings.Fields(cmd), " ") }

// cronJobLine reads a crontab line as a job: its schedule and its
// command's key. Comments, @-specials, variable settings and blank lines
// are not jobs (Salt 2014: a job line has more than five fields).
func cronJobLine(line string) (sched, key string, ok bool) {
	t := strings.TrimSpace(line)
	if t == "" || t[0] == '#' || t[0] == '@' {
		return "", "", false
	}
	f := strings.Fields(t)
	if len(f) <= 5 {
		return "", "", false
	}
	return strings.Join(f[:5], " "), strings.Join(f[5:], " "), true
}

// mergeCrontab returns the crontab cur with each of cmds scheduled at
// sched, and what changed.
func mergeCrontab(cur string, cmds []string, sched string) (string, changes) {
	var lines []string
	if cur != "" {
		lines = strings.Split(strings.TrimSuffix(cur, "\n"), "\n")
	}
	marker := -1
	for i, l := range lines {
		if strings.TrimRight(l, " \t\r") == cronMarker {
			marker = i
			break
		}
	}
	var ch changes
	for _, cmd := range cmds {
		key, found := cronKey(cmd), -1
		if marker >= 0 {
			for i := marker + 1; i < len(lines); i++ {
				if _, k, ok := cronJobLine(lines[i]); ok && k == key {
					found = i
					break
				}
			}
		}
		want := sched + " " + cmd
		switch {
		case found < 0:
			if marker < 0 {
				lines = append(lines, cronMarker)
				marker = len(lines) - 1
			}
			lines = append(lines, want)
			ch.add("job %q added", cmd)
		default:
			if have, _, _ := cronJobLine(lines[found]); have != sched {
				lines[found] = want
				ch.add("job %q scheduled %s", cmd, sched)
			}
		}
	}
	if len(ch) == 0 {
		return cur, nil
	}
	return strings.Join(lines, "\n") + "\n", ch
}
