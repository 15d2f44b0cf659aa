"""Adapters on MoE experts stored as 3-D parameters: one spectral layer per expert matrix, one host per module.

Each expert matrix ``W_e`` (``m x n``) gets its own SVD and its own spectral layer, whose ``base_layer`` is an
:class:`ExpertMatrix` (a stateless handle on ``W_e``). The experts module itself is replaced by an
:class:`ExpertsLayer`, whose forward runs the original module with every adapted stack reading as
``P + stack_e(dW_e)`` (each ``dW_e`` in the stored layout; experts without a layer add zero). The sum is taken in
fp32 and cast to the stack's dtype, exactly what :meth:`SpectralLayer.merge` writes, so the adapted forward and the
merged model agree bit for bit. It works with every experts implementation (eager, batched, grouped), since they all
read the stack as one tensor.

The stack is swapped into the module's ``_parameters`` for the duration of the call and put back afterwards
(a ``torch.nn.utils.parametrize`` parametrization would move the parameter to the end of the module's parameter
order when removed, which changes the nesting vanilla PEFT gives it on export, and recreates the class per call).
The cost is that of PEFT's LoRA on expert parameters: one dense ``E x m x n`` update per adapted stack and forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .matrices import stack_layout, stack_view


class ExpertMatrix(nn.Module):
    """Expert ``expert`` of the stack ``param`` of an experts module, seen as an ``m x n`` layer (holds no state:
    the stack stays the experts module's parameter)."""

    bias = None

    def __init__(self, experts: nn.Module, param: str, expert: int):
        super().__init__()
        self.__dict__["experts"] = experts  # not a submodule: the experts module owns the stack
        self.param = param
        self.expert = expert

    @property
    def weight(self) -> torch.Tensor:
        return stack_view(self.experts, self.param, self.expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.param}[{self.expert}]"


class ExpertsLayer(nn.Module):
    """An experts module whose adapted stacks read ``P + stack_e(dW_e)`` during its forward.

    ``layers[param][str(e)]`` is the spectral layer of expert ``e`` of stack ``param``.
    """

    def __init__(self, base_layer: nn.Module, layers: dict[str, dict[int, nn.Module]]):
        super().__init__()
        self.base_layer = base_layer
        self.expert_layers = nn.ModuleDict(
            {p: nn.ModuleDict({str(e): layer for e, layer in sorted(ls.items())}) for p, ls in layers.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def named_layers(self, prefix: str) -> dict[str, nn.Module]:
        """``{matrix name: layer}`` with names ``prefix.param.e``."""
        return {f"{prefix}.{p}.{e}": layer for p, ls in self.expert_layers.items() for e, layer in ls.items()}

    def effective(self, param: str) -> torch.Tensor | None:
        """``P + stack_e(dW_e)`` in ``P``'s dtype, or ``None`` when no layer of the stack is active."""
        layers = self.expert_layers[param]
        active = {int(e): layer for e, layer in layers.items() if not (layer.merged or layer.disabled)}
        if not active:
            return None
        P = self.base_layer._parameters[param]
        deltas = [active[e].live_delta_weight() if e in active else None for e in range(P.shape[0])]
        zero = torch.zeros_like(next(d for d in deltas if d is not None))
        D = torch.stack([zero if d is None else d for d in deltas])
        if stack_layout(self.base_layer):
            D = D.transpose(1, 2)
        return (P.float() + D).to(P.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = self.base_layer._parameters
        swapped = {p: t for p in self.expert_layers if (t := self.effective(p)) is not None}
        saved = {p: params[p] for p in swapped}
        try:
            params.update(swapped)
            return self.base_layer(*args, **kwargs)
        finally:
            params.update(saved)
