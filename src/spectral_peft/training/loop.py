"""A small, seeded training loop for adapters: AdamW, warm-up + linear/cosine schedule, periodic validation and
best-state keeping, a progress bar, and HiP-LoRA's budget projection after each optimiser step.

Why not ``transformers.Trainer``: the wrapped models do train under ``Trainer`` (with :class:`BudgetCallback`; see
``tests/test_model.py``), but the experiments here train a 2M-parameter organism for a few hundred steps, where
``Trainer``'s per-step overhead (accelerate wrapping, logging, callbacks) is comparable to the step itself, and
REINFORCE needs rollouts inside the step, which ``Trainer`` does not model. The loop is 60 lines, deterministic
for a seed and a thread count, and works identically for :class:`SpectralPeftModel` and PEFT models: it only
calls ``model(...)``, the objective's loss, and ``model.project_budgets()`` when the model has it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``epochs``: passes over the data (``max_steps`` caps the number of optimiser steps when set).
    ``schedule``: ``linear`` or ``cosine`` decay to ``min_lr_ratio * lr`` after ``warmup_ratio`` of the steps, or
    ``constant``. ``eval_every``: validate every so many steps (and always at the end) when a validator is given.
    ``keep_best``: restore the trainable parameters of the best validation score at the end.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    keep_best: bool = True
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


@dataclass
class TrainResult:
    """What happened: per-step losses and logs, the validation history, and the kept step."""

    steps: int
    losses: list[float]
    logs: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_score: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``total``."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    shape = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that require gradients."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


def _batches(n: int, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).tolist()
    return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


def train(model, data: Sequence[Any], objective, cfg: TrainConfig | None = None,
          validate: Callable[[Any], float | dict[str, float]] | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require gradients on ``data`` with ``objective``.

    ``objective`` has ``collate(items) -> batch`` and ``loss(model, batch) -> (loss, logs)`` (see
    :mod:`.objectives`). ``validate(model)`` returns a score (higher is better) or a dict with a ``"score"`` key;
    it runs every ``eval_every`` steps and at the end, in eval mode. With ``keep_best`` the best-scoring trainable
    state is restored at the end. The model is left in eval mode.
    """
    cfg = cfg or TrainConfig()
    if not data:
        raise ValueError("no training data")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
    project = getattr(model, "project_budgets", None)
    result = TrainResult(steps=0, losses=[])
    best_state: dict[str, torch.Tensor] | None = None

    def run_validation(step: int) -> None:
        nonlocal best_state
        model.eval()
        with torch.no_grad():
            out = validate(model)
        model.train()
        out = {"score": float(out)} if not isinstance(out, dict) else {k: float(v) for k, v in out.items()}
        result.validation.append({"step": step, **out})
        if step > 0 and (result.best_score is None or out["score"] > result.best_score):
            result.best_score, result.best_step = out["score"], step
            if cfg.keep_best:
                best_state = trainable_state(model)

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=cfg.desc, disable=not cfg.progress, unit="step")
    step = 0
    try:
        for epoch in range(cfg.epochs):
            for idx in _batches(len(data), cfg, epoch):
                if step >= total:
                    break
                loss, logs = objective.loss(model, objective.collate([data[i] for i in idx]))
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if project is not None:
                    project()
                step += 1
                loss_value = loss.item()
                result.losses.append(loss_value)
                result.logs.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], **logs})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", epoch=epoch + 1)
                if validate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    run_validation(step)
        if validate is not None:
            run_validation(step)
    finally:
        bar.close()
    if cfg.keep_best and best_state is not None and result.best_step != step:
        load_trainable_state(model, best_state)
    result.steps = step
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result
