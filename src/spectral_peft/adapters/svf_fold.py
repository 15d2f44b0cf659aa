"""The SVF expert as a weight: ``W_e = W + dE`` with ``dE = U diag(sigma (z - 1)) V^T`` (``U``, ``sigma``, ``V`` the
SVD of ``W``, ``z`` a probe's learned scales), computed in fp32 and rounded once to ``W``'s dtype.

PALoRA's layers fold their expert this way, and :func:`fold_expert` writes it into a plain model (the starting
point of every other method in a PALoRA comparison), so both see the same ``W_e`` for the same SVD.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..probe import Probe
from ..spectral import SVD, SVDCache
from .matrices import matrix_weights


def expert_delta(svd: SVD, z: torch.Tensor) -> torch.Tensor:
    """``dE = U diag(sigma (z - 1)) V^T`` in fp32, on ``svd``'s device."""
    U, S, V = svd.U.float(), svd.S.float(), svd.V.float()
    return (U * (S * (z.float().to(S.device) - 1.0))) @ V.T


def probe_weights(model: nn.Module, probe: Probe) -> dict[str, torch.Tensor]:
    """The probed matrices' ``m x n`` views of ``model`` (plain, or wrapped: its ``get_base_model()``), after
    checking that they are exactly the weights the probe was trained on (one-line :class:`InputError` otherwise)."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        weights = matrix_weights(root, list(probe.base))
    except KeyError as e:
        raise InputError(f"probe module(s) {e.args[0]} are not in the model; use a probe trained on it") from None
    probe.check_weights(weights)
    return weights


@torch.no_grad()
def fold_expert(model: nn.Module, probe: Probe, svd_cache: SVDCache | None = None) -> nn.Module:
    """Write the probe's SVF expert ``W_e = W + dE`` into every probed matrix of ``model`` (in place) and return it.

    The probe must have been trained on exactly these weights (checked by hash). The SVD comes from ``svd_cache``
    (in memory when ``None``), the one the SVF and PALoRA layers use, so ``W_e`` equals PALoRA's folded weight.
    """
    cache = svd_cache or SVDCache(None)
    for name, W in probe_weights(model, probe).items():
        W.copy_((W.float() + expert_delta(cache.get(W, k=None), probe.scales[name])).to(W.dtype))
    return model
