"""Save/load, merge_and_unload, export to vanilla PEFT, merging on dW, base-identity checks, Trainer hooks."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model
from test_adapters import config_for, train

from spectral_peft import BudgetCallback, export_lora, get_peft_model, load_adapter, merge_adapters, method_config
from spectral_peft.merging import adapter_deltas, merge_deltas, ties, trim

SPECTRAL = ["svf", "svft", "oplora", "palora", "hiplora", "milora"]


def trained(method, input_ids, seed=0, arch="llama", dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    config = config_for(method, arch, dtype) if not kw else method_config(method, **kw)
    return train(get_peft_model(tiny_model(arch, dtype), config, progress=False), input_ids, steps=3)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", SPECTRAL)
def test_save_load_round_trip(method, dtype, input_ids, tmp_path):
    wrapped = trained(method, input_ids, dtype=dtype)
    ref = logits(wrapped, input_ids)
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == method and set(saved["base_weights"]) == set(wrapped.spectral_layers())
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not [k for k in keys if k.rsplit(".", 1)[-1] in ("U", "V", "S", "U_S", "V_S")]  # no singular vectors
    loaded = load_adapter(tiny_model("llama", dtype), tmp_path)
    assert torch.allclose(logits(loaded, input_ids), ref, atol=1e-5)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = load_adapter(tiny_model("llama", dtype), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == wrapped.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method", SPECTRAL)
def test_merge_and_unload_equals_adapted_model(method, input_ids):
    wrapped = trained(method, input_ids)
    ref = logits(wrapped, input_ids)
    merged = wrapped.merge_and_unload()
    assert not any("Layer" in type(m).__name__ and hasattr(m, "base_layer") for m in merged.modules())
    assert torch.allclose(logits(merged, input_ids), ref, atol=1e-5)


def test_unload_restores_base(input_ids):
    base_ref = logits(tiny_model(), input_ids)
    assert torch.allclose(logits(trained("hiplora", input_ids).unload(), input_ids), base_ref, atol=1e-6)


def test_mismatched_base_is_refused(input_ids, tmp_path):
    trained("oplora", input_ids).save_pretrained(tmp_path)
    other = tiny_model()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="hash mismatch"):
        load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(tiny_model_wider(), tmp_path)


def tiny_model_wider():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


PEFT_ONLY = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, ids_path, *adapters = sys.argv[1:]
for adapter in adapters:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids_path, weights_only=True)).logits, adapter + ".logits.pt")
assert not any(m.startswith("spectral_peft") for m in sys.modules), "spectral_peft was imported"
"""

EXPORTED = ["oplora", "palora", "hiplora", "svf", "milora"]


def test_export_lora_loads_in_vanilla_peft(input_ids, tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    torch.save(input_ids, tmp_path / "ids.pt")
    refs = {}
    for method in EXPORTED:
        wrapped = trained(method, input_ids)
        refs[method] = logits(wrapped, input_ids)
        errors = export_lora(wrapped, tmp_path / method)
        assert max(errors.values()) < 1e-6
    ranks = {m: set(json.loads((tmp_path / m / "adapter_config.json").read_text())["rank_pattern"].values())
             for m in EXPORTED}
    assert ranks["oplora"] == {8} and ranks["hiplora"] == {8 + 4}  # r, and r + k
    subprocess.run([sys.executable, "-c", PEFT_ONLY, str(tmp_path / "base"), str(tmp_path / "ids.pt"),
                    *(str(tmp_path / m) for m in EXPORTED)], check=True)
    for method in EXPORTED:
        out = torch.load(tmp_path / f"{method}.logits.pt", weights_only=True).float()
        assert torch.allclose(out, refs[method], atol=1e-5), method


def test_export_truncation_reports_error(input_ids, tmp_path):
    wrapped = trained("svf", input_ids)
    errors = export_lora(wrapped, tmp_path, max_rank=2)
    assert max(errors.values()) > 1e-3
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2}


def test_merge_sum_adds_updates_and_hiplora_gains(input_ids, tmp_path):
    a = trained("hiplora", input_ids, seed=1, k=4, budget_rho=0.5)
    b = trained("hiplora", torch.flip(input_ids, dims=[1]), seed=2, k=4, budget_rho=0.5)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    da, db = adapter_deltas(a), adapter_deltas(b)
    merged = merge_adapters(tiny_model(), [tmp_path / "a", tmp_path / "b"], weights=[1.0, 0.5], how="sum")
    base = dict(tiny_model().named_modules())
    name = "model.layers.0.mlp.up_proj"
    W = dict(merged.named_modules())[name].weight
    assert torch.allclose(W, base[name].weight + da[name] + 0.5 * db[name], atol=1e-6)
    la, lb = a.spectral_layers()[name], b.spectral_layers()[name]
    principal = la.U.T @ (W - base[name].weight) @ la.V
    assert torch.allclose(torch.diag(principal), la.hip_phi + 0.5 * lb.hip_phi, atol=1e-5)


def test_ties_by_hand():
    d1 = torch.tensor([1.0, -2.0, 0.1, 3.0])
    d2 = torch.tensor([-1.5, -1.0, 0.2, 0.5])
    assert trim(d1, 0.5).tolist() == [0.0, -2.0, 0.0, 3.0]
    # trimmed: [0, -2, 0, 3] and [-1.5, -1, 0, 0]; elected signs -, -, 0, +; disjoint means of the agreeing entries
    assert ties([d1, d2], [1.0, 1.0], density=0.5).tolist() == [-1.5, -1.5, 0.0, 3.0]
    merged = merge_deltas([{"w": d1}, {"w": d2}], how="ties", density=1.0)["w"]
    assert torch.allclose(merged, torch.tensor([-1.5, -1.5, 0.15, 1.75]))
    with pytest.raises(ValueError, match="unknown merge operator"):
        merge_deltas([{"w": d1}], how="mean")


def test_peft_lora_and_dora_deltas_match_peft_merge(input_ids):
    for method in ("lora", "dora"):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model(), method_config(method, r=4))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        ref = logits(model, input_ids)
        merged = merge_adapters(tiny_model(), [model])
        assert torch.allclose(logits(merged, input_ids), ref, atol=1e-5), method


def test_trainer_projects_budget_and_logs_use(tmp_path, input_ids):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    config = method_config("hiplora", k=4, budget_rho=0.01)
    wrapped = get_peft_model(tiny_model(), config, progress=False)
    data = Dataset.from_dict({"input_ids": input_ids.tolist() * 4, "labels": input_ids.tolist() * 4})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6, learning_rate=5e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             remove_unused_columns=False)
    callback = BudgetCallback()
    trainer = Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    uses = [use for _, use in callback.history]
    assert len(uses) == 6 and max(uses) <= 1 + 1e-6 and max(uses) > 0.5
    logged = [log["budget_use"] for log in trainer.state.log_history if "budget_use" in log]
    assert len(logged) >= 6


def test_export_command_writes_peft_lora(input_ids, tmp_path, capsys):
    from spectral_peft.cli import main

    tiny_model().save_pretrained(tmp_path / "base")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            eos_token="a").save_pretrained(tmp_path / "base")
    wrapped = trained("oplora", input_ids)
    wrapped.save_pretrained(tmp_path / "adapter")
    code = main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora"),
                 "--model", str(tmp_path / "base")])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["rank_pattern"].values()) == {8}
    capsys.readouterr()
    assert main(["export", "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora")]) == 2
    assert "exists" in capsys.readouterr().err
