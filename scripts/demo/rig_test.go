package main

import (
	"bytes"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/wait"
)

// TestOrphansAdoptedAndReaped: a process started detached (its parent exits
// at once, as the agent's starter does) becomes the demo's child, and once
// it exits reapOrphans leaves no zombie of it behind for PID 1 to collect.
func TestOrphansAdoptedAndReaped(t *testing.T) {
	if err := adoptOrphans(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("sh", "-c", "sleep 0.5 </dev/null >/dev/null 2>&1 & echo $!").Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("orphan pid %q: %v", out, err)
	}
	stat := "/proc/" + strconv.Itoa(pid) + "/stat"
	data, err := os.ReadFile(stat)
	if err != nil {
		t.Fatalf("the orphan is gone already: %v", err)
	}
	ppid := "?"
	if f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:])); len(f) >= 2 {
		ppid = f[1]
	}
	if ppid != strconv.Itoa(os.Getpid()) {
		t.Fatalf("the orphan's parent is pid %s, want the demo (%d)", ppid, os.Getpid())
	}
	wait.Eventually(t, "the orphan exited", func() bool {
		data, err := os.ReadFile(stat)
		return err != nil || bytes.Contains(data, []byte(") Z"))
	})
	reapOrphans(5 * time.Second)
	if _, err := os.Stat(stat); err == nil {
		t.Fatalf("pid %d is still there (a zombie) after reapOrphans", pid)
	}
}
