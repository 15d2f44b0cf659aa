"""Knowledge injection's training: SFT on the QA lines of the facts to inject, from the SVF expert.

Every method starts from the same function (the expert; see :func:`spectral_peft.methods.build_model`). CorDA, which
needs data whose behaviour is to be preserved, calibrates on the first retained skill's training examples.
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
from ..methods import MethodSpec
from ..probe import Probe
from .adapter import FinetuneSettings, train_adapter
from .loop import CHECKPOINT_EVERY, TrainResult
from ..errors import InputError


@dataclass
class InjectSettings:
    """The injection schedule (SFT on the facts' QA lines, AdamW, 3% warm-up, linear decay).

    Attributes:
        epochs: passes over the facts.
        lr: learning rate (a method spec's lr= overrides it for that method).
        batch_size: QA pairs per step.
        paraphrases: question templates trained per fact (1: the main question only).
    """

    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 8
    paraphrases: int = 1

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.paraphrases) < 1 or not (self.lr > 0 and np.isfinite(self.lr)):
            raise InputError("train.epochs, batch_size and paraphrases must be >= 1 and train.lr > 0")


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
    :func:`~spectral_peft.training.adapter.train_adapter`). Returns ``(model, history)``."""
    pairs = suite.split.training_pairs(settings.paraphrases)
    finetune = FinetuneSettings(n_train=len(pairs), n_eval=1, epochs=settings.epochs, lr=settings.lr,
                                batch_size=settings.batch_size)
    first_skill = next(iter(suite.skills.values()))[0]
    calibration = calibration_runner(tokenizer, first_skill) if spec.method == "corda" else None
    return train_adapter(base, tokenizer, spec, pairs, finetune, seed, probe=probe, calibration=calibration,
                         desc=f"inject {spec.label}", progress=progress, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every)
