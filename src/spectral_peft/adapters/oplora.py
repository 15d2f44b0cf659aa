"""OPLoRA: LoRA projected off the top-k singular directions on both sides.

``dW = s * P_L B A P_R`` with ``S`` = the ``k`` largest singular values of ``W``, so the top-k triplets of ``W`` are
kept exactly (``U_k^T dW = 0``, ``dW V_k = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..spectral import SVD
from .base import AdapterConfig, check_rank
from .projected_lora import ProjectedLoRA, ProjectedLoRALayer, lora_scaling


@dataclass
class OPLoRAConfig(AdapterConfig):
    """``r``: LoRA rank; ``lora_alpha``: scale numerator; ``k``: protected top singular directions."""

    method: ClassVar[str] = "oplora"

    r: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    k: int = 16
    svd_method: str = "exact"

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.svd_method not in ("exact", "randomized"):
            raise ValueError(f"svd_method must be 'exact' or 'randomized', got {self.svd_method!r}")

    def svd_rank(self, shape: tuple[int, int]) -> int:
        return self.k

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        check_rank(self.r, shape)
        if self.k + self.r > min(shape):
            raise ValueError(f"{name}: k + r = {self.k + self.r} exceeds min(m, n) = {min(shape)}")

    def make_layer(self, name: str, base_layer: nn.Linear, svd: SVD) -> ProjectedLoRALayer:
        shape = tuple(base_layer.weight.shape)
        lora = ProjectedLoRA(shape, self.r, lora_scaling(self.r, self.lora_alpha, self.use_rslora), svd.U, svd.V)
        return ProjectedLoRALayer(base_layer, lora)
