package protocol

import (
	"fmt"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits ValidateRecipe enforces. They are far above anything real recipes
// use (the largest known recipe has 28 states, 42-byte ids and 20-byte
// module names) and low enough that one bad recipe cannot make an agent
// build huge plans, paths or log lines.
const (
	// MaxRecipeStates bounds the number of states in one recipe.
	MaxRecipeStates = 10000
	// MaxStateIDBytes bounds a state id (it names log lines and waits).
	MaxStateIDBytes = 256
	// MaxModuleNameBytes bounds a state's module name (linux.apt.package).
	MaxModuleNameBytes = 128
	// MaxModuleRepoBytes bounds module.repo (a git URL).
	MaxModuleRepoBytes = 2048
	// MaxModuleTagBytes bounds module.tag (a git tag or branch).
	MaxModuleTagBytes = 256
	// MaxParameterDepth bounds how deeply a state's parameter nests lists
	// and objects (the shared recipes nest 3 deep): every later pass over a
	// parameter (Salt's YAML, the plan, the stored copy) costs more per
	// level, so thousands of levels are refused here, once.
	MaxParameterDepth = 64
)

// moduleNamePattern is a dotted lower-case name such as linux.cmd or
// meta.wait: it picks a native module or a Salt state, so it must never
// carry path separators, spaces or shell syntax.
var moduleNamePattern = regexp.MustCompile(`^[a-z][a-z0-9_]*(\.[a-z0-9_-]+)+$`)

// ValidateRecipe checks what Decode leaves open in a recipe: module names,
// state ids, the states repository and size caps. The agent runs it before
// accepting a recipe and the backend before storing one, so both refuse
// exactly the same recipes. The error is a *Error naming the field, e.g.
// state[3].module.
func ValidateRecipe(m *RecipeMetadata) error {
	if m == nil {
		return &Error{Code: CodeRecipeMetadata, Problem: "no recipe"}
	}
	if m.RecipeVersion <= 0 {
		return recipeError("recipe_version", fmt.Sprintf("must be a positive integer, got %d", m.RecipeVersion))
	}
	if m.Module != nil {
		if err := validateSource(m.Module); err != nil {
			return err
		}
	}
	if len(m.States) > MaxRecipeStates {
		return recipeError("state", fmt.Sprintf("has %d states, more than the %d allowed: split the recipe", len(m.States), MaxRecipeStates))
	}
	for i := range m.States {
		if err := validateState(i, &m.States[i]); err != nil {
			return err
		}
	}
	return nil
}

func recipeError(field, problem string) error {
	return &Error{Code: CodeRecipeMetadata, Field: field, Problem: problem}
}

func validateSource(src *ModuleSource) error {
	if problem := checkText(src.Repo, MaxModuleRepoBytes); problem != "" {
		return recipeError("module.repo", problem)
	}
	if problem := checkText(src.Tag, MaxModuleTagBytes); problem != "" {
		return recipeError("module.tag", problem)
	}
	// Both end up as git arguments: a leading '-' would read as an option.
	if strings.HasPrefix(src.Repo, "-") {
		return recipeError("module.repo", "must not start with '-' (use a git URL such as https://host/states.git)")
	}
	if strings.HasPrefix(src.Tag, "-") {
		return recipeError("module.tag", "must not start with '-' (use a git tag or branch name)")
	}
	return nil
}

func validateState(i int, st *RecipeState) error {
	prefix := fmt.Sprintf("state[%d].", i)
	if problem := checkText(st.ID, MaxStateIDBytes); problem != "" {
		return recipeError(prefix+"id", problem)
	}
	if len(st.Module) > MaxModuleNameBytes {
		return recipeError(prefix+"module", fmt.Sprintf("is %d bytes, more than the %d allowed", len(st.Module), MaxModuleNameBytes))
	}
	if !moduleNamePattern.MatchString(st.Module) {
		return recipeError(prefix+"module", fmt.Sprintf("%q is not a module name: use dotted lower-case words such as linux.cmd or meta.wait", st.Module))
	}
	if d := jsonDepth(st.Parameter); d > MaxParameterDepth {
		return recipeError(prefix+"parameter", fmt.Sprintf("nests %d levels deep, more than the %d allowed", d, MaxParameterDepth))
	}
	return nil
}

// jsonDepth is the deepest nesting of lists and objects in a JSON text
// (already known to be valid), counted without decoding it.
func jsonDepth(raw []byte) int {
	depth, deepest, inString, escaped := 0, 0, false, false
	for _, c := range raw {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			depth++
			deepest = max(deepest, depth)
		case c == ']' || c == '}':
			depth--
		}
	}
	return deepest
}

// checkText returns why s is not a non-empty, printable, valid UTF-8 string
// of at most limit bytes, or "".
func checkText(s string, limit int) string {
	switch {
	case s == "":
		return "must not be empty"
	case len(s) > limit:
		return fmt.Sprintf("is %d bytes, more than the %d allowed", len(s), limit)
	case !utf8.ValidString(s):
		return "is not valid UTF-8"
	}
	for i, r := range s {
		if unicode.IsControl(r) {
			return fmt.Sprintf("has a control character (%U) at byte %d", r, i)
		}
	}
	return ""
}
