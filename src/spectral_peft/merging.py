"""Merge adapters trained from the same base by combining their weight updates ``dW`` (never the factors).

- ``sum`` (task arithmetic): ``dW = sum_j lambda_j dW_j``.
- ``ties`` (Yadav et al.): keep the top ``density`` fraction of each ``lambda_j dW_j`` by magnitude, elect the sign
  of the summed trimmed updates per entry, and average the entries that agree with it (weighted by ``lambda_j``).

Works for every spectral adapter and for PEFT LoRA/DoRA adapters. (PEFT's ``add_weighted_adapter`` without SVD
combines the ``A`` and ``B`` factors separately, which is not a merge of ``dW``.) For HiP-LoRA adapters from one
base, ``sum`` adds the principal gains ``phi`` and the residual channels, since ``dW`` is linear in both.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import PeftModel
from torch import nn

from .model import SpectralPeftModel, load_adapter

MERGE_OPERATORS = ("sum", "ties")

Delta = tuple[torch.Tensor, torch.Tensor]


def _peft_deltas(model: PeftModel) -> dict[str, torch.Tensor]:
    """Dense ``dW`` of every PEFT LoRA/DoRA layer of the active adapter (DoRA: ``m (W + dW) / ||W + dW|| - W``)."""
    from peft.tuners.lora import LoraLayer

    name = model.active_adapter
    prefix = "base_model.model."
    out = {}
    for key, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            continue
        W = layer.get_base_layer().weight.float()
        dW = (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
        if layer.use_dora.get(name, False):
            magnitude = layer.lora_magnitude_vector[name].weight.float()
            merged = W + dW
            dW = (magnitude / torch.linalg.norm(merged, dim=1))[:, None] * merged - W
        out[key.removeprefix(prefix)] = dW.detach().cpu()
    return out


def adapter_deltas(adapter: SpectralPeftModel | PeftModel | str | Path, base: nn.Module | None = None):
    """``{module name: dW}`` (fp32, CPU) of an adapter: a wrapped model, or a directory loaded onto ``base``."""
    if isinstance(adapter, (str, Path)):
        if base is None:
            raise ValueError("loading an adapter directory needs the base model")
        wrapped = load_adapter(base, adapter, progress=False)
        try:
            return adapter_deltas(wrapped)
        finally:
            wrapped.unload()
    if isinstance(adapter, PeftModel):
        return _peft_deltas(adapter)
    if isinstance(adapter, SpectralPeftModel):
        with torch.no_grad():
            return {n: layer.delta_weight().detach().cpu() for n, layer in adapter.spectral_layers().items()}
    raise TypeError(f"cannot take the updates of a {type(adapter).__name__}")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``ceil(density * numel)`` largest-magnitude entries."""
    keep = max(1, int(round(density * delta.numel())))
    if keep >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float = 0.2) -> torch.Tensor:
    """TIES merge of same-shape updates: trim, elect sign, disjoint weighted mean."""
    trimmed = torch.stack([w * trim(d, density) for d, w in zip(deltas, weights)])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    lam = torch.tensor(list(weights), dtype=trimmed.dtype).view(-1, *([1] * (trimmed.dim() - 1)))
    mass = (lam.abs() * agree).sum(0)
    return torch.where(mass > 0, (trimmed * agree).sum(0) / mass.clamp_min(1e-12), torch.zeros_like(sign))


def merge_deltas(
    deltas: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None, how: str = "sum",
    density: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Combine per-module updates of several adapters into one ``{module: dW}``."""
    if how not in MERGE_OPERATORS:
        raise ValueError(f"unknown merge operator {how!r}; use one of {MERGE_OPERATORS}")
    if not deltas:
        raise ValueError("nothing to merge")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} adapters")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    merged = {}
    for name in sorted(set().union(*deltas)):
        present = [(d[name], w) for d, w in zip(deltas, weights) if name in d]
        if how == "sum":
            merged[name] = sum(w * d for d, w in present)
        else:
            merged[name] = ties([d for d, _ in present], [w for _, w in present], density)
    return merged


@torch.no_grad()
def _add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    missing = [n for n in deltas if n not in modules or not hasattr(modules[n], "weight")]
    if missing:
        raise ValueError(f"modules {missing} are not weight-carrying modules of the model")
    for name, dW in deltas.items():
        W = modules[name].weight
        W.copy_((W.float() + dW.to(W.device)).to(W.dtype))


def apply_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], inplace: bool = False) -> nn.Module:
    """``W <- W + dW`` for every named module (on a copy unless ``inplace``)."""
    target = model if inplace else copy.deepcopy(model)
    _add_deltas(target, deltas)
    return target


@contextlib.contextmanager
def applied_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside the block ``W <- W + dW`` in place; afterwards ``W`` is restored bit-exactly from a saved copy of the
    touched weights (no subtraction, so no rounding error), also when the block raises."""
    modules = dict(model.named_modules())
    saved = {n: modules[n].weight.detach().clone() for n in deltas if n in modules and hasattr(modules[n], "weight")}
    try:
        _add_deltas(model, deltas)
        yield model
    finally:
        with torch.no_grad():
            for name, W0 in saved.items():
                modules[name].weight.copy_(W0)


def merge_adapters(
    model: nn.Module,
    adapters: Sequence[SpectralPeftModel | PeftModel | str | Path],
    weights: Sequence[float] | None = None,
    how: str = "sum",
    density: float = 0.2,
    inplace: bool = False,
) -> nn.Module:
    """The base ``model`` with the merged update of ``adapters`` written into its weights."""
    deltas = [adapter_deltas(a, model) for a in adapters]
    return apply_deltas(model, merge_deltas(deltas, weights, how, density), inplace=inplace)
