"""Train one adapter, named by a method spec, on prompt/target pairs: the fine-tuning step every recipe shares.

The schedule is SFT (loss on the target tokens only) with AdamW, 3% warm-up and linear decay. HiP-LoRA's budget
use ``R(phi) / eps`` (max and mean over layers) is logged at every step, so recipes can plot it. With a
``checkpoint_dir`` training checkpoints every ``checkpoint_every`` steps and resumes from a checkpoint found there
(:mod:`.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..methods import MethodSpec, build_model
from ..probe import Probe
from .loop import CHECKPOINT_EVERY, TrainConfig, TrainResult, train
from .objectives import SFTObjective
from ..errors import InputError


@dataclass
class FinetuneSettings:
    """Training and evaluation sizes of one fine-tune.

    Attributes:
        n_train: training pairs per task.
        n_eval: evaluation examples per task.
        epochs: passes over the training pairs.
        lr: AdamW learning rate (a method spec's ``lr=`` overrides it for that method).
        batch_size: pairs per step.
        max_new_tokens: generation budget when scoring (a task's own budget, if smaller, wins).
        stop_at: matched task gain (docs/lab.md (d)): end training at the first check whose accuracy on ``n_val``
            examples of the task's validation split is ``>= stop_at`` (``epochs`` is then the cap); None trains
            all epochs.
        check_every: steps between those checks (and one at the end).
        n_val: validation examples per check.
    """

    n_train: int = 512
    n_eval: int = 64
    epochs: int = 3
    lr: float = 5e-3
    batch_size: int = 16
    max_new_tokens: int = 24
    stop_at: float | None = None
    check_every: int = 8
    n_val: int = 64

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_eval, self.epochs, self.batch_size, self.max_new_tokens, self.check_every,
               self.n_val) < 1:
            raise InputError("n_train, n_eval, epochs, batch_size, max_new_tokens, check_every and n_val must be >= 1")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise InputError(f"lr must be a positive number, got {self.lr}")
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise InputError(f"stop_at is a validation accuracy in (0, 1], got {self.stop_at}")


class BudgetLogging:
    """Objective wrapper: adds HiP-LoRA's budget use (max and mean of ``R(phi)/eps`` over layers) to each step's logs."""

    def __init__(self, inner):
        self.inner = inner

    def collate(self, items):
        return self.inner.collate(items)

    def loss(self, model, batch):
        loss, logs = self.inner.loss(model, batch)
        use = final_budget_use(model)
        if use:
            logs = {**logs, "budget_use_max": max(use.values()), "budget_use_mean": float(np.mean(list(use.values())))}
        return loss, logs


@torch.no_grad()
def final_budget_use(model: nn.Module) -> dict[str, float] | None:
    """``R(phi)/eps`` per HiP-LoRA layer (``None`` for other methods)."""
    use = model.budget_use() if hasattr(model, "budget_use") else {}
    return dict(use) if use else None


def train_adapter(base: nn.Module, tokenizer, spec: MethodSpec, pairs: Sequence[tuple[str, str]],
                  settings: FinetuneSettings, seed: int, probe: Probe | None = None,
                  calibration: Callable[[nn.Module], None] | None = None, desc: str = "train",
                  progress: bool = True, checkpoint_dir: str | Path | None = None,
                  checkpoint_every: int = CHECKPOINT_EVERY, validate: Callable[[nn.Module], float] | None = None,
                  eval_every: int | None = None, stop_score: float | None = None) -> tuple[nn.Module, TrainResult]:
    """Wrap ``base`` (modified in place) with ``spec`` and train it on ``pairs``; returns ``(model, history)``.

    ``checkpoint_dir``: resumable checkpoints every ``checkpoint_every`` steps (removed when training completes).
    ``validate(model)`` (a score), if given, runs every ``eval_every`` steps and at the end; with ``stop_score``
    training ends at the first validation scoring ``>= stop_score`` (``settings.epochs`` is then the cap; see
    :class:`~spectral_peft.training.loop.TrainConfig`). No best state is kept: the model is the one training ended on.
    """
    model = build_model(spec, base, probe=probe, seed=seed, calibration=calibration)
    cfg = TrainConfig(epochs=settings.epochs, lr=spec.lr or settings.lr, batch_size=settings.batch_size,
                      schedule="linear", warmup_ratio=0.03, seed=seed, keep_best=False, progress=progress, desc=desc,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, eval_every=eval_every,
                      stop_score=stop_score)
    history = train(model, list(pairs), BudgetLogging(SFTObjective(tokenizer)), cfg, validate=validate)
    return model, history
