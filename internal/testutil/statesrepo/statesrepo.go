// Package statesrepo writes a TEST FIXTURE states repository: the layout of
// the real Salt fork (sources/adaptor.py, sources/salt/, libs/, compat.txt)
// with a tiny adaptor and a minimal salt.state that implement cmd.run and
// file.managed for real, with Salt's call shapes and return shape. Salt
// itself cannot be installed here (no PyPI); this stands in for it in
// tests. It is not a states repository for instances.
package statesrepo

import (
	"os"
	"path/filepath"
)

// Files is the fixture, path → content.
var Files = map[string]string{
	"compat.txt": "< 2.0\n",
	"libs/fixturelib.py": `# TEST FIXTURE: a library the adaptor imports from libs/.
def describe(parameter):
    return "fixture:" + ",".join(sorted(parameter))
`,
	"sources/adaptor.py": `# TEST FIXTURE adaptor (opsagent tests). Same imports and interface as
# the 2014 adaptor of the MadeiraCloud/salt fork.
import os
import signal
from opsagent.exception import StateException
from opsagent.utils import log
import fixturelib


class StateAdaptor(object):
    # module -> parameter key listing watched files; tfirst: run with
    # watch=True the first time, before any checksum is stored.
    watch = {
        "test.service": {"file": "config", "tfirst": True},
    }

    def __init__(self, runner):
        self.runner = runner
        self.os_type = runner.os_type
        self.os_release = runner.os_release
        self.config = runner.config

    def convert(self, step, module, parameter):
        log("DEBUG", "converting %s" % module, ("convert", self))
        if module == "linux.cmd":
            args = {"name": parameter["cmd"]}
            if parameter.get("cwd"):
                args["cwd"] = parameter["cwd"]
            return [{step: {"cmd": ["run", args]}}]
        if module == "linux.file":
            return [{parameter["path"]: {"file": ["managed", {"contents": parameter.get("content", "")}]}}]
        if module == "test.sleep":
            return [{step: {"cmd": ["run", {"name": "sleep %s" % parameter.get("seconds", 60)}]}}]
        if module == "test.service":
            return [{step: {"test": ["echo", {"text": "watch=%s %s" % (parameter.get("watch", False), fixturelib.describe(parameter))}]}}]
        if module == "test.two":
            return [{step + "-a": {"cmd": ["run", {"name": parameter["first"]}]}},
                    {step + "-b": {"cmd": ["run", {"name": parameter["second"]}]}}]
        if module == "test.crash":
            # Kill the warm worker (our parent) in the middle of a state.
            os.kill(os.getppid(), signal.SIGKILL)
            return None
        if module == "test.garbage":
            os.write(int(os.environ["OPSAGENT_BRIDGE_FD"]), b"this is not json\n")
            return None
        if module == "test.nothing":
            return None
        raise StateException("module %s is not supported by this fixture" % module)
`,
	"sources/salt/__init__.py": "# TEST FIXTURE: minimal stand-in for the Salt package.\n",
	"sources/salt/state.py": `# TEST FIXTURE: minimal stand-in for salt.state with Salt's call shapes:
# State(opts).call_high({id: {mod: [fun, {arg: v}, ...]}}) returns
# {"<mod>_|-<id>_|-<name>_|-<fun>": {"result", "comment", "changes"}}.
import os
import subprocess


class State(object):
    def __init__(self, opts):
        self.opts = opts

    def call_high(self, high):
        ret = {}
        for ident, body in high.items():
            for mod, spec in body.items():
                if mod.startswith("__"):
                    continue
                fun = spec[0]
                args = {}
                for a in spec[1:]:
                    args.update(a)
                name = args.pop("name", ident)
                tag = "%s_|-%s_|-%s_|-%s" % (mod, ident, name, fun)
                ret[tag] = getattr(self, "%s_%s" % (mod, fun))(name, **args)
        return ret

    def cmd_run(self, name, cwd=None, **kwargs):
        p = subprocess.Popen(name, shell=True, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate()
        out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        return {"result": p.returncode == 0, "comment": 'Command "%s" run' % name,
                "changes": {"stdout": out, "stderr": err, "retcode": p.returncode}}

    def file_managed(self, name, contents="", **kwargs):
        old = None
        if os.path.exists(name):
            with open(name) as f:
                old = f.read()
        if old == contents:
            return {"result": True, "comment": "File %s is in the correct state" % name, "changes": {}}
        d = os.path.dirname(name)
        if d and not os.path.isdir(d):
            os.makedirs(d)
        with open(name, "w") as f:
            f.write(contents)
        return {"result": True, "comment": "File %s updated" % name, "changes": {"diff": "new" if old is None else "changed"}}

    def test_echo(self, name, text="", **kwargs):
        return {"result": True, "comment": text, "changes": {}}
`,
	// The import lines of the 2014 adaptor (MadeiraCloud/salt,
	// sources/adaptor.py), to prove the shim satisfies them.
	"sources/adaptor2014_imports.py": `# TEST FIXTURE: the opsagent imports of the 2014 adaptor.
from opsagent.exception import StateException
from opsagent.utils import log
OK = issubclass(StateException, Exception) and callable(log)
`,
}

// With returns a copy of the fixture with extra files (path → content; ""
// deletes) applied on top, e.g. to commit it to a test git server.
func With(extra map[string]string) map[string]string {
	all := map[string]string{}
	for k, v := range Files {
		all[k] = v
	}
	for k, v := range extra {
		all[k] = v
	}
	return all
}

// Write creates the fixture, with extra files applied, in dir.
func Write(dir string, extra map[string]string) error {
	for p, content := range With(extra) {
		full := filepath.Join(dir, p)
		if content == "" {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}
