package native

import (
	"context"

	"github.com/visualops/opsagent/agent/state"
)

// mesosRefusal is why linux.mesos.master and linux.mesos.slave do not
// run. The 2014 fork installed Mesos from Mesosphere's Ubuntu 14.04
// (trusty) repository, Java from the webupd8team Oracle Java 8 PPA and
// Upstart jobs; all of that is gone: the repository and the PPA no
// longer serve, Upstart is not on any supported distribution, no
// distribution packages Mesos (Debian 12 has no mesos package), and
// Apache Mesos itself was retired to the Apache Attic in 2021, so there
// is no maintained release to install instead. A modern equivalent would
// be a different product; the state fails saying so instead of running
// half an installation.
const mesosRefusal = "Apache Mesos was retired to the Apache Attic in 2021, and what the 2014 module installed (Mesosphere's Ubuntu 14.04 repository, Oracle Java 8 from a PPA, Upstart jobs) no longer exists; no distribution packages Mesos: run the workload with linux.docker.running, or install a scheduler of your choice with linux.cmd"

// refusedModules are catalogue modules the native executor knows and
// will not run, each with why; `opsagent modules` shows them as
// unavailable with that reason, and their states fail with it.
var refusedModules = map[string]string{
	"linux.mesos.master": mesosRefusal,
	"linux.mesos.slave":  mesosRefusal,
}

// Refused tells whether module is one the native executor knows and
// refuses to run, and why.
func (e *Executor) Refused(module string) (why string, ok bool) {
	why, ok = refusedModules[module]
	return why, ok
}

// refuse is the module of a refused catalogue module: it fails with the
// reason, in check mode too. The router sends it here (Supports is true)
// rather than to the Salt bridge, whose 2014 state would install from
// repositories that are gone.
func (e *Executor) refuse(module string) func(context.Context, *stateRun) (state.Result, error) {
	return func(context.Context, *stateRun) (state.Result, error) {
		return state.Result{}, failf("%s: %s", module, refusedModules[module])
	}
}
