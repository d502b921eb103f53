package dist

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// maxLatestSize bounds what ReadLatest reads: latest.json is a few hundred
// bytes, and it comes from the network.
const maxLatestSize = 64 << 10

// Latest is latest.json: the newest published version and the SHA-256 of
// its tarball.
type Latest struct {
	Version     string    `json:"version"`
	SHA256      string    `json:"sha256"`
	PublishedAt time.Time `json:"published_at"`
}

// ReadLatest decodes and validates latest.json. Unknown fields are allowed
// so that a later release can add some without breaking older agents.
func ReadLatest(r io.Reader) (Latest, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxLatestSize+1))
	if err != nil {
		return Latest{}, fmt.Errorf("%s: %w", LatestName, err)
	}
	if len(data) > maxLatestSize {
		return Latest{}, fmt.Errorf("%s: more than %d bytes: not a latest.json written by 'opsagent release publish'", LatestName, maxLatestSize)
	}
	var l Latest
	if err := json.Unmarshal(data, &l); err != nil {
		return Latest{}, fmt.Errorf("%s: %w (republish with 'opsagent release publish')", LatestName, err)
	}
	l.SHA256 = strings.ToLower(l.SHA256) // hex in either case reads
	if err := l.validate(); err != nil {
		return Latest{}, err
	}
	return l, nil
}

// EncodeLatest renders l as latest.json, refusing what ReadLatest would
// refuse, so that nothing unreadable is ever published.
func EncodeLatest(l Latest) ([]byte, error) {
	if err := l.validate(); err != nil {
		return nil, err
	}
	body, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", LatestName, err)
	}
	return append(body, '\n'), nil
}

func (l Latest) validate() error {
	if err := CheckVersion(l.Version); err != nil {
		return fmt.Errorf("%s: %w", LatestName, err)
	}
	if err := CheckSHA256(l.SHA256); err != nil {
		return fmt.Errorf("%s: %w", LatestName, err)
	}
	return nil
}
