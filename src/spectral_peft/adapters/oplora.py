"""OPLoRA: LoRA projected off the top-k singular directions on both sides.

``dW = s * P_L B A P_R`` with ``S`` = the ``k`` largest singular values of ``W``, so the top-k triplets of ``W`` are
kept exactly (``U_k^T dW = 0``, ``dW V_k = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..spectral import SVD
from .base import base_weight
from .projected_lora import ProjectedLoRA, ProjectedLoRALayer, TopKLowRankConfig


@dataclass
class OPLoRAConfig(TopKLowRankConfig):
    """``r``: LoRA rank; ``lora_alpha``: scale numerator; ``k``: protected top singular directions."""

    method: ClassVar[str] = "oplora"

    def make_layer(self, name: str, base_layer: nn.Module, svd: SVD) -> ProjectedLoRALayer:
        lora = ProjectedLoRA(tuple(base_weight(base_layer).shape), self.r, self.scaling, svd.U, svd.V)
        return ProjectedLoRALayer(base_layer, lora)
