"""The update regime: how large a LoRA fine-tune's weight updates are, relative to the weights they update.

A calibration fine-tune (LoRA at the recorded settings, from the base) is trained and, for every adapted matrix
``W`` with update ``dW = (alpha / r) B A``, two ratios are measured:

- ``||dW||_F / ||W||_F`` (criterion (c) of ``docs/lab.md``: fine-tuning of 7-8B models stays at a few percent);
- ``||dW||_2 / sigma_1(W)``, the update's largest singular value against the weight's.

Training data (``data``): ``facts``, the organism world's held-out facts (never in pretraining), as the QA lines
knowledge injection trains on (the demo's data, without its categorisation step); ``facts:PATH``, the rows of a QA
JSONL file; or any task data spec (``spectral_peft.data.spec``), its train split. What the fine-tune learned is
scored before and after: recall of the trained facts, or accuracy on ``n_eval`` test problems of the task.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..adapters.matrices import matrix_weights
from ..data import check_task_spec, injection_pairs, load_task
from ..errors import InputError
from ..evaluation import recall, skill_accuracy
from ..evaluation.knowledge_split import check_facts_spec, load_facts
from ..merging import adapter_deltas
from ..methods import TARGETS, MethodSpec, parse_method, target_shapes
from ..training.adapter import FinetuneSettings, train_adapter

FACTS = "facts"


@dataclass
class RegimeSettings:
    """The LoRA calibration fine-tune whose update size is measured. The defaults are the lab's calibrated regime
    (``docs/lab.md``, chosen on LoRA alone): 16 Unknown facts, r = 1 on every linear matrix, lr 5e-5, stopped at
    80% recall (at most 160 epochs).

    Attributes:
        data: facts (the organism world's held-out facts as QA lines), facts:PATH (a QA JSONL file), or a task data
            spec (its train split).
        n_train: facts (or training examples) trained on.
        r: LoRA rank (alpha stays the method default, 16).
        targets: the adapted matrices, mlp or all-linear.
        lr: AdamW learning rate (3% warm-up, linear decay).
        epochs: passes over the training pairs.
        batch_size: pairs per step.
        n_eval: test problems scored before and after (task data only; facts are scored on the trained facts).
        recall_target: facts only: stop at the first check where recall of the trained facts reaches this (0: train
            all epochs, which are otherwise the cap), so the update is measured at a matched, sub-ceiling recall.
        check_every: steps between those recall checks.
    """

    data: str = FACTS
    n_train: int = 16
    r: int = 1
    targets: str = "all-linear"
    lr: float = 5e-5
    epochs: int = 160
    batch_size: int = 8
    n_eval: int = 200
    recall_target: float = 0.8
    check_every: int = 8

    def validate(self, allow_code_execution: bool = False) -> None:
        if min(self.n_train, self.r, self.epochs, self.batch_size, self.n_eval, self.check_every) < 1:
            raise InputError("regime sizes (n_train, r, epochs, batch_size, n_eval, check_every) must be >= 1")
        if not 0 <= self.recall_target <= 1:
            raise InputError(f"regime.recall_target must lie in [0, 1], got {self.recall_target}")
        if self.recall_target and not (self.data == FACTS or self.data.startswith(f"{FACTS}:")):
            raise InputError("regime.recall_target stops a fact injection; it needs data=facts or facts:PATH")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"regime.lr must be a positive number, got {self.lr}")
        if self.targets not in TARGETS:
            raise InputError(f"regime.targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.data.startswith(f"{FACTS}:"):
            check_facts_spec(self.data.split(":", 1)[1])
        elif self.data != FACTS:
            check_task_spec(self.data, allow_code_execution=allow_code_execution)

    def spec(self) -> MethodSpec:
        return parse_method("lora", MethodSpec(r=self.r, targets=self.targets))


@dataclass
class RegimeMeasure:
    """Per adapted matrix, the two update ratios; per scored item, what the fine-tune learned before and after;
    and the training record."""

    spec: dict[str, Any]
    settings: RegimeSettings
    n_pairs: int
    fro_ratio: dict[str, float]
    spectral_ratio: dict[str, float]
    learned_before: list[float]
    learned_after: list[float]
    learned_metric: str
    steps: int
    reached_target: bool | None
    first_loss: float
    last_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "settings": asdict(self.settings)}


def spread(values: dict[str, float]) -> dict[str, float]:
    """``{median, p10, p90, min, max, n}`` of the per-matrix values (linearly interpolated percentiles)."""
    x = np.asarray(list(values.values()), dtype=np.float64)
    if x.size == 0:
        raise InputError("no adapted matrices to summarise")
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "min": float(x.min()),
            "max": float(x.max()), "n": int(x.size)}


@torch.no_grad()
def _norms(model, names: list[str]) -> dict[str, tuple[float, float]]:
    """``(||W||_F, sigma_1(W))`` of the named matrices."""
    out = {}
    for name, W in matrix_weights(model, names).items():
        W = W.detach().float()
        out[name] = (float(torch.linalg.matrix_norm(W)), float(torch.linalg.matrix_norm(W, ord=2)))
    return out


def training_data(settings: RegimeSettings, tokenizer, chat_template: str, allow_code_execution: bool, seed: int
                   ) -> tuple[list[tuple[str, str]], Callable[[Any, bool], list[float]], str]:
    """Training pairs, a scorer ``(model, progress) -> per-item 0/1`` of what they teach, and its name."""
    if settings.data == FACTS or settings.data.startswith(f"{FACTS}:"):
        pool = load_facts("organism" if settings.data == FACTS else settings.data.split(":", 1)[1])
        rows = list(pool.candidates)
        random.Random(f"regime/{seed}").shuffle(rows)
        facts = rows[:settings.n_train]

        def score_facts(model, progress: bool) -> list[float]:
            return [float(c) for c in recall(model, tokenizer, facts, progress=progress).correct]

        return injection_pairs(facts), score_facts, "recall of the trained facts"
    task = load_task(settings.data, tokenizer=tokenizer, chat_template=chat_template,
                     allow_code_execution=allow_code_execution)
    pairs = [(e.prompt, e.target) for e in task.examples("train", n=settings.n_train, seed=seed)]
    test = task.examples("test", n=settings.n_eval, seed=seed)

    def score_task(model, progress: bool) -> list[float]:
        return [float(c) for c in skill_accuracy(model, tokenizer, task, test, progress=progress).correct]

    return pairs, score_task, f"{task.name} test accuracy"


def train_at(settings: RegimeSettings, base, tokenizer, spec: MethodSpec, pairs: list[tuple[str, str]],
             score: Callable[[Any, bool], list[float]], seed: int, probe=None, desc: str = "regime",
             progress: bool = True):
    """Train ``spec`` on ``pairs`` from ``base`` (wrapped in place) at the regime's schedule; with a
    ``recall_target``, stop at the first check (every ``check_every`` steps) where the mean of ``score`` (what the
    pairs teach) reaches it. Returns ``(model, history)``."""
    train = FinetuneSettings(n_train=len(pairs), n_eval=1, epochs=settings.epochs, lr=settings.lr,
                             batch_size=settings.batch_size)
    target = settings.recall_target or None

    def score_now(model) -> float:
        return float(np.mean(score(model, False)))

    return train_adapter(base, tokenizer, spec, pairs, train, seed, probe=probe, desc=desc, progress=progress,
                         validate=score_now if target else None, eval_every=settings.check_every if target else None,
                         stop_score=target)


def measure_regime(base, tokenizer, settings: RegimeSettings, seed: int = 0, chat_template: str = "auto",
                   allow_code_execution: bool = False, progress: bool = True) -> RegimeMeasure:
    """Train the calibration LoRA on ``base`` (wrapped in place) and measure its updates (module docstring)."""
    spec = settings.spec()
    pairs, score, metric = training_data(settings, tokenizer, chat_template, allow_code_execution, seed)
    norms = _norms(base, list(target_shapes(base, spec.targets)))
    before = score(base, progress)
    model, history = train_at(settings, base, tokenizer, spec, pairs, score, seed, desc="regime lora",
                              progress=progress)
    deltas = adapter_deltas(model)
    missing = sorted(set(deltas) - set(norms))
    if missing:
        raise InputError(f"updates of {missing} have no matching base matrix; measure the regime with plain LoRA")
    fro, spectral = {}, {}
    for name, dW in deltas.items():
        fro[name] = float(torch.linalg.matrix_norm(dW.float())) / norms[name][0]
        spectral[name] = float(torch.linalg.matrix_norm(dW.float(), ord=2)) / norms[name][1]
    return RegimeMeasure(spec=spec.to_dict(), settings=settings, n_pairs=len(pairs), fro_ratio=fro,
                         spectral_ratio=spectral, learned_before=before, learned_after=score(model, progress),
                         learned_metric=metric, steps=history.steps, reached_target=history.reached_stop_score,
                         first_loss=history.losses[0],
                         last_loss=history.losses[-1], seconds=history.seconds)
