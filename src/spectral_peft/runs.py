"""Run directories: what a recipe writes, and the rules that keep a user's files safe.

A run directory ``OUT`` is written in a hidden work directory beside it, ``.OUT.partial``, and appears under its
own name only when the run is complete (one ``os.replace``). Both carry a manifest, ``run.json``
(``{"tool": "spectral-peft", "recipe", "version", "status"}``), which is how the library recognises its own runs:

- a new run refuses an ``OUT`` that exists, and a work directory left by a killed run
  (``--overwrite`` replaces them, ``--resume`` continues);
- ``overwrite`` replaces only directories that carry the manifest, never anything else;
- ``resume`` continues in the killed run's work directory, or, when ``OUT`` is complete, in a copy of it. Units
  already written (:meth:`RunDir.unit`) are read back rather than recomputed, so a long multi-unit recipe (a study
  over seeds, MergeFail's adapters) survives interruption and costs only the missing units.

``OUT`` must not be the current directory, the file system root, or a path inside the package.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

MANIFEST = "run.json"
TOOL = "spectral-peft"
MODES = ("new", "overwrite", "resume")


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


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a directory this library created (it carries our manifest)."""
    try:
        return read_json(path / MANIFEST).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: str | Path, mode: str = "new") -> Path:
    """Validate ``out`` for a run in ``mode`` before any work starts; return it as an absolute path.

    Raises a one-line ``FileExistsError``/``ValueError`` saying what to pass instead.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = Path(out).expanduser().absolute()
    if path == Path.cwd().absolute() or path == Path(path.anchor) or str(out).strip() in ("", "."):
        raise ValueError(f"--out {out!r} would replace the current or root directory; name a new directory")
    package = Path(__file__).resolve().parent
    if path.resolve() == package or package in path.resolve().parents:
        raise ValueError(f"--out {out} is inside the installed package; write runs elsewhere")
    work = _work_dir(path)
    for p in (path, work):
        if not p.exists():
            continue
        if not p.is_dir() or not is_run_dir(p):
            raise FileExistsError(f"{p} exists and is not a spectral-peft run; choose another --out")
        if mode == "new":
            what = "an unfinished run" if p == work else "a run"
            raise FileExistsError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to "
                                  f"replace it")
    return path


def _work_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


class RunDir:
    """One recipe run: files are written under :attr:`path` (the work directory) and published by :meth:`finish`.

    ``mode``: ``new`` (refuse anything existing), ``overwrite`` (replace our own run), ``resume`` (continue).
    """

    def __init__(self, out: str | Path, recipe: str, mode: str = "new"):
        self.out = check_out(out, mode)
        self.recipe = recipe
        self.mode = mode
        self.path = _work_dir(self.out)
        if mode == "overwrite" and self.path.exists():
            shutil.rmtree(self.path)
        if mode == "resume" and not self.path.exists() and self.out.exists():
            shutil.copytree(self.out, self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest("running")

    def _manifest(self, status: str) -> None:
        from . import __version__

        write_json(self.path / MANIFEST, {"tool": TOOL, "recipe": self.recipe, "version": __version__,
                                          "status": status})

    def file(self, relative: str | Path) -> Path:
        """The path of ``relative`` inside the run (its parent directory created)."""
        p = self.path / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, relative: str | Path, obj: Any) -> Path:
        return write_json(self.file(relative), obj)

    def write_text(self, relative: str | Path, text: str) -> Path:
        p = self.file(relative)
        p.write_text(text)
        return p

    def write_config(self, cfg: Any) -> Path:
        """The resolved config as ``config.yaml``, readable back with ``--config`` (tuples become lists)."""
        data = json.loads(json.dumps(asdict(cfg), default=_json_default))
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

    def abandon(self) -> None:
        """After a failure: keep the work directory when it holds resumable units, else remove it (it is ours)."""
        units = self.path / "units"
        if self.path != self.out and not (units.is_dir() and any(units.iterdir())):
            shutil.rmtree(self.path, ignore_errors=True)

    def finish(self) -> Path:
        """Publish the work directory as ``out`` (replacing a previous run of ours in overwrite/resume mode)."""
        self._manifest("complete")
        if self.out.exists():
            if not is_run_dir(self.out):
                raise FileExistsError(f"{self.out} appeared during the run and is not a spectral-peft run; "
                                      f"the results stay in {self.path}")
            old = self.out.with_name(f".{self.out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.path, self.out)
        self.path = self.out
        return self.out
