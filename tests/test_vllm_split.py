"""The vLLM-ready split of ``export_lora``: a base with the SVF expert folded in, plus a rank-r LoRA (PALoRA).

Each export is loaded in a subprocess that never imports spectral_peft (transformers and vanilla PEFT only), as a
serving engine would load it, and must reproduce the adapted model's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import save_tiny_organism, tiny_model
from test_adapters import make_probe, train

from spectral_peft import (
    Probe,
    export_lora,
    get_peft_model,
    load_adapter,
    method_config,
)
from spectral_peft.cli import main
from spectral_peft.errors import InputError
from spectral_peft.export import SplitExport

R = 4

PLAIN_LOAD = """
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base, ids_path, out, *lora = sys.argv[1:]
ids = torch.load(ids_path, weights_only=True)
model = AutoModelForCausalLM.from_pretrained(base).eval()
result = {}
with torch.no_grad():
    result["base"] = model(input_ids=ids).logits
if lora:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, lora[0]).eval()
    with torch.no_grad():
        result["lora"] = model(input_ids=ids).logits
if os.path.exists(os.path.join(base, "tokenizer_config.json")):
    result["vocab"] = torch.tensor(len(AutoTokenizer.from_pretrained(base)))
torch.save(result, out)
assert not any(m.startswith("spectral_peft") for m in sys.modules), "spectral_peft was imported"
"""


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from spectral_peft.organism import CHECKPOINT_DIR

    return AutoTokenizer.from_pretrained(CHECKPOINT_DIR, local_files_only=True)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def plain_load(tmp_path, input_ids, base, lora=None) -> dict[str, torch.Tensor]:
    """``base`` (and ``lora`` on it) loaded by transformers and PEFT alone: ``base`` and ``lora`` logits, and the
    tokenizer's size (``vocab``) when ``base`` holds a tokenizer."""
    torch.save(input_ids, tmp_path / "ids.pt")
    out = tmp_path / "plain.pt"
    args = [str(base), str(tmp_path / "ids.pt"), str(out)] + ([str(lora)] if lora else [])
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, *args], check=True)
    return torch.load(out, weights_only=True)


def test_palora_split_is_base_plus_rank_r_lora(input_ids, tmp_path, tokenizer):
    torch.manual_seed(0)
    probe = make_probe()
    wrapped = train(get_peft_model(tiny_model(), method_config("palora", probe=probe, r=R, rho=0.25),
                                   progress=False), input_ids, steps=3)
    ref = logits(wrapped, input_ids)
    before = {k: v.clone() for k, v in wrapped.get_base_model().state_dict().items()}
    result = export_lora(wrapped, tmp_path / "out", split_expert=True, tokenizer=tokenizer)
    assert isinstance(result, SplitExport) and result.lora == tmp_path / "out" / "lora"
    assert max(result.errors.values()) < 1e-6
    # the model is left as it was: same weights, same modules, same output
    assert all(torch.equal(v, before[k]) for k, v in wrapped.get_base_model().state_dict().items())
    assert len(wrapped.spectral_layers()) == len(probe.scales)
    assert torch.equal(logits(wrapped, input_ids), ref)
    config = json.loads((result.lora / "adapter_config.json").read_text())
    assert config["r"] == R and set(config["rank_pattern"].values()) == {R}  # r, not r0 + r
    plain = plain_load(tmp_path, input_ids, result.base, result.lora)
    assert int(plain["vocab"]) == len(tokenizer)
    assert torch.allclose(plain["lora"].float(), ref, atol=1e-5)
    # the base alone is the expert: it differs from the original model and from the adapted one
    expert_only = plain["base"].float()
    assert not torch.allclose(expert_only, logits(tiny_model(), input_ids), atol=1e-3)
    assert not torch.allclose(expert_only, ref, atol=1e-3)


def test_svf_split_is_the_base_alone(input_ids, tmp_path):
    torch.manual_seed(0)
    wrapped = train(get_peft_model(tiny_model(), method_config("svf"), progress=False), input_ids, steps=3)
    ref = logits(wrapped, input_ids)
    assert not torch.allclose(ref, logits(tiny_model(), input_ids), atol=1e-3)  # the expert changed the output
    result = export_lora(wrapped, tmp_path / "out", split_expert=True)
    assert result.lora is None and result.errors == {} and not (tmp_path / "out" / "lora").exists()
    plain = plain_load(tmp_path, input_ids, result.base)
    assert "vocab" not in plain  # no tokenizer was given
    assert torch.allclose(plain["base"].float(), ref, atol=1e-5)


def test_split_refuses_methods_without_an_expert(tmp_path):
    wrapped = get_peft_model(tiny_model(), method_config("oplora", k=4), progress=False)
    with pytest.raises(InputError, match="split_expert"):
        export_lora(wrapped, tmp_path / "out", split_expert=True)
    assert not (tmp_path / "out").exists()


def test_cli_split_expert(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = save_tiny_organism(tmp_path / "checkpoint")
    svf = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), method_config("svf"), progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in svf.spectral_layers().values():
            layer.svf_param.normal_(0, 0.1)
    probe = Probe.from_model(svf)
    svf.unload()
    palora = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), method_config("palora", probe=probe, r=R),
                            progress=False)
    with torch.no_grad():
        for layer in palora.spectral_layers().values():
            layer.lora.lora_B.normal_(0, 0.1)
    palora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = logits(load_adapter(AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "adapter"), ids)
    out = tmp_path / "out"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--model", checkpoint,
                 "--split-expert", "true"]) == 0
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["r"] == R
    assert len(AutoTokenizer.from_pretrained(out / "base")) == len(AutoTokenizer.from_pretrained(checkpoint))
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "lora").eval()
    assert torch.allclose(logits(served, ids), ref, atol=1e-5)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), method_config("oplora", k=2),
                          progress=False)
    lora.save_pretrained(tmp_path / "oplora")
    assert main(["export", "--adapter", str(tmp_path / "oplora"), "--out", str(tmp_path / "x"), "--model", checkpoint,
                 "--split-expert"]) == 2
    assert not (tmp_path / "x").exists()
