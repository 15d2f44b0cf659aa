"""Spectral interference metrics and pretraining degradation: exact cases on plain matrices and a tiny Llama."""

import json
import math

import pytest
import torch
from helpers import tiny_model

from spectral_peft import HiPLoRAConfig, get_peft_model
from spectral_peft.evaluation.interference import (
    Degradation, InterferenceRow, interference_table, parse_module_name, plot_interference, pretraining_degradation,
    spectral_interference,
)
from spectral_peft.merging import adapter_deltas
from spectral_peft.budget import hip_layers


def spectral_matrix(m=12, n=9, seed=0):
    """``W = U diag(S) V^T`` with well-separated singular values 9, 8, ..., 1."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = torch.arange(min(m, n), 0, -1, dtype=torch.float64)
    return U, S, V, (U[:, :len(S)] * S) @ V.T


def test_update_inside_the_top_k_subspace():
    U, S, V, W = spectral_matrix()
    k = 3
    phi = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    out = spectral_interference(W, (U[:, :k] * phi) @ V[:, :k].T, k)
    assert out.energy_fraction == pytest.approx(1.0, abs=1e-12)
    assert out.left_angle_max < 1e-7 and out.right_angle_max < 1e-7
    assert out.sv_rel_change == pytest.approx(float(phi.norm() / S[:k].norm()), rel=1e-9)
    assert out.sv_max_rel_change == pytest.approx(0.5 / 9, rel=1e-9)


def test_update_orthogonal_to_the_top_k_subspace_leaves_it_fixed():
    U, S, V, W = spectral_matrix()
    k, r0 = 3, len(S)
    X = 0.5 * torch.randn(12 - k, r0 - k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dW = U[:, k:] @ X @ V[:, k:].T  # = P_L dW P_R: the HiP-LoRA residual / OPLoRA form
    out = spectral_interference(W, dW, k)
    assert out.energy_fraction == pytest.approx(0.0, abs=1e-12)
    assert out.left_angle_max < 1e-7 and out.right_angle_max < 1e-7
    assert out.sv_rel_change < 1e-12


def test_subspace_invariance_on_planted_updates():
    """invariance = ||(I - U_k U_k^T)(W + dW) V_k||_F / ||(W + dW) V_k||_F: 0 for updates that keep span(U_k)
    invariant (inside the top-k block, or in the complement on both sides), a known value for a planted leak."""
    U, S, V, W = spectral_matrix()
    k, r0 = 3, len(S)
    g = torch.Generator().manual_seed(4)
    inside = U[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64) @ V[:, :k].T
    out = spectral_interference(W, inside, k)
    assert out.energy_fraction == pytest.approx(1.0, abs=1e-12) and out.invariance < 1e-12
    outside = U[:, k:] @ (3 * torch.randn(12 - k, r0 - k, generator=g, dtype=torch.float64)) @ V[:, k:].T
    out = spectral_interference(W, outside, k)
    assert out.energy_fraction == pytest.approx(0.0, abs=1e-12) and out.invariance < 1e-12
    # a large block-diagonal update reorders the spectrum: the largest principal angle jumps to pi/2 (the artefact the
    # drift report avoids), while the invariance stays 0 (up to float64 rounding)
    assert spectral_interference(W, inside + 5 * outside, k).left_angle_max == pytest.approx(math.pi / 2, abs=1e-9)
    assert spectral_interference(W, inside + 5 * outside, k).invariance < 1e-12
    # planted leak eps * u_{k+1} v_1^T: (W + dW) V_k = U_k diag(S_k) + eps u_{k+1} e_1^T
    eps = 0.7
    out = spectral_interference(W, eps * torch.outer(U[:, k], V[:, 0]), k)
    assert out.invariance == pytest.approx(eps / math.sqrt(float(S[:k].pow(2).sum()) + eps ** 2), rel=1e-12)
    generic = 0.3 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    assert spectral_interference(W, generic, k).invariance > 1e-3


def test_update_size_and_intruder_dimensions_on_planted_updates():
    U, S, V, W = spectral_matrix()  # 12 x 9, sigma = 9..1
    k = 3
    # a complement singular direction of W rising into the top k is not an intruder: it is one of W's own
    rise = (U[:, 8:9] * 20.0) @ V[:, 8:9].T
    out = spectral_interference(W, rise, k)
    assert out.intruders == 0
    assert out.fro_ratio == pytest.approx(20.0 / float(S.norm()), rel=1e-12)
    assert out.invariance < 1e-12  # block diagonal: span(U_k) stays invariant although the top k changed
    # a strong direction that mixes all of W's left singular vectors equally (cos 1/sqrt(12) < 0.5) is one
    u = U.sum(dim=1, keepdim=True) / math.sqrt(12)
    v = V[:, :1]
    intruder = spectral_interference(W, 50.0 * u @ v.T, k)
    assert intruder.intruders == 1
    assert intruder.fro_ratio == pytest.approx(50.0 / float(S.norm()), rel=1e-12)
    # a small generic update brings none
    noise = 1e-3 * torch.randn(12, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert spectral_interference(W, noise, k).intruders == 0


def test_small_rotation_angle_is_accurate():
    """Rotating u_1 towards u_9 by theta = 1e-9 rad gives a left angle of 1e-9 (cosines alone would give 0)."""
    U, S, V, W = spectral_matrix()
    theta = 1e-9
    U2 = U.clone()
    U2[:, 0] = math.cos(theta) * U[:, 0] + math.sin(theta) * U[:, 8]
    U2[:, 8] = -math.sin(theta) * U[:, 0] + math.cos(theta) * U[:, 8]
    out = spectral_interference(W, (U2[:, :9] * S) @ V.T - W, k=3)
    assert out.left_angle_max == pytest.approx(theta, rel=1e-4)
    assert out.right_angle_max < 1e-12
    assert out.left_angle_mean == pytest.approx(theta / 3, rel=1e-4)


def test_generic_update_and_known_angle():
    U, S, V, W = spectral_matrix()
    dW = 0.3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = spectral_interference(W, dW, k=3)
    assert 0 < out.energy_fraction < 1 and out.left_angle_max > 1e-3 and out.right_angle_max > 1e-3
    # Swap the roles of u_1 and u_9 (rank-1 plus rank-1 update): the left top-1 subspace turns by 90 degrees.
    swap = 10 * torch.outer(U[:, 8], V[:, 0]) - 9 * torch.outer(U[:, 0], V[:, 0])
    assert spectral_interference(W, swap, k=1).left_angle_max == pytest.approx(math.pi / 2, abs=1e-9)
    assert math.isnan(spectral_interference(W, torch.zeros_like(W), 2).energy_fraction)


def test_bad_input():
    W = torch.eye(4)
    with pytest.raises(ValueError, match="out of range"):
        spectral_interference(W, torch.zeros(4, 4), 5)
    with pytest.raises(ValueError, match="one shape"):
        spectral_interference(W, torch.zeros(4, 3), 2)


def test_parse_module_name():
    assert parse_module_name("model.layers.13.mlp.up_proj") == (13, "up_proj")
    assert parse_module_name("base_model.model.model.layers.0.self_attn.q_proj") == (0, "q_proj")
    assert parse_module_name("lm_head") == (None, "lm_head")


def test_table_on_a_tiny_llama_with_hiplora_residual_only():
    """HiP-LoRA with phi = 0: the update is purely residual, so it leaves the top-k triplets of every W intact."""
    base = tiny_model()
    wrapped = get_peft_model(base, HiPLoRAConfig(r=2, k=4, target_modules=["q_proj", "down_proj"]), progress=False)
    with torch.no_grad():
        for layer in hip_layers(wrapped.spectral_layers().values()):
            layer.lora.lora_B.normal_(std=1e-3)
    deltas = adapter_deltas(wrapped)
    base = wrapped.unload()
    rows = interference_table(base, deltas, k=4)
    assert [(r.layer, r.matrix) for r in rows] == [(0, "down_proj"), (0, "q_proj"), (1, "down_proj"), (1, "q_proj")]
    for row in rows:
        assert row.metrics.energy_fraction < 1e-10
        assert row.metrics.left_angle_max < 1e-4 and row.metrics.right_angle_max < 1e-4
        assert row.metrics.sv_rel_change < 1e-5
    for row in rows:
        assert row.metrics.invariance < 1e-6  # block-diagonal residual update: span(U_k) stays invariant
    assert [InterferenceRow.from_dict(json.loads(json.dumps(r.to_dict()))) for r in rows] == rows
    fig = plot_interference({"hiplora": rows, "random": interference_table(
        base, {n: 0.05 * torch.randn_like(d) for n, d in deltas.items()}, k=4)}, metric="left_angle_max")
    assert [line.get_label() for line in fig.axes[0].lines] == ["hiplora", "random"]
    assert list(fig.axes[0].lines[0].get_xdata()) == [0, 1]
    with pytest.raises(ValueError, match="are not matrices of"):
        interference_table(base, {"model.nope": torch.zeros(2, 2)}, k=1)
    with pytest.raises(ValueError, match="unknown metric"):
        plot_interference({"x": rows}, metric="nope")


def test_pretraining_degradation_with_pluggable_evaluations():
    base, adapted = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    nll = {id(base): 1.0, id(adapted): 1.2}
    acc = {"math": {id(base): 0.80, id(adapted): 0.75}, "known_facts": {id(base): 0.9, id(adapted): 0.6}}
    d = pretraining_degradation(base, adapted, lambda m: nll[id(m)], {t: (lambda m, t=t: acc[t][id(m)]) for t in acc})
    assert d.delta_nll == pytest.approx(0.2)
    assert d.ppl_ratio == pytest.approx(math.exp(0.2)) and d.ppl_adapted / d.ppl_base == pytest.approx(d.ppl_ratio)
    assert d.points == pytest.approx({"known_facts": -30.0, "math": -5.0})
    assert json.loads(json.dumps(d.to_dict()))["points"]["math"] == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="different tasks"):
        Degradation(1.0, 1.0, {"a": 0.5}, {"b": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Degradation(1.0, 1.0, {"a": 50.0}, {"a": 0.5})


def test_interference_reads_the_out_by_in_view_of_conv1d_weights():
    """GPT-2 stores Conv1D weights as in x out; a dW planted in the top-k block of each out x in matrix must have
    energy fraction 1 everywhere, the square attn.c_proj included (its raw weight would give another answer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectral_peft.adapters.matrices import matrix_weights
    from spectral_peft.methods import target_shapes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)).eval()
    names = list(target_shapes(model, "all-linear"))
    assert any(n.endswith("attn.c_proj") for n in names)
    deltas = {}
    for name, W in matrix_weights(model, names).items():
        U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
        deltas[name] = (U[:, :3] @ torch.diag(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)) @ Vh[:3]).float()
    rows = interference_table(model, deltas, k=3)
    assert len(rows) == len(names)
    assert all(abs(r.metrics.energy_fraction - 1) < 1e-4 for r in rows), [(r.module, r.metrics.energy_fraction)
                                                                          for r in rows]
