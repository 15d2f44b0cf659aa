"""Run untrusted Python (model-generated code) in a limited subprocess.

`run_python(code, timeout=...)` writes `code` to a fresh temporary directory and runs it with the current
interpreter in isolated mode (`python -I`), behind a prelude that installs guards before the code runs.
`run_with_tests(code, tests)` appends test statements (e.g. MBPP asserts) and reports pass/fail.

What IS guaranteed (on Linux, by the kernel or by the process boundary):
- The code runs in a separate process; nothing it does touches this interpreter's memory or state.
- Wall-clock limit: after `timeout` seconds the whole process group is killed (SIGKILL). The child starts its
  own session, so processes it manages to spawn are killed with it.
- CPU limit (RLIMIT_CPU, default ceil(timeout) + 1 s), address-space limit (RLIMIT_AS, `memory_mb`), no core
  files (RLIMIT_CORE = 0), at most `max_open_files` descriptors (RLIMIT_NOFILE), and every file it writes,
  including its captured stdout/stderr, is capped at `max_output_bytes` (RLIMIT_FSIZE). These are set in
  `preexec_fn` in the child after fork, so they bind the child and anything it starts.
- For non-root users, RLIMIT_NPROC = 0: the child can create no new process and no thread. (The kernel does
  not enforce RLIMIT_NPROC for root; then only the prelude blocks process creation.)
- Clean environment: only PATH, HOME/TMPDIR (= the temp dir) and LANG; `-I` also ignores PYTHON* variables and
  the user site directory; stdin is /dev/null; the working directory is a temp dir deleted afterwards.
- Network, kernel-level, only where available: with `network="auto"` (the default) the code runs under
  `unshare -rn` (a new user + network namespace: only a down loopback, no route anywhere) when that works
  without privileges on this machine (probed once per process). `SandboxResult.network_isolation` says which
  layer was used: "namespace" or "prelude".

What is best effort only (the prelude, Python-level, in the child before the code runs):
- `socket.socket` (and `_socket.socket`) raise `PermissionError` when instantiated, as do `create_connection`,
  `create_server`, `socketpair`, `fromfd` and DNS lookups (`getaddrinfo`, `gethostbyname`, ...); importing
  `ctypes`/`_ctypes`/`cffi`/`multiprocessing`/`resource` is refused.
- Process creation (`os.fork`, `os.system`, `os.exec*`, `os.spawn*`, `os.posix_spawn*`, `os.popen`,
  `subprocess.*`) and destructive file-system calls (`os.remove`/`unlink`/`rmdir`/`rename`/`replace`/
  `truncate`/`chmod`/`chown`/`kill`, `shutil.rmtree`/`move`, ...) raise `PermissionError`.
Code that sets out to defeat these guards can (e.g. by re-importing built-in modules from scratch). So this
protects against accidents of model-generated code (a stray request, an `os.remove`, an endless loop, a memory
blow-up), NOT against an adversary. It is not a file-system jail: the code can read and write (but, through the
usual calls, not delete) any file this user can. Without the network namespace (where user namespaces are
disabled) the network block is only the prelude's. For hostile code, run this inside a container or VM without
network (e.g. `docker run --network none`, gVisor, firejail).

The limits rely on POSIX `resource` and `preexec_fn` (Linux; macOS mostly); `preexec_fn` is not safe in a
multi-threaded parent, so call this from the main thread of a process that is not running other threads.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["PRELUDE", "SandboxResult", "namespace_available", "run_python", "run_with_tests"]

PRELUDE = r'''
import builtins, sys

def _denied(what):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the spectral-peft sandbox")
    refuse.__name__ = what.rsplit(".", 1)[-1]
    return refuse

import socket, _socket

class _DeniedSocket(socket.socket):  # a class, so stdlib modules that subclass socket.socket still import
    def __new__(cls, *args, **kwargs):
        raise PermissionError("network access (socket.socket) is disabled in the spectral-peft sandbox")
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access (socket.socket) is disabled in the spectral-peft sandbox")

for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
              "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
    if hasattr(socket, _name):
        setattr(socket, _name, _denied("network access (socket." + _name + ")"))
    if hasattr(_socket, _name):
        setattr(_socket, _name, _denied("network access (_socket." + _name + ")"))
socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _DeniedSocket

import os
for _name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp",
              "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
              "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "remove", "removedirs",
              "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod",
              "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "setuid", "seteuid", "setgid", "link",
              "symlink", "mkfifo", "mknod"):
    if hasattr(os, _name):
        setattr(os, _name, _denied("os." + _name))

import subprocess, shutil
subprocess.Popen = _denied("subprocess.Popen")
for _name in ("call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _denied("subprocess." + _name))
for _name in ("rmtree", "move", "chown"):
    setattr(shutil, _name, _denied("shutil." + _name))
try:
    import _posixsubprocess
    _posixsubprocess.fork_exec = _denied("_posixsubprocess.fork_exec")
except ImportError:
    pass

class _RefuseImports:
    blocked = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "multiprocessing", "_multiprocessing", "resource"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in self.blocked:
            raise ImportError(f"import of {name!r} is disabled in the spectral-peft sandbox")
        return None
sys.meta_path.insert(0, _RefuseImports())
for _name in list(sys.modules):
    if _name.split(".", 1)[0] in _RefuseImports.blocked:
        del sys.modules[_name]

del _name
with open("main.py", encoding="utf-8") as _f:
    _source = _f.read()
_globals = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
exec(compile(_source, "main.py", "exec"), _globals)
'''


@dataclass
class SandboxResult:
    """The outcome of one sandboxed run.

    `status` is "ok" (exit code 0), "error" (non-zero exit, e.g. a failed assert or a refused call),
    "timeout" (wall clock), "cpu" (RLIMIT_CPU), "memory" (MemoryError under RLIMIT_AS) or "killed" (another
    signal). `returncode` is None after a timeout.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    network_isolation: str

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0."""
        return self.status == "ok"


def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


@lru_cache(maxsize=None)
def namespace_available() -> bool:
    """Whether `unshare -rn` (an unprivileged user + network namespace) works here; probed once per process."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        probe = subprocess.run([exe, "-rn", sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20, env=_clean_env("/"))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _limits(cpu_seconds: int, memory_bytes: int | None, max_output_bytes: int, max_open_files: int,
            max_processes: int | None):
    def apply():  # runs in the child between fork and exec: plain syscalls only
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_output_bytes, max_output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))
        if max_processes is not None and hasattr(resource, "RLIMIT_NPROC"):
            resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    return apply


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int | None = 1024, cpu_seconds: int | None = None,
               max_output_bytes: int = 1 << 20, max_open_files: int = 64, max_processes: int | None = 0,
               network: str = "auto") -> SandboxResult:
    """Run `code` as `__main__` in a sandboxed `python -I` subprocess and return its status and output.

    `timeout` is the wall-clock limit in seconds; `cpu_seconds` the CPU limit (default ceil(timeout) + 1);
    `memory_mb` the address-space limit (None: none); `max_output_bytes` caps stdout, stderr and every written
    file; `max_processes` is RLIMIT_NPROC (0: no new processes or threads; not enforced for root; None: unset).
    `network`: "auto" adds a network namespace when one can be made without privileges, "namespace" requires it
    (RuntimeError otherwise), "prelude" uses only the Python-level block. The module docstring says exactly what
    is and is not guaranteed.
    """
    if network not in ("auto", "namespace", "prelude"):
        raise ValueError(f"network must be 'auto', 'namespace' or 'prelude', got {network!r}")
    use_ns = network != "prelude" and namespace_available()
    if network == "namespace" and not use_ns:
        raise RuntimeError("network='namespace' needs `unshare -rn` (unprivileged user namespaces), unavailable here")
    cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="spectral-peft-sandbox-") as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(code, encoding="utf-8")
        (work / "prelude.py").write_text(PRELUDE, encoding="utf-8")
        argv = [sys.executable, "-I", "prelude.py"]
        if use_ns:
            argv = [shutil.which("unshare"), "-rn", *argv]
        out_path, err_path = work / ".stdout", work / ".stderr"
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=work, env=_clean_env(tmp), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
                preexec_fn=_limits(cpu, None if memory_mb is None else memory_mb << 20, max_output_bytes,
                                   max_open_files, max_processes),
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole session, including anything it spawned
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        duration = time.monotonic() - start
        stdout, stderr = _read(out_path, max_output_bytes), _read(err_path, max_output_bytes)
    rc = proc.returncode
    if timed_out:
        status = "timeout"
    elif rc == 0:
        status = "ok"
    elif rc == -signal.SIGXCPU:
        status = "cpu"
    elif "MemoryError" in stderr:
        status = "memory"
    elif rc < 0:
        status = "killed"
    else:
        status = "error"
    return SandboxResult(status, None if timed_out else rc, stdout, stderr, duration, "namespace" if use_ns else "prelude")


def run_with_tests(code: str, tests: list[str] | tuple[str, ...], setup: str = "", **limits) -> SandboxResult:
    """Run `setup`, then `code`, then each test statement; `ok` only if every test ran and the process exited 0.

    A random token printed after the last test keeps code that exits early with status 0 (e.g. `sys.exit(0)`
    in a `__main__` block) from counting as a pass. `limits` go to `run_python`.
    """
    token = secrets.token_hex(16)
    program = "\n".join([setup, code, "", *tests, f"print({token!r})", ""])
    result = run_python(program, **limits)
    if result.status == "ok" and result.stdout.rstrip("\n").rsplit("\n", 1)[-1] != token:
        result.status = "error"
        result.stderr += "\n[sandbox] the program exited before all tests ran"
    return result
