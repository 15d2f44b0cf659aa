"""The mathematics of every adapter: identity at init, orthogonality, budgets, SVF forms, parameter counts."""

import math

import pytest
import torch
from helpers import ARCHS, tiny_model

from spectral_peft import Probe, attach_budget_projection, get_peft_model, method_config
from spectral_peft.adapters.hiplora import HiPLoRALayer, weighted_ball_projection
from spectral_peft.adapters.palora import PALoRALayer
from spectral_peft.adapters.svf_fold import fold_expert
from spectral_peft.adapters.matrices import matrix_weights
from spectral_peft.adapters.svft import sparsity_pattern
from spectral_peft.errors import InputError
from spectral_peft.probe import select_indices
from spectral_peft.spectral import svd_full
from spectral_peft.budget import hip_layers

DTYPES = (torch.float32, torch.bfloat16)


def make_probe(arch="llama", dtype=torch.float32, seed=0):
    """A probe from an SVF model whose scales were perturbed (a stand-in for a trained expert)."""
    model = tiny_model(arch, dtype)
    svf = get_peft_model(model, method_config("svf"), progress=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svf.spectral_layers().values():
            layer.svf_param.copy_(torch.randn(layer.svf_param.shape, generator=g) * 0.2)
    probe = Probe.from_model(svf)
    svf.unload()
    return probe


def config_for(method, arch="llama", dtype=torch.float32):
    kw = {"svft": dict(pattern="banded", d=1), "oplora": dict(k=4), "hiplora": dict(k=4),
          "palora": dict(probe=make_probe(arch, dtype), rho=0.25)}.get(method, {})
    return method_config(method, **kw)


def train(model, input_ids, steps=5, lr=1e-2, after_step=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step:
            after_step()
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["svf", "svft", "oplora", "palora", "hiplora", "milora", "lora", "dora", "pissa"])
def test_identity_at_init(method, arch, dtype, input_ids):
    model = tiny_model(arch, dtype)
    with torch.no_grad():
        ref = model(input_ids).logits.float()
    config = config_for(method, arch, dtype)
    if method == "palora":  # PALoRA starts from the SVF expert, not from the base
        with torch.no_grad():
            ref = fold_expert(tiny_model(arch, dtype), config.probe)(input_ids).logits.float()
    wrapped = get_peft_model(model, config, progress=False)
    with torch.no_grad():
        out = wrapped(input_ids=input_ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max())


def orthogonality(layer, U_S, V_S):
    B, A = layer.lora.factors()
    dW = (B @ A).detach()
    norm = dW.norm()
    assert norm > 0, "the update did not train"
    return float((U_S.T @ dW).norm() / norm), float((dW @ V_S).norm() / norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["oplora", "palora"])
def test_update_orthogonal_to_protected_directions_after_training(method, dtype, input_ids):
    model = tiny_model("llama", dtype)
    wrapped = train(get_peft_model(model, config_for(method, "llama", dtype), progress=False), input_ids)
    base = matrix_weights(tiny_model("llama", dtype), list(wrapped.spectral_layers()))  # PALoRA's W holds W_e now
    checked = 0
    for name, layer in wrapped.spectral_layers().items():
        svd = svd_full(base[name])
        if method == "oplora":
            U_S, V_S = svd.U[:, :4], svd.V[:, :4]
        elif isinstance(layer, PALoRALayer):
            U_S, V_S = svd.U[:, layer.protected_index], svd.V[:, layer.protected_index]
        else:
            continue
        left, right = orthogonality(layer, U_S, V_S)
        assert left < 1e-5 and right < 1e-5
        checked += 1
    assert checked > 0


def test_palora_keeps_protected_expert_triplets_exactly(input_ids):
    wrapped = train(get_peft_model(tiny_model(), config_for("palora"), progress=False), input_ids)
    base = matrix_weights(tiny_model(), list(wrapped.spectral_layers()))
    for name, layer in wrapped.spectral_layers().items():
        W_total = base[name] + layer.delta_weight()
        assert torch.allclose(W_total, layer.weight + layer.live_delta_weight(), atol=1e-6)
        svd = svd_full(base[name])
        idx = layer.protected_index
        expert_sigma = svd.S[idx] * layer.expert_scale[idx]
        # W_total v_i = sigma_i z_i u_i for every protected i
        assert torch.allclose(W_total @ svd.V[:, idx], svd.U[:, idx] * expert_sigma, atol=1e-5)


def test_palora_soft_variant_shrinks_by_score(input_ids):
    probe = make_probe()
    config = method_config("palora", probe=probe, soft=True)
    wrapped = train(get_peft_model(tiny_model(), config, progress=False), input_ids)
    layer = next(iter(wrapped.spectral_layers().values()))
    d = (layer.expert_scale - 1).abs()
    w = d / d.max()
    B, _ = layer.lora.projected_factors()
    # U^T (P_L B) = (1 - w) * U^T B: the component along u_i keeps a fraction 1 - w_i.
    U = layer.lora.U_S  # the soft variant keeps every direction
    assert U.shape[1] == min(layer.shape)
    assert torch.allclose(U.T @ B, (1 - w)[:, None] * (U.T @ layer.lora.lora_B), atol=1e-5)
    assert float((U[:, d.argmax()] @ B).detach().abs().max()) < 1e-5


def max_principal_angle(U1, U2):
    """Largest principal angle between two orthonormal bases, from its sine (accurate near zero), in float64."""
    U1, U2 = U1.double(), U2.double()
    return float(torch.arcsin(torch.linalg.svdvals(U2 - U1 @ (U1.T @ U2)).max().clamp(max=1)))


def with_spectral_gap(model, k, factor=3.0):
    """Multiply the top-k singular values of every linear by ``factor`` (a pretrained-like spectral gap)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                svd = svd_full(module.weight)
                S = svd.S.clone()
                S[:k] *= factor
                module.weight.copy_(((svd.U * S) @ svd.V.T).to(module.weight.dtype))
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_hiplora_residual_orthogonal_and_top_subspace_fixed_under_budget(dtype, input_ids):
    config = method_config("hiplora", k=4, budget_mode="constraint", budget_rho=0.05)
    wrapped = get_peft_model(with_spectral_gap(tiny_model("llama", dtype), 4), config, progress=False)
    uses = []
    opt_steps = []

    def check():
        uses.append(max(wrapped.budget_use().values()))
        opt_steps.append(1)

    phis = [layer.hip_phi for layer in hip_layers(wrapped.spectral_layers().values())]
    loras = [p for n, p in wrapped.named_parameters() if p.requires_grad and "lora" in n]
    opt = torch.optim.AdamW([{"params": phis, "lr": 2e-2}, {"params": loras, "lr": 1e-3}])
    attach_budget_projection(opt, wrapped)
    wrapped.train()
    for _ in range(6):
        wrapped(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
        check()
    assert max(uses) <= 1 + 1e-6 and max(uses) > 0.5  # the budget binds and holds after every step
    for layer in wrapped.spectral_layers().values():
        assert isinstance(layer, HiPLoRALayer)
        B, A = layer.lora.factors()
        res = B @ A
        assert res.norm() > 0
        assert float((layer.U.T @ res).norm() / res.norm()) < 1e-5
        assert float((res @ layer.V).norm() / res.norm()) < 1e-5
        W_new = (layer.base_layer.weight.float() + layer.delta_weight()).double()
        # the property holds while sigma_i + phi_i stays above the spectrum of the complement block
        complement = W_new - (layer.U.double() * (layer.S + layer.hip_phi).double()) @ layer.V.double().T
        assert float((layer.S + layer.hip_phi).min()) > float(torch.linalg.matrix_norm(complement, ord=2))
        U, _, Vh = torch.linalg.svd(W_new)
        assert max_principal_angle(U[:, :4], layer.U) < 1e-4
        assert max_principal_angle(Vh[:4].T, layer.V) < 1e-4


def test_weighted_ball_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(3, 6, generator=g)
    w = torch.rand(3, 6, generator=g) + 0.1
    eps = torch.tensor([0.5, 0.01, 100.0])
    x = weighted_ball_projection(phi, w, eps)
    R = (w * x**2).sum(-1)
    assert bool((R <= eps * (1 + 1e-6)).all())
    assert torch.allclose(R[:2], eps[:2], rtol=1e-5)  # active constraint lands on the boundary
    assert torch.equal(x[2], phi[2])  # already feasible: unchanged
    for i in range(2):  # no random feasible point is closer to phi
        y = torch.randn(2000, 6, generator=g)
        y = y * torch.sqrt(eps[i] / (w[i] * y**2).sum(-1, keepdim=True)) * torch.rand(2000, 1, generator=g)
        assert float((y - phi[i]).norm(dim=-1).min()) >= float((x[i] - phi[i]).norm()) - 1e-6
    assert torch.equal(weighted_ball_projection(phi[0], w[0], torch.tensor(0.0)), torch.zeros(6))


def test_hiplora_penalty_adds_weighted_regulariser(input_ids):
    config = method_config("hiplora", k=4, budget_mode="penalty", budget_lambda=0.5, budget_power=1.0)
    wrapped = get_peft_model(tiny_model(), config, progress=False)
    with torch.no_grad():
        for layer in hip_layers(wrapped.spectral_layers().values()):
            layer.hip_phi.fill_(0.3)
    wrapped.train()
    loss = wrapped(input_ids=input_ids, labels=input_ids).loss
    with wrapped.disable_adapter():
        pass
    wrapped.eval()
    plain = wrapped(input_ids=input_ids, labels=input_ids).loss
    R = sum(float(((layer.S / layer.S[0]) * 0.09).sum()) for layer in hip_layers(wrapped.spectral_layers().values()))
    assert math.isclose(float(loss - plain), 0.5 * R, rel_tol=1e-5)


def test_hiplora_relative_budget_and_power():
    config = method_config("hiplora", k=4, budget_rho=0.2, budget_power=-2.0)
    wrapped = get_peft_model(tiny_model(), config, progress=False)
    layer = hip_layers(wrapped.spectral_layers().values())[0]
    S = layer.S
    assert torch.allclose(layer.budget_w, (S / S[0]) ** -2)
    assert math.isclose(layer.budget_eps, 0.04 * float((layer.budget_w * S**2).sum()), rel_tol=1e-6)


@pytest.mark.parametrize("parameterisation", ["plain", "sigmoid"])
def test_svf_factorised_equals_recomposed(parameterisation, input_ids):
    outs, grads = [], []
    for mode in ("factorised", "recompose"):
        config = method_config("svf", parameterisation=parameterisation, forward_mode=mode)
        wrapped = get_peft_model(tiny_model(), config, progress=False)
        with torch.no_grad():
            for i, layer in enumerate(wrapped.spectral_layers().values()):
                layer.svf_param.copy_(torch.linspace(-0.5, 0.5, layer.svf_param.numel()) * (i + 1) / 3)
        loss = wrapped(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        outs.append(loss.detach())
        grads.append(torch.cat([l.svf_param.grad for l in wrapped.spectral_layers().values()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_svf_sigmoid_preserves_singular_value_sum():
    wrapped = get_peft_model(tiny_model(), method_config("svf", parameterisation="sigmoid"), progress=False)
    layer = next(iter(wrapped.spectral_layers().values()))
    assert torch.allclose(layer.scale(), torch.ones_like(layer.S))
    with torch.no_grad():
        layer.svf_param.normal_()
    assert math.isclose(float((layer.S * layer.scale()).sum()), float(layer.S.sum()), rel_tol=1e-5)


def test_parameter_counts_match_formulas():
    model = tiny_model()
    linears = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    mlp = {n: s for n, s in linears.items() if n.endswith(("gate_proj", "up_proj", "down_proj"))}
    r, k = 4, 3
    expected = {
        "svf": sum(min(s) for s in mlp.values()),
        "svft": sum(3 * min(s) - 2 for s in linears.values()),  # banded d=1
        "oplora": sum(r * (s[0] + s[1]) for s in linears.values()),
        "hiplora": sum(r * (s[0] + s[1]) + k for s in linears.values()),
        "milora": sum(r * (s[0] + s[1]) for s in linears.values()),
        "palora": sum(r * (s[0] + s[1]) for s in mlp.values()),
    }
    kw = {"svf": {}, "svft": dict(pattern="banded", d=1), "oplora": dict(r=r, k=k), "hiplora": dict(r=r, k=k),
          "milora": dict(r=r), "palora": dict(r=r, probe=make_probe())}
    for method, count in expected.items():
        wrapped = get_peft_model(tiny_model(), method_config(method, **kw[method]), progress=False)
        assert wrapped.get_nb_trainable_parameters()[0] == count, method


def test_svft_patterns():
    rows, cols = sparsity_pattern(6, "random", d=2, seed=3)
    assert rows.numel() == 6 * 3 and bool((rows == cols).sum() == 6)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.numel()
    rows, cols = sparsity_pattern(5, "top_k", k=2)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows, cols = sparsity_pattern(4, "banded", d=1)
    assert bool(((rows - cols).abs() <= 1).all()) and rows.numel() == 10


def test_milora_starts_from_minor_triplets():
    wrapped = get_peft_model(tiny_model(), method_config("milora", r=3), progress=False)
    layer = next(iter(wrapped.spectral_layers().values()))
    svd = svd_full(layer.base_layer.weight)
    minor = (svd.U[:, -3:] * svd.S[-3:]) @ svd.V[:, -3:].T
    assert torch.allclose(layer.scaling * layer.lora_B @ layer.lora_A, minor, atol=1e-5)
    assert float(layer.delta_weight().abs().max()) < 1e-6


def test_selection_rules():
    d = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.1])
    assert select_indices(d, "top_fraction", rho=0.4).tolist() == [1, 3]
    assert select_indices(d, "threshold", tau=0.1).tolist() == [1, 3]
    assert select_indices(d, "mass", q=0.8).tolist() == [1, 3]  # 0.8 of 1.0 needs 0.5 + 0.3
    assert select_indices(d, "mass", q=0.81).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_indices(d, "random")


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("oplora", dict(r=40), "larger than min"),
        ("hiplora", dict(k=30, r=4), "k \\+ r = 34 is larger than min"),
        ("oplora", dict(k=0), "k must be"),
        ("hiplora", dict(budget_eps=-1.0), "budget_eps"),
        ("hiplora", dict(budget_rho=-0.1), "budget_rho"),
        ("lora", dict(target_modules=["nonexistent_proj"]), None),
        ("oplora", dict(target_modules=["nonexistent_proj"]), "match no linear, Conv1D or expert matrix"),
        ("svft", dict(pattern="diagonal"), "pattern must be"),
        ("svf", dict(parameterisation="tanh"), "parameterisation"),
        ("palora", dict(probe=None), "needs a probe"),
        ("bogus", {}, "unknown method"),
    ],
)
def test_config_errors(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_model(), method_config(method, **kwargs), progress=False)


def test_probe_on_other_weights_is_refused():
    probe = make_probe("llama", seed=0)
    other = tiny_model("llama", seed=5)
    with pytest.raises(ValueError, match="other weights"):
        get_peft_model(other, method_config("palora", probe=probe), progress=False)
    before = {n: type(m) for n, m in other.named_modules()}
    assert all(t is not PALoRALayer for t in before.values())  # nothing half-wrapped


def test_probe_round_trip(tmp_path):
    probe = make_probe()
    probe.save(tmp_path / "probe")
    loaded = Probe.load(tmp_path / "probe")
    assert set(loaded.scales) == set(probe.scales) and loaded.base == probe.base
    assert all(torch.equal(loaded.scales[n], probe.scales[n]) for n in probe.scales)
    with pytest.raises(FileNotFoundError):
        Probe.load(tmp_path)


def test_svf_auto_mode_recomposes_only_for_large_batches():
    wrapped = get_peft_model(tiny_model(), method_config("svf", forward_mode="auto"), progress=False)
    layer = next(iter(wrapped.spectral_layers().values()))  # 48 x 32: recompose above 2*48*32/80 = 38.4 tokens
    with torch.no_grad():
        layer.svf_param.normal_()
    small, large = torch.randn(1, 38, 32), torch.randn(2, 20, 32)
    assert not layer.recomposes(small) and layer.recomposes(large)
    for x in (small, large):
        with torch.no_grad():
            expected = layer.base_layer(x) + layer.delta(x)
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_corda_through_peft_with_calibration(input_ids):
    import itertools

    from spectral_peft.data import documents
    from spectral_peft.training.injection import calibration_runner
    from spectral_peft.organism import build_tokenizer, tiny_random_model

    tokenizer = build_tokenizer(itertools.islice(documents(seed=1), 200), vocab_size=300)
    model = tiny_random_model(tokenizer, hidden_size=32, intermediate_size=48, num_layers=1).eval()
    ids = tokenizer("Math: Start with 3. Add 4.\nSolution:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    run = calibration_runner(tokenizer, "math", n=8)
    wrapped = get_peft_model(model, method_config("corda", r=4), calibration=lambda: run(model))
    with torch.no_grad():
        assert torch.allclose(wrapped(input_ids=ids).logits, ref, atol=1e-4)  # CorDA keeps W_res + BA = W
    assert wrapped.get_nb_trainable_parameters()[0] > 0


def test_svft_diagonal_fast_path_equals_dense_core():
    wrapped = get_peft_model(tiny_model(), method_config("svft", pattern="plain"), progress=False)
    layer = next(iter(wrapped.spectral_layers().values()))
    with torch.no_grad():
        layer.svft_values.normal_()
    x = torch.randn(3, layer.shape[1])
    assert layer.diagonal
    assert torch.allclose(layer.delta(x), ((x @ layer.V) @ layer.core().T) @ layer.U.T, atol=1e-5)


def test_palora_folds_its_expert_in_place_and_restores_the_base_bit_for_bit(input_ids, tmp_path):
    """The expert lives in the weight itself (no copy, no full U/V), and unload, disable and unmerge are exact."""
    probe = make_probe()
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref_base = model(input_ids).logits
        ref_expert = fold_expert(tiny_model(), probe)(input_ids).logits
    wrapped = get_peft_model(model, method_config("palora", probe=probe, rho=0.25), svd_cache=tmp_path,
                             progress=False)
    layers = [layer for layer in wrapped.spectral_layers().values() if isinstance(layer, PALoRALayer)]
    assert layers and all(set(layer.derived_tensors()) == set() for layer in layers)
    for layer in layers:
        r0 = min(layer.shape)
        assert layer.lora.U_S.shape[1] == layer.protected_index.numel() < r0  # only U_S, V_S are kept
        assert wrapped.base_weights[next(n for n, lay in wrapped.spectral_layers().items() if lay is layer)][
            "expert_hash"] == layer.expert_digest != layer.base_digest
    with torch.no_grad():
        for layer in layers:
            layer.lora.lora_B.normal_()
        adapted = wrapped(input_ids=input_ids).logits
        with wrapped.disable_adapter():
            assert torch.equal(wrapped(input_ids=input_ids).logits, ref_base)
        assert torch.equal(wrapped(input_ids=input_ids).logits, adapted)
        for layer in layers:
            layer.lora.lora_B.zero_()
        assert torch.allclose(wrapped(input_ids=input_ids).logits, ref_expert, atol=1e-6)
        for layer in layers:
            layer.lora.lora_B.normal_()
        expert_weights = [layer.weight.clone() for layer in layers]
        for layer in layers:
            layer.merge()
            layer.unmerge()
        assert all(torch.equal(layer.weight, W) for layer, W in zip(layers, expert_weights))
    plain = wrapped.unload()
    assert all(torch.equal(p, before[n]) for n, p in plain.named_parameters())


def test_palora_refuses_a_checkpoint_of_another_expert(tmp_path):
    wrapped = get_peft_model(tiny_model(), method_config("palora", probe=make_probe(seed=0), rho=0.25), progress=False)
    wrapped.save_pretrained(tmp_path / "a")
    other = get_peft_model(tiny_model(), method_config("palora", probe=make_probe(seed=1), rho=0.25), progress=False)
    with pytest.raises(InputError, match="differs from the expert folded"):
        other.load_adapter_weights(tmp_path / "a")


