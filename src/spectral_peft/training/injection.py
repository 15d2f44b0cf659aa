"""Knowledge injection's training: SFT on the QA lines of the facts to inject, from the SVF expert.

Every method starts from the same function (the expert; see :func:`spectral_peft.methods.build_model`). CorDA, which
needs data whose behaviour is to be preserved, calibrates on the first retained skill's training examples.

Matched recall (criterion (d) of ``docs/lab.md``): with ``InjectSettings.recall_target > 0``, recall of the injected
facts (``suite.split.inject``, not the known facts of ``split.mix`` trained beside them; greedy, main question, alias
match: :func:`~spectral_peft.evaluation.knowledge.recall`, the ``recall`` metric of
:func:`~spectral_peft.evaluation.injection.evaluate_injection`) is measured every
``check_every`` steps, and training ends at the first check where it is ``>= recall_target``. ``epochs`` is then the
cap: the learning-rate schedule (3% warm-up, linear decay) is computed over the cap, so a run that stops early ends
before its learning rate has decayed to 0. The model at the stopping step is the result (no other state is kept). The
history records each check (``validation``: ``{"step", "score"}``, ``score`` = recall), the steps taken (``steps``)
and ``reached_stop_score`` (``False``: the target was not reached within the cap; the last check is then at the cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data import load_task
from ..evaluation.injection import Suite
from ..evaluation.knowledge import recall
from ..methods import MethodSpec
from ..probe import Probe
from .adapter import FinetuneSettings, train_adapter
from .loop import CHECKPOINT_EVERY, TrainResult
from ..errors import InputError


@dataclass
class InjectSettings:
    """The injection schedule (SFT on the facts' QA lines, AdamW, 3% warm-up, linear decay). The defaults are the
    lab's calibrated regime (``docs/lab.md``, chosen on LoRA alone): lr 5e-5, stopped at 80% recall of the injected
    facts, at most 160 epochs; with r = 1 on every linear matrix (the recipes' defaults), LoRA's updates are then a
    few percent of the weights, and every method is compared at the same recall.

    Attributes:
        epochs: passes over the facts (with a recall target: the most passes).
        lr: learning rate (a method spec's lr= overrides it for that method).
        batch_size: QA pairs per step.
        paraphrases: question templates trained per fact (1: the main question only).
        recall_target: stop at the first check where recall of the injected facts is >= this (0: off, train all
            epochs; module docstring).
        check_every: optimiser steps between recall checks (with a recall target).
    """

    epochs: int = 160
    lr: float = 5e-5
    batch_size: int = 8
    paraphrases: int = 1
    recall_target: float = 0.8
    check_every: int = 8

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.paraphrases) < 1 or not (self.lr > 0 and np.isfinite(self.lr)):
            raise InputError("train.epochs, batch_size and paraphrases must be >= 1 and train.lr > 0")
        if not 0 <= self.recall_target <= 1:
            raise InputError(f"train.recall_target must be in [0, 1] (0: off), got {self.recall_target}")
        if self.check_every < 1:
            raise InputError(f"train.check_every must be >= 1 step, got {self.check_every}")


def calibration_runner(tokenizer, task, n: int = 64) -> Callable[[nn.Module], None]:
    """CorDA's calibration: run the model on ``n`` training examples of ``task`` (a task or a data spec; the data
    whose behaviour is to be preserved), one at a time (PEFT's covariance hook squeezes the batch dimension)."""
    task = load_task(task) if isinstance(task, str) else task
    texts = [e.prompt + e.target for e in task.examples("train", n=n, seed=12345)]

    @torch.no_grad()
    def run(model: nn.Module) -> None:
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))

    return run



def train_injection(base: nn.Module, tokenizer, spec: MethodSpec, suite: Suite, settings: InjectSettings, seed: int,
                    probe: Probe, progress: bool = True, checkpoint_dir: str | Path | None = None,
                    checkpoint_every: int = CHECKPOINT_EVERY) -> tuple[nn.Module, TrainResult]:
    """Wrap ``base`` (fresh base weights; every method starts from the probe's expert, see ``methods.build_model``)
    with ``spec`` and train it on the QA pairs of the suite's split; CorDA calibrates on the first retained skill's
    training examples. ``checkpoint_dir``: resumable checkpoints every ``checkpoint_every`` steps (see
    :func:`~spectral_peft.training.adapter.train_adapter`). With ``settings.recall_target``, training stops once recall
    of the injected facts reaches it (module docstring). Returns ``(model, history)``."""
    settings.validate()
    target = settings.recall_target or None
    if target is not None and not suite.split.inject:
        raise InputError("train.recall_target needs injected facts to measure recall on; the split has none")
    pairs = suite.split.training_pairs(settings.paraphrases)
    finetune = FinetuneSettings(n_train=len(pairs), n_eval=1, epochs=settings.epochs, lr=settings.lr,
                                batch_size=settings.batch_size)
    first_skill = next(iter(suite.skills.values()))[0]
    calibration = calibration_runner(tokenizer, first_skill) if spec.method == "corda" else None

    def injected_recall(model: nn.Module) -> float:
        return recall(model, tokenizer, suite.split.inject, batch_size=128, progress=False).accuracy

    return train_adapter(base, tokenizer, spec, pairs, finetune, seed, probe=probe, calibration=calibration,
                         desc=f"inject {spec.label}", progress=progress, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, validate=injected_recall if target else None,
                         eval_every=settings.check_every if target else None, stop_score=target)
