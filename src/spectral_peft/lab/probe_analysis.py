"""Is the probe real? Stability of its protected sets, overlap with a null probe, and alternative scores.

Overlap of two protected index sets ``A, B`` of one matrix (``n = r0`` singular indices) is their Jaccard index
``J = |A & B| / |A | B|`` (1 when both are empty). Its chance level is the exact expectation for two independent,
uniformly random subsets of sizes ``k1 = |A|`` and ``k2 = |B|``: the overlap ``j = |A & B|`` is hypergeometric,
``P(j) = C(k1, j) C(n - k1, k2 - j) / C(n, k2)``, and ``E[J] = sum_j P(j) j / (k1 + k2 - j)``.

Across matrices the aggregate is the pooled Jaccard, ``sum_m |A_m & B_m| / sum_m |A_m | B_m|`` (each matrix weighted
by the size of its union). With ``I = sum_m j_m`` and ``K = sum_m (k1_m + k2_m)`` it is ``I / (K - I)``, so its
chance level is exact too: ``I`` is a sum of independent hypergeometrics (its law the convolution of theirs) and
``E = sum_I P(I) I / (K - I)``.

- Stability: the mean pairwise overlap of the protected sets of probes trained with different seeds, against the
  mean of the pairs' chance levels (the expectation of the mean when every set is random).
- Null probe: the overlap of the skill probe with a probe trained the same way on a non-skill objective.
- Alternative scores, each turned into protected sets of exactly the probe's sizes (the top-``|S_m|`` indices by
  score) so that overlaps are size-matched: sigma-aware ``|z_i - 1| sigma_i = |sigma_i z_i - sigma_i|`` (how far the
  singular value itself moved), and the diagonal empirical Fisher of the skill's NLL w.r.t. the SVF scales at
  ``z = 1``, ``F_i = mean_e (d nll_e / d z_i)^2`` over examples ``e`` (``nll_e`` the summed NLL of the gold target
  tokens, teacher-forced), computed on the base model.

The Fisher's per-example gradients come from one forward and backward per batch: the SVF layer's update is
``dW = U diag(sigma (z - 1)) V^T``, so with ``x_t`` the layer's input and ``g_t`` the gradient of the batch's summed
loss w.r.t. its output at token ``t``, ``d nll_e / d z_i = sigma_i sum_{t in e} (u_i . g_t)(v_i . x_t)`` (examples do
not interact in a forward pass, so the tokens of ``e`` carry only ``nll_e``'s gradient).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy.stats import hypergeom
from torch import nn
from tqdm.auto import tqdm

from ..adapters import method_config
from ..adapters.matrices import find_matrices
from ..adapters.svf_fold import probe_weights
from ..errors import InputError
from ..methods import MethodSpec, ablation_indices, protected_sizes
from ..probe import Probe
from ..spectral import SVDCache
from ..training.objectives import collate_pairs, masked_nll

PALORA = MethodSpec(method="palora", label="palora")


# --- Jaccard and its chance level ----------------------------------------------------------------------------------

def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """``|A & B| / |A | B|`` of two index sets (tensors or iterables of ints); 1 when both are empty."""
    a, b = {int(i) for i in a}, {int(i) for i in b}
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _overlap_pmf(n: int, k1: int, k2: int) -> np.ndarray:
    """``P(|A & B| = j)`` for ``j = 0..min(k1, k2)``, ``A, B`` uniformly random subsets of sizes ``k1, k2`` of ``n``."""
    if not (n >= 0 and 0 <= k1 <= n and 0 <= k2 <= n):
        raise InputError(f"set sizes must satisfy 0 <= k <= n, got n={n}, k1={k1}, k2={k2}")
    return hypergeom(n, k1, k2).pmf(np.arange(min(k1, k2) + 1))


def chance_pooled_jaccard(sizes: Sequence[tuple[int, int, int]]) -> float:
    """Exact expected pooled Jaccard of independent uniformly random sets, one pair per ``(n, k1, k2)`` (module
    docstring); 1 when every set is empty."""
    pmf = np.ones(1)
    for n, k1, k2 in sizes:
        pmf = np.convolve(pmf, _overlap_pmf(n, k1, k2))
    total = sum(k1 + k2 for _, k1, k2 in sizes)
    if total == 0:
        return 1.0
    inter = np.arange(pmf.size)
    return float(np.sum(pmf * inter / (total - inter)))


def chance_jaccard(n: int, k1: int, k2: int) -> float:
    """Exact ``E[J]`` of two independent uniformly random subsets of sizes ``k1`` and ``k2`` of ``n`` items."""
    return chance_pooled_jaccard([(n, k1, k2)])


# --- protected sets --------------------------------------------------------------------------------------------------

def protected_sets(probe: Probe, spec: MethodSpec = PALORA) -> dict[str, torch.Tensor]:
    """The probe's protected index set per matrix under the spec's PALoRA selection rule (``select``, ``fraction``,
    ``tau``, ``q``)."""
    return {n: probe.select(n, spec.palora_selection, rho=spec.palora_fraction, tau=spec.palora_tau, q=spec.palora_q)
            for n in probe.scales}


def matched_sets(scores: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per matrix of ``sizes``, the ``sizes[name]`` indices with the largest score (sorted ascending; ties broken by
    ``torch.topk``), e.g. with ``sizes = protected_sizes(probe, spec)`` for sets of exactly the probe's sizes."""
    missing = sorted(set(sizes) - set(scores))
    if missing:
        raise InputError(f"the scores have no entry for {missing[:3]}; score the probe's matrices")
    bad = [n for n, k in sizes.items() if not 0 <= k <= scores[n].numel()]
    if bad:
        raise InputError(f"set sizes of {bad[:3]} exceed their number of scores; use scores of the probe's matrices")
    return {n: torch.sort(torch.topk(scores[n].float(), k).indices).values for n, k in sizes.items()}


@dataclass
class Overlap:
    """Two families of protected sets compared: per matrix ``{jaccard, chance, n, k_a, k_b}``, and the pooled
    Jaccard with its exact chance level (module docstring)."""

    per_matrix: dict[str, dict[str, float]]
    pooled: float
    pooled_chance: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def overlap(sets_a: dict[str, Any], sets_b: dict[str, Any], n: dict[str, int]) -> Overlap:
    """Jaccard of ``sets_a[m]`` and ``sets_b[m]`` (index sets over ``n[m]`` items) for every matrix ``m`` of ``n``."""
    if set(sets_a) != set(n) or set(sets_b) != set(n):
        raise InputError("the two families of protected sets cover different matrices; compare probes of one base")
    a = {m: {int(i) for i in s} for m, s in sets_a.items()}
    b = {m: {int(i) for i in s} for m, s in sets_b.items()}
    out_of_range = [m for m in n if any(not 0 <= i < n[m] for i in a[m] | b[m])]
    if out_of_range:
        raise InputError(f"protected indices of {out_of_range[:3]} fall outside 0..n-1; use sets over the same matrix")
    per = {m: {"jaccard": jaccard(a[m], b[m]), "chance": chance_jaccard(n[m], len(a[m]), len(b[m])), "n": n[m],
               "k_a": len(a[m]), "k_b": len(b[m])} for m in n}
    union = sum(len(a[m] | b[m]) for m in n)
    pooled = sum(len(a[m] & b[m]) for m in n) / union if union else 1.0
    return Overlap(per, pooled, chance_pooled_jaccard([(n[m], len(a[m]), len(b[m])) for m in n]))


def _check_same_base(probes: Sequence[Probe]) -> None:
    first = probes[0]
    for p in probes[1:]:
        if p.base != first.base:
            raise InputError(f"probes {first.source or '#0'} and {p.source or 'another'} were trained on different "
                             "weights or matrices; compare probes of one base model")


def set_overlap(probe_a: Probe, probe_b: Probe, spec: MethodSpec = PALORA) -> Overlap:
    """Overlap of two probes' protected sets (e.g. the skill probe and a null probe) under one selection rule."""
    _check_same_base([probe_a, probe_b])
    n = {m: z.numel() for m, z in probe_a.scales.items()}
    return overlap(protected_sets(probe_a, spec), protected_sets(probe_b, spec), n)


@dataclass
class Stability:
    """Pairwise overlaps of the protected sets of probes trained with different seeds, ``pairs[i]`` giving the probe
    indices of ``overlaps[i]``."""

    pairs: list[tuple[int, int]]
    overlaps: list[Overlap]

    @property
    def pooled(self) -> float:
        """Mean pooled Jaccard over pairs."""
        return float(np.mean([o.pooled for o in self.overlaps]))

    @property
    def pooled_chance(self) -> float:
        """Mean of the pairs' chance levels: the expected mean pooled Jaccard were every set random."""
        return float(np.mean([o.pooled_chance for o in self.overlaps]))

    def per_matrix(self) -> dict[str, dict[str, float]]:
        """Per matrix, the mean over pairs of its Jaccard and of its chance level."""
        names = self.overlaps[0].per_matrix
        return {m: {k: float(np.mean([o.per_matrix[m][k] for o in self.overlaps])) for k in ("jaccard", "chance")}
                for m in names}

    def summary(self) -> dict[str, Any]:
        return {"pooled": self.pooled, "pooled_chance": self.pooled_chance, "pairs": len(self.pairs),
                "per_matrix": self.per_matrix()}


def stability(probes: Sequence[Probe], spec: MethodSpec = PALORA) -> Stability:
    """Overlap of every pair of ``probes`` (at least two, trained on one base)."""
    if len(probes) < 2:
        raise InputError(f"stability needs at least two probes (one per seed), got {len(probes)}")
    _check_same_base(probes)
    pairs = [(i, j) for i in range(len(probes)) for j in range(i + 1, len(probes))]
    return Stability(pairs, [set_overlap(probes[i], probes[j], spec) for i, j in pairs])


def score_overlap(probe: Probe, scores: dict[str, torch.Tensor], spec: MethodSpec = PALORA) -> dict[str, Overlap]:
    """The sets of ``scores`` at the probe's sizes compared with the probe's own sets (``"probe"``) and with the
    top-``|S|`` by sigma (``"sigma"``, the ``protect=sigma`` ablation's sets)."""
    sizes = protected_sizes(probe, spec)
    chosen = matched_sets(scores, sizes)
    n = {m: z.numel() for m, z in probe.scales.items()}
    return {"probe": overlap(chosen, protected_sets(probe, spec), n),
            "sigma": overlap(chosen, ablation_indices(probe, replace(spec, protect="sigma")), n)}


# --- alternative scores ----------------------------------------------------------------------------------------------

def singular_values(model: nn.Module, probe: Probe, svd_cache: SVDCache | None = None) -> dict[str, torch.Tensor]:
    """``sigma`` (decreasing, fp32, CPU) of every probed matrix of ``model``, which must hold exactly the weights the
    probe was trained on (checked by hash); the SVD is the adapters' (``svd_cache``, in memory when ``None``)."""
    cache = svd_cache or SVDCache(None)
    return {name: cache.get(W, k=None, digest=probe.base[name]["hash"]).S.float().cpu()
            for name, W in probe_weights(model, probe).items()}


def sigma_aware_scores(probe: Probe, sigma: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|z_i - 1| sigma_i`` per probed matrix: the change of the singular value itself."""
    bad = [n for n in probe.scales if n not in sigma or sigma[n].numel() != probe.scales[n].numel()]
    if bad:
        raise InputError(f"sigma is missing or of the wrong length for {bad[:3]}; pass singular_values(model, probe)")
    return {n: probe.scores(n) * sigma[n].float().cpu() for n in probe.scales}


def _check_fisher_inputs(model: nn.Module, pairs: Sequence[tuple[str, str]], targets: Sequence[str],
                         batch_size: int) -> None:
    if hasattr(model, "peft_config"):
        raise InputError("fisher_scores takes the plain base model, not an adapter-wrapped one")
    if not pairs or batch_size < 1:
        raise InputError(f"fisher_scores needs at least one (prompt, target) pair and batch_size >= 1, got "
                         f"{len(pairs)} pairs and batch_size={batch_size}")
    kinds = {m.name: m.kind for m in find_matrices(model)[0]}
    missing = [t for t in targets if t not in kinds]
    if not targets or missing or len(set(targets)) != len(targets):
        raise InputError(f"targets must be distinct matrix names of the model (unknown: {missing[:3]}); pass "
                         "list(probe.scales)")
    experts = [t for t in targets if kinds[t] == "expert"]
    if experts:
        raise InputError(f"fisher_scores handles dense matrices only; leave out the expert matrices {experts[:3]}")


def fisher_scores(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], targets: Sequence[str],
                  batch_size: int = 8, max_length: int | None = 512, svd_cache: SVDCache | None = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``F_i = mean_e (d nll_e / d z_i)^2`` of the SVF scales at ``z = 1`` for each matrix
    of ``targets`` (module docstring), over the ``(prompt, target)`` pairs (fp32, CPU).

    ``model`` is the plain base model: an untrained SVF adapter (plain parameterisation, SVD from ``svd_cache``) is
    put on it for the computation and removed afterwards, and the parameters' ``requires_grad`` and the modules'
    training flags are restored, so the model is left as it was; no optimiser step is taken. Runs in eval mode.
    """
    _check_fisher_inputs(model, pairs, targets, batch_size)
    from ..model import get_peft_model

    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    wrapped = get_peft_model(model, method_config("svf", parameterisation="plain", target_modules=list(targets)),
                             svd_cache=svd_cache, progress=False)
    try:
        wrapped.eval()
        return _fisher(wrapped, wrapped.spectral_layers(), tokenizer, pairs, batch_size, max_length, progress)
    finally:
        wrapped.unload()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _fisher(wrapped: nn.Module, layers: dict[str, nn.Module], tokenizer, pairs: Sequence[tuple[str, str]],
            batch_size: int, max_length: int | None, progress: bool) -> dict[str, torch.Tensor]:
    device = next(wrapped.parameters()).device
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}

    def recorder(name: str):
        def hook(module, args, output):
            seen[name].append((args[0].detach(), output))
        return hook

    handles = [layer.register_forward_hook(recorder(n)) for n, layer in layers.items()]
    squares = {n: torch.zeros_like(layer.S) for n, layer in layers.items()}
    try:
        starts = range(0, len(pairs), batch_size)
        for start in tqdm(starts, desc="fisher", disable=not progress, total=len(starts)):
            batch = collate_pairs(tokenizer, pairs[start:start + batch_size], max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total = masked_nll(logits, batch["labels"], reduction="sum_per_row").sum()
            calls = [(n, x, y) for n, recorded in seen.items() for x, y in recorded]
            grads = torch.autograd.grad(total, [y for _, _, y in calls], allow_unused=True)
            with torch.no_grad():
                per_example = {n: torch.zeros(len(batch["input_ids"]), layer.S.numel(), device=layer.S.device)
                               for n, layer in layers.items()}
                for (n, x, _), g in zip(calls, grads):
                    if x.dim() != 3 or x.shape[0] != len(batch["input_ids"]):
                        raise InputError(f"{n} sees inputs of shape {tuple(x.shape)}, not batch x tokens x features; "
                                         "fisher_scores needs matrices applied per token of each example")
                    if g is not None:
                        a = x.float() @ layers[n].V
                        b = g.float() @ layers[n].U
                        per_example[n] += (a * b).sum(1) * layers[n].S
                for n, d in per_example.items():
                    squares[n] += (d ** 2).sum(0)
            for recorded in seen.values():
                recorded.clear()
    finally:
        for h in handles:
            h.remove()
    return {n: (s / len(pairs)).cpu() for n, s in squares.items()}
