package native

import (
	"fmt"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/dockerd"
)

// BenchmarkNoChangeRoundDocker measures a round of each linux.docker.*
// state with everything already in place, against a real engine (and a
// registry on loopback for pulled and deploy): time per state, and the
// engine API calls per state (api-calls/op). running costs a ping and
// one container list; pulled adds the registry's digest of the tag
// (through the engine: one manifest request, no download); built reads
// and hashes its context (here a 2 MB binary and a Dockerfile) and
// inspects one image; pushed inspects one image.
func BenchmarkNoChangeRoundDocker(b *testing.B) {
	rig := newDockerRig(b)
	reg := dockerd.StartRegistry(b, "", "")
	image := reg.Host + "/bench/app"
	rig.writeRootContext(b, "opt/bench", "one")
	states := []struct{ module, param string }{
		{"linux.docker.built", fmt.Sprintf(`{"tag": "%s:v1", "path": "/opt/bench"}`, image)},
		{"linux.docker.pushed", fmt.Sprintf(`{"repository": %q, "tag": "v1"}`, image)},
		{"linux.docker.pulled", fmt.Sprintf(`{"repo": %q, "tag": "v1", "containers": ["web"]}`, image)},
		{"linux.docker.running", fmt.Sprintf(`{"container": "web", "image": "%s:v1", "count": "2", "environment": {"A": "1"}, "port_bindings": {"80": "8080"}}`, image)},
		{"linux.docker.deploy", fmt.Sprintf(`{"container": "site", "image": %q, "tag": "v1", "files": {"/etc/site.conf": "x=1"}}`, image)},
	}
	for _, s := range states { // converge first
		if res := rig.apply(b, s.module, s.param, false); !res.OK {
			b.Fatalf("%s: %+v", s.module, res)
		}
	}
	for _, s := range states {
		b.Run(s.module, func(b *testing.B) {
			mark, n := rig.calls.Mark(), 0
			for b.Loop() {
				if res := rig.apply(b, s.module, s.param, false); !res.OK || res.Changed {
					b.Fatalf("%s changed on a no-change round: %+v", s.module, res)
				}
				n++
			}
			b.ReportMetric(float64(len(rig.calls.Since(mark)))/float64(n), "api-calls/op")
		})
	}
}
