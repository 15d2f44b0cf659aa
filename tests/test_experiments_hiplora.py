"""HiP-LoRA protocols (experiments.finetune/drift/merge_protocol/continual_protocol/editing_protocol/sanity_protocol)
on a tiny random organism: specs, matched budgets, the budget constraint, and --quick runs with valid metrics."""

import json
from dataclasses import replace

import numpy as np
import pytest

from helpers import save_tiny_organism

from spectral_peft.experiments.common import load_model
from spectral_peft.experiments.continual_protocol import ContinualConfig, run_continual_protocol
from spectral_peft.experiments.drift import DriftConfig, run_drift
from spectral_peft.experiments.editing_protocol import EditingConfig, run_editing
from spectral_peft.experiments.finetune import (AdapterSpec, FinetuneConfig, TrainSettings, budget_table, finetune,
                                                match_budgets, parse_spec, parse_specs, resolve_task)
from spectral_peft.experiments.merge_protocol import MergeFailConfig, run_mergefail
from spectral_peft.experiments.sanity_protocol import SanityConfig, run_sanity
from spectral_peft.merging import adapter_deltas
from spectral_peft.model import load_adapter

TINY = TrainSettings(n_train=16, n_eval=4, epochs=1, batch_size=8, lr=2e-3, max_new_tokens=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism-hip"), num_layers=2)


def test_parse_spec_options_and_errors():
    s = parse_spec("hiplora:rho=0.5,mode=penalty,lam=2,k=4", AdapterSpec(r=4))
    assert (s.method, s.budget_rho, s.budget_mode, s.budget_lambda, s.k, s.r) == ("hiplora", 0.5, "penalty", 2.0, 4, 4)
    assert s.label == "hiplora:rho=0.5,mode=penalty,lam=2,k=4" and set(s.explicit) == {"budget_rho", "budget_mode",
                                                                                       "budget_lambda", "k"}
    specs = parse_specs("lora,hiplora:rho=0.5,k=8,oplora")
    assert [x.label for x in specs] == ["lora", "hiplora:rho=0.5,k=8", "oplora"]
    with pytest.raises(ValueError, match="unknown method 'lorax'"):
        parse_spec("lorax")
    with pytest.raises(ValueError, match="bad option 'zz=1'"):
        parse_spec("hiplora:zz=1")
    with pytest.raises(ValueError, match="bad value"):
        parse_spec("hiplora:rho=abc")
    with pytest.raises(ValueError, match="cannot be used here"):
        parse_specs("pissa,lora", allowed=("lora",))


def test_matched_budgets_within_a_few_percent(checkpoint):
    model, _ = load_model(checkpoint)
    specs = match_budgets(parse_specs("hiplora,lora,oplora,lora:r=2", AdapterSpec(r=4, k=8)), model)
    rows = {r["method"]: r for r in budget_table(specs, model)}
    assert rows["lora"]["r"] == 4 and abs(rows["lora"]["vs_reference"]) < 0.05
    assert abs(rows["oplora"]["vs_reference"]) < 0.05
    assert rows["lora:r=2"]["r"] == 2  # explicit ranks are kept


def test_finetune_constraint_keeps_budget_and_adapter_reloads(checkpoint, tmp_path):
    cfg = FinetuneConfig(method="hiplora:rho=0.01", model=checkpoint, r=4, k=4, train=replace(TINY, lr=0.05),
                         progress=False)
    res = finetune(cfg, tmp_path / "ft")
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["budget_use_max"] is not None and 0 < m["budget_use_max"] <= 1 + 1e-6
    assert all(r["budget_use_max"] <= 1 + 1e-6 for r in m["budget_use_trace"][1:])
    assert 0 <= m["accuracy"] <= 1 and m["trainable_parameters"] == res.metrics["budget_counts"][0]["trainable"]
    for f in ("report.md", "config.json", "figures/loss.png", "figures/budget_use.png", "adapter/adapter_config.json"):
        assert (tmp_path / "ft" / f).exists(), f
    base, _ = load_model(checkpoint)
    loaded = load_adapter(base, tmp_path / "ft" / "adapter", progress=False)
    assert max(loaded.budget_use().values()) <= 1 + 1e-6
    assert any(float(d.abs().max()) > 0 for d in adapter_deltas(loaded).values())


def test_jsonl_task_and_errors(checkpoint, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "response": f" a{i % 3}"}) for i in range(20)))
    assert resolve_task("reverse@3").examples("test", n=3)[0].difficulty == 3
    with pytest.raises(ValueError, match="bad difficulty"):
        resolve_task("reverse@x")
    task = resolve_task(str(data))
    assert len(task.examples("train")) == 18 and len(task.examples("val")) == 2
    res = finetune(FinetuneConfig(method="lora", task=str(data), model=checkpoint, r=4, k=4, train=TINY,
                                  progress=False), tmp_path / "ft")
    assert res.metrics["task"] == "pairs" and res.metrics["budget_use_max"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": "y", "response": "z"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each row needs"):
        resolve_task(str(bad))
    with pytest.raises(FileNotFoundError):
        resolve_task(str(tmp_path / "missing.jsonl"))


def test_drift_quick(checkpoint, tmp_path):
    res = run_drift(DriftConfig(methods="lora,hiplora:rho=0.0001,hiplora:mode=penalty", model=checkpoint, r=4, k=4,
                                targets="mlp", quick=True, train=replace(TINY, lr=1e-4), n_ppl=4, n_skill=2, n_facts=4,
                                skill_max_new_tokens=4, progress=False), tmp_path / "drift")
    m = json.loads((tmp_path / "drift" / "metrics.json").read_text())
    assert list(m["methods"]) == ["lora", "hiplora:rho=0.0001", "hiplora:mode=penalty"] and m["reference"] == "lora"
    for label, pm in m["methods"].items():
        d = pm["degradation"]
        assert d["delta_nll"]["low"] <= d["delta_nll"]["estimate"] <= d["delta_nll"]["high"]
        assert set(d["points"]) == {"math", "code", "science", "facts"}
        assert all(-100 <= v["estimate"] <= 100 for v in d["points"].values())
        assert 0 <= pm["interference_mean"]["energy_fraction"] <= 1
        assert len(pm["interference"][0]) == 6  # 2 layers x 3 MLP matrices
    # HiP-LoRA's residual cannot rotate the top-k subspace (angles ~0) while its gains keep sigma_k + phi_k above the
    # residual spectrum, i.e. for small updates (a tiny budget and learning rate here); LoRA's update does rotate it
    hip, lora = m["methods"]["hiplora:rho=0.0001"]["interference_mean"], m["methods"]["lora"]["interference_mean"]
    assert hip["left_angle_max"] < 1e-4 and hip["right_angle_max"] < 1e-4
    assert lora["left_angle_max"] > 10 * hip["left_angle_max"]
    assert max(m["methods"]["hiplora:rho=0.0001"]["budget_use_max"]) <= 1 + 1e-6
    assert (tmp_path / "drift" / "figures" / "degradation.png").exists() and res.metrics["protocol"] == "drift"


def test_mergefail_quick(checkpoint, tmp_path):
    run_mergefail(MergeFailConfig(methods="lora,hiplora", model=checkpoint, r=4, k=4, quick=True, train=TINY,
                                  progress=False), tmp_path / "mf")
    m = json.loads((tmp_path / "mf" / "metrics.json").read_text())
    assert m["tasks"] == ["count", "max", "reverse@3"] and m["seeds"] == [42] and m["tau"] == 0.9
    assert set(m["pooled"]) == {"lora|sum", "hiplora|sum", "hiplora-lora|sum", "lora|ties", "hiplora|ties",
                                "hiplora-lora|ties"}
    for key, v in m["pooled"].items():
        lo = -1 if "-" in key.split("|")[0] else 0
        assert lo <= v["low"] <= v["estimate"] <= v["high"] <= 1 and v["n"] == 5 * 2  # n_merge x sizes {2, 3}
    assert {r["t"] for r in m["summary"]["rates"]} == {2, 3}
    assert set(m["retention"]) == set(m["pooled"])
    assert all(v["estimate"] >= 0 for k, v in m["retention"].items() if "-" not in k.split("|")[0])
    assert (tmp_path / "mf" / "figures" / "mergefail.png").exists()


def test_continual_quick(checkpoint, tmp_path):
    run_continual_protocol(ContinualConfig(methods="lora,hiplora", tasks=("reverse", "sort", "max"), model=checkpoint,
                                           r=4, k=4, quick=True, train=TINY, progress=False), tmp_path / "c")
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    for pm in m["methods"].values():
        assert np.asarray(pm["R"]).shape == (3, 3)
        assert 0 <= pm["final_average_accuracy"]["estimate"] <= 1
        assert -1 <= pm["backward_transfer"]["estimate"] <= 1
    assert "vs_reference" in m["methods"]["hiplora"]
    assert len(list((tmp_path / "c" / "figures").glob("accuracy_matrix_*.png"))) == 2


def test_editing_quick(checkpoint, tmp_path):
    run_editing(EditingConfig(methods="lora,hiplora", model=checkpoint, r=4, k=4, quick=True, n_edits=4, n_local=4,
                              n_skill=2, skill_max_new_tokens=4, train=replace(TINY, epochs=1), progress=False),
                tmp_path / "e")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["sizes"]["n_edits"] == 4 and m["sizes"]["n_local"] == 4
    for pm in m["methods"].values():
        for key in ("edit_success", "paraphrase_generalisation", "locality"):
            assert 0 <= pm["ci"][key]["estimate"] <= 1
        assert -1 <= pm["ci"]["skill_change"]["estimate"] <= 1
    with pytest.raises(ValueError, match="n_edits must be in"):
        run_editing(EditingConfig(model=checkpoint, n_edits=0), tmp_path / "bad")


def test_sanity_quick(checkpoint, tmp_path):
    run_sanity(SanityConfig(model=checkpoint, quick=True, n_indices=3, n_docs=2), tmp_path / "s")
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert set(m["perturbations"]) == {"flip", "noise", "zero"}
    for res in m["perturbations"].values():
        c = res["correlation"]
        assert -1 <= c["pearson_r"] <= 1 and -1 <= c["spearman_rho"] <= 1
        assert 0 <= c["pearson_p"] <= 1 and 0 <= c["spearman_p"] <= 1
        assert len(res["effects"]) == m["n_matrices"] * 3
    with pytest.raises(ValueError, match="unknown perturbation"):
        run_sanity(SanityConfig(model=checkpoint, perturbations=("shake",)), tmp_path / "bad")
