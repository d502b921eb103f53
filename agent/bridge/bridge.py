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
import errno
import hashlib
import json
import os
import sys
import traceback
import types

PROTO = os.fdopen(os.dup(1), "w")
os.environ["OPSAGENT_BRIDGE_FD"] = str(PROTO.fileno())  # for test fixtures
os.dup2(2, 1)
sys.stdout = sys.stderr

DEFAULT_WATCH = {"linux.service": {"file": "watch"}, "linux.supervisord": {"file": "watch"}}

STATE = {"adaptor": None, "salt_state": None, "config": {}, "repo": None}


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

    def log(level, message, where=None):
        sys.stderr.write("[%s] %s: %s\n" % (level, where, message))

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
    return ids.get("ID", "unknown").lower(), ids.get("VERSION_ID", "")


class Runner(object):
    def __init__(self, config, os_root):
        self.config = config
        self.os_type, self.os_release = os_info(os_root)


def load(req):
    repo = req["repo_dir"]
    config = req.get("config") or {}
    install_shim()
    for p in (os.path.join(repo, "libs"), os.path.join(repo, "sources")):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    # Forget modules imported from an older checkout so they re-import.
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if f.startswith(repo) or name == "adaptor" or name == "salt" or name.startswith("salt."):
            del sys.modules[name]
    import importlib
    adaptor = importlib.import_module("adaptor")
    salt_state = importlib.import_module("salt.state")
    STATE["adaptor"] = adaptor.StateAdaptor(Runner(config, config.get("os_root")))
    STATE["salt_state"] = salt_state
    STATE["config"] = config
    STATE["repo"] = repo
    return {"result": True, "comment": "loaded %s" % repo}


def watch_files(module, parameter):
    amap = getattr(STATE["adaptor"], "watch", None)
    if not isinstance(amap, dict):
        amap = DEFAULT_WATCH
    spec = amap.get(module)
    if not spec:
        return [], False
    if not isinstance(spec, dict):
        spec = {"file": spec}
    files = parameter.get(spec.get("file", "watch")) or []
    if not isinstance(files, list):
        files = [files]
    out = []
    for f in files:
        if isinstance(f, dict):
            f = f.get("key")
        if f:
            out.append(str(f))
    return out, bool(spec.get("tfirst", False))


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


def execute(req):
    state_id, module = req["state_id"], req["module"]
    parameter = dict(req.get("parameter") or {})
    files, tfirst = watch_files(module, parameter)
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
    chunks = STATE["adaptor"].convert(state_id, module, parameter)
    if not chunks:
        return {"result": True, "comment": "nothing to do", "stdout": ""}
    if isinstance(chunks, dict):
        chunks = [chunks]
    comments, outs = [], []
    result = True
    for chunk in chunks:
        st = STATE["salt_state"].State(STATE["config"].get("salt_opts") or {})
        ret = st.call_high(chunk)
        if isinstance(ret, list):  # Salt returns a list of errors for bad high data
            result = False
            comments.extend([str(e) for e in ret])
            break
        for tag in sorted(ret):
            r = ret[tag] or {}
            if r.get("comment"):
                comments.append(str(r["comment"]))
            ch = r.get("changes") or {}
            if isinstance(ch, dict):
                for k in ("stdout", "stderr"):
                    if ch.get(k):
                        outs.append(str(ch[k]))
            if not r.get("result", False):
                result = False
        if not result:
            break
    if result:
        for f, s in sums.items():
            try:
                with open(cksum_path(state_id, f), "w") as cf:
                    cf.write(s)
            except (IOError, OSError):
                pass
    return {"result": result, "comment": "\n".join(comments), "stdout": "\n".join(outs)}


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
            res = {"result": False, "comment": "%s: %s" % (type(e).__name__, e), "stdout": traceback.format_exc()}
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
    return json.loads(data.decode("utf-8"))


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
            res = {"result": False, "comment": "bridge: %s: %s" % (type(e).__name__, e), "stdout": traceback.format_exc()}
        res["seq"] = seq
        send(res)


if __name__ == "__main__":
    main()
