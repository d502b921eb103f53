package native

import (
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// BenchmarkNoChangeRound measures a round of linux.group, linux.user
// (a plaintext password: verified against the shadow hash, SHA-512 crypt
// at 5000 rounds), linux.cronjob, common.timezone and linux.service (the
// init script's status through service(8), one watched file) in a Debian
// root where everything is already in place: time per state (goal below
// 50 ms). Each sub-benchmark is one module; "round" is the five in a row,
// reported per state.
func BenchmarkNoChangeRound(b *testing.B) {
	rig := newFoodRig(b)
	debroot.UseExtras(b, rig.root)
	states := []struct{ module, param string }{
		{"linux.group", `{"groupname": "Dev", "gid": "600"}`},
		{"linux.user", `{"username": "InstantForge1", "password": "instant", "fullname": "visualops username", "gid": "600", "groups": ["Dev"], "home": "/srv/visualops1"}`},
		{"linux.cronjob", `{"cmd": ["echo toto >> /tmp/toto.cron 2>&1"], "minute": "*/5", "user": "root"}`},
		{"common.timezone", `{"name": "Asia/Shanghai", "use-utc": false}`},
		{"linux.service", `{"name": ["food"], "watch": ["/etc/food.conf"]}`},
	}
	for _, s := range states { // converge first
		if res := rig.apply(b, s.module, s.param, false); !res.OK {
			b.Fatalf("%s: %+v", s.module, res)
		}
	}
	check := func(module, param string) {
		if res := rig.apply(b, module, param, false); !res.OK || res.Changed {
			b.Fatalf("%s changed on a no-change round: %+v", module, res)
		}
	}
	for _, s := range states {
		b.Run(s.module, func(b *testing.B) {
			for b.Loop() {
				check(s.module, s.param)
			}
		})
	}
	b.Run("round", func(b *testing.B) {
		start := time.Now()
		n := 0
		for b.Loop() {
			for _, s := range states {
				check(s.module, s.param)
			}
			n++
		}
		b.ReportMetric(float64(time.Since(start).Nanoseconds())/float64(n*len(states)), "ns/state")
	})
}
