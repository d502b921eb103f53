// Package layering writes down which package of the module may import
// which, and checks it: TestLayering (layering_test.go) lists every
// package with `go list -json ./...` and fails on an import that crosses
// the layering, the way Tailscale's cmd/tailscaled/deps_test.go keeps its
// import rules true. The table mirrors the architecture's ("may import"
// per folder, ARCHITECTURE.md, which lives outside the repository; the
// package map is in CONTRIBUTING.md). Data flows one way: cmd/opsagent
// wires everything, the capabilities (agent, installer, updater, backend,
// …) use what is below them, and internal/ imports nothing above it.
//
// Only the imports of non-test files are checked: a test may import what
// it tests with (the test helpers beside a package, internal/testutil).
// Imports from outside the module (the standard library, go.mod's
// dependencies) are not checked here.
package layering

import (
	"fmt"
	"sort"
	"strings"
)

// Rule says what the packages matching Pattern may import from the
// module. A pattern is a path relative to the module: "agent" is that
// package, "agent/..." it and everything below it, "..." everything.
type Rule struct {
	Pattern   string
	MayImport []string
	Why       string
}

// Rules are the layering, the first matching rule deciding for a
// package: more specific patterns come first.
var Rules = []Rule{
	{"cmd/...", []string{"..."}, "the CLI wires flags to the packages that do the work: it may import everything"},
	{"e2e", []string{"..."}, "end-to-end tests build and drive the real parts"},
	{"scripts/...", []string{"..."}, "tools (the demo, the soak test) drive the real parts"},
	{"protocol", []string{"internal/textcut"}, "wire messages shared by the agent and the backend: the standard library, and the one leaf that makes text printable"},
	{"agent/native/...", []string{"agent/state", "internal/..."}, "the catalogue's modules run on the system layer (internal/system) and answer the state executor's contract (agent/state)"},
	{"agent/bridge/...", []string{"agent/state", "internal/..."}, "the Salt worker answers the state executor's contract (agent/state)"},
	{"agent/...", []string{"agent/...", "protocol", "salt-bootstrap", "updater", "internal/..."}, "the agent: connection, round engine, outbox, state"},
	{"salt-bootstrap/...", []string{"virtualenv", "internal/..."}, "the Salt path: the states repository and the virtualenv its states run in (Path.Ensure), one sequence for the agent and the installer"},
	{"virtualenv/...", []string{"virtualenv", "internal/..."}, "the virtualenv; its test helpers (venvtest) beside it"},
	{"installer/...", []string{"virtualenv", "salt-bootstrap", "internal/..."}, "install, uninstall, userdata"},
	{"updater/...", []string{"internal/..."}, "every self-update flow"},
	{"release/...", []string{"internal/..."}, "build, sign and publish releases"},
	{"backend/...", []string{"backend/...", "protocol", "internal/..."}, "the reference backend"},
	{"internal/testutil/...", []string{"internal/..."}, "test helpers shared by several packages: never above internal/ (a helper of one package lives beside it)"},
	{"internal/...", []string{"internal/..."}, "the layer below everything: config and layout, processes, files, archives, releases' names and keys"},
}

// testOnly are the packages only tests and tools may import.
func testOnly(rel string) bool {
	last := rel[strings.LastIndexByte(rel, '/')+1:]
	return match("internal/testutil/...", rel) || strings.HasSuffix(last, "test") && last != "test"
}

// Package is one package as `go list -json` describes it.
type Package struct {
	ImportPath string
	Imports    []string
}

// Violation is one import that crosses the layering.
type Violation struct {
	From, To string // relative to the module
	Rule     Rule   // the rule of From ("" Pattern: none matched)
}

func (v Violation) String() string {
	switch {
	case v.Rule.Pattern == "":
		return fmt.Sprintf("%s is in no layer: add a rule for it to internal/layering (and the package map in CONTRIBUTING.md)", v.From)
	case testOnly(v.To):
		return fmt.Sprintf("%s imports %s, a test helper: only tests and tools may import it", v.From, v.To)
	}
	return fmt.Sprintf("%s imports %s: %s may import %s only (%s)", v.From, v.To, v.Rule.Pattern, strings.Join(v.Rule.MayImport, ", "), v.Rule.Why)
}

// Check returns the imports of pkgs that cross the layering, module
// being the module path; imports from outside the module are ignored.
func Check(module string, pkgs []Package) []Violation {
	var out []Violation
	for _, p := range pkgs {
		from, ok := relative(module, p.ImportPath)
		if !ok {
			continue
		}
		rule, ok := ruleOf(from)
		if !ok {
			out = append(out, Violation{From: from})
			continue
		}
		for _, imp := range p.Imports {
			to, ok := relative(module, imp)
			if !ok || allowed(rule, from, to) {
				continue
			}
			out = append(out, Violation{From: from, To: to, Rule: rule})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].From != out[j].From {
			return out[i].From < out[j].From
		}
		return out[i].To < out[j].To
	})
	return out
}

func allowed(rule Rule, from, to string) bool {
	if testOnly(to) && !testOnly(from) && !mayImportAll(rule) {
		return false
	}
	for _, pat := range rule.MayImport {
		if match(pat, to) {
			return true
		}
	}
	return false
}

func mayImportAll(rule Rule) bool {
	return len(rule.MayImport) == 1 && rule.MayImport[0] == "..."
}

func ruleOf(rel string) (Rule, bool) {
	for _, r := range Rules {
		if match(r.Pattern, rel) {
			return r, true
		}
	}
	return Rule{}, false
}

// match reports whether the relative path rel matches pattern.
func match(pattern, rel string) bool {
	if pattern == "..." {
		return true
	}
	if base, ok := strings.CutSuffix(pattern, "/..."); ok {
		return rel == base || strings.HasPrefix(rel, base+"/")
	}
	return rel == pattern
}

// relative is path relative to module, and whether it is in it.
func relative(module, path string) (string, bool) {
	if rest, ok := strings.CutPrefix(path, module+"/"); ok {
		return rest, true
	}
	return "", false
}
