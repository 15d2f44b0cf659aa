"""The shared "projected LoRA" factors used by OPLoRA, PALoRA and HiP-LoRA's residual channel.

``dW = s * (P_L B) (A P_R)`` with ``P_L = I - U_S diag(w) U_S^T`` and ``P_R = I - V_S diag(w) V_S^T``.
With ``w = 1`` (hard) ``U_S^T dW = 0`` and ``dW V_S = 0``: the protected triplets are untouched. The soft variant
uses ``w in [0, 1]`` per direction. ``inside=True`` is the opposite placement, an ablation:
``dW = s * (U_S U_S^T B) (A V_S V_S^T)`` lives entirely in the protected subspace. The projectors are never materialised:
``P_L B = B - U_S (w * (U_S^T B))`` and ``A P_R = A - ((A V_S) * w) V_S^T``, at ``O((m + n) r |S|)`` per forward.

Step time (docs/performance.md): on small matrices the number of ops weighs as much as their FLOPs, so each projection
is one autograd node (:class:`RowProjection`: two matmuls forward, two backward) and the update is added to the base
output by one fused ``addmm`` (:func:`add_low_rank`), with the scale ``s`` folded into the projection rather than
applied to the ``T x m`` output as PEFT's LoRA does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .base import AdapterConfig, SpectralLayer, init_lora_factors
from .derived import DerivedState

SVD_METHODS = ("exact", "randomized")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``s = alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LowRankConfig(AdapterConfig):
    """The LoRA factors' fields: rank ``r``, ``lora_alpha`` and ``use_rslora`` (scale ``s`` as in PEFT)."""

    r: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def validate(self) -> None:
        if self.r < 1:
            raise InputError(f"r must be >= 1, got {self.r}")

    def rank_need(self) -> int:
        return self.r

    def need_text(self) -> str:
        return f"rank r={self.r}"


@dataclass
class TopKLowRankConfig(LowRankConfig):
    """A LoRA beside the top-``k`` singular triplets of ``W`` (exact or randomised SVD); needs ``k + r <= min(m, n)``."""

    k: int = 16
    svd_method: str = "exact"

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")
        if self.svd_method not in SVD_METHODS:
            raise InputError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")

    def rank_need(self) -> int:
        return self.k + self.r

    def need_text(self) -> str:
        return f"k + r = {self.k + self.r}"

    def svd_rank(self, shape: tuple[int, int]) -> int:
        return self.k


def _project_rows(X: torch.Tensor, Q: torch.Tensor, w: torch.Tensor | None, inside: bool, scale: float) -> torch.Tensor:
    """``s X M`` with ``M = I - Q^T diag(w) Q`` (``Q^T diag(w) Q`` when ``inside``) for the rows ``X`` (``r x d``) of a
    factor and orthonormal rows ``Q`` (``|S| x d``; ``w = None`` means ``w = 1``); an empty ``Q`` gives ``s X`` (``0``
    when ``inside``)."""
    c = X @ Q.T  # r x |S|
    if w is not None:
        c = c * w
    if inside:
        return (c * scale) @ Q
    return torch.addmm(X, c, Q, beta=scale, alpha=-scale)


def _without_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``t``'s device while :class:`RowProjection` computes in its factors' dtype: under
    autocast its matmuls would return bf16 in the forward, and its backward (run outside autocast) would then mix
    bf16 gradients with fp32 factors."""
    device = t.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


class RowProjection(torch.autograd.Function):
    """``X -> s X M`` of :func:`_project_rows` as one autograd node, in ``X``'s dtype (autocast or not).

    ``M`` is symmetric, so the gradient is the same map applied to the output's gradient: two thin matmuls each way
    (``X Q^T``, then ``addmm``), where autograd through ``mm``/``sub``/``t`` records six nodes.
    """

    @staticmethod
    def forward(ctx, X: torch.Tensor, Q: torch.Tensor, w: torch.Tensor | None, inside: bool, scale: float):
        ctx.save_for_backward(Q, w)
        ctx.inside, ctx.scale = inside, scale
        with _without_autocast(X):
            return _project_rows(X, Q, w, inside, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        Q, w = ctx.saved_tensors
        with _without_autocast(grad):
            return _project_rows(grad.to(Q.dtype), Q, w, ctx.inside, ctx.scale), None, None, None, None


def add_low_rank(y: torch.Tensor, x: torch.Tensor, Bt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``y + (x A^T) Bt`` for factor rows ``Bt`` (``r x m``) and ``A`` (``r x n``), computed in the factors' dtype and
    cast to ``y``'s; when ``y`` is already in that dtype the sum is one fused ``addmm`` on the flattened tokens
    (``x``: ``... x n``, ``y``: ``... x m``)."""
    h = x.to(A.dtype).reshape(-1, A.shape[1]) @ A.T
    if y.dtype != Bt.dtype:
        return y + (h @ Bt).view(y.shape).to(y.dtype)
    return torch.addmm(y.reshape(-1, Bt.shape[1]), h, Bt).view(y.shape)


class ProjectedLoRA(DerivedState):
    """Trainable ``A`` (``r x n``), ``B`` (``m x r``) whose product is kept off the protected directions; ``U_S``,
    ``V_S`` (``|S|`` columns) and ``w`` are derived state."""

    derived = ("U_St", "V_St", "w")

    def __init__(
        self,
        shape: tuple[int, int],
        r: int,
        scaling: float,
        U_S: torch.Tensor,
        V_S: torch.Tensor,
        weights: torch.Tensor | None = None,
        inside: bool = False,
    ):
        super().__init__()
        self.r = r
        self.inside = inside
        self.scaling = scaling
        self.lora_A, self.lora_B = init_lora_factors(r, shape)
        # stored transposed (|S| x m, |S| x n): the thin products below then run on row-major operands, which
        # measured 2-3x faster than the plain layout for r = 8 (docs/performance.md)
        self.U_St = U_S.float().T.contiguous()
        self.V_St = V_S.float().T.contiguous()
        self.w = None if weights is None else weights.float()

    @property
    def U_S(self) -> torch.Tensor:
        return self.U_St.T

    @property
    def V_S(self) -> torch.Tensor:
        return self.V_St.T

    def factor_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``((s P_L B)^T, A P_R)``: both factors as ``r``-row matrices, the layout the thin products run fastest in."""
        return self._rows(self.scaling)

    def _rows(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        project = RowProjection.apply
        return (project(self.lora_B.T, self.U_St, self.w, self.inside, scale),
                project(self.lora_A, self.V_St, self.w, self.inside, 1.0))

    def projected_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_L B, A P_R)``: ``(B^T - (B^T U_S) w U_S^T)^T`` and ``A - (A V_S) w V_S^T``; with ``inside``,
        ``((B^T U_S) w U_S^T)^T`` and ``(A V_S) w V_S^T``."""
        Bt, A = self._rows(1.0)
        return Bt.T, A

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s P_L B, A P_R)``: ``dW`` = their product."""
        Bt, A = self.factor_rows()
        return Bt.T, A


class ProjectedLoRALayer(SpectralLayer):
    """A matrix with a projected LoRA update (OPLoRA; PALoRA without an expert)."""

    def __init__(self, base_layer: nn.Module, lora: ProjectedLoRA):
        super().__init__(base_layer)
        self.lora = lora

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora.factors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        return add_low_rank(y, x, *self.lora.factor_rows())
