package statusfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/rounds"
)

func TestWriteRead(t *testing.T) {
	p := filepath.Join(t.TempDir(), "status.json")
	if _, err := Read(p); !errors.Is(err, ErrNoStatus) || !strings.Contains(err.Error(), "opsagent run") {
		t.Fatalf("missing file: %v", err)
	}
	s := Snapshot{PID: 42, AgentVersion: "2.1", UpdatedAt: time.Now().UTC().Truncate(time.Second),
		Connection: Connection{Connected: true, OutboxDepth: 3}, Engine: rounds.Status{RecipeVersion: 7, StateIndex: -1}}
	if err := Write(p, s); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o640 {
		t.Errorf("mode %v", st.Mode())
	}
	back, err := Read(p)
	if err != nil || back.PID != 42 || back.Engine.RecipeVersion != 7 || !back.UpdatedAt.Equal(s.UpdatedAt) || back.Connection.OutboxDepth != 3 {
		t.Fatalf("%+v %v", back, err)
	}
	os.WriteFile(p, []byte("{torn"), 0o640)
	if _, err := Read(p); err == nil || !strings.Contains(err.Error(), "not valid JSON") {
		t.Errorf("torn file: %v", err)
	}
}

// TestReadAFIFOFailsAtOnce: a FIFO planted at status.json made `opsagent
// status` hang; Read refuses it with an error that says what is there.
func TestReadAFIFOFailsAtOnce(t *testing.T) {
	p := filepath.Join(t.TempDir(), "status.json")
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Read(p); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "named pipe (FIFO)") {
			t.Errorf("Read of a FIFO: %v", err)
		}
	case <-time.After(20 * time.Second):
		if w, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close() // releases the blocked reader
		}
		t.Fatal("Read blocked on a FIFO at status.json")
	}
}
