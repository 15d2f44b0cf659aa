"""An SVF expert's learned scales, frozen as a probe of skill-critical singular directions.

For each matrix the probe score is ``d_i = |z_i - 1|`` over the singular index ``i`` (``z`` the effective scale).
Protected index sets are chosen from the scores by one rule:
- ``top_fraction``: the ``ceil(rho * r0)`` indices with the largest ``d_i``;
- ``threshold``: ``d_i > tau``;
- ``mass``: the smallest set holding a fraction ``q`` of ``sum_i d_i``.
A probe directory holds ``probe_config.json`` and ``probe.safetensors``; it records the identity (shape and content
hash) of the base weights it was trained on, and refuses other weights. It imports nothing of the adapters or the
wrapper (which depend on it). Matrices are named and read as the adapters
name and read them (:mod:`.adapters.matrices`): linear, Conv1D (its ``out x in`` view) and single experts of 3-D MoE
stacks (``module.param.e``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError, MissingInputError
from .spectral import weight_hash

SELECTION_RULES = ("top_fraction", "threshold", "mass")
PROBE_CONFIG = "probe_config.json"
PROBE_WEIGHTS = "probe.safetensors"


def select_indices(scores: torch.Tensor, rule: str, rho: float = 0.1, tau: float = 0.05, q: float = 0.5) -> torch.Tensor:
    """Protected indices (sorted ascending) chosen from probe scores ``d`` by ``rule``."""
    if rule == "top_fraction":
        if not 0 <= rho <= 1:
            raise InputError(f"rho must be in [0, 1], got {rho}")
        n = math.ceil(rho * scores.numel())
        return torch.sort(torch.topk(scores, n).indices).values
    if rule == "threshold":
        return torch.nonzero(scores > tau).flatten()
    if rule == "mass":
        if not 0 <= q <= 1:
            raise InputError(f"q must be in [0, 1], got {q}")
        order = torch.argsort(scores, descending=True)
        cum = torch.cumsum(scores[order].double(), 0)
        n = int(torch.searchsorted(cum, q * cum[-1]).item()) + 1 if q > 0 else 0
        return torch.sort(order[: min(n, scores.numel())]).values
    raise InputError(f"unknown selection rule {rule!r}; use one of {SELECTION_RULES}")


@dataclass
class Probe:
    """Effective SVF scales ``z`` per module, and the identity of the weights they were learned on."""

    scales: dict[str, torch.Tensor]
    base: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def scores(self, name: str) -> torch.Tensor:
        """``d = |z - 1|`` for one module."""
        return (self.scales[name] - 1.0).abs()

    def select(self, name: str, rule: str, rho: float = 0.1, tau: float = 0.05, q: float = 0.5) -> torch.Tensor:
        return select_indices(self.scores(name), rule, rho=rho, tau=tau, q=q)

    def num_parameters(self) -> int:
        return sum(z.numel() for z in self.scales.values())

    def check_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Check that ``weights`` (``{name: m x n view}``, every probed matrix) are exactly the weights this probe was
        trained on (shape and content hash); raise a one-line :class:`InputError` otherwise."""
        for name, ident in self.base.items():
            W = weights[name]
            if list(W.shape) != list(ident["shape"]) or weight_hash(W) != ident["hash"]:
                raise InputError(f"probe was trained on other weights than the model's {name!r} (hash mismatch)")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp_w, tmp_c = path / (PROBE_WEIGHTS + ".tmp"), path / (PROBE_CONFIG + ".tmp")
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.scales.items()}, str(tmp_w))
        tmp_c.write_text(json.dumps({"modules": self.base, "meta": self.meta}, indent=2))
        os.replace(tmp_w, path / PROBE_WEIGHTS)
        os.replace(tmp_c, path / PROBE_CONFIG)

    @classmethod
    def load(cls, path: str | Path) -> "Probe":
        path = Path(path)
        if not (path / PROBE_CONFIG).exists() or not (path / PROBE_WEIGHTS).exists():
            raise MissingInputError(f"{path} is not a probe directory (needs {PROBE_CONFIG} and {PROBE_WEIGHTS})")
        cfg = json.loads((path / PROBE_CONFIG).read_text())
        return cls(scales=load_file(str(path / PROBE_WEIGHTS)), base=cfg["modules"], meta=cfg.get("meta", {}),
                   source=str(path))

    @classmethod
    def from_model(cls, model: nn.Module, meta: dict[str, Any] | None = None) -> "Probe":
        """Freeze the effective scales ``z`` (each layer's ``scale()``) of a model wrapped with method ``svf``."""
        config = getattr(model, "peft_config", None)
        if getattr(config, "method", None) != "svf" or not hasattr(model, "spectral_layers"):
            raise InputError(f"Probe.from_model takes a model wrapped with method svf, got {type(model).__name__}")
        scales, base = {}, {}
        for name, layer in model.spectral_layers().items():
            scales[name] = layer.scale().detach().float().cpu()
            base[name] = {"shape": list(layer.weight.shape), "hash": weight_hash(layer.weight)}
        return cls(scales=scales, base=base, meta=dict(meta or {}))


def load_probe(path: str | Path) -> Probe:
    """A probe from its directory, or from an SVF run directory holding ``probe/``."""
    path = Path(path).expanduser()
    if (path / "probe").is_dir() and not (path / PROBE_CONFIG).exists():
        path = path / "probe"
    if not (path / PROBE_CONFIG).is_file():
        raise MissingInputError(f"no probe at {path} (train one with `spectral-peft svf`)")
    return Probe.load(path)
