"""Continual tuning: train tasks T_1..T_n in sequence, evaluate every task after each stage.

``R[i][j]`` is the accuracy on task ``j`` after training stage ``i`` (``n x n``, 0-indexed). Metrics (Lopez-Paz &
Ranzato, GEM; Chaudhry et al.):

- final average accuracy ``ACC = mean_j R[n-1][j]``;
- backward transfer ``BWT = mean_{j < n-1} (R[n-1][j] - R[j][j])`` (negative = forgetting);
- forgetting ``F = mean_{j < n-1} (max_{i < n-1} R[i][j] - R[n-1][j])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from torch import nn


def _matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 2:
        raise ValueError(f"R must be a square stages x tasks matrix with at least 2 tasks, got shape {R.shape}")
    if not np.all(np.isfinite(R)):
        raise ValueError("R contains NaN or infinite entries")
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


@dataclass
class ContinualResult:
    """Task order and accuracy matrix of a continual run, with its summary metrics."""

    tasks: list[str]
    R: list[list[float]]

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
                "backward_transfer": self.backward_transfer, "forgetting": self.forgetting}


def run_continual(model: nn.Module, tasks: Sequence[str], train_stage: Callable[[nn.Module, str], nn.Module],
                  evaluate: Callable[[nn.Module, str], float]) -> ContinualResult:
    """Train on ``tasks`` in order (``model = train_stage(model, task)``) and fill ``R`` with ``evaluate(model, task)``
    for every task after each stage."""
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ValueError(f"continual tuning needs at least 2 distinct tasks, got {list(tasks)}")
    R = []
    for task in tasks:
        model = train_stage(model, task)
        R.append([float(evaluate(model, other)) for other in tasks])
    return ContinualResult(list(tasks), R)


def plot_accuracy_matrix(result: ContinualResult, title: str = "continual tuning") -> Figure:
    """Heat map of ``R`` (rows: after training stage, columns: evaluated task), values annotated."""
    R = np.asarray(result.R)
    fig = Figure(figsize=(1.2 * len(R) + 2, 1.0 * len(R) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(R, cmap="viridis", vmin=min(0.0, R.min()), vmax=max(1.0, R.max()))
    for i, j in np.ndindex(R.shape):
        ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w" if R[i, j] < 0.5 * R.max() else "k")
    ax.set_xticks(range(len(R)), result.tasks)
    ax.set_yticks(range(len(R)), [f"after {t}" for t in result.tasks])
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{title}\nACC {result.final_average_accuracy:.3f}, BWT {result.backward_transfer:+.3f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
