"""Spectral sanity check: perturbation algebra, exact restoration of the weights, and the correlations."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_model
from torch import nn

from spectral_peft.evaluation.sanity import (
    correlate, correlate_by_matrix, direction_perturbation, lm_loss, spectral_sanity, spread_indices, text_loss,
)


def svd(seed=0):
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return W, U, S, Vh.T


def test_flip_and_zero_change_exactly_one_singular_value():
    W, U, S, V = svd()
    flipped = W + direction_perturbation(U, S, V, 2, "flip")
    assert torch.allclose(flipped, (U * torch.cat([S[:2], -S[2:3], S[3:]])) @ V.T, atol=1e-12)
    assert torch.allclose(torch.linalg.svdvals(flipped), S, atol=1e-12)  # |-sigma| = sigma
    zeroed = torch.linalg.svdvals(W + direction_perturbation(U, S, V, 2, "zero"))
    assert torch.allclose(zeroed, torch.cat([S[:2], S[3:], torch.zeros(1, dtype=S.dtype)]), atol=1e-12)


def test_fixed_norm_control_gives_every_direction_the_same_norm():
    W, U, S, V = svd()
    norms = [float(direction_perturbation(U, S, V, i, "fixed").norm()) for i in range(len(S))]
    assert norms == pytest.approx([float(S.mean())] * len(S), rel=1e-12)
    # it moves only singular value i, by -mean(sigma)
    moved = torch.linalg.svdvals(W + direction_perturbation(U, S, V, 0, "fixed"))
    expected = torch.cat([(S[0] - S.mean()).abs().reshape(1), S[1:]]).sort(descending=True).values
    assert torch.allclose(moved, expected, atol=1e-12)


def test_noise_is_a_seeded_rank_two_change_of_relative_size_about_noise():
    W, U, S, V = svd()
    dW = direction_perturbation(U, S, V, 0, "noise", 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(dW, direction_perturbation(U, S, V, 0, "noise", 0.1, torch.Generator().manual_seed(3)))
    assert torch.linalg.matrix_rank(dW) <= 2
    assert 0.01 < float(dW.norm() / S[0]) < 0.2
    top = torch.linalg.svdvals(W + dW)  # the triplet keeps its singular value up to the noise's leakage
    assert float(top[0]) == pytest.approx(float(S[0]), rel=0.05)
    with pytest.raises(ValueError, match="unknown perturbation"):
        direction_perturbation(U, S, V, 0, "scale")


class Frobenius(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8, bias=False)


def test_zeroing_under_a_frobenius_loss_gives_perfect_rank_correlation():
    """loss = ||W||_F^2: zeroing sigma_i changes it by exactly -sigma_i^2, monotone in sigma."""
    torch.manual_seed(0)
    model = Frobenius()
    res = spectral_sanity(model, lambda m: float(m.lin.weight.detach().double().pow(2).sum()), ["lin"], "zero",
                          indices=6)
    assert [e.index for e in res.effects] == list(range(6))
    for e in res.effects:
        assert e.loss_change == pytest.approx(-e.sigma ** 2, rel=1e-5)
    assert res.correlation.spearman_rho == pytest.approx(1.0) and res.correlation.spearman_p < 0.01
    assert res.correlation.pearson_r > 0.9
    json.dumps(res.to_dict())


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=False)


@pytest.mark.parametrize("kind,factor", [("flip", -2.0), ("zero", -1.0)])
def test_planted_direction_is_found(kind, factor):
    """The loss reads only singular direction 4 of ``1.proj`` (loss = u_4^T W v_4 = sigma_4, a mid-spectrum value):
    perturbing it changes the loss by exactly factor * sigma_4; every other direction, of either matrix, leaves the
    loss unchanged (up to float32 rounding of the perturbed weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(6, 8), Block(8, 10))
    U, S, Vh = torch.linalg.svd(model[1].proj.weight.detach().double(), full_matrices=False)
    u, v = U[:, 4], Vh[4]
    res = spectral_sanity(model, lambda m: float(u @ m[1].proj.weight.detach().double() @ v), ["0.proj", "1.proj"],
                          kind, indices=10, progress=True)
    assert len(res.effects) == 6 + 8 and res.base_loss == pytest.approx(float(S[4]), rel=1e-6)
    top = max(res.effects, key=lambda e: abs(e.loss_change))
    assert (top.module, top.index) == ("1.proj", 4) and top.loss_change == pytest.approx(factor * float(S[4]), rel=1e-5)
    assert all(abs(e.loss_change) < 1e-5 * abs(top.loss_change) for e in res.effects if e is not top)
    assert list(correlate_by_matrix(res.effects)) == ["proj"]  # grouped by matrix type across layers


def test_text_loss_pads_and_masks():
    """The padded batch's loss is the token-weighted mean of each text's own loss (padding is masked out)."""

    class Chars:
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": [1 + ord(c) % 63 for c in text]}

    model, texts = tiny_model(), ["a short one", "a somewhat longer text here"]
    alone = [text_loss(Chars(), [t])(model) for t in texts]
    weights = [len(t) - 1 for t in texts]
    assert text_loss(Chars(), texts)(model) == pytest.approx(np.dot(alone, weights) / sum(weights), rel=1e-5)
    assert text_loss(Chars(), ["x" * 50], max_length=8)(model) == pytest.approx(text_loss(Chars(), ["x" * 8])(model))
    with pytest.raises(ValueError, match="two or more tokens"):
        text_loss(Chars(), ["x"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["flip", "noise", "zero"])
def test_weights_are_restored_bit_exactly(kind, dtype, input_ids):
    model = tiny_model(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    res = spectral_sanity(model, lm_loss(input_ids), names, kind, indices=[0, 5, 31], seed=1)
    assert len(res.effects) == 6 and any(abs(e.loss_change) > 0 for e in res.effects)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lm_loss(input_ids)(model) == res.base_loss


def test_inputs_are_checked_and_indices_spread():
    assert spread_indices(32, 4) == [0, 10, 21, 31] and spread_indices(3, 10) == [0, 1, 2]
    model = Frobenius()
    with pytest.raises(ValueError, match="out of range"):
        spectral_sanity(model, lambda m: 0.0, ["lin"], indices=[6])
    with pytest.raises(ValueError, match="are not matrices of"):
        spectral_sanity(model, lambda m: 0.0, ["nope"])
    with pytest.raises(ValueError, match="unknown perturbation"):
        spectral_sanity(model, lambda m: 0.0, ["lin"], "scale")
    with pytest.raises(ValueError, match="at least 3"):
        correlate([1.0, 2.0], [0.1, 0.2])
