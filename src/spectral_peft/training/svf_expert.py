"""Stage 1 of PALoRA: train an SVF expert on a task and freeze it as a probe of skill-critical singular directions.

SVF scales each singular value of the target matrices, ``W' = U diag(sigma z) V^T``; only ``z`` trains. Objectives
(:mod:`.objectives`):

- ``sft``: cross-entropy on the task's worked solutions (train split);
- ``reinforce``: one greedy rollout per prompt rewarded +1 / -1 by the task's checker, advantage = reward;
- ``reinforce-group`` (closer to Transformer-squared's REINFORCE): ``samples`` rollouts per prompt sampled at
  ``temperature``, advantage ``A_ij = r_ij - mean_j r_ij`` (the group-mean baseline of the prompt's samples).

Both REINFORCE objectives take an optional KL penalty to the base (``kl_coef``). Validation accuracy (greedy, the
task's checker, on ``n_val`` problems of its ``val`` split) is measured on the base before training (step 0), every
``eval_every`` steps and at the end. The kept state is the best of all of them, step 0 included: when the base
scores strictly above every trained step (training only hurt), the expert is the base itself (``z = 1``,
``best_step = 0``), so an expert never scores below the base on its validation set. On a tie the best trained step
(the earliest) is kept: an equal score is no evidence either way, and whether an expert was learned at all is judged
on held-out problems with a paired interval (``spectral-peft lab-check``, criterion (a)). The kept scales become the
:class:`~spectral_peft.probe.Probe`. Each validation's per-example outcomes travel in the loop's validation record
(so a resumed run still has the kept step's); with a ``checkpoint_dir`` training resumes from a checkpoint found
there (:mod:`.loop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import method_config
from ..evaluation import skill_accuracy
from ..methods import TARGETS
from ..model import get_peft_model
from ..probe import Probe
from .loop import CHECKPOINT_EVERY, TrainConfig, TrainResult, load_trainable_state, train, trainable_state
from .objectives import ReinforceObjective, SFTObjective
from ..errors import InputError

OBJECTIVES = ("sft", "reinforce", "reinforce-group")
PARAMETERISATIONS = ("plain", "sigmoid")
KEEPS = ("best", "last")


@dataclass
class SVFSettings:
    """Sizes and schedule of an SVF expert.

    Attributes:
        n_train: training examples of the task (train split).
        n_val: validation examples (val split), scored on the base (step 0), every eval_every steps and at the end;
            the best of these states is kept (the base when it scores above every trained step). At least 500 for
            an expert whose gain is to be trusted.
        epochs: passes over the training examples.
        lr: AdamW learning rate (cosine decay after 5% warm-up).
        batch_size: examples per step.
        eval_every: validate every so many steps (and at the end).
        kl_coef: KL penalty to the base model (reinforce objectives only).
        samples: rollouts per prompt (reinforce-group only; its advantage is the reward minus the group's mean).
        temperature: sampling temperature of those rollouts (reinforce-group only).
        parameterisation: SVF's scale, plain (z = 1 + delta) or sigmoid (Transformer-squared's).
        targets: the matrices SVF scales, mlp or all-linear.
        max_new_tokens: generation budget when validating and in rollouts (a task's own budget, if smaller, wins).
        keep: best (the best validated state, step 0 included: an expert) or last (the final state whatever it
            scores: a null probe, the same training on a non-skill objective).
    """

    n_train: int = 1024
    n_val: int = 500
    epochs: int = 1
    lr: float = 5e-3
    batch_size: int = 16
    eval_every: int = 16
    kl_coef: float = 0.0
    samples: int = 4
    temperature: float = 1.0
    parameterisation: str = "plain"
    targets: str = "all-linear"
    max_new_tokens: int = 96
    keep: str = "best"

    def validate(self) -> None:
        if min(self.n_train, self.n_val, self.epochs, self.batch_size, self.eval_every, self.max_new_tokens) < 1:
            raise InputError("svf sizes (n_train, n_val, epochs, batch_size, eval_every, max_new_tokens) must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise InputError(f"svf lr must be > 0 and kl_coef >= 0, got lr={self.lr}, kl_coef={self.kl_coef}")
        if self.samples < 2 or not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"svf samples must be >= 2 (a group baseline needs two rollouts) and temperature > 0, got "
                             f"samples={self.samples}, temperature={self.temperature}")
        if self.parameterisation not in PARAMETERISATIONS:
            raise InputError(f"unknown parameterisation {self.parameterisation!r}; choose from "
                             f"{', '.join(PARAMETERISATIONS)}")
        if self.targets not in TARGETS:
            raise InputError(f"svf targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.keep not in KEEPS:
            raise InputError(f"svf keep must be one of {', '.join(KEEPS)}, got {self.keep!r}")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


@dataclass
class SVFExpert:
    """A trained expert: the wrapped model (kept state), its probe, the training history, and the per-example
    validation outcomes of the base and of the kept expert."""

    model: nn.Module
    probe: Probe
    history: TrainResult
    base_val_correct: list[float]
    val_correct: list[float]

    @property
    def singular_values(self) -> dict[str, torch.Tensor]:
        """``sigma`` of every scaled matrix (for the probe figures)."""
        return {n: layer.S.detach().cpu() for n, layer in self.model.spectral_layers().items()}

    def metrics(self, n_base_parameters: int) -> dict[str, Any]:
        """Headline numbers: validation accuracies, steps, losses and the probe's size and overhead."""
        h = self.history
        n_z = self.probe.num_parameters()
        return {"base_val_accuracy": _mean(self.base_val_correct), "expert_val_accuracy": _mean(self.val_correct),
                "best_step": h.best_step, "steps": h.steps, "train_seconds": h.seconds, "first_loss": h.losses[0],
                "last_loss": h.losses[-1], "n_z": n_z, "n_base_parameters": n_base_parameters,
                "parameter_overhead": n_z / n_base_parameters}

    def save(self, directory: str | Path) -> None:
        """``probe/`` and ``adapter/`` (the SVF adapter) under ``directory``."""
        directory = Path(directory)
        self.probe.save(directory / "probe")
        self.model.save_pretrained(directory / "adapter")


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def keep_best_or_base(model: nn.Module, history: TrainResult, base_val: list[float],
                      untrained: dict[str, torch.Tensor]) -> list[float]:
    """Choose between the loop's best trained step and step 0 (the base, scored ``mean(base_val)``): the base wins
    when it scores strictly higher (ties keep the trained step), and then ``model`` gets its ``untrained`` state
    back. Records the choice in ``history`` (``best_step``, ``best_score``, a step-0 validation record first) and
    returns the kept step's per-example validation outcomes."""
    outcomes = {v["step"]: v.pop("correct") for v in history.validation}
    base_score = _mean(base_val)
    history.validation.insert(0, {"step": 0, "score": base_score, "accuracy": base_score})
    if history.best_step is not None and history.best_score >= base_score:
        return outcomes[history.best_step]
    load_trainable_state(model, untrained)
    history.best_step, history.best_score = 0, base_score
    return list(base_val)


def keep_last(history: TrainResult, base_val: list[float]) -> list[float]:
    """Keep the final state (``keep=last``): record it as the kept step, put the step-0 validation record first and
    return the final validation's per-example outcomes."""
    outcomes = {v["step"]: v.pop("correct") for v in history.validation}
    last = history.validation[-1]
    history.validation.insert(0, {"step": 0, "score": _mean(base_val), "accuracy": _mean(base_val)})
    history.best_step, history.best_score = last["step"], last["score"]
    return outcomes[last["step"]]


def train_svf_expert(base: nn.Module, tokenizer, task, settings: SVFSettings, objective: str = "sft", seed: int = 0,
                     meta: dict[str, Any] | None = None, progress: bool = True,
                     checkpoint_dir: str | Path | None = None, checkpoint_every: int = CHECKPOINT_EVERY) -> SVFExpert:
    """Train an SVF expert on ``task`` from ``base`` (wrapped in place) and freeze its probe (``meta`` is recorded
    in it, with the validation accuracies). The kept state is the best validated one, step 0 (the base) included
    (``settings.keep = "last"``: the final one);
    the history's validation records start with step 0. ``checkpoint_dir``: resumable checkpoints every
    ``checkpoint_every`` steps (removed when training completes)."""
    settings.validate()
    check_objective(objective)
    train_ex = task.examples("train", n=settings.n_train, seed=seed)
    val_ex = task.examples("val", n=settings.n_val, seed=seed)
    budget = min(settings.max_new_tokens, getattr(task, "max_new_tokens", settings.max_new_tokens))

    def validate(model, show: bool = False) -> dict[str, Any]:
        res = skill_accuracy(model, tokenizer, task, examples=val_ex, max_new_tokens=budget, progress=show)
        return {"score": res.accuracy, "accuracy": res.accuracy, "correct": [float(c) for c in res.correct]}

    base_val = validate(base, show=progress)["correct"]
    model = get_peft_model(base, method_config("svf", parameterisation=settings.parameterisation,
                                               target_modules=TARGETS[settings.targets]), progress=progress)
    cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
                      schedule="cosine", warmup_ratio=0.05, eval_every=settings.eval_every,
                      keep_best=settings.keep == "best",
                      progress=progress, desc=f"svf {task.name} ({objective})", checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every)
    if objective == "sft":
        obj, data = SFTObjective(tokenizer), [(e.prompt, e.target) for e in train_ex]
    elif objective == "reinforce":
        obj = ReinforceObjective(tokenizer, task, kl_coef=settings.kl_coef, max_new_tokens=budget)
        data = train_ex
    else:
        obj = ReinforceObjective(tokenizer, task, kl_coef=settings.kl_coef, max_new_tokens=budget,
                                 samples=settings.samples, temperature=settings.temperature, baseline="group")
        data = train_ex
    untrained = trainable_state(model)
    history = train(model, data, obj, cfg, validate=validate)
    kept = (keep_best_or_base(model, history, base_val, untrained) if settings.keep == "best"
            else keep_last(history, base_val))
    probe = Probe.from_model(model, meta={**(meta or {}), "objective": objective, "seed": seed,
                                          "val_accuracy": _mean(kept), "base_val_accuracy": _mean(base_val)})
    return SVFExpert(model, probe, history, base_val, kept)
