"""HiP-LoRA's budget in training, attached to the layers so that no training stack can drop it.

Penalty mode minimises ``L + lambda sum_layers R(phi)`` with ``R(phi) = sum_i w_i phi_i^2``. The gradient
``lambda dR/dphi = 2 lambda w phi`` is added by a forward hook on each layer (an identity on its output whose
backward adds the term to ``phi``'s gradient) during the first backward pass after the gradients were cleared
(``phi.grad`` is ``None`` or zero), so it counts exactly once per optimiser step whatever computes the loss
(Trainer, TRL's fused head, a custom ``compute_loss``, a plain loop) and however many micro-batches are accumulated. The value ``lambda R`` is added, without gradient, to the ``loss`` the wrapped model returns in
training mode, so logged training losses are the penalised objective.

Constraint mode projects ``phi`` onto ``R(phi) <= eps`` after every optimiser step (``training.hooks``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .adapters.hiplora import HiPLoRAConfig, HiPLoRALayer, project_budgets


def hip_layers(layers: list[nn.Module]) -> list[HiPLoRALayer]:
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
        return config.budget_lambda * sum(layer.regulariser() for layer in hip_layers(layers))


def project(config: object, layers: list[nn.Module]) -> None:
    """Project every ``phi`` onto its budget ball (constraint mode; a no-op otherwise)."""
    if isinstance(config, HiPLoRAConfig) and config.budget_mode == "constraint":
        project_budgets(hip_layers(layers))


def budget_use(layers: dict[str, nn.Module]) -> dict[str, float]:
    """``R(phi) / eps`` for every HiP-LoRA layer."""
    return {n: m.budget_use() for n, m in layers.items() if isinstance(m, HiPLoRALayer)}
