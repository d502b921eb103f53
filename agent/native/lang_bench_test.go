package native

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/gemsource"
	"github.com/visualops/opsagent/internal/testutil/npmreg"
	"github.com/visualops/opsagent/internal/testutil/pyindex"
)

// BenchmarkNoChangeRoundLanguagePackages times one state of each
// language module on a Debian 12 root where everything is already in
// place: the round reads metadata files and runs nothing. The "latest"
// cases ask the index, registry or sources each round (one pip, npm or
// gem run), which is the documented cost of latest.
//
// Setup installs python3-pip, python3-venv, npm and ruby in the root
// (minutes), then the packages through the modules.
func BenchmarkNoChangeRoundLanguagePackages(b *testing.B) {
	root := debroot.New(b)
	debroot.UseExtras(b, root)
	r, err := fsutil.NewRoot(root)
	if err != nil {
		b.Fatal(err)
	}
	runs := &recordingRunner{Runner: proc.New()}
	e := New(Options{Root: r, Runner: runs, KillGrace: time.Second})
	ctx := context.Background()
	m, err := e.sys.Packages()
	if err != nil {
		b.Fatal(err)
	}
	if _, err := m.EnsureInstalled(ctx, "python3-pip", "python3-venv", "npm", "ruby"); err != nil {
		b.Fatal(err)
	}
	pyindex.New(b, pyindex.Dist{Name: "opsdemo", Version: "1.0", Script: "opsdemo"}).Use(b, root)
	npmreg.New(b, npmreg.Package{Name: "opsnpm", Version: "1.0.0", Bin: "opsnpm"}).Use(b, root)
	gemsource.New(b, root, gemsource.Gem{Name: "opsgem", Version: "1.0.0", Executable: "opsgem"}).Use(b, root)
	if err := os.WriteFile(filepath.Join(root, "srv/req.txt"), []byte("opsdemo==1.0\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	apply := func(module, param string) state.Result {
		return e.Execute(ctx, state.Request{RecipeVersion: 1, StateID: "bench", Module: module, Parameter: json.RawMessage(param)})
	}
	cases := []struct{ name, module, param string }{
		{"pip", "common.pip.package", `{"name": [{"key": "opsdemo", "value": "1.0"}]}`},
		{"pip-latest", "common.pip.package", `{"name": [{"key": "opsdemo", "value": "latest"}]}`},
		{"virtualenv", "common.virtualenv", `{"path": "/srv/venv", "requirements-file": "/srv/req.txt"}`},
		{"npm", "common.npm.package", `{"name": [{"key": "opsnpm", "value": "1.0.0"}]}`},
		{"npm-path", "common.npm.package", `{"name": [{"key": "opsnpm", "value": "1.0.0"}], "path": "/srv/app"}`},
		{"npm-latest", "common.npm.package", `{"name": [{"key": "opsnpm", "value": "latest"}]}`},
		{"gem", "common.gem.package", `{"name": [{"key": "opsgem", "value": "1.0.0"}]}`},
		{"gem-latest", "common.gem.package", `{"name": [{"key": "opsgem", "value": "latest"}]}`},
	}
	for _, c := range cases {
		if res := apply(c.module, c.param); !res.OK {
			b.Fatalf("%s: setup: %s", c.name, res.Comment)
		}
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			mark := runs.Mark()
			b.ResetTimer()
			for range b.N {
				if res := apply(c.module, c.param); !res.OK || res.Changed {
					b.Fatalf("%s: %+v", c.name, res)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(len(runs.Since(mark)))/float64(b.N), "runs/op")
		})
	}
}
