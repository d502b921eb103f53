package updater

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
)

// maxRequestFile bounds what TakeRequest reads: a request is a few
// hundred bytes.
const maxRequestFile = 64 << 10

// WriteRequest leaves r for the running agent (Layout.UpdateRequestFile,
// next to its lock); `opsagent update` then sends it SIGUSR1.
func WriteRequest(l config.Layout, r Request) error {
	data, _ := json.Marshal(r)
	return fsutil.WriteFileAtomic(l.UpdateRequestFile(), data, 0o600)
}

// TakeRequest reads and removes the pending request, if any (nil, nil
// when there is none).
func TakeRequest(l config.Layout) (*Request, error) {
	p := l.UpdateRequestFile()
	data, err := fsutil.ReadFixedFile(p, maxRequestFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	_ = os.Remove(p)
	var r Request
	if err := json.Unmarshal(data, &r); err != nil || r.Version == "" {
		return nil, fmt.Errorf("update request %s is not valid: %v", p, err)
	}
	return &r, nil
}
