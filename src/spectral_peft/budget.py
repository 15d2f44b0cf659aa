"""HiP-LoRA's budget in training, attached to the layers so that no training stack can drop it.

Penalty mode minimises ``L + lambda sum_layers R(phi)`` with ``R(phi) = sum_i w_i phi_i^2``. The gradient
``lambda dR/dphi = 2 lambda w phi`` is added by a forward hook on each layer (an identity on its output whose
backward adds the term to ``phi``'s gradient) during the first backward pass after the gradients were cleared
(``phi.grad`` is ``None`` or zero), so it counts exactly once per optimiser step whatever computes the loss
(Trainer, TRL's fused head, a custom ``compute_loss``, a plain loop) and however many micro-batches are accumulated.
Under FSDP2 that holds when micro-batches accumulate without a reduce-scatter (``set_requires_gradient_sync(False)``
on all but the last, as accelerate's ``accumulate`` does): a reduce-scatter clears the gradient ``phi.grad`` names,
so with one per micro-batch the term is added once per micro-batch. The value ``lambda R`` is added, without
gradient, to the ``loss`` the wrapped model returns in training mode, so logged training losses are the penalised
objective.

Constraint mode projects ``phi`` onto ``R(phi) <= eps`` after every optimiser step (``training.hooks``).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) ``phi`` is a ``DTensor`` holding one shard per rank between
forward passes. ``R(phi)`` and the projection onto the ball (its multiplier ``mu`` depends on every entry) need the
whole vector, so every function here reads it with :func:`whole` (``full_tensor()``, an all-gather): every rank calls
them in the same order, as the optimiser hook, the Trainer callback and the wrapper's ``forward`` do. Every rank then
projects the same whole vector to the same result and keeps its own shard of it, which needs no communication.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from .adapters.hiplora import HiPLoRAConfig, HiPLoRALayer, weighted_ball_projection
from .errors import InputError

try:  # torch built without distributed support (or before 2.5) has no public DTensor, so nothing is sharded
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:
    DTensor = None


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor when ``t`` is a ``DTensor`` (gathered from every rank: a collective)."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param <- value`` for a whole ``value`` that every rank holds identically: a sharded ``param`` keeps its own
    shard of ``value`` (``distribute_tensor`` with ``src_data_rank=None`` slices locally, no communication)."""
    if DTensor is not None and isinstance(param, DTensor):
        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(value)


def whole_phi(layer: HiPLoRALayer) -> torch.Tensor:
    """The layer's whole ``phi``, refusing (one line) a ``phi`` that a training stack keeps where a projection written
    into it cannot act: DeepSpeed ZeRO (stages 1-3) steps fp32 master copies and overwrites the parameter from them,
    and FSDP1 leaves each rank a flat slice of it."""
    phi = layer.hip_phi
    if hasattr(phi, "ds_id") or hasattr(phi, "_hp_mapping"):
        raise InputError("HiP-LoRA's budget projection cannot act under DeepSpeed ZeRO (its optimiser steps fp32 "
                         "master copies of phi); train constraint mode with DDP or FSDP2 (docs/distributed.md)")
    full = whole(phi)
    if full.numel() != layer.budget_w.numel():
        raise InputError(f"HiP-LoRA's phi holds {full.numel()} of its {layer.budget_w.numel()} entries on this rank "
                         "(FSDP1's flat shards?); the projection needs all of them: shard with FSDP2 (fully_shard)")
    return full


def regulariser(layer: HiPLoRALayer) -> torch.Tensor:
    """``R(phi) = sum_i w_i phi_i^2`` of the whole ``phi``."""
    return (layer.budget_w * whole(layer.hip_phi) ** 2).sum()


def hip_layers(layers: Iterable[nn.Module]) -> list[HiPLoRALayer]:
    return [m for m in layers if isinstance(m, HiPLoRALayer)]


def penalty_mode(config: object) -> bool:
    return isinstance(config, HiPLoRAConfig) and config.budget_mode == "penalty" and config.budget_lambda > 0


class _PenaltyGrad(torch.autograd.Function):
    """Identity on a layer's output; its backward adds ``2 lambda w phi`` to ``phi``'s gradient when ``phi.grad`` is
    still clear (the first backward pass of an optimiser step)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, phi: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.phi, ctx.w, ctx.lam = phi, w, lam
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        phi = ctx.phi
        if phi.grad is not None and bool(phi.grad.any()):
            return grad_out, None, None, None
        return grad_out, (2 * ctx.lam) * ctx.w.to(phi.dtype) * phi.detach(), None, None


def _penalty_hook(lam: float, layer: HiPLoRALayer, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    if not (layer.training and torch.is_grad_enabled() and layer.hip_phi.requires_grad and torch.is_tensor(out)):
        return None
    return _PenaltyGrad.apply(out, layer.hip_phi, layer.budget_w, lam)


def attach_penalty(config: object, layers: list[nn.Module]) -> list:
    """Register the penalty-gradient forward hook on every HiP-LoRA layer (penalty mode only); returns the handles.
    Module hooks travel with ``copy.deepcopy`` and read the layer's ``phi`` at run time."""
    if not penalty_mode(config):
        return []
    hook = functools.partial(_penalty_hook, float(config.budget_lambda))
    return [layer.register_forward_hook(hook) for layer in hip_layers(layers)]


def penalty_value(config: object, layers: list[nn.Module]) -> torch.Tensor | None:
    """``lambda sum_layers R(phi)`` without gradient (penalty mode), else ``None``."""
    if not penalty_mode(config):
        return None
    with torch.no_grad():
        return config.budget_lambda * sum(regulariser(layer) for layer in hip_layers(layers))


@torch.no_grad()
def project(config: object, layers: list[nn.Module]) -> None:
    """Project every ``phi`` onto its budget ball, ``phi <- argmin_{R(x) <= eps} ||x - phi||`` (constraint mode; a
    no-op otherwise), in one batched projection of the whole vectors per size ``k`` and device."""
    if not (isinstance(config, HiPLoRAConfig) and config.budget_mode == "constraint"):
        return
    by_k: dict[tuple, list[HiPLoRALayer]] = {}
    for layer in hip_layers(layers):
        by_k.setdefault((layer.budget_w.numel(), layer.budget_w.device), []).append(layer)
    for group in by_k.values():
        phi = torch.stack([whole_phi(layer) for layer in group])
        w = torch.stack([layer.budget_w for layer in group])
        eps = torch.tensor([layer.budget_eps for layer in group], device=phi.device)
        for layer, row in zip(group, weighted_ball_projection(phi, w, eps)):
            assign(layer.hip_phi, row)


def budget_use(layers: dict[str, nn.Module]) -> dict[str, float]:
    """``R(phi) / eps`` for every HiP-LoRA layer (infinite when ``eps = 0`` and ``phi != 0``)."""
    use = {}
    for name, layer in layers.items():
        if isinstance(layer, HiPLoRALayer):
            R, eps = float(regulariser(layer).detach()), layer.budget_eps
            use[name] = R / eps if eps > 0 else (0.0 if R == 0 else float("inf"))
    return use
