"""Spectral sanity check (HiP-LoRA, Table 6): does the loss react more to perturbing larger singular directions?

For a matrix ``W = U diag(sigma) V^T`` (float64 SVD) and a singular index ``i``, one perturbation of the triplet
``sigma_i u_i v_i^T`` is applied at a time:

- ``flip``:  ``sigma_i -> -sigma_i``, i.e. ``dW = -2 sigma_i u_i v_i^T``;
- ``zero``:  ``sigma_i -> 0``, i.e. ``dW = -sigma_i u_i v_i^T``;
- ``noise``: 10% noise on the triplet's singular vectors (our reading of "add 10% noise"):
  ``u~ = normalise(u_i + eta g_u / ||g_u||)``, likewise ``v~``, with Gaussian ``g`` and ``eta = 0.1`` (configurable),
  and ``dW = sigma_i (u~ v~^T - u_i v_i^T)``; ``sigma_i`` is kept;
- ``fixed``: the fixed-norm control, ``dW = -sigma_bar u_i v_i^T`` with ``sigma_bar`` the mean singular value of
  ``W``: every direction of a matrix receives a perturbation of the same norm ``sigma_bar``. The three above are
  proportional to ``sigma_i``, so a larger direction also gets a larger perturbation and the correlation with
  ``sigma`` is partly built in; ``fixed`` asks whether the direction itself matters more.

The loss change is ``loss(W + dW) - loss(W)`` on a fixed batch; the weights are restored bit-exactly after every
perturbation. Over all perturbed (module, index) pairs: Pearson correlation of ``|loss change|`` with
``log(1 + sigma_i)`` and Spearman correlation with ``sigma_i``, each with its two-sided p-value (``scipy.stats``);
:func:`correlate_by_matrix` gives the same per matrix type (``q_proj``, ``up_proj``, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from ..adapters.matrices import matrix_weights
from ..errors import InputError
from ..merging import applied_deltas

PERTURBATIONS = ("flip", "noise", "zero", "fixed")


def direction_perturbation(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, i: int, kind: str, noise: float = 0.1,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """``dW`` that applies perturbation ``kind`` to triplet ``i`` of ``W = U diag(S) V^T`` (module docstring)."""
    if kind not in PERTURBATIONS:
        raise InputError(f"unknown perturbation {kind!r}; use one of {PERTURBATIONS}")
    u, v, s = U[:, i], V[:, i], S[i]
    if kind == "flip":
        return -2 * s * torch.outer(u, v)
    if kind == "zero":
        return -s * torch.outer(u, v)
    if kind == "fixed":
        return -S.mean() * torch.outer(u, v)
    gu = torch.randn(u.shape, generator=generator, dtype=u.dtype)
    gv = torch.randn(v.shape, generator=generator, dtype=v.dtype)
    u2, v2 = u + noise * gu / gu.norm(), v + noise * gv / gv.norm()
    return s * (torch.outer(u2 / u2.norm(), v2 / v2.norm()) - torch.outer(u, v))


@dataclass(frozen=True)
class DirectionEffect:
    """Loss change from perturbing singular direction ``index`` (singular value ``sigma``) of ``module``."""

    module: str
    index: int
    sigma: float
    loss_change: float


@dataclass(frozen=True)
class Correlation:
    """Pearson ``r`` of ``|loss change|`` with ``log(1 + sigma)`` and Spearman ``rho`` with ``sigma``, with p-values."""

    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float


def correlate(sigma: Sequence[float], loss_change: Sequence[float]) -> Correlation:
    """The Table-6 correlations between singular values and the absolute loss changes."""
    s, d = np.asarray(sigma, dtype=np.float64), np.abs(np.asarray(loss_change, dtype=np.float64))
    if s.shape != d.shape or s.ndim != 1 or len(s) < 3:
        raise InputError(f"need equal-length 1-D samples of at least 3 points, got shapes {s.shape} and {d.shape}")
    pearson, spearman = stats.pearsonr(np.log1p(s), d), stats.spearmanr(s, d)
    return Correlation(float(pearson.statistic), float(pearson.pvalue), float(spearman.statistic),
                       float(spearman.pvalue))


def correlate_by_matrix(effects: Sequence[DirectionEffect]) -> dict[str, Correlation]:
    """:func:`correlate` per matrix type (the module name's last component), for each type with at least 3 effects."""
    groups: dict[str, list[DirectionEffect]] = {}
    for e in effects:
        groups.setdefault(e.module.rsplit(".", 1)[-1], []).append(e)
    return {t: correlate([e.sigma for e in g], [e.loss_change for e in g])
            for t, g in sorted(groups.items()) if len(g) >= 3}


@dataclass(frozen=True)
class SanityResult:
    """All direction effects of one perturbation kind, the unperturbed loss, and the pooled correlation."""

    perturbation: str
    base_loss: float
    effects: list[DirectionEffect]
    correlation: Correlation

    def to_dict(self) -> dict:
        return asdict(self)


def spread_indices(r0: int, n: int) -> list[int]:
    """``n`` singular indices spread evenly over ``0..r0-1`` (both ends included; fewer if ``n > r0``)."""
    return sorted({int(round(x)) for x in np.linspace(0, r0 - 1, min(n, r0))})


def lm_loss(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Callable[[nn.Module], float]:
    """A ``loss(model)`` callable: the causal-LM loss of ``model`` on one fixed batch (labels = inputs)."""
    @torch.no_grad()
    def loss(model: nn.Module) -> float:
        device = next(model.parameters()).device
        mask = None if attention_mask is None else attention_mask.to(device)
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        return float(model(input_ids=input_ids.to(device), attention_mask=mask, labels=labels.to(device)).loss)
    return loss


def text_loss(tokenizer, texts: Sequence[str], max_length: int = 256) -> Callable[[nn.Module], float]:
    """:func:`lm_loss` on ``texts``, each tokenised (truncated to ``max_length`` tokens) and right-padded into one
    batch; padding is masked out of the loss."""
    enc = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    if not enc or max(map(len, enc)) < 2:
        raise InputError("the loss batch needs at least one text of two or more tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(enc), max(map(len, enc))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(enc):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return lm_loss(ids, mask)


def spectral_sanity(model: nn.Module, loss: Callable[[nn.Module], float], modules: Sequence[str],
                    perturbation: str = "flip", indices: int | Sequence[int] = 16, noise: float = 0.1,
                    seed: int = 0, progress: bool = False) -> SanityResult:
    """Perturb singular directions of each named module one at a time and correlate ``|loss change|`` with sigma.

    ``loss(model) -> float`` evaluates a fixed batch (e.g. :func:`lm_loss`). ``indices``: explicit singular indices,
    or a count spread evenly over the spectrum of each matrix. ``seed`` fixes the noise. The model is left exactly as
    it was (bit for bit). ``progress`` shows a bar over the (module, index) pairs.
    """
    if perturbation not in PERTURBATIONS:
        raise InputError(f"unknown perturbation {perturbation!r}; use one of {PERTURBATIONS}")
    try:
        weights = matrix_weights(model, list(modules))  # out x in views: Conv1D transposed, experts one by one
    except KeyError as err:
        raise InputError(f"matrices {err.args[0]} are not matrices of the model") from None
    chosen: dict[str, list[int]] = {}
    for name in modules:
        r0 = min(weights[name].shape)
        chosen[name] = spread_indices(r0, indices) if isinstance(indices, int) else list(indices)
        bad = [i for i in chosen[name] if not 0 <= i < r0]
        if bad:
            raise InputError(f"{name}: singular indices {bad} are out of range 0..{r0 - 1}")
    generator = torch.Generator().manual_seed(seed)
    base = float(loss(model))
    effects = []
    bar = tqdm(total=sum(map(len, chosen.values())), desc=f"sanity {perturbation}", disable=not progress)
    for name in modules:
        W = weights[name].detach().cpu().to(torch.float64)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        for i in chosen[name]:
            dW = direction_perturbation(U, S, Vh.T, i, perturbation, noise, generator)
            with applied_deltas(model, {name: dW}):
                effects.append(DirectionEffect(name, i, float(S[i]), float(loss(model)) - base))
            bar.update()
    bar.close()
    return SanityResult(perturbation, base, effects,
                        correlate([e.sigma for e in effects], [e.loss_change for e in effects]))
