package bridge

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// freshInterpreter runs one state the way a bridge-less agent would: a new
// Python process that imports the same fixture modules and runs the state.
const freshInterpreter = `
import sys
sys.path.insert(0, sys.argv[1] + "/libs"); sys.path.insert(0, sys.argv[1] + "/sources")
exec(open(sys.argv[2]).read().split("def main():")[0])
load({"repo_dir": sys.argv[1], "config": {}})
r = execute({"state_id": "s", "module": "linux.cmd", "parameter": {"cmd": "true"}})
assert r["result"], r
`

// BenchmarkBridgeVsFreshInterpreter runs the same 200-state recipe through
// the warm bridge (fork per state) and through a fresh interpreter per
// state, in the same run, and reports both and their ratio.
func BenchmarkBridgeVsFreshInterpreter(b *testing.B) {
	const n = 200
	for i := 0; i < b.N; i++ {
		r := newRig(b, nil)
		if res := r.run(b, context.Background(), "warmup", "test.nothing", map[string]string{}); !res.OK {
			b.Fatal(res)
		}
		begin := time.Now()
		for j := 0; j < n; j++ {
			if res := r.run(b, context.Background(), fmt.Sprintf("s%d", j), "linux.cmd", map[string]string{"cmd": "true"}); !res.OK {
				b.Fatal(res)
			}
		}
		warm := time.Since(begin) / n

		script := filepath.Join(r.state, "bridge.py")
		begin = time.Now()
		for j := 0; j < n; j++ {
			out, err := exec.Command(python(b), "-c", freshInterpreter, r.repo, script).CombinedOutput()
			if err != nil {
				b.Fatalf("%v %s", err, out)
			}
		}
		fresh := time.Since(begin) / n
		b.ReportMetric(float64(warm.Microseconds())/1000, "bridge-ms/state")
		b.ReportMetric(float64(fresh.Microseconds())/1000, "fresh-ms/state")
		b.ReportMetric(float64(fresh)/float64(warm), "x-cheaper")
	}
}

// BenchmarkTimeToFirstState: a cold worker (start, load the repository) and
// its first state, with the repository already on disk.
func BenchmarkTimeToFirstState(b *testing.B) {
	for i := 0; i < b.N; i++ {
		r := newRig(b, nil)
		begin := time.Now()
		if res := r.run(b, context.Background(), "first", "linux.cmd", map[string]string{"cmd": "true"}); !res.OK {
			b.Fatal(res)
		}
		b.ReportMetric(float64(time.Since(begin).Microseconds())/1000, "first-state-ms")
		r.b.Close()
	}
}
