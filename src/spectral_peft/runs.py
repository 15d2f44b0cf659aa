"""Run directories: what a recipe writes, and the rules that keep a user's files safe.

A run directory ``OUT`` is written in a hidden work directory beside it, ``.OUT.partial``, and appears under its
own name only when the run is complete. Both carry a manifest, ``run.json`` (``{"tool": "spectral-peft", "recipe",
"version", "status", "pid", "host"}``), which is how the library recognises its own directories. The rules:

- nothing without the manifest is ever deleted, renamed or written into: an ``OUT`` (or a ``.OUT.partial`` or
  ``.OUT.old``) that exists and is not ours refuses the run, whatever the mode;
- a new run refuses an ``OUT`` that holds a run, and a work directory that holds work (``--overwrite`` replaces
  them, ``--resume`` continues); ``OUT`` may not be the current directory, the file system root, or inside the
  package;
- ``resume`` continues in the killed run's work directory, or, when ``OUT`` is complete, in a copy of it, and only
  a run of the same recipe. Units already written (:meth:`RunDir.unit`) and training checkpoints are read back
  rather than recomputed;
- stale leftovers of a killed run are ours and are removed by the next run into the same ``OUT``: a work directory
  that holds no work (only ``run.json`` and ``config.yaml``) or that holds a replaced run (see below), and
  ``.OUT.old``. A work directory whose manifest names a live process on this host is another run in progress and
  refuses the run. A directory of ours is removed with its manifest last, so a removal cut short stays ours;
- publishing (:meth:`RunDir.finish`) has no moment at which neither the old nor the new ``OUT`` exists: on Linux
  the work directory and the old ``OUT`` are swapped in one ``renameat2(RENAME_EXCHANGE)`` (the old run's manifest
  is first marked ``replaced``, so a swap cut short is recognised), then the old run is removed; elsewhere the old
  ``OUT`` is renamed to ``.OUT.old`` and the work directory to ``OUT`` (a crash between the two renames leaves
  ``.OUT.old``, removed by the next run). A first publication never replaces anything (``RENAME_NOREPLACE``);
- paths in ``config.yaml`` that name existing local files are written absolute (``--model ./ckpt``,
  ``--task gsm8k:data/test.jsonl``), and what recipes store is absolute or relative to the run, so a run is read the
  same from any working directory.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import InputError, OutputExistsError

MANIFEST = "run.json"
TOOL = "spectral-peft"
MODES = ("new", "overwrite", "resume")
NO_WORK = (MANIFEST, "config.yaml")  # a work directory holding only these is stale
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def write_json(path: str | Path, obj: Any, strict: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file, then rename); tensors, arrays, paths and objects with
    ``to_dict`` are converted. ``strict``: NaN or infinite numbers become ``null`` (standard JSON); otherwise they
    are kept as Python's JSON reads them back (for internal state such as resumable units)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = json.loads(json.dumps(obj, default=_json_default))
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) if strict else json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays and scalars
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if is_dataclass(o):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or data spec (``lora:r=2`` -> ``lora_r=2-<hash>``): characters other than
    letters, digits and ``@=+.-`` become ``_``, and a short hash of the original keeps distinct labels distinct."""
    safe = re.sub(r"[^\w@=+.-]+", "_", text)
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def portable_path(value: str) -> str:
    """``value`` with a relative local path made absolute, so it means the same from any working directory: a path
    that exists and contains a ``/`` (or starts with ``.`` or ``~``), also after a data spec's ``kind:`` prefix and
    before its ``?query``; anything else (``organism``, a hub id, a task name) is returned unchanged."""
    head, colon, rest = value.partition(":")
    prefix, body = (head + colon, rest) if colon and re.fullmatch(r"[A-Za-z][\w-]*", head) else ("", value)
    body, question, query = body.partition("?")
    if not body.startswith((".", "~")) and "/" not in body or Path(body).is_absolute():
        return value
    path = Path(body).expanduser()
    return f"{prefix}{path.absolute()}{question}{query}" if path.exists() else value


def _portable(obj: Any) -> Any:
    if isinstance(obj, str):
        return portable_path(obj)
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    return obj


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path / MANIFEST)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a directory this library created (it carries our manifest)."""
    return Path(path).is_dir() and _manifest(Path(path)) is not None


def _holds_work(path: Path) -> bool:
    return any(p.name not in NO_WORK and not p.name.endswith(".tmp") for p in path.iterdir())


def _in_use(path: Path) -> int | None:
    """The pid of a live process on this host that is writing ``path`` (another run), else None. A work directory
    left by this very process (an earlier :class:`RunDir` that failed) is not another run."""
    data = _manifest(path) or {}
    pid = data.get("pid")
    if data.get("status") != "running" or not isinstance(pid, int) or pid == os.getpid() or \
            data.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, owned by another user
        pass
    return pid


def _is_stale(work: Path) -> bool:
    """A work directory of a killed run that holds nothing to resume (or the old run a swap left behind)."""
    return (_manifest(work) or {}).get("status") == "replaced" or not _holds_work(work)


def _remove_ours(path: Path) -> None:
    """Remove a directory of ours, its manifest last (a removal cut short leaves a directory still recognised); a
    symbolic link is removed, never what it points to."""
    if path.is_symlink():
        path.unlink()
        return
    for p in path.iterdir():
        if p.name != MANIFEST:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (path / MANIFEST).unlink(missing_ok=True)
    path.rmdir()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``; False where the C library, kernel or file system lacks it (the caller
    falls back), an ``OSError`` for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then nothing changed)."""
    return _renameat2(a, b, RENAME_EXCHANGE)


def check_out(out: str | Path, mode: str = "new") -> Path:
    """Validate ``out`` for a run in ``mode`` before any work starts; return it as an absolute path.

    Raises a one-line :class:`~spectral_peft.errors.OutputExistsError` / :class:`~spectral_peft.errors.InputError`
    saying what to pass instead. Nothing is changed on disk.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    path = Path(out).expanduser().absolute()
    if path == Path.cwd().absolute() or path == Path(path.anchor) or str(out).strip() in ("", "."):
        raise InputError(f"--out {str(out)!r} would replace the current or root directory; name a new directory")
    package = Path(__file__).resolve().parent
    if path.resolve() == package or package in path.resolve().parents:
        raise InputError(f"--out {out} is inside the installed package; write runs elsewhere")
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: no permission to write in {parent}; choose another --out")
    work, old = _work_dir(path), _old_dir(path)
    for p in (path, work, old):
        if not (p.exists() or p.is_symlink()) or p != path and p.is_dir() and not any(p.iterdir()):
            continue  # absent, or an empty directory left by a kill (removed without loss)
        if not is_run_dir(p):
            hint = "choose another --out" if p == path else f"move it away or choose another --out than {out}"
            raise OutputExistsError(f"{p} exists and is not a spectral-peft run; {hint}")
        if p == work and (pid := _in_use(p)):
            raise OutputExistsError(f"another spectral-peft run (pid {pid}) is writing {out}; wait for it or choose "
                                    "another --out")
        if mode == "new" and (p == path or p == work and not _is_stale(p)):
            what = "an unfinished run" if p == work else "a run"
            raise OutputExistsError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to "
                                    f"replace it")
    return path


def _work_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _old_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _clear_leftovers(out: Path) -> None:
    """Remove what a killed run left beside ``out`` (all of it ours, see :func:`check_out`)."""
    for p in (_old_dir(out), _work_dir(out)):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
        elif p == _old_dir(out) and is_run_dir(p) or p == _work_dir(out) and is_run_dir(p) and _is_stale(p):
            _remove_ours(p)


class RunDir:
    """One recipe run: files are written under :attr:`path` (the work directory) and published by :meth:`finish`.

    ``mode``: ``new`` (refuse anything existing), ``overwrite`` (replace our own run), ``resume`` (continue).
    """

    def __init__(self, out: str | Path, recipe: str, mode: str = "new"):
        self.out = check_out(out, mode)
        self.recipe = recipe
        self.mode = mode
        self.path = _work_dir(self.out)
        if mode == "resume":
            for p in (self.path, self.out):
                other = (_manifest(p) or {}).get("recipe", recipe) if p.is_dir() and not _is_stale(p) else recipe
                if other != recipe:
                    raise OutputExistsError(f"{out} holds a {other} run, not a {recipe} run; --resume continues a run "
                                            "of the same recipe (pass --overwrite to replace it)")
        _clear_leftovers(self.out)
        if mode == "overwrite" and self.path.exists():
            _remove_ours(self.path)
        fresh = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest("running")
        if mode == "resume" and fresh and self.out.exists():
            shutil.copytree(self.out, self.path, dirs_exist_ok=True, ignore=lambda d, names: (
                [MANIFEST] if Path(d) == self.out else []))

    def _manifest(self, status: str) -> None:
        from . import __version__

        write_json(self.path / MANIFEST, {"tool": TOOL, "recipe": self.recipe, "version": __version__,
                                          "status": status, "pid": os.getpid(), "host": socket.gethostname()})

    def file(self, relative: str | Path) -> Path:
        """The path of ``relative`` inside the run (its parent directory created); a path that leaves the run
        (absolute, or through ``..``) raises :class:`~spectral_peft.errors.InputError`."""
        p = self.path / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise InputError(f"{relative} is not a path inside the run directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, relative: str | Path, obj: Any) -> Path:
        return write_json(self.file(relative), obj)

    def write_text(self, relative: str | Path, text: str) -> Path:
        p = self.file(relative)
        p.write_text(text)
        return p

    def write_config(self, cfg: Any) -> Path:
        """The resolved config as ``config.yaml``, readable back with ``--config`` (tuples become lists; local paths
        absolute, see :func:`portable_path`)."""
        data = _portable(json.loads(json.dumps(asdict(cfg), default=_json_default)))
        return self.write_text("config.yaml", yaml.safe_dump(data, sort_keys=False))

    def unit(self, key: str, compute: Callable[[], Any]) -> Any:
        """A resumable unit of work: ``units/<key>.json`` if it exists, else ``compute()`` written there first.

        ``compute`` must return something JSON-serialisable; what is returned is always the JSON round trip, so a
        resumed run and an uninterrupted one see identical values.
        """
        p = self.path / "units" / f"{key}.json"
        if not p.exists():
            write_json(p, compute(), strict=False)
        return read_json(p)

    def abandon(self, keep_work: bool = True) -> None:
        """After a failure: keep the work directory when it holds work (units, checkpoints, outputs) for
        ``--resume`` and ``keep_work`` is true, else remove it (it is ours)."""
        if self.path != self.out and self.path.is_dir() and not (keep_work and _holds_work(self.path)):
            _remove_ours(self.path)

    def finish(self) -> Path:
        """Publish the work directory as ``out`` (replacing a previous run of ours in overwrite/resume mode) with no
        moment at which ``out`` is missing (see the module docstring)."""
        self._manifest("complete")
        if self.out.exists() or self.out.is_symlink():
            if not is_run_dir(self.out):
                raise OutputExistsError(f"{self.out} appeared during the run and is not a spectral-peft run; the "
                                        f"results stay in {self.path}")
            write_json(self.out / MANIFEST, {**(_manifest(self.out) or {}), "status": "replaced"})
            if exchange(self.path, self.out):
                _remove_ours(self.path)  # now the old run
            else:
                old = _old_dir(self.out)
                if is_run_dir(old):
                    _remove_ours(old)
                os.replace(self.out, old)
                os.replace(self.path, self.out)
                _remove_ours(old)
        else:
            try:
                published = _renameat2(self.path, self.out, RENAME_NOREPLACE)
            except FileExistsError:
                raise OutputExistsError(f"{self.out} appeared during the run; the results stay in "
                                        f"{self.path}") from None
            if not published:
                os.replace(self.path, self.out)
        self.path = self.out
        return self.out
