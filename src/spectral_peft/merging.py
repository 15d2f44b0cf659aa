"""Merge adapters trained from the same base by combining their weight updates ``dW`` (never the factors).

- ``sum`` (task arithmetic): ``dW = sum_j lambda_j dW_j``.
- ``ties`` (Yadav et al.): keep the top ``density`` fraction of each ``lambda_j dW_j`` by magnitude, elect the sign
  of the summed trimmed updates per entry, and average the entries that agree with it (weighted by ``lambda_j``).

Updates are ``{matrix name: dW}`` with ``dW`` in the ``out x in`` view of :mod:`.adapters.matrices` (a Conv1D's
update is added to its stored weight transposed; an expert's ``module.param.e`` to its slice of the 3-D stack).
Works for every spectral adapter and for PEFT LoRA/DoRA adapters (LoRA also on expert stacks). (PEFT's
``add_weighted_adapter`` without SVD combines the ``A`` and ``B`` factors separately, which is not a merge of
``dW``.) For HiP-LoRA adapters from one base, ``sum`` adds the principal gains ``phi`` and the residual channels,
since ``dW`` is linear in both.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import PeftModel
from torch import nn

from .adapters.matrices import matrix_weights, stack_layout
from .errors import InputError
from .model import SpectralPeftModel, load_adapter

MERGE_OPERATORS = ("sum", "ties")

Delta = tuple[torch.Tensor, torch.Tensor]


def _peft_deltas(model: PeftModel) -> dict[str, torch.Tensor]:
    """Dense ``dW`` of every PEFT LoRA/DoRA layer of the active adapter (DoRA: ``m (W + dW) / ||W + dW|| - W``);
    a LoRA on an expert stack gives one ``dW`` per expert."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    name = model.active_adapter
    prefix = "base_model.model."
    out = {}
    for key, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            continue
        if isinstance(layer, ParamWrapper):
            path = key.removeprefix(prefix).replace(".base_layer", "")
            stack = layer.get_delta_weight(name).detach().float().cpu()
            transposed = stack_layout(layer.get_base_layer())
            for e, dW in enumerate(stack):
                out[f"{path}.{layer.parameter_name}.{e}"] = dW.T if transposed else dW
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
            raise InputError("loading an adapter directory needs the base model")
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
        raise InputError(f"unknown merge operator {how!r}; use one of {MERGE_OPERATORS}")
    if not deltas:
        raise InputError("nothing to merge")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise InputError(f"{len(weights)} weights for {len(deltas)} adapters")
    if not 0 < density <= 1:
        raise InputError(f"density must be in (0, 1], got {density}")
    merged = {}
    for name in sorted(set().union(*deltas)):
        present = [(d[name], w) for d, w in zip(deltas, weights) if name in d]
        if how == "sum":
            merged[name] = sum(w * d for d, w in present)
        else:
            merged[name] = ties([d for d, _ in present], [w for _, w in present], density)
    return merged


def _views(model: nn.Module, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``out x in`` views the updates are added to; refuses unknown names and shapes that differ, naming them."""
    try:
        views = matrix_weights(model, list(deltas))
    except KeyError as e:
        raise InputError(f"modules {e.args[0]} are not weight-carrying modules of the model (linear, Conv1D or expert "
                         "matrices); use the adapters' base model") from None
    bad = [f"{n} {tuple(deltas[n].shape)} vs {tuple(W.shape)}" for n, W in views.items() if W.shape != deltas[n].shape]
    if bad:
        raise InputError(f"updates and matrices differ in shape: {', '.join(bad)}")
    return views


@torch.no_grad()
def _add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    for name, W in _views(model, deltas).items():
        W.copy_((W.float() + deltas[name].to(W.device)).to(W.dtype))


def apply_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], inplace: bool = False) -> nn.Module:
    """``W <- W + dW`` for every named module (on a copy unless ``inplace``)."""
    target = model if inplace else copy.deepcopy(model)
    _add_deltas(target, deltas)
    return target


@contextlib.contextmanager
def applied_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside the block ``W <- W + dW`` in place; afterwards ``W`` is restored bit-exactly from a saved copy of the
    touched weights (no subtraction, so no rounding error), also when the block raises."""
    views = _views(model, deltas)
    saved = {n: W.detach().clone() for n, W in views.items()}
    try:
        _add_deltas(model, deltas)
        yield model
    finally:
        with torch.no_grad():
            for name, W0 in saved.items():
                views[name].copy_(W0)


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
