package native

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/visualops/opsagent/internal/system"
)

// TestCatalogueMatchesModuleJSON keeps Catalogue equal to the modules of
// testdata/module.json, with the family each is restricted to.
func TestCatalogueMatchesModuleJSON(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "module.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	want := map[string]system.Family{}
	var walk func(any)
	walk = func(o any) {
		switch v := o.(type) {
		case map[string]any:
			if name, ok := v["module"].(string); ok && v["parameter"] != nil {
				fam := system.Family("")
				if distros, ok := v["distro"].([]any); ok {
					d := system.Distro{ID: distros[0].(string)}
					if d.ID == "redhat" || d.ID == "amazon" {
						d.ID = "rhel"
					}
					fam = d.Family()
				}
				want[name] = fam
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(doc)
	got := map[string]system.Family{}
	for _, m := range Catalogue {
		if _, dup := got[m.Name]; dup {
			t.Errorf("%s listed twice", m.Name)
		}
		got[m.Name] = m.Family
	}
	for name, fam := range want {
		if g, ok := got[name]; !ok {
			t.Errorf("%s is in module.json but not in Catalogue", name)
		} else if g != fam {
			t.Errorf("%s: family %q, module.json says %q", name, g, fam)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s is in Catalogue but not in module.json", name)
		}
	}
	if len(want) != 44 {
		t.Errorf("module.json has %d modules, expected 44", len(want))
	}
	names := make([]string, 0, len(Catalogue))
	for _, m := range Catalogue {
		names = append(names, m.Name)
	}
	if !slices.IsSorted(names) {
		t.Error("Catalogue is not sorted by name")
	}
}
