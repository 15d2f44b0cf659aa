"""SVFT: ``dW = U M V^T`` over the full singular bases of ``W``, with a sparse trainable ``M`` (``r0 x r0``).

Sparsity patterns (the non-zero positions of ``M``):
- ``"plain"``: the diagonal (``r0`` entries);
- ``"banded"``: ``|i - j| <= d``;
- ``"random"``: the diagonal plus ``d`` off-diagonal positions per row, drawn with ``seed``;
- ``"top_k"``: the dense ``k x k`` block over the top-k singular indices (our reading of SVFT's top-k variant).
``M`` starts at zero, so the layer starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..spectral import SVD
from .base import AdapterConfig, SpectralLayer
from ..errors import InputError

PATTERNS = ("plain", "banded", "random", "top_k")


def sparsity_pattern(r0: int, pattern: str, d: int = 0, k: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the non-zeros of ``M``, in row-major order, without duplicates."""
    if pattern == "plain":
        i = torch.arange(r0)
        return i, i
    if pattern == "banded":
        rows, cols = torch.meshgrid(torch.arange(r0), torch.arange(-d, d + 1), indexing="ij")
        cols = rows + cols
        keep = (cols >= 0) & (cols < r0)
        return rows[keep], cols[keep]
    if pattern == "random":
        g = torch.Generator().manual_seed(seed)
        offsets = torch.rand(r0, r0 - 1, generator=g).argsort(dim=1)[:, : min(d, r0 - 1)] + 1
        mask = torch.eye(r0, dtype=torch.bool)
        mask[torch.arange(r0)[:, None], (torch.arange(r0)[:, None] + offsets) % r0] = True
        rows, cols = mask.nonzero(as_tuple=True)
        return rows, cols
    if pattern == "top_k":
        rows, cols = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        return rows.reshape(-1), cols.reshape(-1)
    raise InputError(f"unknown SVFT pattern {pattern!r}; use one of {PATTERNS}")


@dataclass
class SVFTConfig(AdapterConfig):
    """``pattern`` of ``M``; ``d`` for banded/random; ``k`` for top_k; ``seed`` for random."""

    method: ClassVar[str] = "svft"

    pattern: str = "plain"
    d: int = 1
    k: int = 16
    seed: int = 0

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise InputError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.d < 0:
            raise InputError(f"d must be >= 0, got {self.d}")
        if self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")

    def rank_need(self) -> int:
        return self.k if self.pattern == "top_k" else 1

    def need_text(self) -> str:
        return f"k={self.k}" if self.pattern == "top_k" else super().need_text()

    def make_layer(self, name: str, base_layer: nn.Module, svd: SVD) -> "SVFTLayer":
        rows, cols = sparsity_pattern(svd.rank, self.pattern, d=self.d, k=self.k, seed=self.seed)
        return SVFTLayer(base_layer, svd, rows, cols)


class SVFTLayer(SpectralLayer):
    """``dW = U M V^T`` with ``M[rows, cols] = svft_values`` (trainable) and zero elsewhere; the full ``U``, ``V`` and
    the pattern are derived state (``S`` is not kept: ``M`` replaces it)."""

    derived = ("rows", "cols", "U", "V")

    def __init__(self, base_layer: nn.Module, svd: SVD, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__(base_layer)
        self.svft_values = nn.Parameter(torch.zeros(rows.numel()))
        self.diagonal = bool(torch.equal(rows, cols))
        self.rows = rows.long()
        self.cols = cols.long()
        self.U = svd.U.float().contiguous()
        self.V = svd.V.float().contiguous()

    def core(self) -> torch.Tensor:
        """The dense ``M``."""
        r0 = self.U.shape[1]
        M = torch.zeros(r0, r0, dtype=self.svft_values.dtype, device=self.svft_values.device)
        return M.index_put((self.rows, self.cols), self.svft_values)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U @ self.core(), self.V.T

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.diagonal:  # the plain pattern: no dense r0 x r0 core
            return ((x @ self.V[:, self.cols]) * self.svft_values) @ self.U[:, self.rows].T
        return ((x @ self.V) @ self.core().T) @ self.U.T
