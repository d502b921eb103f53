package backend

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// appState is everything the backend keeps about one app, persisted as
// <data>/apps/<app>/app.json (atomic rewrite on every change).
type appState struct {
	AppID         string                 `json:"app_id"`
	RecipeVersion int64                  `json:"recipe_version"`
	Module        *protocol.ModuleSource `json:"module,omitempty"`
	States        []stateJSON            `json:"state"`
	Update        *protocol.AgentUpdate  `json:"update,omitempty"`
	// TokenHashes maps instance id → SHA-256 of its token (trust on first
	// use). Only hashes are stored, so a leaked data dir leaks no token.
	// They live in tokens.jsonl (one appended line per new instance) so
	// that a fleet's first connections do not rewrite app.json each time.
	TokenHashes map[string]string `json:"-"`
	// Waits maps instance id → released wait state ids of RecipeVersion;
	// allInstances ("*") holds those the relay released for every instance.
	Waits map[string][]string `json:"waits"`
	// done is which "instance/state" succeeded in RecipeVersion, for the
	// relay; in memory only (the states run again every round).
	done map[string]bool
	// stateIDs is the set of States' ids, built on first use (hasState).
	stateIDs map[string]bool
}

type stateJSON struct {
	ID        string          `json:"id"`
	Module    string          `json:"module"`
	Parameter json.RawMessage `json:"parameter"`
}

func (a *appState) recipe() *protocol.RecipeMetadata {
	m := &protocol.RecipeMetadata{RecipeVersion: a.RecipeVersion, Module: a.Module, States: []protocol.RecipeState{}}
	for _, s := range a.States {
		m.States = append(m.States, protocol.RecipeState{ID: s.ID, Module: s.Module, Parameter: s.Parameter})
	}
	return m
}

// LogEntry is one StateLog as stored (one line of a segment) and served by
// the API. Seq is the backend's own per-app cursor; AgentSeq and LogStream
// are what a protocol-2 agent numbered it. Seq must stay the first field:
// the writer adds it to lines encoded before it is known (encodeRest).
type LogEntry struct {
	Seq           int64     `json:"seq"`
	ReceivedAt    time.Time `json:"received_at"`
	InstanceID    string    `json:"instance_id"`
	LogStream     string    `json:"log_stream,omitempty"`
	AgentSeq      int64     `json:"agent_seq,omitempty"`
	RecipeVersion int64     `json:"recipe_version"`
	StateID       string    `json:"state_id"`
	Result        bool      `json:"result"`
	Comment       *string   `json:"comment"`
	Stdout        *string   `json:"stdout"`
}

var appIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func validAppID(id string) error {
	if !appIDPattern.MatchString(id) {
		return fmt.Errorf("app id %q: use 1-128 letters, digits, '.', '_' or '-'", id)
	}
	return nil
}

type store struct{ dir string }

func (s store) appDir(app string) string { return filepath.Join(s.dir, "apps", app) }

func (s store) save(a *appState) error {
	dir := s.appDir(a.AppID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	// Compact: indenting costs a line per nesting level of a parameter.
	data, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, "app.json"), data, 0o600)
}

// loadAll reads every app; an unreadable app is reported, not fatal.
func (s store) loadAll() (map[string]*appState, []error) {
	apps := map[string]*appState{}
	var errs []error
	entries, err := os.ReadDir(filepath.Join(s.dir, "apps"))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		return apps, errs
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(s.appDir(e.Name()), "app.json"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		a := &appState{}
		if err := json.Unmarshal(data, a); err != nil {
			errs = append(errs, fmt.Errorf("%s/app.json: %w", e.Name(), err))
			continue
		}
		if a.TokenHashes == nil {
			a.TokenHashes = map[string]string{}
		}
		if a.Waits == nil {
			a.Waits = map[string][]string{}
		}
		if err := s.loadTokens(a); err != nil {
			errs = append(errs, err)
			continue
		}
		apps[a.AppID] = a
	}
	return apps, errs
}

type tokenLine struct {
	InstanceID string `json:"instance_id"`
	Hash       string `json:"sha256"`
}

func (s store) tokenPath(app string) string { return filepath.Join(s.appDir(app), "tokens.jsonl") }

// appendToken records a first-seen instance. It is not fsynced: losing the
// last lines in a crash only means those instances are trusted on first
// use again.
func (s store) appendToken(app, instance, hash string) error {
	if err := os.MkdirAll(s.appDir(app), 0o700); err != nil {
		return err
	}
	data, _ := json.Marshal(tokenLine{instance, hash})
	f, err := os.OpenFile(s.tokenPath(app), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Write(append(data, '\n'))
	return err
}

func (s store) loadTokens(a *appState) error {
	f, err := os.Open(s.tokenPath(a.AppID))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l tokenLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.InstanceID != "" && l.Hash != "" {
			if _, dup := a.TokenHashes[l.InstanceID]; !dup {
				a.TokenHashes[l.InstanceID] = l.Hash
			}
		}
	}
	return sc.Err()
}

func hashToken(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(sum[:])
}

func sameHash(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
