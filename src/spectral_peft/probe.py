"""An SVF expert's learned scales, frozen as a probe of skill-critical singular directions.

For each matrix the probe score is ``d_i = |z_i - 1|`` over the singular index ``i`` (``z`` the effective scale).
Protected index sets are chosen from the scores by one rule:
- ``top_fraction``: the ``ceil(rho * r0)`` indices with the largest ``d_i``;
- ``threshold``: ``d_i > tau``;
- ``mass``: the smallest set holding a fraction ``q`` of ``sum_i d_i``.
A probe directory holds ``probe_config.json`` and ``probe.safetensors``; it records the identity (shape and content
hash) of the base weights it was trained on, and refuses other weights. Matrices are named and read as the adapters
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

    def check_base(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The probed matrices' ``m x n`` views, after checking that ``model`` (plain or wrapped) holds exactly the
        weights this probe was trained on; raises a one-line :class:`InputError` otherwise."""
        from .adapters.matrices import matrix_weights
        from .model import SpectralPeftModel

        root = model.base_model if isinstance(model, SpectralPeftModel) else model
        try:
            weights = matrix_weights(root, list(self.base))
        except KeyError as e:
            raise InputError(f"probe module(s) {e.args[0]} are not in the model; use a probe trained on it") from None
        for name, ident in self.base.items():
            W = weights[name]
            if list(W.shape) != list(ident["shape"]) or weight_hash(W) != ident["hash"]:
                raise InputError(f"probe was trained on other weights than the model's {name!r} (hash mismatch)")
        return weights

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
        """Freeze the effective scales of every SVF layer of a model wrapped by ``get_peft_model``."""
        from .adapters.svf import SVFLayer
        from .model import SpectralPeftModel

        if not isinstance(model, SpectralPeftModel):
            raise InputError(f"Probe.from_model takes a model wrapped with method svf, got {type(model).__name__}")
        scales, base = {}, {}
        for name, layer in model.spectral_layers().items():
            if isinstance(layer, SVFLayer):
                scales[name] = layer.scale().detach().float().cpu()
                base[name] = {"shape": list(layer.weight.shape), "hash": weight_hash(layer.weight)}
        if not scales:
            raise InputError("the model has no SVF layers to make a probe from; wrap it with method svf")
        return cls(scales=scales, base=base, meta=dict(meta or {}))


@torch.no_grad()
def fold_expert(model: nn.Module, probe: Probe, svd_cache=None) -> nn.Module:
    """Write the SVF expert ``W_e = W + U diag(sigma (z - 1)) V^T`` into every probed matrix of ``model`` (in place).

    The probe must have been trained on exactly these weights (checked by hash). The SVD is the one the SVF and
    PALoRA layers use (the spectral cache), so ``W_e`` equals PALoRA's folded expert weight.
    """
    from .spectral import SVDCache

    weights = probe.check_base(model)
    cache = svd_cache or SVDCache(None)
    for name, z in probe.scales.items():
        W = weights[name]
        svd = cache.get(W, k=None)
        dW = (svd.U.float() * (svd.S.float() * (z.float().to(W.device) - 1.0))) @ svd.V.float().T
        W.copy_((W.float() + dW).to(W.dtype))
    return model


def load_probe(path: str | Path) -> Probe:
    """A probe from its directory, or from an SVF run directory holding ``probe/``."""
    path = Path(path).expanduser()
    if (path / "probe").is_dir() and not (path / PROBE_CONFIG).exists():
        path = path / "probe"
    if not (path / PROBE_CONFIG).is_file():
        raise MissingInputError(f"no probe at {path} (train one with `spectral-peft svf`)")
    return Probe.load(path)
