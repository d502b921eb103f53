// Package statusfile is the small JSON file the running agent keeps current
// (/var/lib/visualops/opsagent/status.json) so that `opsagent status` can
// tell an operator what the agent is doing without talking to it.
package statusfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/system"
)

// MaxSize bounds what Read accepts; a status is a few KiB.
const MaxSize = 4 << 20

// Connection describes the link to the backend.
type Connection struct {
	Connected     bool      `json:"connected"`
	Since         time.Time `json:"since,omitzero"` // connected (or disconnected) since
	Backend       string    `json:"backend"`
	Protocol      int       `json:"protocol,omitempty"` // 1 or 2, of the current or last connection
	OutboxDepth   int       `json:"outbox_depth"`       // StateLogs not yet delivered
	OutboxBytes   int64     `json:"outbox_bytes"`
	OutboxStorage string    `json:"outbox_storage"` // "disk", or "memory: why"
	NextSeq       int64     `json:"next_seq"`       // seq the next StateLog gets
	DroppedFrames int64     `json:"dropped_frames"`
	DroppedLogs   int64     `json:"dropped_logs"` // StateLogs the outbox dropped this run: the sum of DroppedBy
	// DroppedBy counts them by reason: outbox_limit, outbox_max_bytes,
	// outbox_max_age (the bounds, oldest first), recipe_replaced,
	// lost_from_memory (kept in memory when the agent stopped).
	DroppedBy map[string]int64 `json:"dropped_by,omitempty"`
	LastError string           `json:"last_error,omitempty"`
}

// Snapshot is the whole file.
type Snapshot struct {
	PID          int           `json:"pid"`
	AgentVersion string        `json:"agent_version"`
	InstanceID   string        `json:"instance_id"`
	AppID        string        `json:"app_id"`
	System       *system.Info  `json:"system,omitempty"` // distribution, package manager, init system
	StartedAt    time.Time     `json:"started_at"`
	UpdatedAt    time.Time     `json:"updated_at"`
	Connection   Connection    `json:"connection"`
	Engine       rounds.Status `json:"engine"`
	Update       *Update       `json:"update,omitempty"`
	Goroutines   int           `json:"goroutines"` // a leak shows here first (make soak)
	InitErrors   []string      `json:"init_errors,omitempty"`
}

// Update is where the current or last self-update stands: downloading
// (with bytes), verifying, extracting, smoke-testing, swapping, confirming,
// done, refused, rolled-back or failed, with the reason.
type Update struct {
	Phase   string    `json:"phase"`
	Version string    `json:"version,omitempty"`
	From    string    `json:"from,omitempty"`
	Bytes   int64     `json:"bytes,omitempty"`
	Total   int64     `json:"total,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	At      time.Time `json:"at,omitzero"`
}

// Write replaces the file atomically (mode 0640: operators in the agent's
// group may read it; it holds no secret).
func Write(path string, s Snapshot) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("status %s: %w", path, err)
	}
	return fsutil.WriteFileAtomic(path, append(data, '\n'), 0o640)
}

// ErrNoStatus means the agent never wrote a status file.
var ErrNoStatus = errors.New("no status file")

// Read loads the file.
func Read(path string) (Snapshot, error) {
	var s Snapshot
	data, err := fsutil.ReadFixedFile(path, MaxSize)
	if errors.Is(err, os.ErrNotExist) {
		return s, fmt.Errorf("status %s: %w (has the agent ever run? start it with 'systemctl start opsagent' or 'opsagent run')", path, ErrNoStatus)
	}
	if err != nil {
		return s, fmt.Errorf("status %s: %w", path, err)
	}
	if err := json.Unmarshal(data, &s); err != nil {
		return s, fmt.Errorf("status %s: not valid JSON (%v); it is rewritten every few seconds by a running agent", path, err)
	}
	return s, nil
}
