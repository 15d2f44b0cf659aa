"""Every spectral method on tiny random models of twelve architectures (no downloads).

Per (architecture, method): identity at init, the logits change after optimiser steps (every layer trains), save ->
load, merge_and_unload, and orthogonality of the projected methods. Per architecture: export loaded by vanilla PEFT
(one subprocess for all, which never imports spectral_peft), one bf16 step, and the "mlp" rule. The full export and
bf16 matrices are marked slow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers as T
from torch import nn

from spectral_peft import export_lora, get_peft_model, load_adapter, method_config
from spectral_peft.adapters.palora import PALoRALayer
from spectral_peft.adapters.targets import select
from spectral_peft.errors import InputError
from spectral_peft.methods import target_shapes
from spectral_peft.model import base_identity, task_type
from spectral_peft.probe import Probe
from spectral_peft.spectral import svd_full

SPECTRAL = ("svf", "svft", "oplora", "palora", "hiplora", "milora")
SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
ROPE = dict(SMALL, intermediate_size=48, num_key_value_heads=2)
MOE = dict(ROPE, num_experts_per_tok=2)
CONFIGS = {  # architecture -> config with n layers
    "llama": lambda n: T.LlamaConfig(**ROPE, num_hidden_layers=n),
    "mistral": lambda n: T.MistralConfig(**ROPE, num_hidden_layers=n),
    "qwen2": lambda n: T.Qwen2Config(**ROPE, num_hidden_layers=n),
    "qwen3": lambda n: T.Qwen3Config(**ROPE, num_hidden_layers=n, head_dim=8),
    "gemma3": lambda n: T.Gemma3TextConfig(**ROPE, num_hidden_layers=n, head_dim=8),
    "phi3": lambda n: T.Phi3Config(**ROPE, num_hidden_layers=n, pad_token_id=0),
    "gpt2": lambda n: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=n, n_head=4, n_positions=64, n_inner=48),
    "gpt_neox": lambda n: T.GPTNeoXConfig(**SMALL, num_hidden_layers=n, intermediate_size=48),
    "opt": lambda n: T.OPTConfig(**SMALL, num_hidden_layers=n, ffn_dim=48, word_embed_proj_dim=32),
    "falcon": lambda n: T.FalconConfig(**SMALL, num_hidden_layers=n, ffn_hidden_size=48),
    "qwen2_moe": lambda n: T.Qwen2MoeConfig(**MOE, num_hidden_layers=n, num_experts=4, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=24),
    "mixtral": lambda n: T.MixtralConfig(**MOE, num_hidden_layers=n, num_local_experts=4),
}
ARCHS = tuple(CONFIGS)
# The "mlp" rule per architecture: the suffixes of the matrices it selects (an expert by its stack, module.param).
MLP = {
    **{a: {"gate_proj", "up_proj", "down_proj"} for a in ("llama", "mistral", "qwen2", "qwen3", "gemma3")},
    "phi3": {"gate_up_proj", "down_proj"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"fc1", "fc2"},
    "falcon": {"dense_h_to_4h", "dense_4h_to_h"},
    "qwen2_moe": {"experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                  "shared_expert.down_proj"},
    "mixtral": {"experts.gate_up_proj", "experts.down_proj"},
}
# Matrices of each kind "all-linear" adapts in two layers with r = 4 (Qwen2-MoE's 32 -> 1 shared_expert_gate is left
# out); 14 linear for the Llama-likes.
KINDS = {"gpt2": {"conv1d": 8}, "qwen2_moe": {"linear": 14, "expert": 16}, "mixtral": {"linear": 8, "expert": 16},
         "phi3": {"linear": 8}, "gpt_neox": {"linear": 8}, "falcon": {"linear": 8}, "opt": {"linear": 12}}
# The exported method and the bf16 method of each architecture: every method on two architectures; Mixtral's SVF
# ("mlp") exports expert stacks alone, Qwen2-MoE's HiP-LoRA ("all-linear") linears and two stacks per module.
EXPORT = {"llama": "svf", "mistral": "svft", "qwen2": "oplora", "qwen3": "palora", "gemma3": "milora",
          "phi3": "hiplora", "gpt2": "palora", "gpt_neox": "svft", "opt": "milora", "falcon": "oplora",
          "qwen2_moe": "hiplora", "mixtral": "svf"}
BF16 = {"llama": "hiplora", "mistral": "svf", "qwen2": "svft", "qwen3": "oplora", "gemma3": "palora",
        "phi3": "milora", "gpt2": "svf", "gpt_neox": "hiplora", "opt": "oplora", "falcon": "palora",
        "qwen2_moe": "milora", "mixtral": "svft"}


def tiny(arch: str, dtype: torch.dtype = torch.float32, layers: int = 1) -> nn.Module:
    """The architecture's causal LM with random weights (seed 0)."""
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(CONFIGS[arch](layers)).to(dtype).eval()


def random_probe(model: nn.Module, seed: int = 0) -> Probe:
    """A probe over the "mlp" matrices with random scales ``z = 1 + 0.2 N(0, 1)`` (a stand-in SVF expert)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = target_shapes(model, "mlp")
    scales = {n: 1 + 0.2 * torch.randn(min(s), generator=gen) for n, s in shapes.items()}
    return Probe(scales, base_identity(model, list(shapes)))


def config_for(method: str, model: nn.Module):
    kw = {"oplora": dict(r=4, k=4), "hiplora": dict(r=4, k=4), "milora": dict(r=4), "svft": dict(pattern="banded"),
          "palora": dict(r=4, rho=0.25, probe=random_probe(model))}.get(method, {})
    return method_config(method, **kw)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train(wrapped, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    wrapped.train()
    for _ in range(steps):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return wrapped.eval()


def deltas(wrapped) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: layer.delta_weight().detach().clone() for n, layer in wrapped.spectral_layers().items()}


def relative_leak(dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``max(||U^T dW||, ||dW V||) / ||dW||``: how much of the update touches the protected directions."""
    return max(float((U.T @ dW).norm()), float((dW @ V).norm())) / float(dW.norm())


def stored_matrix(layer) -> torch.Tensor:
    """``W`` (out x in) rebuilt from the stored tensor, not through the library's view: a Conv1D stores ``W^T``; the
    Mixtral and Qwen2-MoE stacks are ``[E, out, in]``."""
    base = layer.base_layer
    if layer.kind == "conv1d":
        return base.weight.T
    if layer.kind == "expert":
        return base.experts._parameters[base.param][base.expert]
    return base.weight


def check_orthogonal(method: str, wrapped) -> None:
    """The trained update of OPLoRA, PALoRA and HiP-LoRA's residual channel avoids the protected singular
    directions of each matrix, computed afresh from its stored weight (the base's: PALoRA's stored weight holds its
    expert, and disabling the adapter puts the base back)."""
    with wrapped.disable_adapter():
        svds = {name: svd_full(stored_matrix(layer)) for name, layer in wrapped.spectral_layers().items()}
    for name, layer in wrapped.spectral_layers().items():
        svd = svds[name]
        if method == "palora":
            if not isinstance(layer, PALoRALayer):
                continue
            index = layer.protected_index
        else:
            index = torch.arange(4)
        B, A = layer.lora.factors()
        assert relative_leak((B @ A).detach(), svd.U[:, index], svd.V[:, index]) < 1e-5, name


@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("arch", ARCHS)
def test_method_on_architecture(arch, method, input_ids, tmp_path):
    model = tiny(arch)
    ref = logits(model, input_ids)
    config = config_for(method, model)
    wrapped = get_peft_model(model, config, progress=False)
    at_init = deltas(wrapped)
    out = logits(wrapped, input_ids)
    if method != "palora":  # PALoRA starts from its SVF expert, which its update reproduces exactly
        assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert max(float(d.abs().max()) for d in at_init.values()) < 1e-5
    trained = train(wrapped, input_ids)
    adapted = logits(trained, input_ids)
    assert float((adapted - out).abs().max()) > 1e-5
    moved = {n: float((d - at_init[n]).norm()) for n, d in deltas(trained).items()}
    assert all(v > 0 for v in moved.values()), [n for n, v in moved.items() if v == 0]
    if method in ("oplora", "palora", "hiplora"):
        check_orthogonal(method, trained)
    trained.save_pretrained(tmp_path)
    loaded = load_adapter(tiny(arch), tmp_path, progress=False)
    assert loaded.adapted_counts() == trained.adapted_counts()
    assert torch.allclose(logits(loaded, input_ids), adapted, atol=1e-5)
    merged = trained.merge_and_unload()
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    assert torch.allclose(logits(merged, input_ids), adapted, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_rule_and_adapted_kinds(arch, capsys):
    model = tiny(arch, layers=2)
    paths = {m.path for m in select(model, "mlp", (), need=1).matrices}  # an expert by its stack, module.param
    assert all(any(p.endswith("." + s) for s in MLP[arch]) for p in paths), paths
    assert all(any(p.endswith("." + s) for p in paths) for s in MLP[arch]), paths
    assert set(target_shapes(model, "mlp")) == {m.name for m in select(model, "mlp", (), need=1).matrices}
    if arch == "gpt2":
        assert not any(".attn." in p for p in paths)
    wrapped = get_peft_model(model, method_config("milora", r=4), progress=True)
    printed = capsys.readouterr().out
    assert wrapped.adapted_counts() == KINDS.get(arch, {"linear": 14})
    assert wrapped.adapted_summary() in printed
    if arch == "qwen2_moe":
        assert set(wrapped.left_out) == {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
        assert "left out 2 matrices (min(m, n) < 4)" in printed


PEFT_ONLY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
jobs = json.loads(sys.argv[1])
ids = torch.load(sys.argv[2], weights_only=True)
for base, adapter in jobs:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, adapter + ".logits.pt")
assert not any(m.startswith("spectral_peft") for m in sys.modules), "spectral_peft was imported"
"""


def export_all(pairs, input_ids, tmp_path):
    """Train and export each (arch, method), then load all of them in one vanilla-PEFT subprocess and compare."""
    torch.save(input_ids, tmp_path / "ids.pt")
    refs, jobs = {}, []
    for arch in sorted({a for a, _ in pairs}):
        tiny(arch, layers=2).save_pretrained(tmp_path / arch)
    for arch, method in pairs:
        model = tiny(arch, layers=2)
        torch.manual_seed(1)
        wrapped = train(get_peft_model(model, config_for(method, model), progress=False), input_ids)
        out = tmp_path / f"{arch}-{method}"
        assert max(export_lora(wrapped, out).values()) < 1e-5
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] == (arch == "gpt2")
        assert bool(config["target_parameters"]) == ("expert" in wrapped.adapted_counts())
        refs[str(out)] = logits(wrapped, input_ids)
        jobs.append((str(tmp_path / arch), str(out)))
    subprocess.run([sys.executable, "-c", PEFT_ONLY, json.dumps(jobs), str(tmp_path / "ids.pt")], check=True)
    for adapter, ref in refs.items():
        assert torch.allclose(torch.load(adapter + ".logits.pt", weights_only=True).float(), ref, atol=1e-5), adapter


def test_export_loads_in_vanilla_peft(input_ids, tmp_path):
    export_all(list(EXPORT.items()), input_ids, tmp_path)


@pytest.mark.slow
def test_export_loads_in_vanilla_peft_every_method(input_ids, tmp_path):
    export_all([(arch, m) for arch in ARCHS for m in SPECTRAL], input_ids, tmp_path)


def bf16_step(arch, method, input_ids):
    model = tiny(arch, torch.bfloat16)
    wrapped = get_peft_model(model, config_for(method, model), progress=False)
    params = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    wrapped.train()
    loss = wrapped(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    opt.step()
    changed = [n for n, p in wrapped.named_parameters() if p.requires_grad and not torch.equal(p, params[n])]
    assert changed and all(p.dtype == torch.float32 for p in params.values())
    assert torch.isfinite(logits(wrapped.eval(), input_ids)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_step(arch, input_ids):
    bf16_step(arch, BF16[arch], input_ids)


@pytest.mark.slow
@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_step_every_method(arch, method, input_ids):
    bf16_step(arch, method, input_ids)


class OpaqueExperts(nn.Module):
    """An experts module with a 3-D stack and no stated layout."""

    def __init__(self):
        super().__init__()
        self.down_proj = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return x


class WithOpaqueExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.Module()
        self.mlp.experts = OpaqueExperts()
        self.mlp.up_proj = nn.Linear(8, 8)


@pytest.mark.parametrize("model, kwargs, message", [
    ("qwen2_moe", dict(target_modules=["gate"]), "model.layers.0.mlp.gate (Qwen2MoeTopKRouter"),
    ("qwen2_moe", dict(target_modules=["shared_expert_gate"]), "model.layers.0.mlp.shared_expert_gate: rank r=4"),
    ("qwen2_moe", dict(target_modules=["mlp"]), "model.layers.0.mlp (Qwen2MoeSparseMoeBlock"),
    ("gpt2", dict(target_modules=["q_proj"]), "its matrices end with ['c_attn', 'c_fc', 'c_proj', 'lm_head']"),
    ("gpt2", dict(r=40), "rank r=40 is larger than min(m, n)"),
    ("opaque", dict(), "mlp.experts (OpaqueExperts: 3-D parameters ['down_proj'] of unknown layout)"),
    ("opaque", dict(target_modules="mlp", exclude_modules=["up_proj"]), "mlp.experts (OpaqueExperts"),
    ("opaque", dict(target_modules=["experts"]), "mlp.experts (OpaqueExperts: 3-D parameters ['down_proj']"),
])
def test_unadaptable_targets_are_refused_naming_them(model, kwargs, message):
    base = WithOpaqueExperts() if model == "opaque" else tiny(model)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        get_peft_model(base, method_config("milora", **{"r": 4, **kwargs}), progress=False)
    assert "\n" not in str(err.value)


def test_opaque_experts_can_be_excluded():
    wrapped = get_peft_model(WithOpaqueExperts(), method_config("milora", r=4, exclude_modules=["experts"]),
                             progress=False)
    assert wrapped.adapted_counts() == {"linear": 2}


def test_named_expert_targets_and_single_experts(input_ids):
    wrapped = get_peft_model(tiny("mixtral", layers=2), method_config("oplora", r=2, k=2, target_modules=["down_proj"],
                                                            exclude_modules=["layers.1.mlp.experts.down_proj.3"]),
                             progress=False)
    names = set(wrapped.spectral_layers())
    assert names == {f"model.layers.{i}.mlp.experts.down_proj.{e}" for i in range(2) for e in range(4)} - {
        "model.layers.1.mlp.experts.down_proj.3"}
    assert all(layer.shape == (32, 48) for layer in wrapped.spectral_layers().values())


def test_peft_lora_resolves_mlp_on_conv1d_and_expert_stacks(input_ids):
    for arch, kinds in (("gpt2", {"c_fc", "c_proj"}), ("mixtral", set())):
        config = method_config("lora", r=2, target_modules="mlp")
        wrapped = get_peft_model(tiny(arch), config, progress=False)
        assert {n.rsplit(".", 1)[-1] for n in config.target_modules} == kinds
        assert config.fan_in_fan_out == (arch == "gpt2")
        assert bool(config.target_parameters) == (arch == "mixtral")
        assert wrapped.get_nb_trainable_parameters()[0] > 0
    with pytest.raises(InputError, match="dora cannot adapt the 3-D expert stacks model.layers.0.mlp.experts"):
        get_peft_model(tiny("mixtral"), method_config("dora", r=2, target_modules="mlp"), progress=False)


def test_task_type_is_the_models_own():
    assert task_type(tiny("gpt2")) == "CAUSAL_LM" and task_type(tiny("llama")) == "CAUSAL_LM"
    cls = T.LlamaForSequenceClassification(T.LlamaConfig(**ROPE, num_labels=2, pad_token_id=0))
    assert task_type(cls) == "SEQ_CLS"
    assert task_type(WithOpaqueExperts()) is None


class ConvAndExperts(nn.Module):
    """A Conv1D beside a Mixtral experts module (not a transformers model: no task type)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c_fc = T.pytorch_utils.Conv1D(12, 8)
        self.experts = T.models.mixtral.modeling_mixtral.MixtralExperts(
            T.MixtralConfig(hidden_size=8, intermediate_size=6, num_local_experts=2))
        for p in self.experts.parameters():
            nn.init.normal_(p)


def test_export_of_a_model_without_task_type(tmp_path):
    conv = get_peft_model(ConvAndExperts(), method_config("svf", target_modules=["c_fc"]), progress=False)
    export_lora(conv, tmp_path / "conv")
    config = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["fan_in_fan_out"] and config["target_modules"] == ["c_fc"]
    both = get_peft_model(ConvAndExperts(), method_config("svf", target_modules="all-linear"), progress=False)
    assert both.adapted_counts() == {"conv1d": 1, "expert": 4}
    with pytest.raises(InputError, match="cannot export Conv1D and expert matrices together"):
        export_lora(both, tmp_path / "both")
