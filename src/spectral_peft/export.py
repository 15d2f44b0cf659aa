"""Export any spectral adapter as a standard PEFT LoRA directory that vanilla ``peft`` loads.

Every layer's update is already a product ``dW = B_eff A_eff`` (rank ``r`` for OPLoRA, ``r + k`` for HiP-LoRA,
``r0 + r`` for PALoRA with its expert, ``r0`` for SVF and SVFT), so the export is exact: ``lora_B = B_eff``,
``lora_A = A_eff`` with ``lora_alpha = r`` per module (scale 1). A factor pair wider than ``min(m, n)`` is compressed
exactly to ``min(m, n)``; with ``max_rank`` it is truncated to its best rank-``max_rank`` approximation (via QR of
both factors and an SVD of the small core), and the relative Frobenius error of each module is returned.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .model import SpectralPeftModel


def compress_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``B @ A`` and the relative Frobenius error of the truncation."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    P, S, Qh = torch.linalg.svd(Rb @ Ra.T)
    total = float(S.square().sum())
    error = (float(S[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    B_new = (Qb @ P[:, :rank]) * S[:rank]
    A_new = Qh[:rank] @ Qa.T
    return B_new.float(), A_new.float(), error


def export_lora(model: SpectralPeftModel, path: str | Path, max_rank: int | None = None) -> dict[str, float]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's LoRA format into ``path``.

    Returns the relative Frobenius error of each module's exported update (0 up to rounding when not truncated).
    """
    if not isinstance(model, SpectralPeftModel):
        raise TypeError("export_lora takes a model returned by spectral_peft.get_peft_model or load_adapter")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    tensors, ranks, errors = {}, {}, {}
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            B, A = (t.detach().float().cpu() for t in layer.delta_factors())
            limit = min(min(B.shape[0], A.shape[1]), max_rank or B.shape[1])
            error = 0.0
            if B.shape[1] > limit:
                B, A, error = compress_factors(B, A, limit)
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
            ranks[name], errors[name] = B.shape[1], error
    pattern = {re.escape(n): r for n, r in ranks.items()}
    r = max(ranks.values())
    name_or_path = getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=pattern, target_modules=sorted(ranks),
        lora_dropout=0.0, task_type="CAUSAL_LM", base_model_name_or_path=name_or_path,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors.tmp"))
    config.save_pretrained(str(path))
    os.replace(path / "adapter_model.safetensors.tmp", path / "adapter_model.safetensors")
    (path / "export_errors.json").write_text(json.dumps(errors, indent=2))
    return errors
