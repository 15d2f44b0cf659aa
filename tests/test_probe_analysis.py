"""The probe analyses: Jaccard and its exact chance level, stability and overlap of protected sets, size-matched sets
of other scores, and the sigma-aware and Fisher scores on a tiny random Llama."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from spectral_peft import get_peft_model, method_config
from spectral_peft.errors import InputError
from spectral_peft.lab.probe_analysis import (chance_jaccard, chance_pooled_jaccard, fisher_scores, jaccard,
                                              matched_sets, overlap, protected_sets, score_overlap, set_overlap,
                                              sigma_aware_scores, singular_values, stability)
from spectral_peft.methods import parse_method, protected_sizes
from spectral_peft.probe import Probe
from spectral_peft.training.objectives import collate_pairs, masked_nll

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
PAIRS = [("Q: 12 plus 7 is", " 19\n"), ("Q: what is 3 times 4? Think it through.", " 3 times 4 is 12, so 12\n"),
         ("Q: 5", " five\n")]


@pytest.fixture(scope="module")
def tokenizer():
    from spectral_peft.data import documents
    from spectral_peft.organism import build_tokenizer

    return build_tokenizer(itertools.islice(documents(seed=1), 300), vocab_size=400)


def tiny(tokenizer, seed=0):
    from spectral_peft.organism import tiny_random_model

    return tiny_random_model(tokenizer, seed=seed, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


def probe_of(scales: dict[str, torch.Tensor], base_tag: str = "base") -> Probe:
    base = {n: {"shape": [z.numel(), z.numel()], "hash": base_tag} for n, z in scales.items()}
    return Probe(scales=scales, base=base)


def random_probe(seed: int, matrices: int = 40, n: int = 64) -> Probe:
    gen = torch.Generator().manual_seed(seed)
    return probe_of({f"m{i}": 1 + torch.randn(n, generator=gen) for i in range(matrices)})


def monte_carlo_pooled(sizes, trials: int, seed: int = 0) -> tuple[float, float]:
    """Mean and standard error of the pooled Jaccard of uniformly random sets, drawn ``trials`` times."""
    gen = torch.Generator().manual_seed(seed)
    inter = torch.zeros(trials)
    union = torch.zeros(trials)
    for n, k1, k2 in sizes:
        a = torch.rand(trials, n, generator=gen).argsort(1) < k1
        b = torch.rand(trials, n, generator=gen).argsort(1) < k2
        inter += (a & b).sum(1)
        union += (a | b).sum(1)
    j = inter / union
    return float(j.mean()), float(j.std() / math.sqrt(trials))


# --- Jaccard and chance ----------------------------------------------------------------------------------------------

def test_jaccard_identities():
    assert jaccard([1, 2, 3], torch.tensor([3, 2, 1])) == 1.0
    assert jaccard([0, 1], [2, 3]) == 0.0
    assert jaccard([], []) == 1.0
    assert jaccard([0, 1, 2], [1, 2, 3]) == pytest.approx(2 / 4)


@pytest.mark.parametrize("n,k1,k2", [(10, 3, 5), (7, 2, 2), (12, 9, 4), (5, 0, 3)])
def test_chance_jaccard_is_the_monte_carlo_mean(n, k1, k2):
    mean, se = monte_carlo_pooled([(n, k1, k2)], trials=40_000)
    assert abs(chance_jaccard(n, k1, k2) - mean) < 4 * se + 1e-9


def test_chance_jaccard_known_answers():
    assert chance_jaccard(16, 16, 5) == pytest.approx(5 / 16)  # A is everything: J = k2 / n always
    assert chance_jaccard(16, 5, 16) == pytest.approx(5 / 16)
    assert chance_jaccard(9, 0, 0) == 1.0
    # n = 3, k1 = k2 = 2: overlap 1 w.p. 2/3 (J = 1/3), 2 w.p. 1/3 (J = 1)
    assert chance_jaccard(3, 2, 2) == pytest.approx(2 / 3 * 1 / 3 + 1 / 3)


def test_pooled_chance_is_the_monte_carlo_mean_of_the_pooled_ratio():
    sizes = [(10, 3, 5), (6, 2, 2), (30, 4, 9), (8, 0, 1)]
    mean, se = monte_carlo_pooled(sizes, trials=40_000)
    assert abs(chance_pooled_jaccard(sizes) - mean) < 4 * se


def test_chance_refuses_sets_larger_than_their_universe():
    with pytest.raises(InputError):
        chance_jaccard(4, 5, 1)


# --- stability and overlap -------------------------------------------------------------------------------------------

def test_stability_of_identical_probes_is_one():
    p = random_probe(0, matrices=5)
    result = stability([p, copy.deepcopy(p), copy.deepcopy(p)])
    assert result.pooled == 1.0 and len(result.pairs) == 3
    assert all(row["jaccard"] == 1.0 for row in result.per_matrix().values())
    assert result.pooled_chance < 0.2


def test_stability_of_independent_random_probes_sits_at_chance():
    spec = parse_method("palora:fraction=0.25")
    result = stability([random_probe(s) for s in range(3)], spec)
    k = math.ceil(0.25 * 64)
    assert result.pooled_chance == pytest.approx(chance_pooled_jaccard([(64, k, k)] * 40))
    assert result.per_matrix()["m0"]["chance"] == pytest.approx(chance_jaccard(64, k, k))
    # 40 matrices of 64 indices: the pooled ratio's sd per pair is about 0.01
    assert abs(result.pooled - result.pooled_chance) < 0.04


def test_set_overlap_counts_planted_sets_of_different_sizes():
    n = 20
    za, zb = torch.ones(n), torch.ones(n)
    za[:5] = 1.5
    zb[3:10] = 0.5
    a, b = probe_of({"w": za}), probe_of({"w": zb})
    result = set_overlap(a, b, parse_method("palora:select=threshold,tau=0.1"))
    row = result.per_matrix["w"]
    assert (row["k_a"], row["k_b"]) == (5, 7)
    assert row["jaccard"] == pytest.approx(2 / 10) and result.pooled == pytest.approx(2 / 10)
    assert row["chance"] == pytest.approx(chance_jaccard(n, 5, 7)) == pytest.approx(result.pooled_chance)


def test_overlap_refuses_probes_of_other_weights_and_sets_out_of_range():
    with pytest.raises(InputError):
        set_overlap(random_probe(0, matrices=2), probe_of(random_probe(1, matrices=2).scales, base_tag="other"))
    with pytest.raises(InputError):
        stability([random_probe(0)])
    with pytest.raises(InputError):
        overlap({"w": [0, 9]}, {"w": [1]}, {"w": 5})


def test_matched_sets_take_the_top_scores_at_the_probes_sizes():
    gen = torch.Generator().manual_seed(3)
    z = {"a": 1 + torch.randn(30, generator=gen), "b": 1 + 0.1 * torch.randn(12, generator=gen)}
    probe = probe_of(z)
    spec = parse_method("palora:select=threshold,tau=0.3")
    sizes = protected_sizes(probe, spec)
    scores = {n: torch.randn(v.numel(), generator=gen) for n, v in z.items()}
    sets = matched_sets(scores, sizes)
    for n, s in sets.items():
        assert s.numel() == sizes[n]
        outside = torch.ones(scores[n].numel(), dtype=torch.bool)
        outside[s] = False
        if s.numel() and outside.any():
            assert scores[n][s].min() > scores[n][outside].max()
    # the probe's own scores give back its sets; decreasing scores give the top-sigma sets
    same = score_overlap(probe, {n: probe.scores(n) for n in z}, spec)
    assert same["probe"].pooled == 1.0
    by_sigma = score_overlap(probe, {n: -torch.arange(v.numel()).float() for n, v in z.items()}, spec)
    assert by_sigma["sigma"].pooled == 1.0
    assert by_sigma["sigma"].pooled_chance == pytest.approx(by_sigma["probe"].pooled_chance)
    assert {n: s.tolist() for n, s in protected_sets(probe, spec).items()} == \
        {n: sorted(torch.nonzero(probe.scores(n) > 0.3).flatten().tolist()) for n in z}


# --- sigma-aware and Fisher scores -----------------------------------------------------------------------------------

def trained_probe(model: nn.Module, seed: int = 0) -> Probe:
    wrapped = get_peft_model(model, method_config("svf", target_modules=TARGETS), progress=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in wrapped.spectral_layers().values():
            layer.svf_param.copy_(0.3 * torch.randn(layer.svf_param.shape, generator=gen))
    probe = Probe.from_model(wrapped)
    wrapped.unload()
    return probe


def test_sigma_aware_scores_are_the_change_of_each_singular_value(tokenizer):
    model = tiny(tokenizer)
    probe = trained_probe(model)
    sigma = singular_values(model, probe)
    weights = dict(model.named_modules())
    for n in TARGETS:
        assert torch.allclose(sigma[n], torch.linalg.svdvals(weights[n].weight.detach().double()).float(), atol=1e-5)
    scores = sigma_aware_scores(probe, sigma)
    for n in TARGETS:
        assert torch.allclose(scores[n], (sigma[n] * probe.scales[n] - sigma[n]).abs(), atol=1e-6)
    with pytest.raises(InputError):
        singular_values(tiny(tokenizer, seed=1), probe)
    with pytest.raises(InputError):
        sigma_aware_scores(probe, {n: s[:-1] for n, s in sigma.items()})


def per_example_autograd_fisher(model: nn.Module, tokenizer, pairs) -> dict[str, torch.Tensor]:
    """``mean_e (d nll_e / d z)^2`` by one backward per example through a real SVF adapter (``z = 1 + param``)."""
    wrapped = get_peft_model(model, method_config("svf", target_modules=TARGETS), progress=False)
    layers = wrapped.spectral_layers()
    total = {n: torch.zeros_like(layer.svf_param) for n, layer in layers.items()}
    for pair in pairs:
        wrapped.zero_grad()
        batch = collate_pairs(tokenizer, [pair])
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked_nll(logits, batch["labels"], reduction="sum_per_row").sum().backward()
        for n, layer in layers.items():
            total[n] += layer.svf_param.grad ** 2
    return {n: t / len(pairs) for n, t in total.items()}


def test_fisher_scores_equal_per_example_autograd_and_leave_the_model_unchanged(tokenizer):
    model = tiny(tokenizer).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    reference = per_example_autograd_fisher(copy.deepcopy(model), tokenizer, PAIRS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    fisher = fisher_scores(model, tokenizer, PAIRS, TARGETS, batch_size=2)
    assert set(fisher) == set(TARGETS)
    for n in TARGETS:
        assert fisher[n].shape == reference[n].shape and fisher[n].max() > 0
        assert torch.allclose(fisher[n], reference[n], rtol=1e-4, atol=1e-6 * float(reference[n].max()))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert model.training and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert all(p.grad is None for p in model.parameters())


def test_fisher_scores_refuse_bad_inputs_before_any_work(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(InputError):
        fisher_scores(model, tokenizer, [], TARGETS)
    with pytest.raises(InputError):
        fisher_scores(model, tokenizer, PAIRS, TARGETS, batch_size=0)
    with pytest.raises(InputError):
        fisher_scores(model, tokenizer, PAIRS, ["model.layers.9.mlp.up_proj"])
    wrapped = get_peft_model(model, method_config("svf", target_modules=TARGETS), progress=False)
    with pytest.raises(InputError):
        fisher_scores(wrapped, tokenizer, PAIRS, TARGETS)
