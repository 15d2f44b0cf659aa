"""Input checks shared by the recipes, run before any work so that a bad input fails in seconds, in one line.

- numbers: :func:`check_at_least` (sizes such as ``n_eval`` or ``threads``), :func:`check_positive` (finite and
  ``> 0``, e.g. a learning rate), :func:`check_interval` (e.g. TIES' density in ``(0, 1]``) and
  :func:`check_finite_numbers` (every float of a config or method spec, nested dataclasses and tuples included, is
  finite: ``--budget-rho nan`` or ``lr: .nan`` in a YAML config never reaches training);
- lists: :func:`check_distinct` (non-empty, each value once; seeds, tasks, skills);
- settings: :func:`check_constructed` re-runs a settings dataclass's constructor checks on values changed since;
- method specs: :func:`check_method` / :func:`check_methods` parse specs (``spectral_peft.methods``) and refuse
  non-finite hyper-parameters;
- files: :func:`check_safetensors` reads only a ``.safetensors`` file's header and size (a truncated or garbage file
  is refused without loading it), :func:`check_finite_tensors`, :func:`check_adapter` (an adapter directory with a
  readable config and finite weights) and :func:`check_probe` (an SVF probe with finite scales), and
  :func:`read_json_file`.

Every check raises a :class:`~spectral_peft.errors.SpectralPeftError` whose one-line message names the input and
says what to give instead.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InputError, MissingInputError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def check_at_least(minimum: int, **values: int) -> None:
    """Every named value is a number ``>= minimum`` (e.g. ``check_at_least(1, threads=t, n_eval=n)``)."""
    bad = {name: v for name, v in values.items() if not (isinstance(v, (int, float)) and v >= minimum)}
    if bad:
        names = list(values)
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        got = ", ".join(f"{name}={v!r}" for name, v in bad.items())
        raise InputError(f"{listed} must be >= {minimum}, got {got}")


def check_positive(**values: float) -> None:
    """Every named value is a finite number ``> 0`` (e.g. a learning rate)."""
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a positive number, got {v!r}")


def check_interval(name: str, value: float, low: float, high: float) -> None:
    """``low < value <= high`` (a fraction such as TIES' density or MergeFail's tau)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low < value <= high):
        raise InputError(f"{name} must be in ({low}, {high}], got {value!r}")


def check_distinct(name: str, values: Sequence[Any], minimum: int = 1) -> None:
    """At least ``minimum`` values, each given once (``--seeds 0,1,2``; ``--seeds ,`` and ``--seeds 1,1`` fail)."""
    values = list(values)
    if len(values) < minimum or len(set(values)) != len(values):
        raise InputError(f"{name}: give at least {minimum}, each once (got {values})")


def check_finite_numbers(obj: Any, where: str = "") -> None:
    """Every float inside ``obj`` (a dataclass, nested dataclasses, tuples, lists and dicts) is finite."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise InputError(f"{where or 'value'} must be a finite number, got {obj}")
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            check_finite_numbers(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite_numbers(v, f"{where}.{k}" if where else str(k))


def check_constructed(settings: Any) -> None:
    """Re-run a settings dataclass's constructor checks (its ``__post_init__``) on its current values, which a
    Python caller may have changed after construction (``cfg.train.n_eval = 0``)."""
    replace(settings)


def check_method(spec: str, defaults=None):
    """:func:`spectral_peft.methods.parse_method`, refusing non-finite hyper-parameters (``hiplora:rho=nan``)."""
    from .methods import parse_method

    parsed = parse_method(spec, defaults)
    _finite_spec(parsed)
    return parsed


def check_methods(specs: str | Sequence[str], defaults=None, allowed: Sequence[str] | None = None) -> list:
    """:func:`spectral_peft.methods.parse_methods`, refusing non-finite hyper-parameters in any spec."""
    from .methods import METHODS, parse_methods

    parsed = parse_methods(specs, defaults, allowed=METHODS if allowed is None else allowed)
    for spec in parsed:
        _finite_spec(spec)
    return parsed


def _finite_spec(spec) -> None:
    for f in fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"method spec {spec.label!r}: {f.name} must be a finite number, got {value}")


def read_json_file(path: str | Path, what: str) -> Any:
    """The JSON in ``path``; a missing or malformed file raises one line naming ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file ({what})")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); it should be {what}") from None


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """The header of a ``.safetensors`` file, after checking (without reading the tensors) that the file is whole:
    an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then exactly the bytes the header's
    ``data_offsets`` describe. A truncated, padded or garbage file raises :class:`InputError`."""
    path = Path(path)

    def bad(why: str) -> InputError:
        return InputError(f"{path} is not a valid safetensors file ({why}); re-download or re-save it")

    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"only {size} bytes")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise bad("its header lacks data offsets") from None
    if 8 + n + end != size:
        raise bad(f"{size} bytes where its header describes {8 + n + end}: truncated or corrupt")
    return header


def check_finite_tensors(tensors: Iterable[tuple[str, Any]], where: str) -> None:
    """Every floating-point tensor of ``(name, tensor)`` pairs is finite; else one line naming the first bad one."""
    import torch

    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{where}: {name} holds NaN or infinite values; it is broken, retrain or re-download it")


def check_adapter(path: str | Path) -> dict[str, Any]:
    """An adapter directory (spectral-peft or PEFT): its ``adapter_config.json`` is a JSON object and its
    ``adapter_model.safetensors`` is whole and finite. Returns the config."""
    from safetensors.torch import load_file

    from .model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingInputError(f"no such adapter directory: {path}")
    if not (path / ADAPTER_CONFIG).is_file():
        raise MissingInputError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    config = read_json_file(path / ADAPTER_CONFIG, "an adapter config")
    if not isinstance(config, dict) or not ("method" in config or "peft_type" in config):
        raise InputError(f"{path / ADAPTER_CONFIG} names no adapter method (no method or peft_type)")
    weights = path / ADAPTER_WEIGHTS
    if weights.is_file():
        check_safetensors(weights)
        check_finite_tensors(load_file(str(weights)).items(), f"adapter {path}")
    elif "method" in config or not (path / "adapter_model.bin").is_file():
        raise MissingInputError(f"{path} has no {ADAPTER_WEIGHTS}; the adapter was not saved completely")
    return config


def check_probe(path: str | Path):
    """The SVF probe at ``path`` (a probe or svf run directory; see :func:`spectral_peft.probe.load_probe`),
    after checking its weight file is whole and its scales finite."""
    from .probe import PROBE_CONFIG, PROBE_WEIGHTS, load_probe

    where = Path(path).expanduser()
    if (where / "probe").is_dir() and not (where / PROBE_CONFIG).exists():
        where = where / "probe"
    if (where / PROBE_CONFIG).is_file():
        read_json_file(where / PROBE_CONFIG, "a probe config")
        check_safetensors(where / PROBE_WEIGHTS)
    probe = load_probe(path)
    check_finite_tensors(probe.scales.items(), f"probe {path}")
    return probe
