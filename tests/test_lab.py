"""The lab's validity checks: chance levels, gold NLL, update ratios, the expert's paired gain, the criteria's
verdicts, and the lab-check recipe end to end on a tiny organism."""

from __future__ import annotations

import json

import pytest
import torch

from spectral_peft import get_peft_model, method_config
from spectral_peft.data import Example, load_task
from spectral_peft.errors import InputError, MissingInputError
from spectral_peft.lab import chance_level, gold_nll, measure_expert, measure_regime, spread
from spectral_peft.lab.criteria import (FAIL, NOT_MEASURED, PASS, expert_verdict, regime_verdict, skills_verdict,
                                        tasks_verdict)
from spectral_peft.lab.regime import RegimeSettings
from spectral_peft.loading import ModelSource
from spectral_peft.methods import target_shapes
from spectral_peft.probe import Probe
from spectral_peft.recipes import execute, recipe
from spectral_peft.training.objectives import collate_pairs, masked_nll

from helpers import save_tiny_organism

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    return save_tiny_organism(tmp_path_factory.mktemp("lab") / "model")


@pytest.fixture(scope="module")
def identity_probe(checkpoint, tmp_path_factory):
    """An untrained SVF expert (z = 1 everywhere): the expert is the base itself."""
    path = tmp_path_factory.mktemp("identity") / "probe"
    model = get_peft_model(ModelSource(checkpoint).fresh(), method_config("svf"), progress=False)
    Probe.from_model(model, meta={"skill": "math"}).save(path)
    return str(path)


def ex(answer, task="", difficulty=0, meta=()):
    return Example(prompt=f"Q {answer} {difficulty}", target=f" {answer}\n", answer=answer, task=task,
                   difficulty=difficulty, meta=meta)


# --- chance ---------------------------------------------------------------------------------------------------------

def test_chance_is_the_majority_answer_share_for_open_answers():
    c = chance_level([ex("7"), ex("7"), ex("7 "), ex("3"), ex("12"), ex("40"), ex("1"), ex("2")])
    assert c.rate == pytest.approx(3 / 8) and c.rule == "constant answer"


def test_chance_of_science_is_a_uniform_pick_among_the_names():
    c = chance_level([ex("Ann", "science", 1), ex("Bo", "science", 2), ex("Cy", "science", 1), ex("Di", "science", 3)])
    assert c.rate == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 4) / 4) and c.rule == "uniform pick"
    science = load_task("science")  # the real generator: k = difficulty + 1 names in every problem
    for e in science.examples("test", n=20):
        names = set(e.target.split("####")[0].replace(".", "").replace(">", " ").split())
        assert len(names) == e.difficulty + 1 and e.answer in names


def test_chance_of_multiple_choice_uses_the_options_and_the_better_strategy_wins():
    options = (("options", ("a", "b", "c", "d")),)
    assert chance_level([ex("A", meta=options), ex("B", meta=options)]).rate == pytest.approx(0.5)  # constant: 1/2
    c = chance_level([ex(x, meta=options) for x in "ABCDABCD"])
    assert c.rate == pytest.approx(0.25)
    with pytest.raises(InputError):
        chance_level([])


# --- gold NLL and spread ---------------------------------------------------------------------------------------------

def test_gold_nll_is_the_per_item_target_nll_whatever_the_batching(checkpoint):
    source = ModelSource(checkpoint)
    model, tok = source.fresh(), source.tokenizer
    examples = load_task("math").examples("test", n=5)
    batched = gold_nll(model, tok, examples, batch_size=3, progress=False)
    for e, nll, n in zip(examples, batched.nll, batched.tokens):
        b = collate_pairs(tok, [(e.prompt, e.target)])
        with torch.no_grad():
            alone = masked_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"],
                               reduction="sum_per_row")
        assert nll == pytest.approx(float(alone), rel=1e-4)
        assert n == len(tok(e.target, add_special_tokens=False)["input_ids"])
    assert batched.per_token == pytest.approx(sum(batched.nll) / sum(batched.tokens))


def test_spread_gives_interpolated_percentiles():
    s = spread({str(i): float(i) for i in range(1, 12)})
    assert (s["median"], s["p10"], s["p90"], s["min"], s["max"], s["n"]) == (6, 2, 10, 1, 11, 11)


# --- the update regime ----------------------------------------------------------------------------------------------

def test_regime_ratios_are_peft_updates_over_the_base_weights(checkpoint, monkeypatch):
    from spectral_peft.lab import regime as regime_module

    source = ModelSource(checkpoint)
    trained = {}
    original = regime_module.train_adapter

    def keep(*args, **kwargs):
        trained["model"], history = original(*args, **kwargs)
        return trained["model"], history

    monkeypatch.setattr(regime_module, "train_adapter", keep)
    settings = RegimeSettings(data="sort", n_train=8, r=2, targets="mlp", epochs=1, batch_size=4, lr=1e-2, n_eval=4,
                              recall_target=0.0)
    m = measure_regime(source.fresh(), source.tokenizer, settings, progress=False)
    base = source.fresh()
    assert set(m.fro_ratio) == set(target_shapes(base, "mlp")) and m.spec["r"] == 2
    for key, layer in trained["model"].named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            name = key.removeprefix("base_model.model.")
            dW = layer.get_delta_weight("default").detach().float()
            W = base.get_submodule(name).weight.detach().float()
            assert m.fro_ratio[name] == pytest.approx(float(dW.norm() / W.norm()), rel=1e-4)
            assert m.spectral_ratio[name] == pytest.approx(
                float(torch.linalg.matrix_norm(dW, ord=2) / torch.linalg.matrix_norm(W, ord=2)), rel=1e-4)
            assert m.fro_ratio[name] > 0
    assert len(m.learned_before) == len(m.learned_after) == 4 and m.steps == 2


def test_regime_settings_fail_before_any_work():
    with pytest.raises(MissingInputError, match="no such file"):
        RegimeSettings(data="facts:/no/such/qa.jsonl").validate()
    with pytest.raises(InputError, match="targets"):
        RegimeSettings(targets="attention").validate()
    with pytest.raises(InputError, match="lr"):
        RegimeSettings(lr=0.0).validate()


# --- the expert -----------------------------------------------------------------------------------------------------

def test_an_identity_expert_has_exactly_zero_gain_and_is_not_learned(checkpoint, identity_probe):
    source = ModelSource(checkpoint)
    m = measure_expert(source, load_task("math"), Probe.load(identity_probe), n=6, progress=False)
    assert m.expert_correct == m.base_correct and len(m.base_correct) == 6
    g = m.gain
    assert (g.estimate, g.low, g.high) == (0.0, 0.0, 0.0) and not m.learned


# --- the verdicts ---------------------------------------------------------------------------------------------------

def gain(low, n=500):
    return {"estimate": low + 0.02, "ci_low": low, "ci_high": low + 0.04, "n": n}


def skill(low, high, chance=0.4, n=500):
    return {"accuracy": (low + high) / 2, "ci_low": low, "ci_high": high, "chance": chance, "n": n}


def test_expert_verdict_needs_a_positive_interval_on_500_problems():
    assert expert_verdict(gain(0.001)).status == PASS
    v = expert_verdict(gain(-0.001))
    assert v.status == FAIL and v.note.startswith("no expert was learned")
    assert expert_verdict(gain(0.05, n=499)).status == FAIL
    assert expert_verdict(None, "no probe").status == NOT_MEASURED


def test_skills_verdict_needs_every_skill_above_chance_and_below_80():
    assert skills_verdict({"a": skill(0.41, 0.79), "b": skill(0.10, 0.20, chance=0.05)}).status == PASS
    for bad in (skill(0.40, 0.60), skill(0.60, 0.80), skill(0.5, 0.6, n=499)):
        v = skills_verdict({"a": skill(0.41, 0.79), "bad": bad})
        assert v.status == FAIL and v.note.startswith("bad:")


def test_regime_verdict_needs_the_10_90_spread_inside_1_to_5_percent():
    assert regime_verdict({"p10": 0.01, "median": 0.03, "p90": 0.05}).status == PASS
    assert regime_verdict({"p10": 0.009, "median": 0.03, "p90": 0.05}).status == FAIL
    assert regime_verdict({"p10": 0.01, "median": 0.03, "p90": 0.0501}).status == FAIL


def test_tasks_verdict_needs_six_half_known_tasks_and_a_fail_rate_off_the_floor_and_ceiling():
    half = dict(zip("abcdef", (0.20, 0.30, 0.40, 0.50, 0.55, 0.60)))
    assert tasks_verdict(half, {"lora|sum": 0.5}).status == PASS
    assert tasks_verdict(half, {"lora|sum": 1.0, "lora|ties": 0.05}).status == FAIL
    assert tasks_verdict(half, {}, "later").status == NOT_MEASURED
    v = tasks_verdict({**half, "a": 0.19}, {"lora|sum": 0.5})
    assert v.status == FAIL and "5 of 6" in v.note


# --- the recipe -----------------------------------------------------------------------------------------------------

def test_lab_check_writes_every_key_and_verdict(checkpoint, identity_probe, tmp_path):
    module = recipe("lab-check")
    cfg = module.Config(model=checkpoint, skills=("math", "science"), n_problems=6, probe=identity_probe, n_expert=6,
                        regime=RegimeSettings(n_train=4, r=1, targets="mlp", epochs=1, batch_size=4), tasks=("sort",),
                        n_tasks=4,
                        n_controls=4, n_rehearsal=4, seed_probes=(identity_probe,), null_probe=identity_probe,
                        n_fisher=4, progress=False)
    execute("lab-check", cfg, tmp_path / "lab")
    lab = json.loads((tmp_path / "lab" / "lab.json").read_text())
    assert lab["expert_gain"]["estimate"] == 0.0 and lab["expert_gain"]["n"] == 6
    assert lab["criteria"]["a"]["status"] == FAIL and "no expert was learned" in lab["criteria"]["a"]["note"]
    assert lab["criteria"]["b"]["status"] == FAIL and "only 6 problems" in lab["criteria"]["b"]["note"]
    assert set(lab["skills"]) == {"math", "science"}
    for s in lab["skills"].values():
        assert {"accuracy", "chance", "nll"} <= set(s) and 0 <= s["chance"] <= 1 and s["nll"] > 0
    assert lab["skills"]["science"]["chance_rule"] == "uniform pick"
    fro = lab["lora_update_fro_ratio"]
    assert fro["p10"] <= fro["median"] <= fro["p90"] and fro["n"] == len(target_shapes(ModelSource(checkpoint).fresh(),
                                                                                      "mlp"))
    pos = lab["positive_control"]
    assert pos["n"] == 4 and {"estimate", "ci_low", "ci_high"} <= set(pos) and pos["ci_low"] <= pos["estimate"]
    assert set(lab["negative_controls"]) == set(cfg.negative)
    evidence = lab["probe_evidence"]  # a probe against itself overlaps fully; sets at its sizes stay above 0
    assert evidence["stability"]["pooled"] == 1.0 and evidence["null"]["pooled"] == 1.0
    assert evidence["null"]["pooled_chance"] < 1.0
    assert {"probe", "sigma"} <= set(evidence["fisher"]) and {"probe", "sigma"} <= set(evidence["sigma_aware"])
    assert lab["mergefail_fail_rates"] == {} and lab["mergefail_fail_rates_reason"]
    assert [lab["criteria"][c]["status"] for c in "df"] == [NOT_MEASURED, FAIL]
    assert lab["criteria"]["e"]["status"] == (PASS if pos["ci_low"] > 0 else FAIL)
    assert lab["settings"]["n_problems"] == 6 and lab["settings"]["regime"]["r"] == 1
    metrics = json.loads((tmp_path / "lab" / "metrics.json").read_text())
    assert len(metrics["items"]["skills"]["math"]["correct"]) == 6
    assert (tmp_path / "lab" / "report.md").read_text().count("| (") == 6


def test_lab_check_config_fails_before_any_work(identity_probe):
    module = recipe("lab-check")
    with pytest.raises(InputError, match="--expert-skill"):
        module.Config(expert_skill="math").validate()
    with pytest.raises(InputError):
        module.Config(skills=("math", "math")).validate()
    with pytest.raises(MissingInputError):
        module.Config(probe="/no/such/svf-run").validate()
    assert module.Config(probe=identity_probe).probe_skill() == "math"


def test_lab_check_reads_pooled_fail_rates_of_a_mergefail_run(tmp_path):
    """Only the rates pooled over merge sizes (t = None) count, keyed method|operator, with their distinct counts."""
    module = recipe("lab-check")
    rate = {"estimate": 0.25, "low": 0.1, "high": 0.4, "method": "wilson", "confidence": 0.95}
    rows = [{"method": "lora", "operator": "sum", "t": None, "n": 40, "n_distinct": 12, "n_used": 12, "rate": rate},
            {"method": "lora", "operator": "sum", "t": 2, "n": 20, "n_distinct": 6, "n_used": 6,
             "rate": {**rate, "estimate": 1.0}}]
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"rates": rows}}))
    assert module.mergefail_rates(str(tmp_path)) == {"lora|sum": {"rate": 0.25, "ci_low": 0.1, "ci_high": 0.4,
                                                                  "n_distinct": 12}}
    verdict = tasks_verdict({f"t{i}": 0.4 for i in range(6)}, {"lora|sum": 0.25})
    assert verdict.status == PASS
    assert tasks_verdict({f"t{i}": 0.4 for i in range(6)}, {"lora|sum": 1.0}).status == FAIL
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"rates": rows[1:]}}))
    with pytest.raises(InputError, match="no pooled fail rates"):
        module.mergefail_rates(str(tmp_path))
    with pytest.raises(MissingInputError):
        module.Config(mergefail=str(tmp_path / "nothing")).validate()
