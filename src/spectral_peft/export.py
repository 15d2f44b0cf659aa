"""Export any spectral adapter as a standard PEFT LoRA directory that vanilla ``peft`` loads.

Every layer's update is already a product ``dW = B_eff A_eff`` (rank ``r`` for OPLoRA, ``r + k`` for HiP-LoRA,
``r0 + r`` for PALoRA with its expert, ``r0`` for SVF and SVFT), so the export is exact: ``lora_B = B_eff``,
``lora_A = A_eff`` with ``lora_alpha = r`` per module (scale 1). A factor pair wider than ``min(m, n)`` is compressed
exactly to ``min(m, n)``; with ``max_rank`` it is truncated to its best rank-``max_rank`` approximation (via QR of
both factors and an SVD of the small core), and the relative Frobenius error of each module is returned.

Layouts, as PEFT expects them:
- linear: ``target_modules`` with a ``rank_pattern`` entry per module;
- Conv1D (GPT-2): the same factors of the ``out x in`` view with ``fan_in_fan_out=True``, which makes PEFT add
  ``(B A)^T`` to the stored ``in x out`` weight;
- expert stacks: ``target_parameters`` (PEFT's ``ParamWrapper``), one ``lora_A`` (``E r x n``, expert ``e`` in rows
  ``e r .. e r + r - 1``) and one ``lora_B`` (``m x r E``, rank index ``i`` of expert ``e`` in column ``i E + e``) per
  stack, every expert padded with zeros to the export's largest rank ``r`` (PEFT gives a stack one rank). PEFT nests
  the wrappers of one module's stacks in the module's parameter order, the first innermost, so its keys carry one
  ``base_layer.`` per stack adapted after it.
PEFT's ``ParamWrapper`` refuses ``fan_in_fan_out``, so a model with both Conv1D and expert matrices adapted is refused.
The recorded ``task_type`` is the wrapped model's own (``None`` when transformers lists its class under no task).

The vLLM-ready split (``split_expert=True``, PALoRA and SVF): a serving engine caps the LoRA rank (vLLM at 512), and
PALoRA's full update ``U diag(sigma (z - 1)) V^T + s P_L B A P_R`` has rank ``r0 + r``. The split writes
``base/``, a Hugging Face checkpoint whose probed matrices are ``W_e = W + U diag(sigma (z - 1)) V^T`` (the expert,
computed in fp32 and cast to the weight's dtype: PALoRA's weights already hold it, folded in place), and ``lora/``, a PEFT
LoRA of the knowledge update ``dW_k = s P_L B A P_R`` alone, rank ``r``, against that base. An SVF update is all
expert: ``base/`` holds ``W + U diag(sigma (z - 1)) V^T`` and no LoRA is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .adapters.base import SpectralLayer
from .adapters.matrices import stack_names
from .adapters.svf import SVFLayer
from .errors import InputError
from .model import SpectralPeftModel, task_type

SPLIT_METHODS = ("palora", "svf")


@dataclass
class SplitExport:
    """What ``export_lora(..., split_expert=True)`` wrote: ``base``, a Hugging Face checkpoint with the expert folded
    in; ``lora``, a PEFT LoRA against ``base`` (``None`` for SVF, whose whole update is the expert); ``errors``, the
    LoRA's relative Frobenius error per matrix (empty without a LoRA)."""

    base: Path
    lora: Path | None
    errors: dict[str, float]


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


def _factors(model: SpectralPeftModel, max_rank: int | None,
             update: Callable[[SpectralLayer], tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, dict[str, float]]:
    """``{matrix name: (B, A)}`` of each layer's exported ``update`` (fp32, CPU; rank at most ``min(m, n)`` and
    ``max_rank``) and the truncation errors."""
    factors, errors = {}, {}
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            B, A = (t.detach().float().cpu() for t in update(layer))
            limit = min(min(B.shape[0], A.shape[1]), max_rank or B.shape[1])
            error = 0.0
            if B.shape[1] > limit:
                B, A, error = compress_factors(B, A, limit)
            factors[name], errors[name] = (B, A), error
    return factors, errors


def _stack_tensors(model: SpectralPeftModel, factors: dict, r: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's ``ParamWrapper`` tensors of every adapted expert stack (module docstring) and the stacks' paths."""
    layers = model.spectral_layers()
    by_stack: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, layer in layers.items():
        if layer.kind == "expert":
            module, param, e = name.rsplit(".", 2)
            by_stack.setdefault((module, param), {})[int(e)] = factors[name]
    hosts = model.hosts()
    tensors = {}
    for (module, param), experts in by_stack.items():
        experts_module = hosts[module].base_layer
        E = experts_module._parameters[param].shape[0]
        B0, A0 = next(iter(experts.values()))
        A_full, B_full = torch.zeros(E, r, A0.shape[1]), torch.zeros(B0.shape[0], r, E)
        for e, (B, A) in experts.items():
            A_full[e, : A.shape[0]] = A
            B_full[:, : B.shape[1], e] = B
        adapted = [p for p in stack_names(experts_module) if (module, p) in by_stack]
        key = f"base_model.model.{module}." + "base_layer." * (len(adapted) - 1 - adapted.index(param))
        tensors[key + "lora_A.weight"] = A_full.reshape(E * r, -1).contiguous()
        tensors[key + "lora_B.weight"] = B_full.reshape(B0.shape[0], r * E).contiguous()
    return tensors, sorted(f"{module}.{param}" for module, param in by_stack)


def export_lora(model: SpectralPeftModel, path: str | Path, max_rank: int | None = None, split_expert: bool = False,
                tokenizer: Any = None) -> dict[str, float] | SplitExport:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's LoRA format into ``path``.

    Returns the relative Frobenius error of each matrix's exported update (0 up to rounding when not truncated).
    With ``split_expert`` (PALoRA and SVF; module docstring) it writes ``path/base`` (with ``tokenizer`` when given)
    and, for PALoRA, ``path/lora``, and returns a :class:`SplitExport`. The model is left as it was.
    """
    if not isinstance(model, SpectralPeftModel):
        raise TypeError("export_lora takes a model returned by spectral_peft.get_peft_model or load_adapter")
    if max_rank is not None and max_rank < 1:
        raise InputError(f"max_rank must be >= 1, got {max_rank}")
    method = model.peft_config.method
    if split_expert and method not in SPLIT_METHODS:
        raise InputError(f"split_expert needs an adapter with an SVF expert ({', '.join(SPLIT_METHODS)}), got "
                         f"{method!r}; export it without split_expert")
    if any(layer.merged or layer.disabled for layer in model.spectral_layers().values()):
        raise InputError("export an active adapter: unmerge it, or leave the disable_adapter() block, first")
    kinds = model.adapted_counts()
    if "conv1d" in kinds and "expert" in kinds and not (split_expert and method == "svf"):
        raise InputError("cannot export Conv1D and expert matrices together (PEFT's expert-stack LoRA refuses "
                         "fan_in_fan_out); adapt one kind per export")
    path = Path(path)
    if not split_expert:
        name_or_path = getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)
        return _write_lora(model, path, max_rank, lambda layer: layer.delta_factors(), name_or_path)
    _save_folded_base(model, path / "base", tokenizer)
    if method == "svf":
        return SplitExport(path / "base", None, {})
    errors = _write_lora(model, path / "lora", max_rank, lambda layer: layer.lora.factors(), None)
    return SplitExport(path / "base", path / "lora", errors)


def _expert_delta(layer: SpectralLayer) -> torch.Tensor | None:
    """The SVF expert ``U diag(sigma (z - 1)) V^T`` (fp32) that the layer's stored weight does not hold yet, or
    ``None`` (no expert, or PALoRA's, which is folded into the weight in place)."""
    return layer.delta_weight() if isinstance(layer, SVFLayer) else None


@torch.no_grad()
def _save_folded_base(model: SpectralPeftModel, path: Path, tokenizer: Any) -> None:
    """Save the LM with every expert folded in (``W_e = (W + dE) in W's dtype``) as a Hugging Face checkpoint.

    The experts are folded into the live weights and the adapter modules swapped out only while the LM saves; the
    original weights (kept on the CPU) and the adapter modules are put back afterwards, also after an error.
    """
    lm = model.get_base_model()
    hosts = model.hosts()
    layers = model.spectral_layers()
    originals: dict[str, torch.Tensor] = {}
    try:
        for name, layer in layers.items():
            delta = _expert_delta(layer)
            if delta is not None:
                W = layer.weight
                originals[name] = W.detach().to("cpu", copy=True)
                W.copy_((W.float() + delta.to(W.device)).to(W.dtype))
        for name, host in hosts.items():
            lm.set_submodule(name, host.base_layer)
        path.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
    finally:
        for name, host in hosts.items():
            lm.set_submodule(name, host)
        for name, W0 in originals.items():
            W = layers[name].weight
            W.copy_(W0.to(W.device))


def _write_lora(model: SpectralPeftModel, path: Path, max_rank: int | None,
                update: Callable[[SpectralLayer], tuple[torch.Tensor, torch.Tensor]],
                name_or_path: str | None) -> dict[str, float]:
    """Write each layer's ``update`` factors as a PEFT LoRA into ``path``; the relative errors per matrix."""
    kinds = model.adapted_counts()
    factors, errors = _factors(model, max_rank, update)
    r = max(B.shape[1] for B, _ in factors.values())
    kind = {n: layer.kind for n, layer in model.spectral_layers().items()}
    tensors, ranks = {}, {}
    for name, (B, A) in factors.items():
        if kind[name] != "expert":
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
            ranks[name] = B.shape[1]
    stack_tensors, stacks = _stack_tensors(model, factors, r)
    tensors.update(stack_tensors)
    pattern = {re.escape(n): k for n, k in ranks.items()}
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=pattern, target_modules=sorted(ranks),
        target_parameters=stacks or None, fan_in_fan_out="conv1d" in kinds, lora_dropout=0.0,
        task_type=task_type(model.get_base_model()), base_model_name_or_path=name_or_path,
    )
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors.tmp"))
    config.save_pretrained(str(path))
    os.replace(path / "adapter_model.safetensors.tmp", path / "adapter_model.safetensors")
    (path / "export_errors.json").write_text(json.dumps(errors, indent=2))
    return errors
