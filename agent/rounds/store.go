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

// Store persists the recipe and a pending update as JSON files in one
// directory (/var/lib/visualops/opsagent), each written atomically.
type Store struct {
	dir   string
	clock clock.Clock
	log   *slog.Logger
}

// NewStore returns a Store for dir (already root-mapped).
func NewStore(dir string, clk clock.Clock, log *slog.Logger) *Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{dir: dir, clock: clk, log: log}
}

const (
	recipeName = "recipe.json"
	updateName = "pending-update.json"
)

// RecipePath is where the recipe lives.
func (s *Store) RecipePath() string { return filepath.Join(s.dir, recipeName) }

// SaveRecipe writes r atomically. A nil r removes the file.
func (s *Store) SaveRecipe(r *Recipe) error {
	if r == nil {
		return s.remove(recipeName)
	}
	f := recipeFile{Version: r.Version, Module: r.Module, States: make([]storedState, len(r.States)), Satisfied: append([]string{}, r.Satisfied...)}
	sort.Strings(f.Satisfied)
	for i, st := range r.States {
		f.States[i] = storedState{st.ID, st.Module, st.Parameter}
	}
	return s.write(recipeName, f)
}

// LoadRecipe returns the persisted recipe, or nil when there is none. A
// corrupt file is moved aside (recipe.json.corrupt-<time>) with a warning,
// and nil is returned: the agent starts empty and the backend re-pushes.
func (s *Store) LoadRecipe() (*Recipe, error) {
	var f recipeFile
	ok, err := s.read(recipeName, &f)
	if err != nil || !ok {
		return nil, err
	}
	if f.Version <= 0 {
		s.quarantine(recipeName, fmt.Errorf("recipe_version %d is not positive", f.Version))
		return nil, nil
	}
	r := &Recipe{Version: f.Version, Module: f.Module, States: make([]protocol.RecipeState, len(f.States)), Satisfied: f.Satisfied}
	for i, st := range f.States {
		if st.ID == "" || st.Module == "" {
			s.quarantine(recipeName, fmt.Errorf("state %d has no id or module", i))
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
		return s.remove(updateName)
	}
	return s.write(updateName, u)
}

// LoadUpdate returns the persisted pending update, or nil.
func (s *Store) LoadUpdate() (*protocol.AgentUpdate, error) {
	var u protocol.AgentUpdate
	ok, err := s.read(updateName, &u)
	if err != nil || !ok {
		return nil, err
	}
	if u.Version == "" {
		s.quarantine(updateName, errors.New("version is empty"))
		return nil, nil
	}
	return &u, nil
}

func (s *Store) write(name string, v any) error {
	data, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return fmt.Errorf("store %s: %w", name, err)
	}
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("store %s: %w", s.dir, err)
	}
	return fsutil.WriteFileAtomic(filepath.Join(s.dir, name), append(data, '\n'), 0o600)
}

func (s *Store) read(name string, v any) (bool, error) {
	path := filepath.Join(s.dir, name)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("store: read %s: %w", path, err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		s.quarantine(name, err)
		return false, nil
	}
	return true, nil
}

// quarantine moves a corrupt file aside so that nothing is lost and the
// agent can start empty.
func (s *Store) quarantine(name string, cause error) {
	path := filepath.Join(s.dir, name)
	aside := fmt.Sprintf("%s.corrupt-%s", path, s.clock.Now().UTC().Format("20060102T150405Z"))
	if err := os.Rename(path, aside); err != nil {
		s.log.Error("corrupt state file could not be moved aside; remove it by hand", "file", path, "cause", cause, "err", err)
		return
	}
	s.log.Warn("corrupt state file moved aside; starting without it", "file", path, "moved_to", aside, "cause", cause)
}

func (s *Store) remove(name string) error {
	err := os.Remove(filepath.Join(s.dir, name))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}
