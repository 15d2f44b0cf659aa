"""MiLoRA: LoRA initialised from the minor (bottom-r) singular triplets, with the base weight left untouched.

With the bottom-r triplets ``(U_b, sigma_b, V_b)`` and LoRA scale ``s``, the factors start at
``B_0 = U_b diag(sqrt(sigma_b / s))`` and ``A_0 = diag(sqrt(sigma_b / s)) V_b^T``, so ``s B_0 A_0 = W_b`` (the minor
part of ``W``). PEFT's PiSSA-style init rewrites ``W <- W - s B_0 A_0``; we keep ``W`` and put the frozen
correction in the adapter instead: ``dW = s (B A - B_0 A_0)``, which is zero at init and gives the same effective
weight ``W - W_b + s B A``. ``B_0, A_0`` are recomputed from the SVD, never saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..spectral import SVD
from .base import SpectralLayer
from .projected_lora import LowRankConfig


@dataclass
class MiLoRAConfig(LowRankConfig):
    """``r``: rank (the number of minor triplets); ``lora_alpha``, ``use_rslora``: the LoRA scale."""

    method: ClassVar[str] = "milora"

    def make_layer(self, name: str, base_layer: nn.Module, svd: SVD) -> "MiLoRALayer":
        return MiLoRALayer(base_layer, svd.bottom(self.r), self.scaling)


class MiLoRALayer(SpectralLayer):
    """``dW = s (B A - B_0 A_0)`` with ``B``, ``A`` trainable from the minor-triplet init; ``B_0``, ``A_0`` derived."""

    derived = ("B0", "A0")

    def __init__(self, base_layer: nn.Module, minor: SVD, scaling: float):
        super().__init__(base_layer)
        self.scaling = scaling
        root = torch.sqrt(minor.S.float() / scaling)
        B0 = minor.U.float() * root
        A0 = root[:, None] * minor.V.float().T
        self.lora_A = nn.Parameter(A0.clone())
        self.lora_B = nn.Parameter(B0.clone())
        self.B0 = B0.contiguous()
        self.A0 = A0.contiguous()

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scaling
        return torch.cat([s * self.lora_B, -s * self.B0], dim=1), torch.cat([self.lora_A, self.A0], dim=0)
