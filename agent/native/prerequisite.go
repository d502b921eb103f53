package native

import (
	"context"
	"fmt"

	"github.com/visualops/opsagent/internal/system"
)

// need makes sure a tool a module runs is installed, installing its
// package through the package layer when it is missing (where the 2014
// adaptor installed it first), and adds what it installed to ch as
// "PKG installed (prerequisite)". In check mode nothing is installed: the
// package is reported as one that would be, and missing is true so that
// the caller runs nothing that needs the tool. It is the one way every
// module gets its tools.
func (s *stateRun) need(ctx context.Context, pre system.Prerequisite, ch *changes) (missing bool, err error) {
	if s.sys.HasTool(pre.Tool) {
		return false, nil
	}
	if s.test {
		ch.add("%s would be installed (prerequisite)", prerequisitePackage(s, pre))
		return true, nil
	}
	pkg, err := s.sys.EnsureTool(ctx, pre)
	if err != nil {
		return false, fmt.Errorf("%s is not installed and cannot be: %w", pre.Tool, err)
	}
	if pkg != "" {
		ch.add("%s installed (prerequisite)", pkg)
	}
	return false, nil
}

// prerequisitePackage names the package that would provide the tool, for
// check mode's comment.
func prerequisitePackage(s *stateRun, pre system.Prerequisite) string {
	if d, err := s.sys.Distro(); err == nil {
		if pkg := pre.Packages[d.Family()]; pkg != "" {
			return pkg
		}
	}
	return pre.Tool
}
