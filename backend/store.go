package backend

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// appStore is where the backend keeps what must outlive it: each app's
// state (recipe, waits, update), enrollment secret, instance tokens and
// revocations, and its StateLogs. The Server holds the loaded apps in
// memory and writes through the store; fileStore (this file and
// logstore.go) is today's implementation, and storetest_test.go states
// what any implementation must do (the store is to move to NATS
// JetStream, and the same suite must pass against that).
//
// The rules that keep acknowledged StateLogs:
//   - An app is loaded (LoadApp or CreateApp) before anything of it is
//     written; a load that fails leaves it unloaded and changes nothing,
//     and a later LoadApp tries again.
//   - CreateApp never creates over anything stored of the app, loaded or
//     not: it answers errAppExists.
//   - Submit refuses (closes without acknowledgement) what it cannot store;
//     it acknowledges only what is durable.
type appStore interface {
	// AppIDs lists every app stored, whether or not it loads.
	AppIDs() ([]string, error)
	// LoadApp reads an app in full and opens its StateLogs for writing.
	// errNoApp when nothing of it is stored. It must not be loaded yet.
	LoadApp(id string) (*appState, error)
	// CreateApp stores a new app (its state and a.Secret) and leaves it
	// loaded; errAppExists when anything of it is already stored.
	CreateApp(a *appState) error
	// SaveApp stores a loaded app's state (recipe, waits, update).
	SaveApp(a *appState) error
	// SaveSecret replaces a loaded app's enrollment secret.
	SaveSecret(app, secret string) error
	// AddInstance records a newly enrolled instance's token hash.
	AddInstance(app, instance, hash string) error
	// RevokeInstance forgets an instance's token and bars its id from
	// enrolling again, durably; AdmitInstance lifts the bar.
	RevokeInstance(app, instance string, at time.Time) error
	AdmitInstance(app, instance string) error

	// Submit hands over a StateLog of a loaded app. When ack is not nil
	// the StateLog is acknowledged to it once durable, or it is refused.
	Submit(app string, e LogEntry, ack acker) error
	// ReadLogs is one page of stored StateLogs with seq > after.
	ReadLogs(app string, after int64, limit, maxBytes int) (logs []LogEntry, more bool, err error)
	Summaries(app string) map[string]instSummary
	// HighSeq is the highest agent seq stored for an instance's stream.
	HighSeq(app, instance, stream string) int64
	// LastSeq is the app's last stored backend seq (the API cursor).
	LastSeq(app string) int64
	// Close stores what was submitted and stops; later Submits fail.
	Close() error
}

// acker is the connection a protocol-2 StateLog came on.
type acker interface {
	// ack acknowledges a stream up to seq (it never blocks).
	ack(stream string, seq int64)
	// refuse closes the connection without acknowledging anything more
	// (the agent sends the StateLogs again after reconnecting); refused
	// reports whether that happened.
	refuse(reason string)
	refused() bool
}

var (
	errNoApp     = errors.New("no such app")
	errAppExists = errors.New("the app already exists in the data directory")
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
	// Revoked maps a revoked instance id → when: it may not connect or
	// enroll again until admitted (tokens.jsonl too).
	Revoked map[string]time.Time `json:"-"`
	// Secret is the enrollment secret (enroll.secret).
	Secret string `json:"-"`
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

func newAppState(id, secret string) *appState {
	return &appState{AppID: id, Secret: secret, TokenHashes: map[string]string{}, Revoked: map[string]time.Time{}, Waits: map[string][]string{}}
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

// fileStore keeps apps in <data>/apps/<app>/: app.json, enroll.secret,
// tokens.jsonl, and the StateLogs (logstore.go).
type fileStore struct {
	dir  string // the data directory
	log  *slog.Logger
	logs *logStore
}

const (
	appFileName   = "app.json"
	tokenFileName = "tokens.jsonl"
	secretFile    = "enroll.secret"
)

func openFileStore(dir string, lo logOptions, log *slog.Logger) *fileStore {
	ls := newLogStore(filepath.Join(dir, "apps"), lo, log)
	go ls.run()
	return &fileStore{dir: dir, log: log, logs: ls}
}

func (s *fileStore) appsDir() string             { return filepath.Join(s.dir, "apps") }
func (s *fileStore) appDir(app string) string    { return filepath.Join(s.dir, "apps", app) }
func (s *fileStore) tokenPath(app string) string { return filepath.Join(s.appDir(app), tokenFileName) }
func (s *fileStore) secretPath(app string) string {
	return filepath.Join(s.appDir(app), secretFile)
}

func (s *fileStore) AppIDs() ([]string, error) {
	entries, err := os.ReadDir(s.appsDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("apps directory: %w (fix its permissions)", err)
	}
	var ids []string
	for _, e := range entries {
		// Temporary directories of CreateApp start with '.', which no app
		// id does.
		if e.IsDir() && validAppID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

func (s *fileStore) LoadApp(id string) (*appState, error) {
	path := filepath.Join(s.appDir(id), appFileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, s.noAppFile(id, path)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	a := newAppState(id, "")
	if err := json.Unmarshal(data, a); err != nil {
		return nil, fmt.Errorf("%s: %w (restore it from a backup)", path, err)
	}
	if a.AppID != id {
		return nil, fmt.Errorf("%s names app %q, not %q: restore it from a backup", path, a.AppID, id)
	}
	if a.Waits == nil {
		a.Waits = map[string][]string{}
	}
	if err := s.loadTokens(a); err != nil {
		return nil, err
	}
	secret, created, err := s.loadOrCreateSecret(id)
	if err != nil {
		return nil, err
	}
	if created {
		s.log.Info("app had no enrollment secret; created one (new instances must present it)", "app_id", id, "file", s.secretPath(id))
	}
	a.Secret = secret
	if err := s.logs.load(id); err != nil {
		return nil, fmt.Errorf("StateLogs: %w", err)
	}
	return a, nil
}

// noAppFile explains a missing app.json: errNoApp when nothing of the app
// is stored (no directory, or an empty one), else an error, as the app's
// files must not be taken for a new app's.
func (s *fileStore) noAppFile(id, path string) error {
	entries, err := os.ReadDir(s.appDir(id))
	switch {
	case errors.Is(err, fs.ErrNotExist) || err == nil && len(entries) == 0:
		return errNoApp
	case err != nil:
		return fmt.Errorf("app directory: %w (fix its permissions)", err)
	}
	return fmt.Errorf("%s is missing while %s holds other files of the app: restore app.json from a backup (or, if the app never existed, remove the directory)", path, s.appDir(id))
}

// CreateApp builds the app's directory under a temporary name and renames
// it into place: rename(2) fails when the target holds anything, so an
// app stored, even one that does not load, is never created over.
func (s *fileStore) CreateApp(a *appState) error {
	// Checked first as well, so that the answer is the same on a disk too
	// full to build the new directory.
	if entries, err := os.ReadDir(s.appDir(a.AppID)); len(entries) > 0 || err != nil && !errors.Is(err, fs.ErrNotExist) {
		return errAppExists
	}
	if err := os.MkdirAll(s.appsDir(), 0o700); err != nil {
		return fmt.Errorf("apps directory: %w", err)
	}
	tmp, err := os.MkdirTemp(s.appsDir(), "."+a.AppID+".new-")
	if err != nil {
		return fmt.Errorf("new app directory: %w", err)
	}
	defer os.RemoveAll(tmp) // gone once renamed
	data, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(tmp, appFileName), data, 0o600); err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(tmp, secretFile), []byte(a.Secret+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.appDir(a.AppID)); err != nil {
		if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, fs.ErrExist) {
			return errAppExists
		}
		return fmt.Errorf("new app directory: %w", err)
	}
	if err := fsutil.SyncDir(s.appsDir()); err != nil {
		return err
	}
	if err := s.logs.load(a.AppID); err != nil {
		return fmt.Errorf("StateLogs: %w", err)
	}
	return nil
}

func (s *fileStore) SaveApp(a *appState) error {
	// Compact: indenting costs a line per nesting level of a parameter.
	data, err := json.Marshal(a)
	if err != nil {
		return err
	}
	// No MkdirAll: an app is saved only over its own directory.
	return fsutil.WriteFileAtomic(filepath.Join(s.appDir(a.AppID), appFileName), data, 0o600)
}

// tokenLine is one line of tokens.jsonl: an enrollment (instance and
// hash), a revocation, or an admission that lifts one.
type tokenLine struct {
	InstanceID string     `json:"instance_id"`
	Hash       string     `json:"sha256,omitempty"`
	Revoked    *time.Time `json:"revoked,omitempty"`
	Admitted   bool       `json:"admitted,omitempty"`
}

// AddInstance records a first-seen instance. It is not fsynced: losing
// the last lines in a crash only means those instances present the
// enrollment secret again.
func (s *fileStore) AddInstance(app, instance, hash string) error {
	return s.appendToken(app, tokenLine{InstanceID: instance, Hash: hash}, false)
}

// RevokeInstance is fsynced: a revocation must not come undone.
func (s *fileStore) RevokeInstance(app, instance string, at time.Time) error {
	at = at.UTC()
	return s.appendToken(app, tokenLine{InstanceID: instance, Revoked: &at}, true)
}

func (s *fileStore) AdmitInstance(app, instance string) error {
	return s.appendToken(app, tokenLine{InstanceID: instance, Admitted: true}, true)
}

func (s *fileStore) appendToken(app string, l tokenLine, sync bool) error {
	data, _ := json.Marshal(l)
	// No O_CREATE of the directory: only a stored app gets tokens.
	f, err := os.OpenFile(s.tokenPath(app), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(data, '\n'))
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// loadTokens replays tokens.jsonl: the first hash of an instance holds
// until a revocation, which bars the id until an admission.
func (s *fileStore) loadTokens(a *appState) error {
	f, err := os.Open(s.tokenPath(a.AppID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", s.tokenPath(a.AppID), err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l tokenLine
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.InstanceID == "" {
			continue
		}
		switch {
		case l.Revoked != nil:
			delete(a.TokenHashes, l.InstanceID)
			a.Revoked[l.InstanceID] = *l.Revoked
		case l.Admitted:
			delete(a.Revoked, l.InstanceID)
		case l.Hash != "":
			if _, dup := a.TokenHashes[l.InstanceID]; !dup {
				a.TokenHashes[l.InstanceID] = l.Hash
			}
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", s.tokenPath(a.AppID), err)
	}
	return nil
}

// loadOrCreateSecret reads enroll.secret, or writes a new one when it is
// missing or empty (apps stored before secrets existed).
func (s *fileStore) loadOrCreateSecret(app string) (secret string, created bool, err error) {
	path := s.secretPath(app)
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", false, fmt.Errorf("enrollment secret %s: %w (fix its permissions, or delete it to get a new one)", path, err)
	}
	if secret = strings.TrimSpace(string(data)); secret != "" {
		if len(secret) > maxEnrollmentSecret {
			return "", false, fmt.Errorf("enrollment secret %s: longer than %d bytes, which agents cannot send: shorten it or delete the file to get a new one", path, maxEnrollmentSecret)
		}
		return secret, false, nil
	}
	if secret, err = newSecret(); err != nil {
		return "", false, err
	}
	if err := s.SaveSecret(app, secret); err != nil {
		return "", false, err
	}
	return secret, true, nil
}

func (s *fileStore) SaveSecret(app, secret string) error {
	path := s.secretPath(app)
	if err := fsutil.WriteFileAtomic(path, []byte(secret+"\n"), 0o600); err != nil {
		return fmt.Errorf("enrollment secret %s: %w", path, err)
	}
	return nil
}

func (s *fileStore) Submit(app string, e LogEntry, ack acker) error {
	return s.logs.submit(app, e, ack)
}

func (s *fileStore) ReadLogs(app string, after int64, limit, maxBytes int) ([]LogEntry, bool, error) {
	return s.logs.read(app, after, limit, maxBytes)
}

func (s *fileStore) Summaries(app string) map[string]instSummary { return s.logs.summaries(app) }
func (s *fileStore) HighSeq(app, instance, stream string) int64 {
	return s.logs.highSeq(app, instance, stream)
}
func (s *fileStore) LastSeq(app string) int64 { return s.logs.lastSeq(app) }
func (s *fileStore) Close() error             { return s.logs.close() }

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
