"""Cross-cutting training hooks: HiP-LoRA's budget projection after every optimiser step, and budget logging.

Plain loops and accelerate: ``attach_budget_projection(optimizer, model)`` registers a torch optimiser post-step hook.
transformers ``Trainer``: ``BudgetCallback()`` projects in ``on_optimizer_step`` and adds the budget use
(``max_layers R(phi) / eps``) to the logs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import InputError
from ..model import SpectralPeftModel


def unwrap_spectral(model: Any) -> SpectralPeftModel | None:
    """The :class:`SpectralPeftModel` inside DDP/accelerate wrappers (``.module``), or ``None``."""
    while model is not None and not isinstance(model, SpectralPeftModel):
        model = getattr(model, "module", None)
    return model


def max_budget_use(model: SpectralPeftModel) -> float | None:
    """The largest ``R(phi) / eps`` over HiP-LoRA layers (``None`` when there are none)."""
    use = model.budget_use()
    return max(use.values()) if use else None


def attach_budget_projection(optimizer: torch.optim.Optimizer, model: Any):
    """Project HiP-LoRA's ``phi`` onto its budget after every step of ``optimizer``; returns the hook handle.

    ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``: the hook goes on the torch optimiser inside,
    so it runs only on the steps that really update, e.g. not on skipped gradient-accumulation steps); ``model`` may
    be wrapped by DDP or accelerate (``.module``)."""
    wrapped = unwrap_spectral(model)
    if wrapped is None:
        raise InputError(f"attach_budget_projection takes a model from spectral_peft.get_peft_model, got "
                         f"{type(model).__name__}")
    while not hasattr(optimizer, "_optimizer_step_post_hooks") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer.register_step_post_hook(lambda *_: wrapped.project_budgets())


class BudgetCallback(TrainerCallback):
    """Trainer hook: budget projection after each optimiser step; ``budget_use`` kept in ``history`` as
    ``(step, use)`` after every step, and added to each logged entry (``trainer.state.log_history``)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        wrapped = unwrap_spectral(model)
        if wrapped is None:
            return
        wrapped.project_budgets()
        use = max_budget_use(wrapped)
        if use is not None:
            self.history.append((state.global_step + 1, use))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.history and logs is not None:
            logs["budget_use"] = self.history[-1][1]
            if state.log_history:
                state.log_history[-1]["budget_use"] = self.history[-1][1]
