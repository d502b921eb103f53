# opsagent Salt bridge: a warm Python worker driven by the Go agent.
#
# Protocol: one JSON object per line. Requests on stdin, responses on the
# original stdout (kept as a private channel); everything Salt or the
# adaptor prints goes to stderr, which the agent copies to its log.
#   {"op": "ping", "seq": N}                        -> {"seq": N, "result": true}
#   {"op": "load", "seq": N, "repo_dir": ..., "config": {...}}
#   {"op": "run", "seq": N, "state_id": ..., "module": ..., "parameter": {...}}
#       -> {"seq": N, "event": "started", "pgid": P}   (the state's process group)
#       -> {"seq": N, "result": bool, "comment": ..., "stdout": ...}
# Each state runs in a forked child in its own process group, so the agent
# can stop it by killing that group without losing the warm worker.
# Runs on Python 2.7 and 3.6+: no f-strings, no annotations.
#
# "load" config (all optional; the Go agent sends them):
#   site_packages   the virtualenv's site-packages: added with site.addsitedir
#                   (a minimal Python 2 env has only a symlinked interpreter)
#   salt_opts       Salt's options, used as given
#   salt            {srv_root, extension_modules, cachedir}: the directories
#                   the 2014 StateRunner took from [salt] (srv_root may be
#                   "a:b"); used to build Salt's options when salt_opts is
#                   not given; missing ones are derived from global.envroot
#   global          {conf_path, envroot, ...}: the 2014 adaptor reads
#                   config['global']['conf_path']
#   watch_dir, os_root
import copy
import errno
import hashlib
import json
import logging
import os
import site
import sys
import traceback
import types

PROTO = os.fdopen(os.dup(1), "w")
os.environ["OPSAGENT_BRIDGE_FD"] = str(PROTO.fileno())  # for test fixtures
os.dup2(2, 1)
sys.stdout = sys.stderr

# The 2014 agent's watch map, for an adaptor without one. Its entries:
#   file_key  parameter key listing the watched files (dir_key: directories,
#             with file the name of the watched file in each)
#   action    function(config, parameter) giving the watched paths instead
#   tfirst    a file without a stored checksum counts as changed (default)
#   rerun     run the state, then check the files it wrote, and run it
#             again with watch=True when they changed (docker deploy)
# An entry without file_key/dir_key is the older form (the test fixture's):
# file is the parameter key and tfirst defaults to false.
DEFAULT_WATCH = {"linux.service": {"file_key": "watch", "tfirst": True},
                 "linux.supervisord": {"file_key": "watch", "tfirst": True}}

# The 2014 agent's [salt] defaults, below global.envroot (its "chroot").
SALT_DIR_DEFAULTS = {
    "srv_root": "/srv/salt",
    "extension_modules": "/var/cache/salt/minion/extmods",
    "cachedir": "/var/cache/visualops",
}

# State modules after which the 2014 StateRunner built a fresh salt State
# (they install tools that other Salt modules probe for when loaded).
FRESH_STATE_MODULES = ("npm", "gem", "pip")

LOGGER_CLASS = logging.getLoggerClass()

STATE = {"adaptor": None, "salt_state": None, "salt": None, "opts": None, "config": {}, "repo": None}

try:
    TEXT_TYPE = unicode  # noqa: F821 (Python 2)
except NameError:
    TEXT_TYPE = str


def text(v):
    """Salt returns byte strings on Python 2; JSON needs text."""
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, TEXT_TYPE):
        return v
    try:
        return TEXT_TYPE(v)
    except UnicodeError:  # Python 2: an exception with non-ASCII bytes
        return TEXT_TYPE(repr(v))


def native(v):
    """On Python 2, JSON's unicode strings as UTF-8 byte strings, as the
    2014 agent's uni2str did: Salt 2014 formats them into byte strings
    (state tags, comments) and fails on non-ASCII unicode."""
    if TEXT_TYPE is str:
        return v
    if isinstance(v, TEXT_TYPE):
        return v.encode("utf-8")
    if isinstance(v, dict):
        return dict((native(k), native(x)) for k, x in v.items())
    if isinstance(v, list):
        return [native(x) for x in v]
    return v


def log_line(s):
    """Python 2's stderr (a pipe) encodes unicode as ASCII, and fails."""
    if TEXT_TYPE is not str and isinstance(s, TEXT_TYPE):
        s = s.encode("utf-8")
    sys.stderr.write(s)


def send(obj):
    PROTO.write(json.dumps(obj) + "\n")
    PROTO.flush()


def install_shim():
    """The opsagent package the 2014 adaptor imports from."""
    if "opsagent" in sys.modules and getattr(sys.modules["opsagent"], "__bridge__", False):
        return
    pkg = types.ModuleType("opsagent")
    pkg.__path__ = []
    pkg.__bridge__ = True
    exc = types.ModuleType("opsagent.exception")

    class StateException(Exception):
        pass

    exc.StateException = StateException
    utils = types.ModuleType("opsagent.utils")
    # The 2014 adaptor's convert() catches its own errors, logs them and
    # returns None; run_state() reads them here to fail the state with them.
    utils.errors = []

    def log(level, message, where=None):
        if isinstance(where, tuple) and where:
            where = where[0]
        log_line(u"[%s] %s: %s\n" % (text(level), text(where), text(message)))
        if str(level).upper() in ("ERROR", "CRITICAL"):
            utils.errors.append(text(message))

    utils.log = log
    pkg.exception = exc
    pkg.utils = utils
    sys.modules["opsagent"] = pkg
    sys.modules["opsagent.exception"] = exc
    sys.modules["opsagent.utils"] = utils


def os_info(root):
    ids = {}
    path = os.path.join(root or "/", "etc/os-release")
    try:
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.strip().split("=", 1)
                    ids[k] = v.strip('"').strip("'")
    except (IOError, OSError):
        pass
    os_id = ids.get("ID", "unknown").lower()
    # The 2014 adaptor knows the names of Salt's "os" grain.
    return {"amzn": "amazon", "rhel": "redhat"}.get(os_id, os_id), ids.get("VERSION_ID", "")


class Runner(object):
    def __init__(self, config, os_root):
        self.config = config
        self.os_type, self.os_release = os_info(os_root)


def add_site_packages(path):
    """addsitedir (so .pth files work), ahead of the interpreter's own
    site-packages, which may hold other versions of Salt's libraries."""
    before = list(sys.path)
    site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    if not added:
        return
    rest = [p for p in sys.path if p not in added]
    at = len(rest)
    for i, p in enumerate(rest):
        if p.rstrip("/").endswith(("site-packages", "dist-packages")):
            at = i
            break
    sys.path[:] = rest[:at] + added + rest[at:]


def mkdirs(path, what):
    if not os.path.isdir(path):
        try:
            os.makedirs(path)
        except OSError as e:
            raise RuntimeError("cannot create the Salt %s directory %s: %s" % (what, path, e))
    return path


def build_salt_opts(config):
    """The options the 2014 StateRunner gave salt.state.State, every
    directory taken from config (and created, as the 2014 runner did)."""
    dirs = dict(config.get("salt") or {})
    envroot = (config.get("global") or {}).get("envroot")
    for key, default in SALT_DIR_DEFAULTS.items():
        if not dirs.get(key) and envroot:
            dirs[key] = os.path.normpath(envroot + "/" + default)
    missing = sorted(k for k in SALT_DIR_DEFAULTS if not dirs.get(k))
    if missing:
        raise RuntimeError("config lacks salt.%s (or global.envroot to derive it): the agent must send the Salt directories" % ", salt.".join(missing))
    roots = [mkdirs(p, "file root") for p in str(dirs["srv_root"]).split(":") if p]
    return {
        "file_client": "local",
        "renderer": "yaml_jinja",
        "failhard": False,
        "state_top": "salt://top.sls",
        "nodegroups": {},
        "file_roots": {"base": roots},
        "state_auto_order": False,
        "extension_modules": mkdirs(dirs["extension_modules"], "extension modules"),
        "id": "",
        "pillar_roots": "",
        "cachedir": mkdirs(dirs["cachedir"], "cache"),
        "test": False,
        "environment": None,
    }


def is_real_salt(repo):
    """A Salt tree has salt/version.py; the test stand-in has none and
    needs no options."""
    return os.path.isfile(os.path.join(repo, "sources", "salt", "version.py"))


def load(req):
    repo = req["repo_dir"]
    config = req.get("config") or {}
    # A failed load leaves nothing loaded, not the previous checkout's
    # adaptor over half-forgotten modules.
    STATE.update({"adaptor": None, "salt_state": None, "salt": None, "opts": None, "repo": None})
    if config.get("site_packages"):
        add_site_packages(config["site_packages"])
    install_shim()
    for p in (os.path.join(repo, "libs"), os.path.join(repo, "sources")):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    # Forget modules imported from an older checkout so they re-import.
    # Salt's import sets its own logger class, and derives the next one
    # from the class in place: put the original back first.
    logging.setLoggerClass(LOGGER_CLASS)
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if f.startswith(repo) or name == "adaptor" or name == "salt" or name.startswith("salt."):
            del sys.modules[name]
    if config.get("salt_opts"):
        opts = dict(config["salt_opts"])
    elif is_real_salt(repo):
        opts = build_salt_opts(config)
    else:
        opts = {}
    import importlib
    adaptor = importlib.import_module("adaptor")
    salt_state = importlib.import_module("salt.state")
    # Built once, warm, like the 2014 StateRunner: loading grains and
    # modules takes about a second, and every state's forked child
    # inherits this one.
    warm = salt_state.State(opts)
    STATE["adaptor"] = adaptor.StateAdaptor(Runner(config, config.get("os_root")))
    STATE["salt_state"] = salt_state
    STATE["salt"] = warm
    STATE["opts"] = opts
    STATE["config"] = config
    STATE["repo"] = repo
    return {"result": True, "comment": "loaded %s" % repo}


def pathname(f):
    """A path as the interpreter's own str (bytes on Python 2)."""
    return f if isinstance(f, (bytes, TEXT_TYPE)) else str(f)


def watch_spec(module):
    amap = getattr(STATE["adaptor"], "watch", None)
    if not isinstance(amap, dict):
        amap = DEFAULT_WATCH
    spec = amap.get(module)
    if not spec:
        return None
    if not isinstance(spec, dict):
        spec = {"file": spec}
    return spec


def watch_files(spec, parameter):
    """The files a state watches, and its tfirst. As the 2014 agent did, the
    parameter's list of watched files is taken out of parameter["watch"]:
    the adaptor reads a true "watch" as "restart"."""
    if spec is None:
        return [], False
    if "file_key" not in spec and "dir_key" not in spec:
        files = parameter.get(spec.get("file", "watch")) or []
        if not isinstance(files, list):
            files = [files]
        out = []
        for f in files:
            if isinstance(f, dict):
                f = f.get("key")
            if f:
                out.append(pathname(f))
        return out, bool(spec.get("tfirst", False))
    tfirst = bool(spec.get("tfirst", True))
    key = spec.get("file_key") or spec.get("dir_key")
    if not parameter.get(key):
        return [], tfirst
    if callable(spec.get("action")):
        files = spec["action"](STATE["config"], parameter)
    else:
        files = parameter.get(key)
    if isinstance(files, (bytes, TEXT_TYPE)):
        files = [files]
    if not isinstance(files, list):
        return [], tfirst
    parameter.pop("watch", None)
    out = []
    for f in files:
        if isinstance(f, dict):
            f = f.get("key")
        if not f:
            continue
        f = pathname(f)
        if spec.get("file"):
            f = os.path.join(f, spec["file"])
        out.append(f)
    return out, tfirst


def cksum_path(state_id, path):
    return os.path.join(STATE["config"].get("watch_dir", "/tmp"), "%s-%s.cksum" % (state_id, path.replace("/", "-")))


def md5_of(path):
    h = hashlib.md5()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(65536), b""):
                h.update(block)
    except (IOError, OSError):
        return ""
    return h.hexdigest()


def ordered(ret):
    """Salt's results in the order Salt ran them."""
    def key(item):
        r = item[1]
        return (r.get("__run_num__", 0) if isinstance(r, dict) else 0, text(item[0]))
    return sorted(ret.items(), key=key)


def state_for(chunk, refreshed):
    st = STATE["salt"]
    mods = set()
    for body in chunk.values():
        if isinstance(body, dict):
            mods.update(body.keys())
    if st is None or mods.intersection(FRESH_STATE_MODULES):
        st = STATE["salt_state"].State(STATE["opts"])
    # Salt reloads its modules in this child after installing packages;
    # the warm worker must do the same, or later states miss new tools.
    orig = getattr(type(st), "module_refresh", None)
    if orig is not None:
        def module_refresh():
            refreshed.append(True)
            return orig(st)
        st.module_refresh = module_refresh
    return st


def execute(req):
    state_id, module = native(req["state_id"]), native(req["module"])
    parameter = native(dict(req.get("parameter") or {}))
    spec = watch_spec(module)
    first = None
    if spec and spec.get("rerun"):
        # The state writes the files it watches: run it, then look.
        first = run_state(state_id, module, copy.deepcopy(parameter))
        if not first["result"]:
            return first
    files, tfirst = watch_files(spec, parameter)
    sums = {}
    changed = False
    for f in files:
        sums[f] = md5_of(f)
        try:
            with open(cksum_path(state_id, f)) as cf:
                old = cf.read().strip()
        except (IOError, OSError):
            old = None
        if (old is None and tfirst) or (old is not None and old != sums[f]):
            changed = True
    if changed:
        parameter["watch"] = True
    if first is None:
        res = run_state(state_id, module, parameter)
    elif changed:
        res = run_state(state_id, module, parameter)
        for k in ("comment", "stdout"):
            res[k] = "\n".join([x for x in (first[k], res[k]) if x])
        if first.get("refresh_modules"):
            res["refresh_modules"] = True
    else:
        res = first
    if res["result"]:
        for f, s in sums.items():
            try:
                with open(cksum_path(state_id, f), "w") as cf:
                    cf.write(s)
            except (IOError, OSError):
                pass
    return res


def run_state(state_id, module, parameter):
    """Converts with the adaptor and runs the chunks with Salt."""
    errors = getattr(sys.modules["opsagent.utils"], "errors", [])
    del errors[:]
    chunks = STATE["adaptor"].convert(state_id, module, parameter)
    if not chunks:
        if errors:
            # The 2014 adaptor swallows its StateException and returns None.
            return {"result": False, "comment": "\n".join(errors), "stdout": ""}
        return {"result": True, "comment": "nothing to do", "stdout": ""}
    if isinstance(chunks, dict):
        chunks = [chunks]
    comments, outs = [], []
    result = True
    refreshed = []
    for chunk in chunks:
        ret = state_for(chunk, refreshed).call_high(chunk)
        if isinstance(ret, list):  # Salt returns a list of errors for bad high data
            result = False
            comments.extend([text(e) for e in ret])
            break
        for tag, r in ordered(ret):
            if not isinstance(r, dict) or "result" not in r:
                continue
            if r.get("comment"):
                comments.append(text(r["comment"]))
            if "state_stdout" in r:  # the fork's own output key
                if r["state_stdout"]:
                    outs.append(text(r["state_stdout"]))
            else:
                ch = r.get("changes") or {}
                if isinstance(ch, dict):
                    for k in ("stdout", "stderr"):
                        if ch.get(k):
                            outs.append(text(ch[k]))
            if not r["result"]:  # None is Salt's "would change" in test mode
                result = False
        if not result:
            break
    res = {"result": result, "comment": "\n".join(comments), "stdout": "\n".join(outs)}
    if refreshed:
        res["refresh_modules"] = True
    return res


def run(req):
    if STATE["adaptor"] is None:
        return {"result": False, "comment": "bridge: no states repository loaded"}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        try:
            res = execute(req)
        except Exception as e:  # the adaptor's StateException included
            res = {"result": False, "comment": u"%s: %s" % (type(e).__name__, text(e)), "stdout": text(traceback.format_exc())}
        try:
            data = json.dumps(res)
        except Exception as e:
            data = json.dumps({"result": False, "comment": "bridge: result not serialisable: %s" % e})
        os.write(w, data.encode("utf-8"))
        os._exit(0)
    os.close(w)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    send({"seq": req.get("seq"), "event": "started", "pgid": pid})
    chunks = []
    while True:
        try:
            b = os.read(r, 65536)
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return {"result": False, "comment": "bridge: the state process ended without a result (wait status %d)" % status}
    res = json.loads(data.decode("utf-8"))
    if res.pop("refresh_modules", False):
        refresh_warm_state()
    return res


def refresh_warm_state():
    st = STATE["salt"]
    if st is None or not hasattr(st, "load_modules"):
        return
    try:
        st.load_modules()
    except Exception:
        log_line("bridge: reloading Salt's modules failed; the next state may not see new tools:\n%s" % traceback.format_exc())


def main():
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        seq = None
        try:
            req = json.loads(line)
            seq = req.get("seq")
            op = req.get("op")
            if op == "ping":
                res = {"result": True}
            elif op == "load":
                res = load(req)
            elif op == "run":
                res = run(req)
            else:
                res = {"result": False, "comment": "bridge: unknown op %r" % op}
        except Exception as e:
            res = {"result": False, "comment": u"bridge: %s: %s" % (type(e).__name__, text(e)), "stdout": text(traceback.format_exc())}
        res["seq"] = seq
        send(res)


if __name__ == "__main__":
    main()
