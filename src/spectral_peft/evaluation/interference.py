"""How much an update disturbs the frozen model: spectral interference in weight space, degradation in function.

Spectral interference of an update ``dW`` of ``W = U diag(sigma) V^T`` (methods.md), all in float64:

- top-k energy fraction ``||U_k^T dW V_k||_F^2 / ||dW||_F^2`` (NaN when ``dW = 0``);
- subspace invariance ``||(I - U_k U_k^T)(W + dW) V_k||_F / ||(W + dW) V_k||_F``: the part of the image of the top-k
  right singular directions that leaves ``span(U_k)``. It is 0 exactly when ``W + dW`` still maps ``span(V_k)`` into
  ``span(U_k)`` (the top-k subspace pair is invariant), e.g. for every block-diagonal update ``dW = U_k X V_k^T +
  U_perp Y V_perp^T``, and it grows continuously with the leakage;
- principal angles between ``span(U_k)`` of ``W`` and of ``W + dW`` (left), and likewise for ``V_k`` (right), from
  ``scipy.linalg.subspace_angles``, which takes small angles from their sines (Bjorck-Golub), so angles near 0 are
  accurate; rows report the largest and the mean angle, in radians;
- relative change of the top-k singular values ``||sigma'_k - sigma_k||_2 / ||sigma_k||_2`` and its per-value maximum
  ``max_i |sigma'_i - sigma_i| / sigma_i``;
- the update's size ``||dW||_F / ||W||_F`` (``fro_ratio``; the lab's regime criterion, docs/lab.md (c));
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of equivalence"): the number
  of the top-k left singular vectors ``u'_j`` of ``W + dW`` whose largest cosine with every left singular vector of
  ``W``, ``max_i |u'_j^T u_i|``, is below ``INTRUDER_COS`` (0.5): new directions, unlike any of the base's, that rose
  into the top k. Counted separately from the invariance: a block-diagonal update can keep ``span(U_k)`` invariant
  and still bring a complement direction into the top k.

If ``sigma_k == sigma_{k+1}`` the top-k subspace of ``W`` is not unique and the angles are not meaningful. The angles
are an artefact for block-diagonal updates (HiP-LoRA, OPLoRA): every singular vector of ``W + dW`` then lies in
``span(U_k)`` or in its complement, so the top-k subspace of ``W + dW`` is ``span(U_k)`` with whole directions swapped
for orthogonal ones once a singular value of the complement block overtakes one of the top block, and the largest
angle is 0 or pi/2 by construction. The invariance measure is continuous and is the one to report.

Pretraining degradation (methods.md): the increase in held-out NLL / perplexity and the percentage points lost on
general tasks (skills, known facts) between a base and an adapted model. The evaluations are callables.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.linalg import subspace_angles
from torch import nn
from tqdm.auto import tqdm

from ..adapters.matrices import matrix_weights
from ..errors import InputError

INTERFERENCE_METRICS = ("energy_fraction", "invariance", "left_angle_max", "right_angle_max", "left_angle_mean",
                        "right_angle_mean", "sv_rel_change", "sv_max_rel_change", "fro_ratio", "intruders")
INTRUDER_COS = 0.5  # a top-k singular vector of W + dW whose best cosine with W's singular vectors is below: an intruder


@dataclass(frozen=True)
class Interference:
    """Spectral interference metrics of one update (see the module docstring)."""

    k: int
    energy_fraction: float
    invariance: float
    left_angle_max: float
    right_angle_max: float
    left_angle_mean: float
    right_angle_mean: float
    sv_rel_change: float
    sv_max_rel_change: float
    fro_ratio: float
    intruders: int


def _svd64(matrix: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vh = np.linalg.svd(matrix.detach().cpu().to(torch.float64).numpy(), full_matrices=False)
    return U, S, Vh.T


def spectral_interference(W: torch.Tensor, dW: torch.Tensor, k: int) -> Interference:
    """Interference metrics of the update ``dW`` on the top-``k`` singular triplets of ``W`` (float64, exact SVDs)."""
    if W.dim() != 2 or W.shape != dW.shape:
        raise InputError(f"W and dW must be matrices of one shape, got {tuple(W.shape)} and {tuple(dW.shape)}")
    r0 = min(W.shape)
    if not 1 <= k <= r0:
        raise InputError(f"k={k} is out of range for a {tuple(W.shape)} matrix (1 <= k <= {r0})")
    U_all, S, V = _svd64(W)
    w_norm = float(np.linalg.norm(S))  # ||W||_F
    U2, S2, V2 = _svd64(W.to(torch.float64) + dW.to(torch.float64))
    U, S, V, U2, S2, V2 = U_all[:, :k], S[:k], V[:, :k], U2[:, :k], S2[:k], V2[:, :k]
    intruders = int(np.sum(np.abs(U_all.T @ U2).max(axis=0) < INTRUDER_COS))
    d = dW.detach().cpu().to(torch.float64).numpy()
    total = float(np.sum(d * d))
    energy = float(np.sum((U.T @ d @ V) ** 2)) / total if total > 0 else math.nan
    image = (W.detach().cpu().to(torch.float64).numpy() + d) @ V
    size = float(np.linalg.norm(image))
    invariance = float(np.linalg.norm(image - U @ (U.T @ image))) / size if size > 0 else math.nan
    left, right = subspace_angles(U, U2), subspace_angles(V, V2)
    return Interference(k, energy, invariance, float(left.max()), float(right.max()), float(left.mean()),
                        float(right.mean()), float(np.linalg.norm(S2 - S) / np.linalg.norm(S)),
                        float(np.max(np.abs(S2 - S) / S)), math.sqrt(total) / w_norm, intruders)


def parse_module_name(name: str) -> tuple[int | None, str]:
    """``(layer index, matrix type)`` of a module name, e.g. ``model.layers.3.mlp.up_proj`` -> ``(3, "up_proj")``.

    The layer index is the last purely numeric component (``None`` if there is none).
    """
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    return (int(numbers[-1]) if numbers else None), name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class InterferenceRow:
    """Interference metrics of one module's update, with where the module sits."""

    module: str
    layer: int | None
    matrix: str
    metrics: Interference

    def to_dict(self) -> dict:
        return {"module": self.module, "layer": self.layer, "matrix": self.matrix, **asdict(self.metrics)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "InterferenceRow":
        """The row :meth:`to_dict` wrote (e.g. read back from JSON)."""
        names = {f.name for f in fields(Interference)}
        return cls(d["module"], d["layer"], d["matrix"], Interference(**{n: d[n] for n in names}))


def interference_table(base_model: nn.Module, deltas: Mapping[str, torch.Tensor], k: int,
                       progress: bool = False) -> list[InterferenceRow]:
    """Per-module interference of ``{module name: dW}`` (as ``merging.adapter_deltas`` returns) on ``base_model``.

    ``base_model`` is the model the adapter was trained on; its weights are read, never changed. ``k`` is capped at
    each matrix's ``min(m, n)``. ``progress`` shows a bar over the matrices (two float64 SVDs each).
    """
    try:
        weights = matrix_weights(base_model, list(deltas))  # out x in views: Conv1D transposed, experts one by one
    except KeyError as err:
        raise InputError(f"matrices {err.args[0]} of the update are not matrices of the base model") from None
    rows = []
    names = sorted(deltas, key=lambda n: (parse_module_name(n)[0] or -1, n))
    for name in tqdm(names, desc="interference", disable=not progress):
        W = weights[name]
        layer, matrix = parse_module_name(name)
        rows.append(InterferenceRow(name, layer, matrix, spectral_interference(W, deltas[name], min(k, *W.shape))))
    return rows


def plot_interference(rows_by_method: Mapping[str, Sequence[InterferenceRow]], metric: str = "energy_fraction",
                      matrix: str | None = None, title: str | None = None) -> Figure:
    """One line per method: ``metric`` per layer, averaged over the layer's matrices (or only type ``matrix``).

    Returns a pyplot-free ``Figure`` (rendered by Agg on ``savefig``; no global backend is set).
    """
    if metric not in INTERFERENCE_METRICS:
        raise InputError(f"unknown metric {metric!r}; use one of {INTERFERENCE_METRICS}")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for method, rows in rows_by_method.items():
        by_layer: dict[int, list[float]] = {}
        for row in rows:
            if row.layer is not None and (matrix is None or row.matrix == matrix):
                by_layer.setdefault(row.layer, []).append(getattr(row.metrics, metric))
        layers = sorted(by_layer)
        ax.plot(layers, [np.nanmean(by_layer[layer]) for layer in layers], marker="o", label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric + ("" if matrix is None else f" ({matrix})"))
    ax.set_title(title or f"spectral interference: {metric}")
    ax.legend()
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Degradation:
    """Pretraining degradation of an adapted model against its base.

    ``delta_nll = nll_adapted - nll_base`` (nats/token), ``ppl_ratio = exp(delta_nll)``, and per general task
    ``points[task] = 100 * (score_adapted - score_base)`` (percentage points; negative = lost).
    """

    nll_base: float
    nll_adapted: float
    scores_base: dict[str, float]
    scores_adapted: dict[str, float]

    def __post_init__(self):
        if set(self.scores_base) != set(self.scores_adapted):
            raise InputError(f"base and adapted scores cover different tasks: {sorted(self.scores_base)} vs "
                             f"{sorted(self.scores_adapted)}")
        bad = sorted({t for scores in (self.scores_base, self.scores_adapted) for t, s in scores.items()
                      if not 0 <= s <= 1})
        if bad:
            raise InputError(f"scores must be accuracies in [0, 1]; tasks {bad} are not")

    @property
    def delta_nll(self) -> float:
        return self.nll_adapted - self.nll_base

    @property
    def ppl_base(self) -> float:
        return math.exp(self.nll_base)

    @property
    def ppl_adapted(self) -> float:
        return math.exp(self.nll_adapted)

    @property
    def ppl_ratio(self) -> float:
        return math.exp(self.delta_nll)

    @property
    def points(self) -> dict[str, float]:
        return {t: 100 * (self.scores_adapted[t] - self.scores_base[t]) for t in sorted(self.scores_base)}

    def to_dict(self) -> dict:
        return {**asdict(self), "delta_nll": self.delta_nll, "ppl_base": self.ppl_base,
                "ppl_adapted": self.ppl_adapted, "ppl_ratio": self.ppl_ratio, "points": self.points}


def pretraining_degradation(base_model: nn.Module, adapted_model: nn.Module, heldout_nll: Callable[[nn.Module], float],
                            scores: Mapping[str, Callable[[nn.Module], float]]) -> Degradation:
    """Evaluate both models and compare them.

    ``heldout_nll(model)``: mean token NLL on held-out pretraining-distribution text, e.g.
    ``lambda m: perplexity(m, tok, heldout_text(...)).nll``; ``scores[task](model)``: an accuracy in [0, 1]
    (a skill's ``skill_accuracy(...).accuracy``, or ``recall(m, tok, known_facts).accuracy``).
    """
    return Degradation(heldout_nll(base_model), heldout_nll(adapted_model),
                       {t: f(base_model) for t, f in scores.items()}, {t: f(adapted_model) for t, f in scores.items()})
