"""Continual tuning: train tasks T_1..T_n in sequence, evaluate every task after each stage.

The driver keeps the per-example outcomes ``O[i][j][e]`` (example ``e`` of task ``j`` after training stage ``i``,
0-indexed); ``R[i][j] = mean_e O[i][j][e]`` is the ``n x n`` accuracy matrix. Metrics (Lopez-Paz & Ranzato, GEM;
Chaudhry et al.):

- final average accuracy ``ACC = mean_j R[n-1][j]``;
- backward transfer ``BWT = mean_{j < n-1} (R[n-1][j] - R[j][j])`` (negative = forgetting);
- forgetting ``F = mean_{j < n-1} (max_{i < n-1} R[i][j] - R[n-1][j])``.

For intervals, :func:`example_transfer` gives ACC and BWT per example index: with the same number ``E`` of examples
for every task, example ``e`` of every task forms one unit, ``ACC_e = mean_j O[n-1][j][e]`` and
``BWT_e = mean_{j < n-1} (O[n-1][j][e] - O[j][j][e])``, so ``ACC = mean_e ACC_e`` and ``BWT = mean_e BWT_e``. Stacked
over seeds they are the ``[seeds, examples]`` tables that ``evaluation.stats`` resamples (seeds, then examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from torch import nn
from tqdm.auto import tqdm
from ..errors import InputError


def _matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 2:
        raise InputError(f"R must be a square stages x tasks matrix with at least 2 tasks, got shape {R.shape}")
    if not np.all(np.isfinite(R)):
        raise InputError("R contains NaN or infinite entries")
    return R


def final_average_accuracy(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """``mean_j R[n-1][j]``."""
    return float(_matrix(R)[-1].mean())


def backward_transfer(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """``mean_{j < n-1} (R[n-1][j] - R[j][j])``."""
    R = _matrix(R)
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def forgetting(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """``mean_{j < n-1} (max_{i < n-1} R[i][j] - R[n-1][j])``."""
    R = _matrix(R)
    return float(np.mean(R[:-1, :-1].max(axis=0) - R[-1, :-1]))


def example_transfer(outcomes: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(ACC_e, BWT_e)`` per example (module docstring) of outcomes ``[..., stage, task, example]`` (leading axes,
    e.g. seeds, are kept): two arrays of shape ``[..., example]``."""
    O = np.asarray(outcomes, dtype=np.float64)
    if O.ndim < 3 or O.shape[-3] != O.shape[-2] or O.shape[-2] < 2 or O.shape[-1] < 1:
        raise InputError(f"outcomes must be [..., stage, task, example] with as many stages as tasks (>= 2) and the "
                         f"same number of examples for every task, got shape {O.shape}")
    n = O.shape[-2]
    last = O[..., n - 1, :, :]                                  # [..., task, example]
    learned = O[..., np.arange(n - 1), np.arange(n - 1), :]     # [..., task < n-1, example]: right after its stage
    return last.mean(axis=-2), (last[..., :-1, :] - learned).mean(axis=-2)


@dataclass
class ContinualResult:
    """Task order and per-example outcomes ``[stage][task][example]`` of a continual run, with its summary metrics."""

    tasks: list[str]
    outcomes: list[list[list[float]]]

    @property
    def R(self) -> list[list[float]]:
        return [[float(np.mean(o)) for o in row] for row in self.outcomes]

    @property
    def final_average_accuracy(self) -> float:
        return final_average_accuracy(self.R)

    @property
    def backward_transfer(self) -> float:
        return backward_transfer(self.R)

    @property
    def forgetting(self) -> float:
        return forgetting(self.R)

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "R": self.R, "final_average_accuracy": self.final_average_accuracy,
                "backward_transfer": self.backward_transfer, "forgetting": self.forgetting,
                "outcomes": self.outcomes}


def run_continual(model: nn.Module, tasks: Sequence[str], train_stage: Callable[[nn.Module, str], nn.Module],
                  evaluate: Callable[[nn.Module, str], Sequence[float]], progress: bool = False,
                  desc: str = "continual") -> ContinualResult:
    """Train on ``tasks`` in order (``model = train_stage(model, task)``) and, after each stage, record
    ``evaluate(model, task)``, the per-example outcomes (e.g. 0/1 correctness) of every task."""
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise InputError(f"continual tuning needs at least 2 distinct tasks, got {list(tasks)}")
    outcomes = []
    for task in tqdm(tasks, desc=desc, unit="stage", disable=not progress):
        model = train_stage(model, task)
        row = [[float(x) for x in evaluate(model, other)] for other in tasks]
        if any(not r for r in row):
            raise InputError(f"evaluate returned no outcomes for a task after stage {task!r}")
        outcomes.append(row)
    return ContinualResult(list(tasks), outcomes)


def plot_accuracy_matrix(tasks: Sequence[str], R: Sequence[Sequence[float]] | np.ndarray,
                         title: str = "continual tuning") -> Figure:
    """Heat map of ``R`` (rows: after training stage, columns: evaluated task), values annotated."""
    R = _matrix(R)
    fig = Figure(figsize=(1.2 * len(R) + 2, 1.0 * len(R) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(R, cmap="viridis", vmin=min(0.0, R.min()), vmax=max(1.0, R.max()))
    for i, j in np.ndindex(R.shape):
        ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w" if R[i, j] < 0.5 * R.max() else "k")
    ax.set_xticks(range(len(R)), list(tasks))
    ax.set_yticks(range(len(R)), [f"after {t}" for t in tasks])
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{title}\nACC {final_average_accuracy(R):.3f}, BWT {backward_transfer(R):+.3f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
