package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// countingRecipe is k linux.cmd states that each append a line to
// /srv/count/tokens and print how many lines it holds, then a meta.wait the
// test never releases: every round ends blocked at the wait, with no
// command running, which is when the test reloads, stops or checks. Each
// execution leaves one number in the file and, once delivered, one StateLog
// whose stdout is that number.
func countingRecipe(k int) string {
	var states []string
	for i := 1; i <= k; i++ {
		states = append(states, fmt.Sprintf(`{"id":"c%02d","module":"linux.cmd","parameter":{"cmd":"echo x >> tokens && wc -l < tokens","cwd":"/srv/count"}}`, i))
	}
	states = append(states, `{"id":"wait","module":"meta.wait","parameter":{"state":["@{nobody.state.1}"]}}`)
	return `{"state":[` + strings.Join(states, ",") + `]}`
}

// everyRunStoredOnce compares what ran (the numbers 1..n in the token
// file) with what the backend stored: a lost StateLog is a missing number,
// one stored twice a repeat.
func everyRunStoredOnce(b *backendProc, root, app, id string) (bool, string) {
	ran := statesRun(root)
	seen := map[int]int{}
	for _, l := range b.logs(nil, app) {
		if l.InstanceID != id || !strings.HasPrefix(l.StateID, "c") || l.Stdout == nil {
			continue
		}
		n, _ := strconv.Atoi(strings.TrimSpace(*l.Stdout))
		seen[n]++
	}
	var missing, twice []int
	for n := 1; n <= ran; n++ {
		switch seen[n] {
		case 0:
			missing = append(missing, n)
		case 1:
		default:
			twice = append(twice, n)
		}
	}
	return ran > 0 && len(missing) == 0 && len(twice) == 0 && len(seen) == ran,
		fmt.Sprintf("%d states ran, the backend holds %d; missing: %v; stored twice: %v", ran, len(seen), missing, twice)
}

// statesRun is how many of countingRecipe's commands ran below root.
func statesRun(root string) int {
	data, _ := os.ReadFile(filepath.Join(root, "srv/count/tokens"))
	return bytes.Count(data, []byte("\n"))
}

// fillDisk stops the agent's files from growing more than a few bytes past
// the outbox file's size now (RLIMIT_FSIZE, set on the running process):
// the outbox's next write stores part of a record and fails with EFBIG, as
// a write to a full disk stores what fits and fails with ENOSPC, and the
// outbox falls back to memory. It needs no privilege (a full filesystem
// would need a mount). The returned func frees the "disk".
func fillDisk(t *testing.T, pid int, root string) (free func()) {
	t.Helper()
	st, err := os.Stat(filepath.Join(root, "var/lib/visualops/opsagent/outbox/outbox.log"))
	if err != nil {
		t.Fatal(err)
	}
	var old unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &unix.Rlimit{Cur: uint64(st.Size()) + 5, Max: unix.RLIM_INFINITY}, &old); err != nil {
		t.Fatalf("prlimit: %v", err)
	}
	return func() {
		if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &old, nil); err != nil {
			t.Fatalf("prlimit: %v", err)
		}
	}
}

// TestFullDiskReloadsAndRestartsLoseNoStateLog: the outbox falls back to
// memory when its disk is full; whatever happens then, every StateLog the
// agent produced reaches the backend exactly once, and status counts
// nothing dropped.
//
//   - reload: the disk fills, StateLogs are delivered from memory, the disk
//     is freed and SIGHUP sent (what re-running the userdata does). The
//     reload used to reopen the outbox from the stale file and hand out
//     the same seqs again; the backend dropped the new StateLogs as
//     duplicates (185 of 200 in the report) with status saying 0 dropped.
//   - backend down: StateLogs wait in memory while the backend is down and
//     SIGHUP comes; the reload used to discard them, uncounted.
//   - restart: the disk fills, StateLogs are delivered from memory, the
//     agent stops and starts again from the stale file: its seqs were
//     handed out before, and the backend dropped its StateLogs.
func TestFullDiskReloadsAndRestartsLoseNoStateLog(t *testing.T) {
	data := t.TempDir()
	b := startBackend(t, data, "127.0.0.1:0")
	const app, id, k = "full", "i-full", 20
	put := func() { b.api(t, "PUT", "/api/apps/"+app+"/recipe", countingRecipe(k)) }
	put()
	root := agentRoot(t, b.addr, app, id, "[salt]\ndelay = 1s\n[agent]\nengine = native\n")
	agent := startAgent(t, root)
	pid := agent.cmd.Process.Pid
	conn := func() map[string]any { c, _ := statusOf(root)["connection"].(map[string]any); return c }
	depth := func() float64 { d, _ := conn()["outbox_depth"].(float64); return d }
	inMemory := func() bool { s, _ := conn()["outbox_storage"].(string); return strings.HasPrefix(s, "memory: ") }
	atWait := func() bool { return engineField(root, "waiting_on") == "wait" }
	var why string
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last comparison: %s\nstatus connection: %v", why, conn())
		}
	})
	// allStored waits until at least ran states ran, all of them are
	// stored exactly once and the agent is blocked at its wait.
	allStored := func(phase string, ran int) {
		t.Helper()
		eventually(t, phase+": every state that ran stored exactly once, the agent at its wait", func() bool {
			var ok bool
			ok, why = everyRunStoredOnce(b, root, app, id)
			return ok && statesRun(root) >= ran && atWait() && depth() == 0
		})
		if d, _ := conn()["dropped_logs"].(float64); d != 0 {
			t.Fatalf("%s: status says %v StateLogs dropped (%v)", phase, d, conn()["dropped_by"])
		}
		t.Logf("%s: %s", phase, why)
	}
	allStored("first round", k)

	// reload: the disk fills; a new recipe version runs from memory.
	free := fillDisk(t, pid, root)
	put()
	eventually(t, "reload: a round delivered from memory", func() bool {
		ok, _ := everyRunStoredOnce(b, root, app, id)
		return ok && statesRun(root) >= 2*k && inMemory() && atWait() && depth() == 0
	})
	free()
	_ = agent.cmd.Process.Signal(syscall.SIGHUP) // a new session: the round runs again
	allStored("reload", 3*k)
	if s, _ := conn()["outbox_storage"].(string); s != "disk" {
		t.Errorf("reload: the outbox is in %q after the disk was freed and SIGHUP sent", s)
	}

	// backend down: StateLogs in memory when SIGHUP comes.
	b.stop(t, syscall.SIGTERM)
	free = fillDisk(t, pid, root)
	_ = agent.cmd.Process.Signal(syscall.SIGHUP) // a new session: the round runs again
	eventually(t, "backend down: a round queued in memory", func() bool {
		return inMemory() && atWait() && depth() >= k && conn()["connected"] == false
	})
	queued := depth()
	_ = agent.cmd.Process.Signal(syscall.SIGHUP)
	eventually(t, "backend down: the round after the reload queued too", func() bool { return atWait() && depth() >= queued+k })
	free()
	b = startBackend(t, data, b.addr)
	allStored("backend down", statesRun(root))
	_ = agent.cmd.Process.Signal(syscall.SIGHUP) // the disk is free: back to it
	allStored("backend down, then SIGHUP", statesRun(root)+k)
	if s, _ := conn()["outbox_storage"].(string); s != "disk" {
		t.Errorf("backend down: the outbox is in %q after the disk was freed and SIGHUP sent", s)
	}

	// restart: StateLogs delivered from memory, then a new process.
	ran := statesRun(root)
	free = fillDisk(t, pid, root)
	put()
	eventually(t, "restart: a round delivered from memory", func() bool {
		ok, _ := everyRunStoredOnce(b, root, app, id)
		return ok && statesRun(root) >= ran+k && inMemory() && atWait() && depth() == 0
	})
	free()
	agent.stop(t, syscall.SIGTERM)
	ran = statesRun(root)
	startAgent(t, root)
	allStored("restart", ran+k)
	logText, _ := os.ReadFile(filepath.Join(root, "var/log/visualops/agent.log"))
	if !bytes.Contains(logText, []byte("renumbered after the backend's")) {
		t.Errorf("restart: the agent did not say it renumbered its StateLogs")
	}
}
