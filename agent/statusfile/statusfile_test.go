package statusfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
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
