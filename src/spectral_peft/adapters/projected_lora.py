"""The shared "projected LoRA" factors used by OPLoRA, PALoRA and HiP-LoRA's residual channel.

``dW = s * (P_L B) (A P_R)`` with ``P_L = I - U_S diag(w) U_S^T`` and ``P_R = I - V_S diag(w) V_S^T``.
With ``w = 1`` (hard) ``U_S^T dW = 0`` and ``dW V_S = 0``: the protected triplets are untouched. The soft variant
uses ``w in [0, 1]`` per direction. ``inside=True`` is the opposite placement, an ablation:
``dW = s * (U_S U_S^T B) (A V_S V_S^T)`` lives entirely in the protected subspace. The projectors are never materialised:
``P_L B = B - U_S (w * (U_S^T B))`` and ``A P_R = A - ((A V_S) * w) V_S^T``, at ``O((m + n) r |S|)``.
"""

from __future__ import annotations

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

    def projected_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_L B, A P_R)``, computed as ``(B^T - (B^T U_S) w U_S^T)^T`` and ``A - (A V_S) w V_S^T``; with
        ``inside``, ``((B^T U_S) U_S^T)^T`` and ``(A V_S) V_S^T``."""
        B, A = self.lora_B, self.lora_A
        if self.U_St.shape[0] == 0:
            return (B * 0, A * 0) if self.inside else (B, A)
        Bt = B.T
        cb = Bt @ self.U_St.T  # r x |S|
        ca = A @ self.V_St.T  # r x |S|
        if self.w is not None:
            cb = cb * self.w
            ca = ca * self.w
        if self.inside:
            return (cb @ self.U_St).T, ca @ self.V_St
        return (Bt - cb @ self.U_St).T, A - ca @ self.V_St

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s P_L B, A P_R)``: ``dW`` = their product."""
        B, A = self.projected_factors()
        return self.scaling * B, A


class ProjectedLoRALayer(SpectralLayer):
    """A matrix with a projected LoRA update (OPLoRA; PALoRA without an expert)."""

    def __init__(self, base_layer: nn.Module, lora: ProjectedLoRA):
        super().__init__(base_layer)
        self.lora = lora

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora.factors()
