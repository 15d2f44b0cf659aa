"""Build the model a knowledge-injection run trains, for every method, all starting from the same SVF expert.

- ``palora`` (and its ablations) takes the *base* weights and the probe: the layer applies the expert internally
  and projects the LoRA update off the probe's protected directions.
- every other method is applied to the base with the expert folded into its weights (``W_e = U diag(sigma z) V^T``),
  so all methods start from the same function.

Rank ``r`` and targets (the MLP matrices by default) are the same for every method, so LoRA, OPLoRA, PALoRA,
MiLoRA, PiSSA and CorDA train exactly the same number of parameters; DoRA adds its magnitudes, HiP-LoRA its
``k`` gains per matrix, SVFT its ``r0`` diagonal entries (the counts are reported side by side). OPLoRA protects
``k = |S|`` directions, the size of PALoRA's protected set, so the two differ only in *which* directions.

Ablations (PALoRA's design choices, everything else equal):
- ``palora-sigma``: the protected set is the top-|S| by sigma (OPLoRA's rule) instead of the probe's choice;
- ``palora-random``: a random protected set of the same size per matrix;
- ``lora-in-probe``: the LoRA update forced *into* the probe subspace, ``dW = s U_S U_S^T B A V_S V_S^T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..adapters import method_config
from ..adapters.base import MLP_MODULES
from ..adapters.palora import PALoRALayer
from ..adapters.projected_lora import ProjectedLoRA
from ..model import get_peft_model
from ..probe import Probe
from .common import merge_expert

INJECT_METHODS = ("palora", "lora", "dora", "pissa", "milora", "oplora", "svft", "corda", "hiplora")
ABLATIONS = ("palora-sigma", "palora-random", "lora-in-probe")
ALL_METHODS = INJECT_METHODS + ABLATIONS
TARGETS = {"mlp": list(MLP_MODULES), "all-linear": "all-linear"}


@dataclass
class MethodConfig:
    """Shared adapter hyper-parameters: rank ``r``, ``lora_alpha``, ``targets`` (``mlp`` or ``all-linear``),
    PALoRA's ``selection``/``rho``/``tau``/``q``/``soft``, HiP-LoRA's ``hip_k``/``budget_rho``."""

    r: int = 8
    lora_alpha: float = 16.0
    targets: str = "mlp"
    selection: str = "top_fraction"
    rho: float = 0.1
    tau: float = 0.05
    q: float = 0.5
    soft: bool = False
    hip_k: int = 16
    budget_rho: float = 0.1
    seed: int = 0


def check_method(name: str) -> str:
    key = name.lower()
    if key not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
    return key


def protected_size(probe: Probe, cfg: MethodConfig) -> dict[str, int]:
    """|S| per probed matrix under PALoRA's selection rule."""
    return {n: int(probe.select(n, cfg.selection, rho=cfg.rho, tau=cfg.tau, q=cfg.q).numel()) for n in probe.scales}


class InProbeLoRA(ProjectedLoRA):
    """The ablation's factors: ``(U_S U_S^T B, A V_S V_S^T)``, i.e. the update lives *inside* the protected set."""

    def projected_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U_S @ (self.U_S.T @ self.lora_B), (self.lora_A @ self.V_S) @ self.V_S.T


def _force_into_probe(model) -> None:
    for layer in model.spectral_layers().values():
        if isinstance(layer, PALoRALayer):
            old = layer.lora
            new = InProbeLoRA(layer.shape, old.r, old.scaling, old.U_S, old.V_S)
            with torch.no_grad():
                new.lora_A.copy_(old.lora_A)
                new.lora_B.copy_(old.lora_B)
            layer.lora = new.to(old.lora_A.device)


def build_method_model(method: str, base: nn.Module, probe: Probe, cfg: MethodConfig,
                       calibration: Callable[[nn.Module], None] | None = None, progress: bool = False) -> nn.Module:
    """Wrap ``base`` (fresh base weights, modified in place) for ``method``; returns the trainable model.

    ``calibration(model)`` runs the model on skill data (CorDA's covariance; required for ``corda``).
    """
    method = check_method(method)
    if cfg.targets not in TARGETS:
        raise ValueError(f"targets must be one of {tuple(TARGETS)}, got {cfg.targets!r}")
    targets = TARGETS[cfg.targets]
    common = dict(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets)
    torch.manual_seed(cfg.seed)
    if method in ("palora", "palora-sigma", "palora-random", "lora-in-probe"):
        kw = dict(probe=probe, selection=cfg.selection, rho=cfg.rho, tau=cfg.tau, q=cfg.q, soft=cfg.soft)
        if method in ("palora-sigma", "palora-random"):
            sizes = protected_size(probe, cfg)
            gen = torch.Generator().manual_seed(cfg.seed)
            indices = {n: (list(range(k)) if method == "palora-sigma"
                           else sorted(torch.randperm(probe.scales[n].numel(), generator=gen)[:k].tolist()))
                       for n, k in sizes.items()}
            kw.update(selection="explicit", protected_indices=indices, soft=False)
        model = get_peft_model(base, method_config("palora", **common, **kw), progress=progress)
        if method == "lora-in-probe":
            _force_into_probe(model)
        return model
    merge_expert(base, probe)
    if method == "oplora":
        k = max(protected_size(probe, cfg).values())
        return get_peft_model(base, method_config("oplora", k=k, **common), progress=progress)
    if method == "hiplora":
        conf = method_config("hiplora", k=cfg.hip_k, budget_rho=cfg.budget_rho, **common)
        return get_peft_model(base, conf, progress=progress)
    if method == "milora":
        return get_peft_model(base, method_config("milora", **common), progress=progress)
    if method == "svft":
        return get_peft_model(base, method_config("svft", pattern="plain", target_modules=targets), progress=progress)
    conf = method_config(method, **common)
    if method == "corda":
        if calibration is None:
            raise ValueError("CorDA needs calibration data")
        return get_peft_model(base, conf, calibration=lambda: calibration(base))
    return get_peft_model(base, conf)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def probe_overhead(probe: Probe, n_base: int) -> float:
    """The paper's parameter overhead: number of ``z`` entries / number of base parameters."""
    return probe.num_parameters() / n_base


def ceil_frac(rho: float, n: int) -> int:
    return math.ceil(rho * n)
