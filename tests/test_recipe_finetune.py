"""The finetune recipe: a positive and a negative control, HiP-LoRA's budget held, matched budgets, JSONL tasks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from helpers import save_tiny_organism
from spectral_peft.loading import load_model
from spectral_peft.merging import adapter_deltas
from spectral_peft.methods import budget_table, match_budgets, MethodSpec, parse_methods
from spectral_peft.model import load_adapter
from spectral_peft.recipes import execute, recipe

FT = recipe("finetune")
TINY = dict(n_train=8, n_eval=4, epochs=1, batch_size=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("org") / "model", num_layers=2)


def tiny(**kw):
    cfg = FT.Config(progress=False, r=4, k=4, **kw)
    return replace(cfg, train=replace(cfg.train, **TINY))


def test_finetune_learns_a_task_and_a_frozen_run_changes_nothing(tmp_path):
    """A positive control on the shipped organism (its accuracy must rise) and a negative one (lr ~ 0)."""
    base = FT.Config(method="lora:r=4", task="max@16", targets="mlp", progress=False, threads=2)
    base.train = replace(base.train, n_train=128, n_eval=48, epochs=2, lr=5e-3, batch_size=16, max_new_tokens=8)
    learned, _ = execute("finetune", base, tmp_path / "learn")
    assert learned.gain.low > 0, learned.to_dict()["gain"]
    frozen_cfg = replace(base, train=replace(base.train, lr=1e-12, epochs=1, n_train=16))
    frozen, _ = execute("finetune", frozen_cfg, tmp_path / "frozen")
    assert frozen.correct == frozen.base_correct


def test_matched_budgets_within_a_few_percent(organism):
    model, _ = load_model(organism)
    specs = match_budgets(parse_methods("hiplora,lora,oplora,lora:r=2", MethodSpec(r=4, k=8)), model, MethodSpec())
    rows = {r["method"]: r for r in budget_table(specs, model)}
    assert rows["lora"]["r"] == 4 and abs(rows["lora"]["vs_reference"]) < 0.05
    assert abs(rows["oplora"]["vs_reference"]) < 0.05
    assert rows["lora:r=2"]["r"] == 2  # explicit ranks are kept


def test_hiplora_constraint_keeps_budget_and_adapter_reloads(organism, tmp_path):
    cfg = tiny(method="hiplora:rho=0.01", model=organism)
    cfg = replace(cfg, train=replace(cfg.train, lr=0.05))
    res, _ = execute("finetune", cfg, tmp_path / "ft")
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["budget_use_max"] is not None and 0 < m["budget_use_max"] <= 1 + 1e-6
    assert all(r["budget_use_max"] <= 1 + 1e-6 for r in m["budget_use_trace"][1:])
    assert m["trainable_parameters"] == res.budget_counts[0]["trainable"]
    for f in ("report.md", "config.yaml", "figures/loss.png", "figures/budget_use.png", "adapter/adapter_config.json"):
        assert (tmp_path / "ft" / f).exists(), f
    base, _ = load_model(organism)
    loaded = load_adapter(base, tmp_path / "ft" / "adapter", progress=False)
    assert max(loaded.budget_use().values()) <= 1 + 1e-6
    assert any(float(d.abs().max()) > 0 for d in adapter_deltas(loaded).values())


def test_jsonl_task_with_a_numeric_checker(organism, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "response": f" {i % 3}"}) for i in range(20)))
    res, _ = execute("finetune", tiny(method="lora", task=f"{data}?checker=numeric", model=organism), tmp_path / "ft")
    assert res.task == "pairs" and res.budget_use is None and len(res.correct) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": "y", "response": "z"}\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        execute("finetune", tiny(method="lora", task=str(bad), model=organism), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()
