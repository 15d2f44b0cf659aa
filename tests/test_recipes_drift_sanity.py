"""The drift and sanity recipes end to end on a tiny organism, through ``recipes.execute`` and the CLI, with known
answers: adapters whose weights cannot move change nothing (exactly zero NLL and accuracy change), block-diagonal
updates (HiP-LoRA, OPLoRA) leave ``span(U_k)`` invariant while LoRA's does not, and the sanity protocol reports the
singular values of the model's own matrices."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from helpers import save_tiny_organism

from spectral_peft.cli import main
from spectral_peft.evaluation.sanity import spread_indices
from spectral_peft.loading import load_model
from spectral_peft.recipes import drift, execute, sanity
from spectral_peft.training.adapter import FinetuneSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = FinetuneSettings(n_train=16, n_eval=4, epochs=1, batch_size=8, lr=0.05, max_new_tokens=4)
TINY_FLAGS = ["--r", "2", "--k", "4", "--targets", "mlp", "--n-ppl", "4", "--n-skill", "2", "--n-facts", "4",
              "--train.n-train", "16", "--train.n-eval", "4", "--train.epochs", "1", "--train.batch-size", "8",
              "--train.max-new-tokens", "4", "--progress", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism-drift"), num_layers=2)


def tiny_drift(checkpoint, **kw) -> drift.Config:
    cfg = drift.Config(methods="lora,hiplora,oplora", model=checkpoint, seeds=(0, 1), r=2, k=4, targets="mlp",
                       train=TINY, n_ppl=4, n_skill=2, n_facts=4, progress=False)
    return replace(cfg, **kw)


def inside(ci: dict) -> bool:
    return ci["low"] <= ci["estimate"] <= ci["high"]


def test_drift_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "drift"
    result, summary = execute("drift", tiny_drift(checkpoint), out)
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["methods"]) == ["lora", "hiplora", "oplora"] and m["reference"] == "lora"
    assert m["methods"]["lora"]["vs_reference"] is None and summary.count("\n") == 2
    base = m["items"]["base"]
    assert np.shape(base["nll"]) == (1, 4) and np.shape(base["scores"]["facts"]) == (1, 4)
    for label, pm in m["methods"].items():
        items = m["items"][label]
        assert np.shape(items["nll"]) == (2, 4) and np.shape(items["scores"]["task"]) == (2, 4)
        assert np.shape(items["scores"]["math"]) == (2, 2) and items["tokens"] == [base["tokens"][0]] * 2
        # the pooled NLL change is the ratio estimate sum(adapted - base) / tokens, per seed, averaged over seeds
        ratio = (np.sum(items["nll"]) / 2 - np.sum(base["nll"])) / np.sum(base["tokens"])
        assert pm["delta_nll"]["estimate"] == pytest.approx(ratio, rel=1e-9) and inside(pm["delta_nll"])
        assert pm["delta_nll"]["estimate"] == pytest.approx(pm["nll"] - m["base"]["nll"], rel=1e-9)
        for name in ("task", "math", "code", "science", "facts"):
            change = pm["change"][name]
            assert change["estimate"] == pytest.approx(np.mean(items["scores"][name]) - np.mean(base["scores"][name]))
            assert inside(change) and inside(pm["accuracy"][name]) and 0 <= pm["accuracy"][name]["low"] <= 1
        assert [len(rows) for rows in m["interference"][label]] == [6, 6]  # 2 layers x 3 MLP matrices, per seed
        if pm["vs_reference"]:
            lora = m["methods"]["lora"]["delta_nll"]["estimate"]
            assert pm["vs_reference"]["delta_nll"]["estimate"] == pytest.approx(pm["delta_nll"]["estimate"] - lora)
    inv = {label: pm["interference_mean"]["invariance"] for label, pm in m["methods"].items()}
    # HiP-LoRA's and OPLoRA's updates are block-diagonal in the (U_k, U_perp) x (V_k, V_perp) basis: span(U_k) stays
    # invariant (up to float32 rounding of dW); LoRA's update is generic and leaks out of it
    assert inv["hiplora"] < 1e-4 and inv["oplora"] < 1e-4 and inv["lora"] > 1e-2
    assert m["methods"]["oplora"]["interference_mean"]["energy_fraction"] < 1e-9
    assert max(m["methods"]["hiplora"]["budget_use_max"]) <= 1 + 1e-6
    for name in ("interference_invariance.png", "degradation.png", "loss.png", "budget_use.png"):
        assert (out / "figures" / name).is_file()
    assert "invariance" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "units").iterdir()) == [
        "base.json", "hiplora-seed0.json", "hiplora-seed1.json", "lora-seed0.json", "lora-seed1.json",
        "oplora-seed0.json", "oplora-seed1.json"]
    assert yaml.safe_load((out / "config.yaml").read_text())["seeds"] == [0, 1]
    assert result.sizes["n_ppl"] == 4 and result.sizes["n_facts"] == 4


def test_drift_weights_that_cannot_move_change_nothing_and_resume_skips_units(checkpoint, tmp_path, monkeypatch):
    """With lr = 1e-30 every adapter's dW (LoRA and HiP-LoRA start at dW = 0) stays far below float32 resolution, so
    the adapted model computes exactly the base model's outputs: every change is exactly 0, and so is its CI."""
    out = tmp_path / "still"
    cfg = tiny_drift(checkpoint, methods="lora,hiplora", train=replace(TINY, lr=1e-30))
    execute("drift", cfg, out)
    m = json.loads((out / "metrics.json").read_text())
    for label, pm in m["methods"].items():
        assert m["items"][label]["nll"] == m["items"]["base"]["nll"] * 2
        assert (pm["delta_nll"]["low"], pm["delta_nll"]["estimate"], pm["delta_nll"]["high"]) == (0.0, 0.0, 0.0)
        assert all(c["estimate"] == c["low"] == c["high"] == 0.0 for c in pm["change"].values())
    assert m["methods"]["hiplora"]["vs_reference"]["delta_nll"]["estimate"] == 0.0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished unit was recomputed")

    monkeypatch.setattr(drift, "train_adapter", no_training)
    execute("drift", cfg, out, mode="resume")
    assert json.loads((out / "metrics.json").read_text())["items"] == m["items"]


def test_sanity_end_to_end(checkpoint, tmp_path):
    cfg = sanity.Config(model=checkpoint, n_indices=3, n_docs=2, perturbations=("flip", "zero"), progress=False)
    result, summary = execute("sanity", cfg, tmp_path / "s")
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert list(m["perturbations"]) == ["flip", "zero"] and m["n_matrices"] == 14  # 2 layers x 7 linear matrices
    model, _ = load_model(checkpoint)
    weights = {n: mod.weight.detach().double() for n, mod in model.named_modules() if hasattr(mod, "weight")}
    for kind, res in m["perturbations"].items():
        assert len(res["effects"]) == 14 * 3 and kind in summary
        for e in res["effects"]:  # each effect is at its spread index, with that singular value of the model's matrix
            sigma = torch.linalg.svdvals(weights[e["module"]])
            assert e["index"] in spread_indices(len(sigma), 3) and e["sigma"] == pytest.approx(float(sigma[e["index"]]))
        c = res["correlation"]
        assert -1 <= c["pearson_r"] <= 1 and 0 <= c["spearman_p"] <= 1
        assert set(res["by_matrix_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    # the model is restored bit-exactly after every perturbation: both kinds see the same unperturbed loss
    assert m["perturbations"]["flip"]["base_loss"] == m["perturbations"]["zero"]["base_loss"]
    assert (tmp_path / "s" / "figures" / "sanity.png").is_file() and (tmp_path / "s" / "report.md").is_file()


def test_cli_quick_records_the_preset(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sanity", "--quick", "--model", checkpoint, "--perturbations", "zero", "--progress", "false",
                 "--out", str(out)]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["n_indices"], cfg["n_docs"], cfg["perturbations"]) == (6, 8, ["zero"])
    assert len(json.loads((out / "metrics.json").read_text())["perturbations"]["zero"]["effects"]) == 14 * 6
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["sanity", "--model", checkpoint, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already holds a run" in err and "\n" not in err

    out = tmp_path / "d"
    assert main(["drift", "--quick", "--model", checkpoint, "--methods", "lora,hiplora", *TINY_FLAGS,
                 "--out", str(out)]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["seeds"] == [0] and cfg["methods"] == "lora,hiplora"  # the preset's seeds, the given methods
    assert (cfg["n_ppl"], cfg["train"]["n_train"], cfg["train"]["epochs"]) == (4, 16, 1)
    assert "hiplora: delta NLL" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["drift", "--methods", "lora,pissa"], "cannot be used here"),
    (["drift", "--methods", "lorax"], "unknown method 'lorax'"),
    (["drift", "--task", "juggling"], "unknown task 'juggling'"),
    (["drift", "--seeds", "0,0"], "each once"),
    (["drift", "--n-facts", "0"], "n_ppl, n_skill and n_facts must be >= 1"),
    (["drift", "--chat-template", "sometimes"], "chat_template must be one of"),
    (["drift", "--model", "/nonexistent/checkpoint"], "no such checkpoint directory"),
    (["sanity", "--perturbations", "shake"], "unknown perturbation"),
    (["sanity", "--noise", "0"], "noise must be a positive number"),
    (["sanity", "--targets", "attention"], "targets must be one of"),
])
def test_cli_one_line_errors(args, message, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()
