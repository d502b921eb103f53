package rounds

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"

	"github.com/visualops/opsagent/internal/clock"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// Recipe is the persisted recipe: what the engine applies, round after round.
type Recipe struct {
	Version int64                  `json:"recipe_version"`
	Module  *protocol.ModuleSource `json:"module,omitempty"`
	States  []protocol.RecipeState `json:"-"`
	// Satisfied lists the meta.wait state ids the backend released for
	// this version.
	Satisfied []string `json:"satisfied_waits"`
}

// recipeFile is the on-disk shape of Recipe (states as protocol JSON).
type recipeFile struct {
	Version   int64                  `json:"recipe_version"`
	Module    *protocol.ModuleSource `json:"module,omitempty"`
	States    []storedState          `json:"state"`
	Satisfied []string               `json:"satisfied_waits"`
}

type storedState struct {
	ID        string          `json:"id"`
	Module    string          `json:"module"`
	Parameter json.RawMessage `json:"parameter"`
}

// Files names the Store's files (from the layout: recipe.json and
// pending-update.json in the state directory).
type Files struct {
	Recipe        string
	PendingUpdate string
}

// Store persists the recipe and a pending update as JSON files, each
// written atomically.
type Store struct {
	files Files
	clock clock.Clock
	log   *slog.Logger
}

// MaxFileSize bounds what the Store reads back (a recipe of 100 000 states
// with large parameters stays far below it).
const MaxFileSize = 64 << 20

// NewStore returns a Store of files (host paths).
func NewStore(files Files, clk clock.Clock, log *slog.Logger) *Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{files: files, clock: clk, log: log}
}

// SaveRecipe writes r atomically. A nil r removes the file.
func (s *Store) SaveRecipe(r *Recipe) error {
	if r == nil {
		return s.remove(s.files.Recipe)
	}
	f := recipeFile{Version: r.Version, Module: r.Module, States: make([]storedState, len(r.States)), Satisfied: append([]string{}, r.Satisfied...)}
	sort.Strings(f.Satisfied)
	for i, st := range r.States {
		f.States[i] = storedState{st.ID, st.Module, st.Parameter}
	}
	return s.write(s.files.Recipe, f)
}

// LoadRecipe returns the persisted recipe, or nil when there is none. A
// corrupt file is moved aside (recipe.json.corrupt-<time>) with a warning,
// and nil is returned: the agent starts empty and the backend re-pushes.
func (s *Store) LoadRecipe() (*Recipe, error) {
	var f recipeFile
	ok, err := s.read(s.files.Recipe, &f)
	if err != nil || !ok {
		return nil, err
	}
	if f.Version <= 0 {
		s.quarantine(s.files.Recipe, fmt.Errorf("recipe_version %d is not positive", f.Version))
		return nil, nil
	}
	r := &Recipe{Version: f.Version, Module: f.Module, States: make([]protocol.RecipeState, len(f.States)), Satisfied: f.Satisfied}
	for i, st := range f.States {
		if st.ID == "" || st.Module == "" {
			s.quarantine(s.files.Recipe, fmt.Errorf("state %d has no id or module", i))
			return nil, nil
		}
		p := st.Parameter
		if len(p) == 0 {
			p = json.RawMessage("{}")
		}
		r.States[i] = protocol.RecipeState{ID: st.ID, Module: st.Module, Parameter: p}
	}
	return r, nil
}

// SaveUpdate persists a pending AgentUpdate; nil removes it.
func (s *Store) SaveUpdate(u *protocol.AgentUpdate) error {
	if u == nil {
		return s.remove(s.files.PendingUpdate)
	}
	return s.write(s.files.PendingUpdate, u)
}

// LoadUpdate returns the persisted pending update, or nil.
func (s *Store) LoadUpdate() (*protocol.AgentUpdate, error) {
	var u protocol.AgentUpdate
	ok, err := s.read(s.files.PendingUpdate, &u)
	if err != nil || !ok {
		return nil, err
	}
	if u.Version == "" {
		s.quarantine(s.files.PendingUpdate, errors.New("version is empty"))
		return nil, nil
	}
	return &u, nil
}

func (s *Store) write(path string, v any) error {
	// Compact: indenting costs a line per nesting level of a parameter.
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("store %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("store %s: %w", path, err)
	}
	return fsutil.WriteFileAtomic(path, append(data, '\n'), 0o600)
}

func (s *Store) read(path string, v any) (bool, error) {
	data, err := fsutil.ReadFixedFile(path, MaxFileSize)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("store: read %s: %w", path, err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		s.quarantine(path, err)
		return false, nil
	}
	return true, nil
}

// quarantine moves a corrupt file aside so that nothing is lost and the
// agent can start empty.
func (s *Store) quarantine(path string, cause error) {
	aside := fmt.Sprintf("%s.corrupt-%s", path, s.clock.Now().UTC().Format("20060102T150405Z"))
	if err := os.Rename(path, aside); err != nil {
		s.log.Error("corrupt state file could not be moved aside; remove it by hand", "file", path, "cause", cause, "err", err)
		return
	}
	s.log.Warn("corrupt state file moved aside; starting without it", "file", path, "moved_to", aside, "cause", cause)
}

func (s *Store) remove(path string) error {
	err := os.Remove(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}
