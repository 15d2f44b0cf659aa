"""The one method-spec grammar: parsing, validation, PALoRA's ablations as spec options, matched budgets."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from spectral_peft.methods import (MethodSpec, build_model, expected_count, match_budgets, matched_rank,
                                   parse_method, parse_methods, split_specs, target_shapes)
from spectral_peft.probe import Probe


def test_split_and_parse():
    assert split_specs("lora,hiplora:rho=0.5,k=8,oplora") == ["lora", "hiplora:rho=0.5,k=8", "oplora"]
    assert split_specs("lora,nope,palora:protect=random,fraction=0.2") == ["lora", "nope",
                                                                          "palora:protect=random,fraction=0.2"]
    s = parse_method("hiplora:mode=penalty,lam=2,p=2,k=4,lr=1e-2")
    assert (s.method, s.budget_mode, s.budget_lambda, s.budget_power, s.k, s.lr) == ("hiplora", "penalty", 2.0, 2.0,
                                                                                     4, 0.01)
    assert set(s.explicit) == {"budget_mode", "budget_lambda", "budget_power", "k", "lr"}
    assert parse_method("palora:protect=random,soft=true").palora_soft is True
    assert parse_method("lora", MethodSpec(r=3)).r == 3


@pytest.mark.parametrize("spec, message", [
    ("foo", "unknown method 'foo'"), ("lora:x=1", "bad option 'x=1'"), ("lora:r=two", "bad value 'two'"),
    ("lora:protect=sigma", "options of palora only"), ("palora:protect=best", "protect must be one of"),
    ("hiplora:mode=soft", "mode must be one of"), ("lora:targets=attn", "targets must be one of"),
    ("svft:lr=-1", "lr must be a positive number"), ("lora:r=0", "r and k must be >= 1"),
])
def test_bad_specs_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_method(spec)
    assert "\n" not in str(err.value)


def test_parse_methods_rejects_duplicates_and_disallowed():
    with pytest.raises(ValueError, match="each once"):
        parse_methods("lora,lora")
    with pytest.raises(ValueError, match="cannot be used here"):
        parse_methods("lora,palora", allowed=("lora", "hiplora"))


def _probe(model, seed=0):
    """A probe over the MLP matrices with random scales (a stand-in SVF expert)."""
    gen = torch.Generator().manual_seed(seed)
    from spectral_peft.model import base_identity

    names = list(target_shapes(model, "mlp"))
    modules = dict(model.named_modules())
    scales = {n: 1 + 0.1 * torch.randn(min(modules[n].weight.shape), generator=gen) for n in names}
    return Probe(scales, base_identity(model, names))


def _protected(model):
    return {n: layer.protected_index.tolist() for n, layer in model.spectral_layers().items()}


def test_palora_ablations_choose_the_named_sets():
    base = tiny_model()
    probe = _probe(base)
    fraction = 0.25
    plain = build_model(parse_method(f"palora:fraction={fraction}"), tiny_model(), probe)
    sigma = build_model(parse_method(f"palora:fraction={fraction},protect=sigma"), tiny_model(), probe)
    random_a = build_model(parse_method(f"palora:fraction={fraction},protect=random"), tiny_model(), probe, seed=1)
    random_b = build_model(parse_method(f"palora:fraction={fraction},protect=random"), tiny_model(), probe, seed=2)
    for name, idx in _protected(plain).items():
        d = probe.scores(name)
        assert sorted(idx) == sorted(torch.topk(d, len(idx)).indices.tolist())  # the probe's own choice
        assert _protected(sigma)[name] == list(range(len(idx)))  # top-|S| by sigma
        assert len(_protected(random_a)[name]) == len(idx)
    assert _protected(random_a) != _protected(random_b)


def test_palora_place_inside_puts_the_update_in_the_protected_subspace():
    probe = _probe(tiny_model())
    for place in ("orthogonal", "inside"):
        model = build_model(parse_method(f"palora:place={place},fraction=0.3"), tiny_model(), probe, seed=0)
        for layer in model.spectral_layers().values():
            torch.nn.init.normal_(layer.lora.lora_B)
            B, A = layer.lora.factors()
            dW = B @ A
            U_S, V_S = layer.lora.U_S, layer.lora.V_S
            inside = U_S @ (U_S.T @ dW) @ V_S @ V_S.T
            if place == "inside":
                assert (dW - inside).norm() / dW.norm() < 1e-5
            else:
                assert (U_S.T @ dW).norm() / dW.norm() < 1e-5 and (dW @ V_S).norm() / dW.norm() < 1e-5


def test_non_palora_methods_start_from_the_folded_expert():
    base = tiny_model()
    probe = _probe(base)
    ids = torch.randint(0, 64, (1, 8))
    palora = build_model(parse_method("palora"), tiny_model(), probe)
    lora = build_model(parse_method("lora"), tiny_model(), probe)
    with torch.no_grad():
        a, b = palora(input_ids=ids).logits, lora(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, plain, atol=1e-3)


def test_matched_budget_rank_and_counts():
    model = tiny_model()
    shapes = target_shapes(model, "all-linear")
    hip = parse_method("hiplora:r=2,k=16")
    r = matched_rank(hip, shapes)
    per_rank = sum(m + n for m, n in shapes.values())
    target = expected_count(hip, shapes)
    assert abs(r * per_rank - target) <= min(abs((r + 1) * per_rank - target), abs((r - 1) * per_rank - target))
    specs = match_budgets(parse_methods("hiplora:r=2,lora:targets=all-linear,lora:r=5,targets=all-linear"), model,
                          MethodSpec())
    assert specs[1].r == r and specs[2].r == 5
    wrapped = build_model(parse_method("lora:targets=all-linear,r=3"), tiny_model())
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == 3 * per_rank
