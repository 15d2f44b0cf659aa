"""Matched task gain: fine-tunes that end at the same validation accuracy on their task (docs/lab.md (d)).

Methods that train at one learning rate for one number of steps reach different task accuracies, and a method that
learned less also disturbs less: comparing their degradation would credit the method for learning less. With
``FinetuneSettings.stop_at = a``, every fine-tune checks its accuracy ``acc_val`` on the first ``n_val`` examples of
the task's validation split every ``check_every`` steps (greedy, exact match, the task's checker) and ends at the
first check with ``acc_val >= a``, so every method is compared at (about) the same task gain; ``epochs`` is the cap,
and a run that never reaches ``a`` is reported as such (``TrainResult.reached_stop_score`` is ``False``). The
validation split is disjoint from the training and test examples (hash-split, ``data.example.split_of``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..evaluation import skill_accuracy
from .adapter import FinetuneSettings


def task_stop(task, tokenizer, settings: FinetuneSettings, max_new_tokens: int) -> dict[str, Any]:
    """Keyword arguments of :func:`~spectral_peft.training.adapter.train_adapter` that stop at ``settings.stop_at``
    (``validate``, ``eval_every``, ``stop_score``); ``{}`` when ``stop_at`` is None (train every epoch)."""
    if settings.stop_at is None:
        return {}
    examples = task.examples("val", n=settings.n_val)

    def accuracy(model: nn.Module) -> float:
        return skill_accuracy(model, tokenizer, task, examples, max_new_tokens=max_new_tokens, progress=False).accuracy

    return {"validate": accuracy, "eval_every": settings.check_every, "stop_score": settings.stop_at}
