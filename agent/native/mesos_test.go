package native

import (
	"context"
	"strings"
	"testing"
)

// TestMesosRefused: the Mesos modules are known and refused with one line
// naming why and what to use instead, in check mode too, and the router
// never sends them to the Salt bridge (Supports is true).
func TestMesosRefused(t *testing.T) {
	e, _ := newExec(t)
	for _, m := range []string{"linux.mesos.master", "linux.mesos.slave"} {
		if !e.Supports(m) {
			t.Errorf("%s not claimed: it would go to the Salt bridge", m)
		}
		why, ok := e.Refused(m)
		if !ok || !strings.Contains(why, "Apache Attic") {
			t.Errorf("%s: Refused = %q, %v", m, why, ok)
		}
		for _, test := range []bool{false, true} {
			r := e.Execute(context.Background(), req(m, `{"cluster_name": "cluster", "masters_addresses": [{"key": "127.0.0.1", "value": "master1"}], "server_id": "1"}`, test))
			if r.OK || r.Changed || !strings.HasPrefix(r.Comment, m+": Apache Mesos was retired to the Apache Attic in 2021") || !strings.Contains(r.Comment, "linux.docker.running") || strings.Contains(r.Comment, "\n") {
				t.Errorf("%s (check %v): %+v", m, test, r)
			}
		}
	}
	if _, ok := e.Refused("linux.mount"); ok {
		t.Error("linux.mount refused")
	}
}
