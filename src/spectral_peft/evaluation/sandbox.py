"""Run untrusted Python (model-written code) in a sandbox, and judge its tests outside it.

`run_with_tests(code, tests, setup)` answers "does `code` pass these `assert` statements?"; `run_python(code)` runs
`code` and reports how it ended. docs/security.md is the threat model: what each layer stops and what it does not.

Three processes. The evaluator (the caller) starts a *judge*: this file, run as a script. The judge starts a
*worker*, a fresh interpreter that runs the code. The verdict never depends on anything the worker can write (one
exception: a non-root caller without namespaces, whose processes code that defeats the Python guards can reach):
- The judge evaluates every assert itself. A test is split at the names the code defines: in
  `assert add(1, 2) == 3` the worker evaluates `add(1, 2)` and returns its value as plain data (None, bool, int,
  float, complex, str, bytes, bytearray, list, tuple, set, frozenset, dict, OrderedDict, Counter, deque, range,
  Decimal, Fraction; anything else fails the test). The comparison, `set(...)`, `math.isclose(...)` and every other
  operation of the test run in the judge, on those values. The judge writes the verdict to a pipe the worker never
  holds. Printing a token, exit codes, `os._exit(0)`, an object whose `__eq__` is always True, or a worker that lies
  about its values cannot make a failing assert pass: the most a worker can do is return the values the test
  expects, which is what passing the test means (a program can still hard-code them; the tests decide that).

Kernel layers (they hold against code that defeats every Python-level guard):
- Resource limits on the worker: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of every file it writes,
  its captured stdout/stderr included (RLIMIT_FSIZE), open descriptors (RLIMIT_NOFILE), no core files, and
  RLIMIT_NPROC = `max_processes` (default 0: no new process and no thread; the worker never runs as root, so the
  kernel enforces it).
- Started as root, the judge and worker run as the unprivileged user 'nobody' (uid/gid 65534 when that entry is
  missing), with no supplementary groups, no_new_privs, and undumpable (the worker cannot ptrace the judge).
- Only PATH, HOME and TMPDIR are set (HOME = TMPDIR = the work directory); stdin is /dev/null.
- Wall clock: after `timeout` seconds the evaluator kills the process group (SIGKILL).
- Where they can be made (probed at run time, `available_isolation()`), fresh pid, mount, network, IPC and UTS
  namespaces (`unshare`; plus a user namespace when not root, with every capability dropped before the code runs):
  the sandbox dies with the judge, even processes that left the group with setsid(); no network, not even Unix
  sockets of the host; and the worker sees a read-only view of /usr, /bin, /lib* and the Python installation, a
  fresh tmpfs /work (also /tmp) as the only writable place, capped at `max_files` files and
  `max_files * max_output_bytes` bytes, and nothing else: no /etc, /home, /root, /proc, /sys or /run. The FFI
  extension modules (_ctypes, _cffi_backend) are hidden in that view.

Python layer (the worker, defence in depth only): an audit hook (PEP 578; Python code cannot remove it) refuses
process creation, signals, sockets of every family, FFI (`ctypes.*` events; imports of ctypes, cffi,
multiprocessing), building code objects, changes to files outside the work directory, reads outside the work
directory and the Python installation, and more than `max_files` new files. Without namespaces, file-system
confinement and the file count rest on this layer and on the uid only.

The limits use POSIX `resource` and `preexec_fn` (Linux); call this from the main thread of a process that runs no
other threads.
"""

from __future__ import annotations

import ast
import builtins
import errno
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from functools import cache
from pathlib import Path

try:
    from ..errors import InputError
except ImportError:  # this file also runs on its own, as the harness inside the sandbox (standard library only)
    InputError = ValueError

__all__ = ["OPTIONS", "SandboxResult", "available_isolation", "run_python", "run_with_tests"]

PATH = "/usr/local/bin:/usr/bin:/bin"
OVERFLOW_ID = 65534  # the kernel's overflow uid/gid ('nobody' on most systems)
HOLE = "__sandbox_value__"  # the judge's stand-in for a value the worker computes
NO_VERDICT = "the judge gave no verdict"
MAX_DEPTH = 100  # nesting of a value sent from the worker
REPLY_LIMIT = 16 << 20  # bytes of one value sent from the worker
BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "multiprocessing", "_multiprocessing"})
REFUSED_EVENTS = frozenset({
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link", "socket.__new__", "socket.connect",
    "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname", "code.__new__",
})
WRITE_EVENTS = frozenset({"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.mkdir",
                          "os.utime", "os.chdir", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr"})
READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.listxattr", "os.getxattr"})
DEVICES = ("null", "zero", "random", "urandom")
OPTIONS = {"timeout": 10.0, "memory_mb": 1024, "cpu_seconds": None, "max_output_bytes": 1 << 20, "max_open_files": 64,
           "max_processes": 0, "max_files": 64, "isolation": "auto", "guards": True, "python": None}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 24, 38


# --- the worker: runs the code, answers the judge's requests for values ------------------------------------------

def _install_guards(work: str, max_files: int) -> None:
    """Add the worker's audit hook: refuse the events above, confine file access to `work` (+ reads of Python)."""
    realpath, join = os.path.realpath, os.path.join
    readable = tuple({realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)})
    devices = frozenset(f"/dev/{d}" for d in DEVICES)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    created = [0]

    def resolve(path) -> str | None:  # None: an open descriptor, whose own opening was checked
        if isinstance(path, int) or path is None:
            return None
        return realpath(join(os.getcwd(), os.fsdecode(os.fspath(path))))

    def under(full: str, roots) -> bool:
        return any(full == root or full.startswith(root.rstrip("/") + "/") for root in roots)

    def write_to(path, creates: bool) -> None:
        full = resolve(path)
        if full is None:
            return
        if not under(full, (work,)):
            raise PermissionError(f"writing {full} is refused in the spectral-peft sandbox (only {work} is writable)")
        if creates and not os.path.lexists(full):
            created[0] += 1
            if created[0] > max_files:
                raise PermissionError(f"more than {max_files} new files are refused in the spectral-peft sandbox")

    def read_from(path) -> None:
        full = resolve(path)
        if full is not None and full not in devices and not under(full, (work, *readable)):
            raise PermissionError(f"reading {full} is refused in the spectral-peft sandbox")

    def hook(event: str, args: tuple) -> None:
        if event in REFUSED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"{event} is refused in the spectral-peft sandbox")
        if event == "import" and args[0].partition(".")[0] in BLOCKED_MODULES:
            raise ImportError(f"import of {args[0]!r} is refused in the spectral-peft sandbox")
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & write_flags:
                write_to(path, creates=True)
            else:
                read_from(path)
        elif event in WRITE_EVENTS:
            write_to(args[0], creates=event == "os.mkdir")
            if event == "os.rename":
                write_to(args[1], creates=False)
        elif event in READ_EVENTS:
            read_from(args[0] if args and args[0] is not None else ".")

    sys.addaudithook(hook)


def _encode(value, depth: int = 0) -> list:
    """`value` as a JSON tree of tagged plain data (the inverse of `_decode`); TypeError for any other value."""
    if depth > MAX_DEPTH:
        raise InputError("the value is nested too deeply to be judged")

    def items(values) -> list:
        return [_encode(x, depth + 1) for x in values]

    if value is None:
        return ["None"]
    if type(value) is bool:
        return ["bool", value]
    if isinstance(value, int):
        return ["int", format(int(value), "x")]
    if isinstance(value, float):
        return ["float", float(value).hex()]
    if isinstance(value, complex):
        return ["complex", value.real.hex(), value.imag.hex()]
    if isinstance(value, str):
        return ["str", str(value)]
    if isinstance(value, (bytes, bytearray)):
        return ["bytearray" if isinstance(value, bytearray) else "bytes", bytes(value).hex()]
    if isinstance(value, deque):
        return ["deque", items(value), value.maxlen]
    for kind in (list, tuple, set, frozenset):
        if isinstance(value, kind):
            return [kind.__name__, items(value)]
    for kind in (Counter, OrderedDict, dict):
        if isinstance(value, kind):
            return [kind.__name__, [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]]
    if isinstance(value, range):
        return ["range", items((value.start, value.stop, value.step))]
    if isinstance(value, Decimal):
        return ["Decimal", str(value)]
    if isinstance(value, Fraction):
        return ["Fraction", items((value.numerator, value.denominator))]
    raise TypeError(f"a {type(value).__name__} value cannot be judged outside the sandbox (only plain data can)")


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, in at most 300 characters."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - a message that cannot even be printed
        text = type(exc).__name__
    return text[:300]


def _worker_main(request_fd: int, reply_fd: int, options: dict) -> int:
    """Run setup + code as `__main__`, then answer each request `{"expr": ...}` with the encoded value, until EOF."""
    requests, replies = os.fdopen(request_fd, "rb"), os.fdopen(reply_fd, "wb")
    program = json.loads(requests.readline())
    if options["guards"]:
        _install_guards(os.getcwd(), options["max_files"])

    def send(message: dict) -> None:
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    env = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(program["setup"], "<setup>", "exec"), env)  # noqa: S102 - running the code is the point
        exec(compile(program["code"], "<code>", "exec"), env)  # noqa: S102
    except SystemExit:
        send({"ready": False, "error": "the program exited before the tests"})
        raise
    except BaseException as exc:  # noqa: BLE001 - the code's failure: report it the way python does, fail its tests
        sys.excepthook(type(exc), exc, exc.__traceback__)
        send({"ready": False, "error": _describe(exc)})
        return 1
    send({"ready": True})
    for line in requests:
        try:
            send({"value": _encode(eval(compile(json.loads(line)["expr"], "<test>", "eval"), env))})
        except BaseException as exc:  # noqa: BLE001 - any failure of a value (SystemExit too) fails that test only
            send({"error": _describe(exc)})
    return 0


# --- the judge: confines itself and the worker, evaluates the tests on the worker's values ------------------------

def _decode(tree, depth: int = 0):
    """Rebuild a value from `_encode`'s tree, accepting nothing else (the tree comes from untrusted code)."""
    if depth > MAX_DEPTH or not isinstance(tree, list) or not tree or not isinstance(tree[0], str):
        raise InputError("malformed value from the sandbox")
    tag, args = tree[0], tree[1:]
    text = args[0] if len(args) == 1 and isinstance(args[0], str) else None

    def many() -> list:
        return [_decode(x, depth + 1) for x in args[0]]

    if tag == "None" and not args:
        return None
    if tag == "bool" and len(args) == 1 and type(args[0]) is bool:
        return args[0]
    if text is not None and tag in ("int", "float", "str", "bytes", "bytearray", "Decimal"):
        return {"int": lambda s: int(s, 16), "float": float.fromhex, "str": str, "bytes": bytes.fromhex,
                "bytearray": bytearray.fromhex, "Decimal": Decimal}[tag](text)
    if tag == "complex" and len(args) == 2 and all(isinstance(a, str) for a in args):
        return complex(float.fromhex(args[0]), float.fromhex(args[1]))
    if not args or not isinstance(args[0], list):
        raise InputError(f"malformed value from the sandbox (tag {tag!r})")
    if tag in ("list", "tuple", "set", "frozenset") and len(args) == 1:
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](many())
    if tag == "deque" and len(args) == 2 and (args[1] is None or type(args[1]) is int):
        return deque(many(), args[1])
    if tag in ("dict", "OrderedDict", "Counter") and len(args) == 1:
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in args[0]):
            raise InputError("malformed mapping from the sandbox")
        pairs = [(_decode(key, depth + 1), _decode(value, depth + 1)) for key, value in args[0]]
        return {"dict": dict, "OrderedDict": OrderedDict, "Counter": Counter}[tag](dict(pairs))  # not Counter(pairs)
    if tag in ("range", "Fraction") and len(args) == 1:
        numbers = many()
        if all(type(n) is int for n in numbers) and len(numbers) == (3 if tag == "range" else 2):
            return range(*numbers) if tag == "range" else Fraction(*numbers)
    raise InputError(f"malformed value from the sandbox (tag {tag!r})")


def _local_names(tree: ast.AST) -> set[str]:
    """Names a test binds itself: comprehension targets and lambda parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.comprehension):
            names |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Lambda):
            a = node.args
            names |= {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None}
    return names


class _Split(ast.NodeTransformer):
    """Replace each maximal subexpression that needs the code's names by `HOLE(k)`; `holes[k]` is its source.

    The judge evaluates operators, comparisons, displays and calls of its own functions (`set(f(x))`,
    `math.isclose(f(x), 1.0)`); a call of the code's function, an attribute or item of the code's value, and a
    comprehension or lambda that uses the code's names are evaluated by the worker as a whole.
    """

    JUDGED = (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.Compare, ast.Call, ast.Tuple, ast.List, ast.Set,
              ast.Dict, ast.Starred, ast.keyword, ast.JoinedStr, ast.FormattedValue)

    def __init__(self, known: set[str]):
        self.known, self.holes = known, []

    def needs_code(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id not in self.known for n in ast.walk(node))

    def visit(self, node: ast.AST) -> ast.AST:
        if not self.needs_code(node):
            return node
        if isinstance(node, self.JUDGED) and not (isinstance(node, ast.Call) and self.needs_code(node.func)):
            return self.generic_visit(node)
        self.holes.append(ast.unparse(node))
        return ast.copy_location(ast.Call(ast.Name(HOLE, ast.Load()), [ast.Constant(len(self.holes) - 1)], []), node)


def _judge_tests(tests: list[str], setup: str, ask) -> list[tuple[bool, str]]:
    """(passed, why not) per test; `ask(source)` returns the worker's value of an expression of the code."""
    env = {"__name__": "__judge__", "__builtins__": builtins}
    exec(compile(setup, "<setup>", "exec"), env)  # noqa: S102 - the data set's setup code (trusted)
    outcomes = []
    for number, source in enumerate(tests, 1):
        outcome = (True, "")
        for statement in ast.parse(source).body:
            text = ast.unparse(statement)
            known = set(dir(builtins)) | set(env) | _local_names(statement.test)
            for node in ast.walk(statement.test):  # `math.isclose(...)` where only the code imported math
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id not in known
                        and node.value.id in sys.stdlib_module_names):
                    env[node.value.id] = __import__(node.value.id)
                    known.add(node.value.id)
            split = _Split(known)
            expression = ast.fix_missing_locations(ast.Expression(split.visit(statement.test)))

            def value(k: int, holes: list[str] = split.holes):
                return ask(holes[k])

            try:
                held = eval(compile(expression, f"<test {number}>", "eval"), {**env, HOLE: value})
            except Exception as exc:  # noqa: BLE001 - the code's failure (a _CodeFailure) or the test's on its values
                outcome = (False, f"test {number} ({text}): {_describe(exc)}")
                break
            if not held:
                outcome = (False, f"test {number} ({text}): does not hold")
                break
        outcomes.append(outcome)
    return outcomes


class _CodeFailure(Exception):
    """The worker could not give a value (the code raised, returned something that is not data, or ended)."""


def _prctl(option: int, value: int) -> None:
    """prctl(2) through libc (the judge only: the worker never loads ctypes); OSError when it fails."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(ctypes.c_int(option), *map(ctypes.c_ulong, (value, 0, 0, 0))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {value}): {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2) through libc; OSError when it fails."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    raw = [None if s is None else os.fsencode(s) for s in (source, target, fstype, data)]
    if libc.mount(raw[0], raw[1], raw[2], ctypes.c_ulong(flags), raw[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _bind_read_only(source: str, target: str) -> None:
    """Bind `source` at `target` read-only, nosuid, nodev (keeping flags a user namespace may not clear)."""
    _mount(source, target, flags=MS_BIND)
    held = os.statvfs(source).f_flag
    keep = held & (os.ST_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if held & os.ST_RELATIME else 0)
    _mount(None, target, flags=MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _confine(cfg: dict) -> None:
    """(the judge, as root of fresh mount/pid/net namespaces) Build the worker's file-system view and enter it."""
    root, limits = cfg["root"], cfg["limits"]
    _mount(None, "/", flags=MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m,nr_inodes=4096")
    for path in cfg["view"]:
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(path):
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            _bind_read_only(path, target)
    os.makedirs(f"{root}/dev")
    for name in DEVICES:
        Path(f"{root}/dev/{name}").touch()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", flags=MS_BIND)
    os.makedirs(f"{root}/sandbox")
    _bind_read_only(cfg["inputs"], f"{root}/sandbox")
    os.makedirs(f"{root}/work")
    owner = 0 if cfg["uid"] is None else cfg["uid"], 0 if cfg["gid"] is None else cfg["gid"]
    _mount("tmpfs", f"{root}/work", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"mode=700,size={max(limits['files'], 1) * limits['fsize']},nr_inodes={limits['files'] + 1},"
          f"uid={owner[0]},gid={owner[1]}")
    os.symlink("/work", f"{root}/tmp")
    Path(f"{root}/.empty").touch()
    for path in cfg["hidden"]:
        if os.path.exists(root + path):
            _mount(f"{root}/.empty", root + path, flags=MS_BIND)
    _mount(None, root, flags=MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/work")


def _drop_privileges(cfg: dict) -> None:
    """Become the unprivileged user when started as root; no_new_privs and undumpable always; in a user namespace
    also empty the capability bounding set, so the worker starts with no capability."""
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    elif cfg["namespaces"]:
        for cap in range(64):
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: past the last capability this kernel knows
                    raise
                break
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)


def _worker_limits(limits: dict):
    """preexec_fn for the worker: its rlimits (hard = soft, so the code cannot raise them)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
        if limits["memory"] is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
        if limits["nproc"] is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
    return apply


def _judge_main(config_path: str, verdict_fd: int) -> int:
    """Confine, drop privileges, start the worker, judge the tests; write the verdict (JSON) to `verdict_fd`."""
    import ctypes  # noqa: F401  (for _mount and _prctl: loaded while the whole installation is still readable)

    cfg = json.loads(Path(config_path).read_text())
    verdict = os.fdopen(verdict_fd, "w")
    if cfg["namespaces"]:
        _confine(cfg)
    else:
        os.chdir(cfg["work"])
    _drop_privileges(cfg)
    work = os.getcwd()
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    worker = subprocess.Popen(
        [cfg["python"], "-I", "-S", "-B", cfg["harness"], "worker", str(request_r), str(reply_w),
         json.dumps({"guards": cfg["guards"], "max_files": cfg["limits"]["files"]})],
        env={"PATH": PATH, "HOME": work, "TMPDIR": work}, pass_fds=(request_r, reply_w), close_fds=True,
        preexec_fn=_worker_limits(cfg["limits"]))  # noqa: PLW1509 - the judge runs no threads
    os.close(request_r)
    os.close(reply_w)
    requests, replies = os.fdopen(request_w, "wb"), os.fdopen(reply_r, "rb")
    ended = []  # the worker stopped answering (it exited, was killed by a limit, or closed its pipe)

    def exchange(message: dict) -> dict:
        try:
            requests.write(json.dumps(message).encode() + b"\n")
            requests.flush()
            line = replies.readline(REPLY_LIMIT + 1)
        except OSError as exc:
            ended.append(True)
            raise _CodeFailure(f"the program ended before answering ({_describe(exc)})") from None
        if not line.endswith(b"\n"):
            ended.append(not line)
            raise _CodeFailure("the program ended before answering" if not line else "the value is too large")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise _CodeFailure("malformed answer from the sandbox")
        return answer

    def ask(source: str):
        answer = exchange({"expr": source})
        if "error" in answer:
            raise _CodeFailure(f"{source}: {answer['error']}")
        return _decode(answer.get("value"))

    report = {"ready": False, "tests": [], "reasons": [], "returncode": None}
    try:
        ready = exchange({"setup": cfg["setup"], "code": cfg["code"]})
        report["ready"] = ready.get("ready") is True
        if report["ready"] and cfg["tests"] is not None:
            outcomes = _judge_tests(cfg["tests"], cfg["setup"], ask)
            report["tests"] = [passed for passed, _ in outcomes]
            report["reasons"] = [why for _, why in outcomes if why]
        elif not report["ready"]:
            report["reasons"] = [str(ready.get("error", "the program did not start"))[:300]]
    except _CodeFailure as exc:
        report["reasons"] = [str(exc)]
    except Exception as exc:  # noqa: BLE001 - the judge's own failure (e.g. broken setup code): a failed run
        report["reasons"] = [f"the judge failed: {_describe(exc)}"]
    requests.close()
    try:  # run_python: the exit status is the result; with tests, the verdict is in and the worker may go
        report["returncode"] = worker.wait(timeout=None if cfg["tests"] is None else 1 if any(ended) else 0)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    verdict.write(json.dumps(report))
    verdict.close()
    return 0


# --- the evaluator: starts the judge under limits, reads its verdict ----------------------------------------------

@dataclass
class SandboxResult:
    """The outcome of one sandboxed run.

    `status`: "ok" (run_python: the program exited 0; run_with_tests: every test held), "failed" (a test did not
    hold), "error" (the program raised or exited before its tests; run_python: non-zero exit), "timeout" (wall
    clock), "cpu" (RLIMIT_CPU), "memory" (MemoryError under RLIMIT_AS) or "killed" (another signal).
    `returncode` is the worker's exit status (None after a timeout, or when the judge ended it after the tests).
    `tests` holds each test's verdict (run_with_tests only), `isolation` is "namespaces" or "none", `uid` the user
    the code ran as (None: the caller's own, possibly as root of a user namespace without capabilities).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    isolation: str
    uid: int | None
    tests: tuple[bool, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the program exited 0 (run_python) or every test held (run_with_tests)."""
        return self.status == "ok"


def _unprivileged_ids() -> tuple[int, int]:
    """uid and gid of 'nobody', or the kernel's overflow ids (65534) where that entry is missing."""
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return OVERFLOW_ID, OVERFLOW_ID
    return entry.pw_uid, entry.pw_gid


@cache
def _python_view(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths the worker sees read-only, FFI extension modules hidden in that view) for interpreter `python`."""
    if python == os.path.realpath(sys.executable):
        prefixes = {sys.base_prefix, sys.base_exec_prefix}
    else:
        out = subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.prefix); print(sys.exec_prefix)"],
                             capture_output=True, text=True, timeout=60, env={"PATH": PATH}, check=True)
        prefixes = set(out.stdout.split())
    candidates = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", os.path.dirname(python),
                  *map(os.path.realpath, prefixes)]
    view: list[str] = []
    for path in sorted(set(candidates), key=len):
        if os.path.lexists(path) and not any(path.startswith(kept.rstrip("/") + "/") for kept in view):
            view.append(path)
    hidden = set()
    for base in (p for p in view if os.path.isdir(p) and not os.path.islink(p)):
        for lib in ("lib*/python3*", "local/lib*/python3*"):
            for module in ("lib-dynload/_ctypes*.so", "*-packages/_cffi_backend*.so"):
                hidden |= {str(p) for p in Path(base).glob(f"{lib}/{module}")}
    return tuple(view), tuple(sorted(hidden))


def _judge_limits(limits: dict):
    """preexec_fn for the judge (and `unshare`): the worker's limits, a second more CPU, and no process limit."""
    def apply():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"] + 1, limits["cpu"] + 2))
        if limits["memory"] is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
    return apply


def _collect(proc: subprocess.Popen, fd: int, timeout: float) -> tuple[bytes, bool]:
    """Read `fd` until the process exits or `timeout` passes: (what was read, timed out)."""
    deadline, chunks, size, reading = time.monotonic() + timeout, [], 0, True
    os.set_blocking(fd, False)
    while proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True
        if not reading:
            try:
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                pass
        elif select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            reading = bool(chunk)
            if size < REPLY_LIMIT:
                chunks.append(chunk)
                size += len(chunk)
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk or size >= REPLY_LIMIT:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def _execute(code: str, tests: list[str] | None, setup: str, limits: dict, namespaces: bool, guards: bool,
            python: str, timeout: float) -> SandboxResult:
    """One run, without checks or probes (see `run_python`)."""
    uid, gid = _unprivileged_ids() if os.geteuid() == 0 else (None, None)
    view, hidden = _python_view(python) if namespaces else ((), ())
    with tempfile.TemporaryDirectory(prefix="spectral-peft-sandbox-") as tmp:
        base = Path(tmp)
        base.chmod(0o711)
        inputs, work, root = base / "in", base / "work", base / "root"
        for folder in (inputs, work, root):
            folder.mkdir()
        inputs.chmod(0o755)
        shutil.copyfile(__file__, inputs / "harness.py")
        (inputs / "harness.py").chmod(0o644)
        if uid is not None:
            os.chown(work, uid, gid)
        config = base / "config.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({
            "namespaces": namespaces, "guards": guards, "uid": uid, "gid": gid, "python": python,
            "harness": "/sandbox/harness.py" if namespaces else str(inputs / "harness.py"), "inputs": str(inputs),
            "work": str(work), "root": str(root), "view": view, "hidden": hidden, "limits": limits,
            "setup": setup, "code": code, "tests": tests}))
        argv = [python, "-I", "-S", "-B", str(inputs / "harness.py"), "judge", str(config)]
        if namespaces:
            argv = [shutil.which("unshare"), "--fork", "--kill-child", "--pid", "--mount", "--net", "--ipc", "--uts",
                    "--propagation", "private", *(["--map-root-user"] if uid is None else []), "--", *argv]
        verdict_r, verdict_w = os.pipe()
        start = time.monotonic()
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            proc = subprocess.Popen([*argv, str(verdict_w)], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(verdict_w,), close_fds=True, env={"PATH": PATH},
                                    start_new_session=True,
                                    preexec_fn=_judge_limits(limits))  # noqa: PLW1509 - see the module docstring
        os.close(verdict_w)
        try:
            raw, timed_out = _collect(proc, verdict_r, timeout)
        finally:
            os.close(verdict_r)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group; with a pid namespace, everything in it
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        duration = time.monotonic() - start
        stdout, stderr = (p.read_bytes()[:limits["fsize"]].decode("utf-8", "replace")
                          for p in (base / "stdout", base / "stderr"))
    try:
        report = json.loads(raw)
    except ValueError:
        report = None
    return _interpret(report, tests, timed_out, stdout, stderr, duration, namespaces, uid)


def _interpret(report: dict | None, tests: list[str] | None, timed_out: bool, stdout: str, stderr: str,
              duration: float, namespaces: bool, uid: int | None) -> SandboxResult:
    """The status of a run from the judge's report (None: the judge gave none)."""
    rc = report.get("returncode") if report else None
    verdicts = tuple(bool(v) for v in report.get("tests", ())) if report else ()
    for reason in report.get("reasons", ()) if report else ():
        stderr += f"\n[sandbox] {reason}"
    if report is None and not timed_out:
        stderr += f"\n[sandbox] {NO_VERDICT}"
    if timed_out:
        status = "timeout"
    elif report is not None and (rc == 0 if tests is None else report["ready"] and len(verdicts) == len(tests)
                                 and all(verdicts)):
        status = "ok"
    elif rc == -signal.SIGXCPU:
        status = "cpu"
    elif "MemoryError" in stderr:
        status = "memory"
    elif rc is not None and rc < 0:
        status = "killed"
    elif tests is not None and report is not None and report["ready"]:
        status = "failed"
    else:
        status = "error"
    return SandboxResult(status, None if timed_out else rc, stdout, stderr.lstrip("\n"), duration,
                         "namespaces" if namespaces else "none", uid, verdicts)


@cache
def _probe(namespaces: bool, python: str) -> str:
    """'' when a trivial program passes its test in this mode here, else why not (one line)."""
    if namespaces and (shutil.which("unshare") is None or not sys.platform.startswith("linux")):
        return "no `unshare` here"
    limits = {"cpu": 10, "memory": 1 << 30, "fsize": 1 << 20, "nofile": 64, "nproc": 0, "files": 16}
    try:
        result = _execute("x = 6 * 7", ["assert x == 42"], "", limits, namespaces, True, python, 30.0)
    except (OSError, subprocess.SubprocessError) as exc:  # e.g. `python` does not run at all
        return _describe(exc)
    if result.ok:
        return ""
    lines = [line for line in result.stderr.splitlines() if line.strip() and NO_VERDICT not in line]
    return lines[-1] if lines else result.status


def available_isolation(python: str | None = None) -> str:
    """"namespaces" where the full namespace sandbox works here (probed once per process), else "none"."""
    return "namespaces" if not _probe(True, os.path.realpath(python or sys.executable)) else "none"


def _input_error(message: str) -> ValueError:
    """The library's InputError; imported here, not at the top, because this file also runs as a plain script."""
    from ..errors import InputError

    return InputError(message)


def _check_options(options: dict) -> dict:
    """`OPTIONS` updated with `options`; InputError for an unknown option or a bad value."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise _input_error(f"unknown sandbox option(s) {', '.join(unknown)}; the options are {', '.join(OPTIONS)}")
    o = {**OPTIONS, **options}

    def is_int(value, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    checks = [
        (o["isolation"] in ("auto", "namespaces", "none"),
         f"isolation must be 'auto', 'namespaces' or 'none', got {o['isolation']!r}"),
        (isinstance(o["timeout"], (int, float)) and math.isfinite(o["timeout"]) and o["timeout"] > 0,
         f"timeout must be a positive number of seconds, got {o['timeout']!r}"),
        (o["memory_mb"] is None or is_int(o["memory_mb"], 64),
         f"memory_mb must be None or an integer >= 64, got {o['memory_mb']!r}"),
        (o["cpu_seconds"] is None or is_int(o["cpu_seconds"], 1),
         f"cpu_seconds must be None or a positive integer, got {o['cpu_seconds']!r}"),
        (is_int(o["max_output_bytes"], 4096),
         f"max_output_bytes must be an integer >= 4096, got {o['max_output_bytes']!r}"),
        (is_int(o["max_open_files"], 16), f"max_open_files must be an integer >= 16, got {o['max_open_files']!r}"),
        (o["max_processes"] is None or is_int(o["max_processes"], 0),
         f"max_processes must be None or an integer >= 0, got {o['max_processes']!r}"),
        (is_int(o["max_files"], 0), f"max_files must be an integer >= 0, got {o['max_files']!r}"),
        (isinstance(o["guards"], bool), f"guards must be True or False, got {o['guards']!r}"),
        (o["python"] is None or isinstance(o["python"], str), f"python must be a path or None, got {o['python']!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise _input_error(message)
    return o


def _check_tests(tests, setup: str) -> list[str]:
    """`tests` as a list; InputError unless each is assert statements and `setup` and the tests parse."""
    tests = list(tests) if isinstance(tests, (list, tuple)) else tests
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise _input_error("tests must be a list of strings, each one or more assert statements")
    if not isinstance(setup, str):
        raise _input_error(f"setup must be a string of Python code, got {type(setup).__name__}")
    for index, source in enumerate([setup, *tests]):
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            raise _input_error(f"cannot parse test or setup code {source[:60]!r}: {exc.msg}; fix the data") from None
        if index and not (tree.body and all(isinstance(s, ast.Assert) for s in tree.body)):
            raise _input_error(f"a test must be assert statements only, got {source[:60]!r}; move other code to setup")
    return tests


def _resolve_isolation(isolation: str, python: str) -> bool:
    """True to use namespaces; InputError when the requested mode cannot run here."""
    use = isolation == "namespaces" or (isolation == "auto" and not _probe(True, python))
    why = _probe(use, python)
    if why and use:
        raise _input_error(f"isolation='namespaces' does not work here ({why}); use isolation='auto' or 'none'")
    if why:
        who = "user 'nobody'" if os.geteuid() == 0 else "sandbox"
        raise _input_error(f"the sandbox cannot run {python} without namespaces ({why}); give python= an interpreter "
                         f"the {who} can read, or run where `unshare` namespaces work")
    return use


def _launch(code: str, tests: list[str] | None, setup: str, options: dict) -> SandboxResult:
    """Check the options, choose the isolation (probing it), run."""
    o = _check_options(options)
    python = os.path.realpath(o["python"] or sys.executable)
    namespaces = _resolve_isolation(o["isolation"], python)
    limits = {"cpu": o["cpu_seconds"] or math.ceil(o["timeout"]) + 1, "fsize": o["max_output_bytes"],
              "memory": None if o["memory_mb"] is None else o["memory_mb"] << 20, "nofile": o["max_open_files"],
              "nproc": o["max_processes"], "files": o["max_files"]}
    return _execute(code, tests, setup, limits, namespaces, o["guards"], python, o["timeout"])


def run_python(code: str, **options) -> SandboxResult:
    """Run `code` as `__main__` in the sandbox; `status` "ok" when it exits 0 (an exit status is no verdict).

    `options` (defaults in `OPTIONS`): `timeout` wall-clock seconds for the whole run (10); `cpu_seconds`
    RLIMIT_CPU (None: ceil(timeout) + 1); `memory_mb` RLIMIT_AS (1024; None: none); `max_output_bytes`
    RLIMIT_FSIZE, the cap on stdout, stderr and every file (1 MiB); `max_open_files` RLIMIT_NOFILE (64);
    `max_processes` RLIMIT_NPROC (0: no process or thread; None: unset); `max_files` new files the code may create
    (64; with `max_output_bytes` also the size of the work tmpfs); `isolation` "auto" (namespaces where they work
    here), "namespaces" (InputError where they do not) or "none"; `guards` (True) False leaves out the in-process
    audit hook, to test the kernel's layers alone; `python` the interpreter (None: this one), which the sandbox user
    must be able to read. Unknown options and bad values raise InputError before anything runs.
    """
    return _launch(code, None, "", options)


def run_with_tests(code: str, tests: list[str] | tuple[str, ...], setup: str = "", **options) -> SandboxResult:
    """Run `setup` then `code` in the sandbox, and judge each test (assert statements) outside it.

    `ok` only when every test held; the result's `tests` holds each verdict. `setup` (e.g. imports the tests use)
    runs before the code and in the judge. `options` are `run_python`'s. Tests that are not assert statements, and
    setup or tests that do not parse, raise InputError before anything runs.
    """
    return _launch(code, _check_tests(tests, setup), setup, options)


if __name__ == "__main__":  # the harness: `judge <config> <verdict fd>` or `worker <request fd> <reply fd> <options>`
    if sys.argv[1] == "judge":
        sys.exit(_judge_main(sys.argv[2], int(sys.argv[3])))
    sys.exit(_worker_main(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])))
