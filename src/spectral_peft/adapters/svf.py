"""SVF (Transformer-squared): scale the singular values, ``W' = U diag(sigma * z) V^T``; only ``z`` trains.

Parameterisations of the effective scale ``z`` (length ``r0 = min(m, n)``):
- ``"plain"`` (default): ``z = 1 + delta``, ``delta`` initialised to 0.
- ``"sigmoid"``: Transformer-squared's ``z = sigmoid(p) * sum(sigma) / sum(sigma * sigmoid(p))``, which keeps
  ``sum(sigma * z) = sum(sigma)``; any constant ``p`` (here 0) is the identity.

Forward modes: ``"factorised"`` computes ``W x + U ((sigma * (z - 1)) * (V^T x))`` (about ``(m + n) r0`` extra
multiply-adds per token); ``"recompose"`` builds ``U diag(sigma * z) V^T`` once per call (``m n r0``, independent of
the batch) and applies it. Both give the same output (tested). ``"auto"`` (default) recomposes when the batch has
more than ``2 m n / (m + n)`` tokens, the point where the two costs cross on the step-time benchmark
(docs/performance.md: recomposing wins on the organism's 1,024-token batches, and loses by 8x on a 4096x14336
layer with a few hundred tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..spectral import SVD
from .base import AdapterConfig, SpectralLayer

PARAMETERISATIONS = ("plain", "sigmoid")
FORWARD_MODES = ("auto", "factorised", "recompose")


def effective_scale(param: torch.Tensor, S: torch.Tensor, parameterisation: str) -> torch.Tensor:
    """The multiplier ``z`` on each singular value for a raw parameter vector."""
    if parameterisation == "plain":
        return 1.0 + param
    gate = torch.sigmoid(param)
    return gate * (S.sum() / (S * gate).sum())


@dataclass
class SVFConfig(AdapterConfig):
    """``parameterisation``: ``"plain"`` or ``"sigmoid"``; ``forward_mode``: ``"auto"``, ``"factorised"`` or
    ``"recompose"``."""

    method: ClassVar[str] = "svf"
    default_targets: ClassVar[str] = "mlp"

    parameterisation: str = "plain"
    forward_mode: str = "auto"

    def validate(self) -> None:
        if self.parameterisation not in PARAMETERISATIONS:
            raise InputError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")
        if self.forward_mode not in FORWARD_MODES:
            raise InputError(f"forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")

    def make_layer(self, name: str, base_layer: nn.Module, svd: SVD) -> "SVFLayer":
        return SVFLayer(base_layer, svd, self.parameterisation, self.forward_mode)


class SVFLayer(SpectralLayer):
    """``dW = U diag(sigma * (z - 1)) V^T`` with trainable ``svf_param`` (length ``r0``); the full ``U``, ``S``, ``V``
    (derived state) are what its forward needs."""

    derived = ("U", "S", "V")

    def __init__(self, base_layer: nn.Module, svd: SVD, parameterisation: str, forward_mode: str):
        super().__init__(base_layer)
        self.parameterisation = parameterisation
        self.forward_mode = forward_mode
        self.svf_param = nn.Parameter(torch.zeros(svd.rank))
        self.U = svd.U.float().contiguous()
        self.S = svd.S.float().contiguous()
        self.V = svd.V.float().contiguous()

    def scale(self) -> torch.Tensor:
        """The effective ``z``."""
        return effective_scale(self.svf_param, self.S, self.parameterisation)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U * (self.S * (self.scale() - 1.0)), self.V.T

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.V) * (self.S * (self.scale() - 1.0))) @ self.U.T

    def recomposes(self, x: torch.Tensor) -> bool:
        if self.forward_mode == "auto":
            m, n = self.shape
            return x.numel() // n > 2 * m * n / (m + n)
        return self.forward_mode == "recompose"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or not self.recomposes(x):
            return super().forward(x)
        W = (self.U * (self.S * self.scale())) @ self.V.T
        return F.linear(x, W.to(x.dtype), self.base_layer.bias)
