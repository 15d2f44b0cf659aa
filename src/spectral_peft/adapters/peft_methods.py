"""Configs for the baselines PEFT already implements: LoRA, DoRA, PiSSA and CorDA (all ``peft.LoraConfig``)."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora.config import CordaConfig
from ..errors import InputError

PEFT_METHODS = ("lora", "dora", "pissa", "corda")


def peft_lora_config(
    method: str,
    r: int = 8,
    lora_alpha: float = 16.0,
    target_modules: list[str] | str | None = "all-linear",
    use_rslora: bool = False,
    pissa_niter: int | None = None,
    corda_method: str = "kpm",
    **kwargs: Any,
) -> LoraConfig:
    """A ``LoraConfig`` for ``method``: plain LoRA, DoRA (``use_dora``), PiSSA (``init_lora_weights="pissa"``, or
    ``pissa_niter_K`` for the fast randomised init) or CorDA (``init_lora_weights="corda"``; needs calibration data
    at ``get_peft_model`` time)."""
    if method not in PEFT_METHODS:
        raise InputError(f"unknown PEFT method {method!r}; use one of {PEFT_METHODS}")
    common = dict(r=r, lora_alpha=lora_alpha, target_modules=target_modules, use_rslora=use_rslora,
                  lora_dropout=0.0, task_type="CAUSAL_LM", **kwargs)
    if method == "dora":
        return LoraConfig(use_dora=True, **common)
    if method == "pissa":
        return LoraConfig(init_lora_weights="pissa" if pissa_niter is None else f"pissa_niter_{pissa_niter}", **common)
    if method == "corda":
        return LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method=corda_method), **common)
    return LoraConfig(**common)
