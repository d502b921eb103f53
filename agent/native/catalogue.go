package native

import "github.com/visualops/opsagent/internal/system"

// CatalogueModule is one module of the catalogue (testdata/module.json)
// and the distribution family it is written for, if any.
type CatalogueModule struct {
	Name   string
	Family system.Family // "" when the module runs on any Linux
}

// Catalogue is every module of the catalogue, in module.json's order of
// families (a test keeps it equal to module.json). meta.comment and
// meta.wait are run by the round engine itself.
var Catalogue = []CatalogueModule{
	{"common.archive", ""},
	{"common.gem.package", ""},
	{"common.git", ""},
	{"common.hg", ""},
	{"common.npm.package", ""},
	{"common.pip.package", ""},
	{"common.svn", ""},
	{"common.timezone", ""},
	{"common.virtualenv", ""},
	{"linux.apt.package", system.FamilyDebian},
	{"linux.apt.ppa", system.FamilyDebian},
	{"linux.apt.repo", system.FamilyDebian},
	{"linux.chef.client", ""},
	{"linux.chef.solo", ""},
	{"linux.cmd", ""},
	{"linux.cronjob", ""},
	{"linux.dir", ""},
	{"linux.docker.built", ""},
	{"linux.docker.deploy", ""},
	{"linux.docker.pulled", ""},
	{"linux.docker.pushed", ""},
	{"linux.docker.running", ""},
	{"linux.file", ""},
	{"linux.group", ""},
	{"linux.lvm.lv", ""},
	{"linux.lvm.pv", ""},
	{"linux.lvm.vg", ""},
	{"linux.mesos.master", ""},
	{"linux.mesos.slave", ""},
	{"linux.mkfs", ""},
	{"linux.mount", ""},
	{"linux.puppet.agent", ""},
	{"linux.puppet.apply", ""},
	{"linux.puppet.run", ""},
	{"linux.raid", ""},
	{"linux.rpm.key", system.FamilyRHEL},
	{"linux.service", ""},
	{"linux.supervisord", ""},
	{"linux.symlink", ""},
	{"linux.user", ""},
	{"linux.yum.package", system.FamilyRHEL},
	{"linux.yum.repo", system.FamilyRHEL},
	{"meta.comment", ""},
	{"meta.wait", ""},
}

// FamilyOf is the family a catalogue module is written for ("" for any).
func FamilyOf(module string) system.Family {
	for _, m := range Catalogue {
		if m.Name == module {
			return m.Family
		}
	}
	return ""
}
