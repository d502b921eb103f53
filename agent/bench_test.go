package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
)

// freshForkState runs one state the 2014 way: a new Python 2.7 process
// that loads the real fork (Salt and the adaptor) and runs the state, with
// the same bridge code and config the warm worker uses.
const freshForkState = `
import json, sys
exec(open(sys.argv[1]).read().split("def main():")[0])
load({"repo_dir": sys.argv[2], "config": json.loads(sys.argv[3])})
r = execute({"state_id": "s", "module": "linux.cmd", "parameter": {"cmd": "true", "cwd": "/tmp"}})
assert r["result"], r
`

// BenchmarkRealForkWarmBridgeVsFreshInterpreter: per state through the warm
// bridge with the real Salt 2014.1 (fork per state), against a fresh
// Python 2.7 interpreter per state loading the same fork, in the same run.
func BenchmarkRealForkWarmBridgeVsFreshInterpreter(b *testing.B) {
	const warmStates, freshStates = 50, 5
	s := forkExecutor(b)
	req := func(i int) state.Request {
		return state.Request{RecipeVersion: 1, StateID: fmt.Sprintf("s%d", i), Module: "linux.cmd", Parameter: json.RawMessage(`{"cmd":"true","cwd":"/tmp"}`)}
	}
	if res := s.Execute(context.Background(), req(-1)); !res.OK { // venv, clone, Salt loaded
		b.Fatal(res)
	}
	cfg, _ := json.Marshal(s.bridge.Options().Config)
	for i := 0; i < b.N; i++ {
		begin := time.Now()
		for j := 0; j < warmStates; j++ {
			if res := s.Execute(context.Background(), req(j)); !res.OK {
				b.Fatal(res)
			}
		}
		warm := time.Since(begin) / warmStates
		begin = time.Now()
		for j := 0; j < freshStates; j++ {
			out, err := exec.Command(s.bridge.Options().Python, "-c", freshForkState, s.layout.BridgeScript(), s.layout.StatesDir(), string(cfg)).CombinedOutput()
			if err != nil {
				b.Fatalf("%v %s", err, out)
			}
		}
		fresh := time.Since(begin) / freshStates
		b.ReportMetric(float64(warm.Microseconds())/1000, "bridge-ms/state")
		b.ReportMetric(float64(fresh.Microseconds())/1000, "fresh-ms/state")
		b.ReportMetric(float64(fresh)/float64(warm), "x-cheaper")
	}
}
