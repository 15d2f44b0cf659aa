"""The sandbox for model-written code (docs/security.md): the verdict, the limits, and each attack of the review.

Every attack runs under three layer sets where they exist here: all layers (the default), the kernel's layers alone
(namespaces, uid, rlimits; the in-process audit hook off), and the fallback without namespaces (uid, rlimits and the
audit hook). A set that this machine cannot provide is skipped with the missing feature named. Fork bombs and disk
fills run under small process, file and size limits.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter, OrderedDict, deque
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from spectral_peft.data.real import load_mbpp
from spectral_peft.errors import InputError
from spectral_peft.evaluation.sandbox import (
    OPTIONS,
    _decode,
    _encode,
    available_isolation,
    run_python,
    run_with_tests,
)

FIX = Path(__file__).parent / "fixtures" / "real"
try:
    run_python("pass")
except InputError as exc:  # neither namespaces nor an interpreter the sandbox user can read
    pytest.skip(f"the sandbox cannot run here: {exc}", allow_module_level=True)
NAMESPACES = available_isolation() == "namespaces"
ROOT = os.geteuid() == 0


def _plain_python() -> str | None:
    """An interpreter that the sandbox can run without namespaces (as 'nobody' when root), or None."""
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python and os.path.exists(python):
            try:
                run_python("pass", isolation="none", python=python)
            except InputError:
                continue
            return python
    return None


PLAIN_PYTHON = _plain_python()
LAYERS = {
    "all": pytest.param({}, id="all-layers"),
    "kernel": pytest.param({"isolation": "namespaces", "guards": False}, id="kernel-only", marks=pytest.mark.skipif(
        not NAMESPACES, reason="no namespaces here (`unshare` of pid/mount/net namespaces fails)")),
    "plain": pytest.param({"isolation": "none", "python": PLAIN_PYTHON}, id="no-namespaces", marks=pytest.mark.skipif(
        PLAIN_PYTHON is None, reason="no Python here that the sandbox user (nobody) can read")),
}
ALL_LAYERS = list(LAYERS.values())


@pytest.fixture
def exposed():
    """A world-writable directory outside the sandbox with a secret (0644) and a victim file (0666)."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-exposed-", dir="/tmp"))
    folder.chmod(0o777)
    (folder / "secret.txt").write_text(f"secret-{secrets.token_hex(8)}")
    (folder / "victim.txt").write_text("keep me")
    (folder / "secret.txt").chmod(0o644)
    (folder / "victim.txt").chmod(0o666)
    yield folder
    shutil.rmtree(folder)


def attempts(*lines: str) -> str:
    """A program that tries each line and prints how it ended (so one run tries several attacks)."""
    body = "\n".join(f"try:\n    {line}\n    print('DONE', {line!r})\nexcept BaseException as e:\n"
                     f"    print('REFUSED', {line!r}, type(e).__name__, e)" for line in lines)
    return "import os, posix, sys\n" + body


# --- the verdict ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mbpp():
    return load_mbpp(FIX / "mbpp", allow_code_execution=True, t2_pool=5, t2_train=3)


@pytest.fixture(scope="module")
def gcd(mbpp):
    return next(e for e in mbpp.examples("test") if dict(e.meta)["task_id"] == 7)  # gcd, with setup code


FAKE_PASSES = {
    "token and os._exit(0)": "def gcd(a, b):\n    return 0\nprint('ALL TESTS PASSED')\nimport os\nos._exit(0)",
    "sys.exit(0)": "import sys\ndef gcd(a, b):\n    return 0\nsys.exit(0)",
    "always-equal object": "class A:\n    def __eq__(self, o):\n        return True\ndef gcd(a, b):\n    return A()",
    "always-equal int": ("class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                         "def gcd(a, b):\n    return I(0)"),
    "exit 0 at exit": "import atexit, os\natexit.register(os._exit, 0)\ndef gcd(a, b):\n    return 0",
    "forged verdict on every descriptor": (
        "import os\nfake = b'{\"ready\": true, \"tests\": [true, true, true], \"reasons\": [], \"returncode\": 0}'\n"
        "for fd in range(3, 1024):\n    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
        "def gcd(a, b):\n    return 0\nos._exit(0)"),
    "kill the judge": "import os\nos.kill(os.getppid(), 9)\ndef gcd(a, b):\n    return 0",
    "patched assert machinery": ("import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
                                 "def gcd(a, b):\n    return 0"),
}


def test_mbpp_checker_passes_a_solution_and_fails_a_wrong_one(mbpp, gcd):
    assert mbpp.check(gcd.target, gcd)
    assert not mbpp.check("def gcd(a, b):\n    return a * b\n[DONE]", gcd)


@pytest.mark.parametrize("attack", list(FAKE_PASSES))
def test_mbpp_checker_does_not_score_a_faked_pass(mbpp, gcd, attack):
    assert not mbpp.check(FAKE_PASSES[attack] + "\n[DONE]", gcd)


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_faked_passes_fail_under_each_layer_set(layers):
    tests = ["assert gcd(12, 8) == 4", "assert gcd(7, 3) == 1"]
    for attack in ("token and os._exit(0)", "forged verdict on every descriptor", "kill the judge"):
        r = run_with_tests(FAKE_PASSES[attack], tests, **layers)
        assert not r.ok and r.tests != (True, True), attack


def test_the_judge_evaluates_the_test_on_the_code_values():
    code = "import math\ndef area(r):\n    return math.pi * r * r\ndef pair(x):\n    return [x, x + 1]"
    r = run_with_tests(code, ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)", "assert set(pair(1)) == {1, 2}",
                              "assert pair(1)[1] == 2", "assert area(2) == 5"], setup="import math")
    assert r.tests == (True, True, True, False) and r.status == "failed" and "area(2) == 5" in r.stderr
    lazy = run_with_tests("def f(x):\n    return (i for i in range(x))", ["assert list(f(2)) == [0, 1]"])
    assert lazy.status == "failed" and "cannot be judged" in lazy.stderr  # a generator is no data
    broken = run_with_tests("def f(x):\n    raise ValueError('no')\ndef g():\n    return 1",
                            ["assert f(1) == 1", "assert g() == 1"])
    assert broken.tests == (False, True) and "ValueError: no" in broken.stderr


def test_typical_mbpp_asserts_pass_with_correct_code():
    code = ("import heapq, math, re\nfrom collections import Counter\n"
            "def similar(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
            "def largest(nums, n):\n    return heapq.nlargest(n, nums)\n"
            "def volume(r):\n    return 4 / 3 * math.pi * r ** 3\n"
            "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
            "def chain(pairs, n):\n    return sum(1 for p in pairs if p.a < p.b)\n"
            "def ranked(d):\n    return Counter(d).most_common()\n"
            "def freq(rows):\n    return Counter(x for row in rows for x in row)\n"
            "def words(text):\n    return re.findall(r'\\b\\w{4,}\\b', text)\n"
            "def has_none(t):\n    return any(x is None for x in t)")
    tests = ["assert similar((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)",
             "assert set(similar((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
             "assert largest([25, 35, 22, 85, 14, 65, 75, 22, 58], 3) == [85, 75, 65]",
             "assert math.isclose(volume(10), 4188.790204786391, rel_tol=0.001)",
             "assert chain([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 4",
             "assert ranked({'Math': 81, 'Physics': 83}) == [('Physics', 83), ('Math', 81)]",
             "assert freq([[1, 2, 3, 2], [4, 2]]) == {2: 3, 1: 1, 3: 1, 4: 1}",
             "assert words('Please move back to stream') == ['Please', 'move', 'back', 'stream']",
             "assert has_none((10, 4, None)) == True", "assert not has_none((1,))"]
    r = run_with_tests(code, tests)
    assert r.ok and r.tests == (True,) * len(tests), r.stderr


@pytest.mark.parametrize("value", [None, True, -(10 ** 40), 0.1, float("inf"), 1 - 2j, "é", b"\x00", bytearray(b"a"),
                                   [1, (2, 3)], {frozenset({1}): {"a": [None]}}, {1, 2}, OrderedDict(b=1, a=2),
                                   Counter("abca"), deque([1], maxlen=3), range(1, 9, 2), Decimal("1.10"),
                                   Fraction(2, 6)])
def test_values_cross_as_exact_plain_data(value):
    back = _decode(json.loads(json.dumps(_encode(value))))
    assert back == value and type(back) is type(value) and repr(back) == repr(value)


def test_values_that_are_not_data_or_malformed_are_refused():
    for value in (iter([1]), object(), print, [1, object()]):
        with pytest.raises(TypeError, match="cannot be judged"):
            _encode(value)
    for tree in (["int"], ["bool", 1], ["exec", "x"], ["list", "abc"], ["set", [["list", []]]], ["dict", [[1]]], 5):
        with pytest.raises((ValueError, TypeError)):
            _decode(tree)


def test_code_that_fails_before_the_tests():
    r = run_with_tests("def add(a, b)\n    return a + b", ["assert add(1, 2) == 3"])
    assert r.status == "error" and "SyntaxError" in r.stderr and not r.tests


def test_tests_must_be_asserts_and_options_are_checked():
    for tests in (["print(x)"], [""], ["x = 1\nassert x"]):
        with pytest.raises(InputError, match="assert statements"):
            run_with_tests("x = 1", tests)
    with pytest.raises(InputError, match="cannot parse"):
        run_with_tests("x = 1", ["assert x =="])
    with pytest.raises(InputError, match="unknown sandbox option"):
        run_python("pass", network="none")
    with pytest.raises(InputError, match="isolation"):
        run_python("pass", isolation="docker")
    with pytest.raises(InputError, match="timeout"):
        run_python("pass", timeout=float("nan"))
    assert set(OPTIONS) >= {"timeout", "memory_mb", "max_processes", "max_files", "isolation", "guards"}


# --- limits and environment -----------------------------------------------------------------------------------------

def test_runs_unprivileged_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SANDBOX_CANARY", "parent-secret")
    r = run_python("import os\nprint(os.getuid())\nprint(sorted(os.environ))\nprint(os.environ.get('HOME'))")
    uid, names, home = r.stdout.splitlines()
    assert r.ok and set(eval(names)) <= {"PATH", "HOME", "TMPDIR", "LC_CTYPE"} and "parent-secret" not in r.stdout
    assert home == "/work" or "spectral-peft-sandbox-" in home
    if ROOT:
        assert int(uid) != 0 and r.uid == int(uid)


def test_infinite_loop_is_killed_by_the_wall_clock_limit():
    r = run_python("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and r.returncode is None and r.duration < 5


def test_cpu_limit():
    r = run_python("while True:\n    pass", timeout=10.0, cpu_seconds=1)
    assert r.status == "cpu" and r.duration < 5


def test_memory_hog_is_stopped():
    r = run_python("x = bytearray(4 * 1024 ** 3)", memory_mb=256)
    assert r.status == "memory" and not r.ok


def test_output_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", timeout=5.0, max_output_bytes=10_000)
    assert not r.ok and len(r.stdout) <= 10_000


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_network_is_refused(layers):
    r = run_python(attempts("socket.create_connection(('192.0.2.1', 80), timeout=1)",
                            "urllib.request.urlopen('http://192.0.2.1/', timeout=1)").replace(
        "import os", "import socket, urllib.request, os", 1), timeout=8.0, **layers)
    assert "DONE" not in r.stdout and r.stdout.count("REFUSED") == 2


# --- the review's attacks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_posix_twins_are_closed(layers, exposed):
    victim = subprocess.Popen(["sleep", "60"])  # a process of the evaluator's user
    try:
        r = run_python(attempts(f"posix.system('echo pwned > {exposed}/system.txt')",
                                f"posix.unlink('{exposed}/victim.txt')",
                                f"posix.truncate('{exposed}/victim.txt', 0)",
                                f"posix.rename('{exposed}/victim.txt', '{exposed}/moved.txt')",
                                "print('CHILD') if posix.fork() == 0 else posix.waitpid(-1, 0)",
                                f"posix.kill({victim.pid}, 9)", "posix.kill(os.getppid(), 9)"), **layers)
        assert victim.poll() is None  # the evaluator's processes are out of reach (and so is the evaluator)
    finally:
        victim.kill()
        victim.wait()
    assert sorted(p.name for p in exposed.iterdir()) == ["secret.txt", "victim.txt"]
    assert (exposed / "victim.txt").read_text() == "keep me" and "CHILD" not in r.stdout.splitlines()
    assert f"REFUSED posix.kill({victim.pid}, 9)" in r.stdout


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_removing_the_import_hook_does_not_unblock_ctypes(layers):
    code = attempts("sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != '__main__']",
                    "import ctypes; ctypes.CDLL(None).getpid()",
                    "import glob, importlib.util as u; p = glob.glob(sys.prefix + '/lib/python3*/lib-dynload/_ctypes*')"
                    "[0]; u.module_from_spec(u.spec_from_file_location('_ctypes', p))")
    r = run_python(code, **layers)
    assert "DONE import ctypes" not in r.stdout and "DONE import glob" not in r.stdout, r.stdout
    assert r.stdout.count("REFUSED") >= 2


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_fork_bomb_with_setsid_is_stopped(layers):
    bomb = ("import os\nforked = 0\nfor _ in range(8):\n    try:\n        pid = os.fork()\n    except OSError as e:\n"
            "        print('refused', type(e).__name__)\n        break\n    if pid == 0:\n        os.setsid()\n"
            "        os._exit(0)\n    forked += 1\nprint('forked', forked)")
    r = run_python(bomb, **layers)
    assert "forked 0" in r.stdout and "refused" in r.stdout


@pytest.mark.skipif(not NAMESPACES, reason="no pid namespace here (`unshare --pid` fails)")
def test_processes_that_leave_the_group_die_with_the_pid_namespace():
    mark = f"61.{secrets.randbelow(10 ** 6):06d}"  # a unique `sleep` argument to find survivors by
    code = ("import os\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
            f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\nprint('forked')")
    r = run_python(code, guards=False, max_processes=64, isolation="namespaces")
    assert "forked" in r.stdout
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and mark in _cmdline(p)]
    assert not alive


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_files_outside_the_sandbox_are_out_of_reach(layers, exposed):
    bashrc = Path(os.path.expanduser("~/.bashrc"))
    r = run_python(attempts("print(open('/etc/passwd').read())", f"print(open('{bashrc}').read())",
                            f"print(open('{exposed}/secret.txt').read())", f"print(os.listdir('{exposed}'))",
                            f"open('{exposed}/victim.txt', 'w').write('pwned')",
                            f"open('{exposed}/victim.txt', 'r+').truncate(0)",
                            f"os.truncate('{exposed}/victim.txt', 0)",
                            f"open('{exposed}/new.txt', 'x').write('new')", "open('/tmp/../etc/new.txt', 'w')",
                            "open('inside.txt', 'w').write('mine'); print(open('inside.txt').read())"), **layers)
    assert "root:x:0:0" not in r.stdout and (exposed / "secret.txt").read_text() not in r.stdout
    assert not bashrc.exists() or bashrc.read_text().strip() not in r.stdout
    assert sorted(p.name for p in exposed.iterdir()) == ["secret.txt", "victim.txt"]
    assert (exposed / "victim.txt").read_text() == "keep me"
    assert "mine" in r.stdout  # the work directory itself is usable


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_disk_fill_is_bounded(layers):
    fill = ("import os\nfiles = size = 0\ntry:\n    for i in range(10_000):\n        with open(f'f{i}', 'wb') as f:\n"
            "            files += 1\n            for _ in range(4):\n                size += f.write(b'x' * 16384)\n"
            "except OSError as e:\n    print('stopped', type(e).__name__)\nprint(files, size)")
    r = run_python(fill, max_files=4, max_output_bytes=65536, **layers)
    files, size = map(int, r.stdout.splitlines()[-1].split())
    assert "stopped" in r.stdout and files <= 4 and size <= 4 * 65536
    big = run_python("open('big', 'wb').write(b'x' * (1 << 24))", max_output_bytes=65536, **layers)
    assert not big.ok and "File too large" in big.stderr


@pytest.mark.parametrize("layers", ALL_LAYERS)
def test_unix_sockets_are_out_of_reach(layers, exposed):
    path, abstract = exposed / "listener.sock", f"\0spectral-peft-test-{secrets.token_hex(6)}"
    listeners = []
    for address in (str(path), abstract):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen(4)
        listener.setblocking(False)
        listeners.append(listener)
    path.chmod(0o777)
    try:
        r = run_python(attempts(*(f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({a!r}); s.send(b'hi')"
                                  for a in (str(path), abstract))), **layers)
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
    assert "DONE" not in r.stdout


@pytest.mark.skipif(not ROOT or PLAIN_PYTHON is None or shutil.which("setpriv") is None,
                    reason="needs root, `setpriv` and a Python that the user nobody can read")
def test_a_non_root_evaluator_uses_a_user_namespace_or_the_fallback(tmp_path):
    """The evaluator itself as 'nobody': the user-namespace chain (capabilities dropped) where it works."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-evaluator-", dir="/tmp"))  # the package's two files, readable
    try:
        src = Path(__file__).parents[1] / "src" / "spectral_peft"
        for name in ("__init__.py", "evaluation/__init__.py", "errors.py", "evaluation/sandbox.py"):
            (folder / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "pkg" / name).write_text("" if name.endswith("__init__.py") else (src / name).read_text())
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        script = (f"import json, sys\nsys.path.insert(0, {str(folder)!r})\nfrom pkg.evaluation import sandbox as sb\n"
                  "r = sb.run_python('import os\\nprint(os.getuid())\\nos.chroot(\"/\")\\n"
                  "print(open(\"/etc/passwd\").read())', guards=False)\n"
                  "t = sb.run_with_tests('def f():\\n    return 1', ['assert f() == 1', 'assert f() == 2'])\n"
                  "print(json.dumps([r.isolation, r.uid, r.stdout, r.stderr, t.tests]))")
        command = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", PLAIN_PYTHON, "-I", "-S",
                   "-c", script]
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=folder, check=False)
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 0, out.stderr[-2000:]
    isolation, uid, stdout, stderr, tests = json.loads(out.stdout.splitlines()[-1])
    assert uid is None and tests == [True, False] and "root:x:0:0" not in stdout
    if isolation == "namespaces":  # root of a user namespace, without the capability to become anyone else
        assert stdout.splitlines()[0] == "0" and "PermissionError" in stderr
