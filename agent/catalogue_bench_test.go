package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// noChangeStates are states already in place both on a fresh Debian root
// and on the machine running the benchmark, and read-only for Salt 2014
// there (an installed package: no refresh, no install; an existing group
// with no gid asked), so that the warm bridge may run them against the
// machine itself. States that would change the machine (users, cron,
// timezone, services) are compared natively only (see
// agent/native's BenchmarkNoChangeRound*).
var noChangeStates = []struct{ module, param string }{
	{"linux.apt.package", `{"name":[{"key":"bash"},{"key":"coreutils"}]}`},
	{"linux.group", `{"groupname":"root"}`},
}

// BenchmarkNoChangeNativeVsWarmSalt: time per state of a round where
// everything is in place, natively in a Debian 12 root against the same
// states through the warm Salt bridge and the real 2014 fork (Salt 2014
// lists the installed packages with dpkg-query on every pkg state).
func BenchmarkNoChangeNativeVsWarmSalt(b *testing.B) {
	nat := native.New(native.Options{Root: mustRoot(b, debroot.New(b))})
	salt := forkExecutor(b)
	req := func(i int, module, param string) state.Request {
		return state.Request{RecipeVersion: 1, StateID: fmt.Sprintf("s%d", i), Module: module, Parameter: json.RawMessage(param)}
	}
	for _, st := range noChangeStates { // warm both: the venv, the clone, Salt loaded, caches
		for _, ex := range []state.Executor{nat, salt} {
			if r := ex.Execute(context.Background(), req(0, st.module, st.param)); !r.OK {
				b.Fatalf("%s: %+v", st.module, r)
			}
		}
	}
	const rounds = 5
	for i := 0; i < b.N; i++ {
		for _, st := range noChangeStates {
			var took [2]time.Duration
			for k, ex := range []state.Executor{nat, salt} {
				begin := time.Now()
				for j := 0; j < rounds; j++ {
					if r := ex.Execute(context.Background(), req(j, st.module, st.param)); !r.OK || r.Changed {
						b.Fatalf("%s: %+v", st.module, r)
					}
				}
				took[k] = time.Since(begin) / rounds
			}
			b.ReportMetric(float64(took[0].Microseconds())/1000, st.module+"-native-ms")
			b.ReportMetric(float64(took[1].Microseconds())/1000, st.module+"-salt-ms")
			b.ReportMetric(float64(took[1])/float64(took[0]), st.module+"-x-faster")
		}
	}
}
