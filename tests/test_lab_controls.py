"""Criterion (e)'s controls on a tiny organism: every arm starts from the same expert, is scored on the same problems,
rehearsal adds the skill's training pairs, the negative controls use the named subspaces, gains are paired, and
bad input fails before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spectral_peft.adapters.matrices import matrix_weights
from spectral_peft.adapters.svf_fold import fold_expert
from spectral_peft.data import load_task, split_of
from spectral_peft.errors import InputError
from spectral_peft.lab import controls
from spectral_peft.lab import regime as regime_module
from spectral_peft.lab.controls import (DEFAULT_NEGATIVE, REFERENCE, REHEARSAL, Arm, ControlsMeasure,
                                        measure_controls, mix_in)
from spectral_peft.lab.regime import RegimeSettings
from spectral_peft.loading import ModelSource
from spectral_peft.methods import ablation_indices, parse_method, target_shapes
from spectral_peft.model import base_identity
from spectral_peft.probe import Probe
from spectral_peft.spectral import svd_full
from spectral_peft.training import adapter as adapter_module

from helpers import save_tiny_organism

pytestmark = pytest.mark.usefixtures("one_thread")

TWIN = "lora:r=2"  # the reference's own spec written out: an arm identical to LoRA
SETTINGS = RegimeSettings(n_train=4, r=2, targets="mlp", epochs=2, batch_size=4, lr=1e-2, recall_target=0.0)
N, N_REHEARSAL = 8, 4
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    return save_tiny_organism(tmp_path_factory.mktemp("controls") / "model")


@pytest.fixture(scope="module")
def probe(checkpoint):
    """A stand-in SVF expert over the MLP matrices: random scales ``z = 1 + 0.2 g`` (the expert differs from the
    base)."""
    model = ModelSource(checkpoint).fresh()
    names = list(target_shapes(model, "mlp"))
    gen = torch.Generator().manual_seed(0)
    scales = {n: 1 + 0.2 * torch.randn(min(W.shape), generator=gen) for n, W in matrix_weights(model, names).items()}
    return Probe(scales, base_identity(model, names), meta={"skill": "math"})


@pytest.fixture(scope="module")
def run(checkpoint, probe):
    """One measurement with spies: each built model's logits before training, each training call, each scoring."""
    seen = {"start": [], "train": {}, "problems": []}
    build, train, score = adapter_module.build_model, regime_module.train_adapter, controls.skill_accuracy

    def spy_build(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            seen["start"].append(model(input_ids=IDS).logits)
        return model

    def spy_train(base, tok, spec, pairs, settings, seed, **kwargs):
        model, history = train(base, tok, spec, pairs, settings, seed, **kwargs)
        seen["train"][kwargs["desc"]] = {"pairs": list(pairs), "model": model, "seed": seed, "spec": spec}
        return model, history

    def spy_score(model, tok, task, examples, **kwargs):
        seen["problems"].append([e.prompt for e in examples])
        return score(model, tok, task, examples, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter_module, "build_model", spy_build)
        mp.setattr(regime_module, "train_adapter", spy_train)
        mp.setattr(controls, "skill_accuracy", spy_score)
        m = measure_controls(ModelSource(checkpoint), load_task("math"), probe, SETTINGS, n=N, n_rehearsal=N_REHEARSAL,
                             negative=(*DEFAULT_NEGATIVE, TWIN), progress=False)
    return m, seen


def test_every_arm_starts_from_the_expert_and_answers_the_same_problems(run, checkpoint, probe):
    m, seen = run
    assert list(m.arms) == [REFERENCE, REHEARSAL, *DEFAULT_NEGATIVE, TWIN]
    with torch.no_grad():
        expert = fold_expert(ModelSource(checkpoint).fresh(), probe)(input_ids=IDS).logits
        base = ModelSource(checkpoint).fresh()(input_ids=IDS).logits
    assert not torch.allclose(expert, base, atol=1e-3)  # the expert is not the base
    assert len(seen["start"]) == len(m.arms)
    for logits in seen["start"]:
        assert torch.allclose(logits, expert, atol=1e-5)
    problems = seen["problems"]
    assert len(problems) == 1 + len(m.arms) and all(p == problems[0] for p in problems)
    assert problems[0] == [e.prompt for e in load_task("math").examples("test", n=N, seed=0)]
    for arm in m.arms.values():
        assert len(arm.correct) == N and len(arm.learned) == SETTINGS.n_train
    assert len(m.expert_correct) == N and len(m.expert_learned) == SETTINGS.n_train
    assert {s["seed"] for s in seen["train"].values()} == {0}


def test_an_arm_identical_to_lora_has_exactly_zero_gain(run):
    m, _ = run
    twin, lora = m.arms[TWIN], m.arms[REFERENCE]
    assert (twin.correct, twin.learned, twin.last_loss) == (lora.correct, lora.learned, lora.last_loss)
    s = m.negative_controls()[TWIN]
    assert (s["estimate"], s["ci_low"], s["ci_high"]) == (0.0, 0.0, 0.0)
    assert s["learned_gain"] == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert lora.last_loss < lora.first_loss  # it trained


def test_rehearsal_mixes_the_skills_training_pairs_into_the_facts(run):
    m, seen = run
    facts, mixed = seen["train"][REFERENCE]["pairs"], seen["train"][REHEARSAL]["pairs"]
    assert seen["train"][REHEARSAL]["spec"] == seen["train"][REFERENCE]["spec"]
    train = [(e.prompt, e.target) for e in load_task("math").examples("train", n=N_REHEARSAL, seed=0)]
    assert len(mixed) == len(facts) + N_REHEARSAL == m.arms[REHEARSAL].n_pairs
    assert [p for p in mixed if p in facts] == facts  # the facts, in their order
    added = [p for p in mixed if p not in facts]
    assert added == train and all(split_of(prompt) == "train" for prompt, _ in added)
    assert not {prompt for prompt, _ in added} & set(seen["problems"][0])
    assert all(split_of(prompt) != "train" for prompt in seen["problems"][0])
    batches = -(-len(mixed) // SETTINGS.batch_size)
    assert m.arms[REHEARSAL].steps == SETTINGS.epochs * batches > m.arms[REFERENCE].steps


def test_negative_controls_place_the_update_in_the_named_subspaces(run, checkpoint, probe):
    _, seen = run
    weights = matrix_weights(ModelSource(checkpoint).fresh(), list(probe.scales))
    svds = {name: svd_full(W) for name, W in weights.items()}
    k = math.ceil(0.1 * 32)  # PALoRA's default protected fraction of the 32 directions of each 64 x 32 matrix
    expected = {
        "palora:protect=random": ablation_indices(probe, parse_method("palora:protect=random"), seed=0),
        "palora:place=inside": {n: probe.select(n, "top_fraction", rho=0.1).tolist() for n in probe.scales},
        "palora:protect=random,place=inside": ablation_indices(probe, parse_method("palora:protect=random"), seed=0),
        "palora:protect=sigma,place=inside": {n: list(range(k)) for n in probe.scales},
    }
    for label, indices in expected.items():
        layers = seen["train"][label]["model"].spectral_layers()
        assert set(layers) == set(probe.scales)
        for name, layer in layers.items():
            index = layer.protected_index.tolist()
            assert sorted(index) == sorted(indices[name]) and len(index) == k
            B, A = layer.lora.factors()
            dW = (B @ A).detach()
            U_S, V_S = svds[name].U[:, index], svds[name].V[:, index]
            assert dW.norm() > 0  # it trained
            if label.endswith("place=inside"):
                inside = U_S @ (U_S.T @ dW) @ V_S @ V_S.T
                assert (dW - inside).norm() <= 1e-5 * dW.norm()
            else:
                assert (U_S.T @ dW).norm() <= 1e-5 * dW.norm() and (dW @ V_S).norm() <= 1e-5 * dW.norm()
    assert expected["palora:protect=random"] != {n: list(range(k)) for n in probe.scales}


def test_the_result_round_trips_through_json(run):
    m, _ = run
    again = ControlsMeasure.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.summary() == m.summary() and again.settings == SETTINGS
    pc = m.positive_control()
    assert pc["n"] == N and pc["n_rehearsal"] == N_REHEARSAL and pc["control"] == REHEARSAL
    assert set(m.negative_controls()) == {*DEFAULT_NEGATIVE, TWIN}


def _measure(lora, rehearsal, expert, twin=None) -> ControlsMeasure:
    def arm(correct):
        return Arm(spec={"label": "lora"}, n_pairs=4, correct=correct, learned=[1.0, 0.0], steps=1, reached_target=None,
                   first_loss=1.0, last_loss=0.5, seconds=0.0)

    arms = {REFERENCE: arm(lora), REHEARSAL: arm(rehearsal), **({TWIN: arm(twin)} if twin else {})}
    return ControlsMeasure("math", "", SETTINGS, 4, "recall", expert, [0.0, 0.0], arms)


def test_gains_are_paired_differences_over_the_same_problems():
    varied = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0] * 4
    better = [1.0] * len(varied)
    m = _measure(varied, better, expert=better, twin=list(varied))
    twin = m.negative_controls()[TWIN]
    assert (twin["estimate"], twin["ci_low"], twin["ci_high"]) == (0.0, 0.0, 0.0)  # unpaired, it would be wide
    pc = m.positive_control()
    assert pc["estimate"] == pytest.approx(0.5) and 0 < pc["ci_low"] < 0.5 < pc["ci_high"] <= 1
    assert (pc["lora_accuracy"], pc["rehearsal_accuracy"], pc["expert_accuracy"], pc["n"]) == (0.5, 1.0, 1.0, 32)
    flipped = [1.0 - x for x in varied]  # the same accuracy, on the other half of the problems
    swapped = _measure(varied, flipped, expert=better).positive_control()
    assert swapped["estimate"] == 0.0 and swapped["ci_low"] < -0.2 and swapped["ci_high"] > 0.2


def test_mix_in_keeps_both_orders_and_is_seeded():
    facts = [(f"f{i}", "") for i in range(6)]
    extra = [(f"x{i}", "") for i in range(4)]
    mixed = mix_in(facts, extra, seed=3)
    assert [p for p in mixed if p in facts] == facts and [p for p in mixed if p in extra] == extra
    assert mix_in(facts, extra, seed=3) == mixed
    assert len({tuple(mix_in(facts, extra, seed=s)) for s in range(10)}) > 1
    assert mix_in(facts, [], seed=3) == facts


class Untouchable:
    """A model source that fails the test if anything loads a model from it."""

    tokenizer = None

    def fresh(self):
        raise AssertionError("a model was loaded before the input was checked")


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be"), ({"n_rehearsal": -1}, "n_rehearsal must be"),
    ({"negative": ("palora:protect=best",)}, "protect must be one of"),
    ({"negative": ("lora",)}, "label of an arm"), ({"negative": ("palora", "palora")}, "each once"),
    ({"negative": ("corda",)}, "cannot be used here"), ({"negative": ("palora:fraction=2",)}, "rho"),
    ({"settings": RegimeSettings(lr=0.0)}, "lr"),
])
def test_bad_input_fails_before_any_work(probe, monkeypatch, kwargs, message):
    monkeypatch.setattr(regime_module, "train_adapter", Untouchable().fresh)
    args = {"n": N, "n_rehearsal": N_REHEARSAL, "settings": SETTINGS, **kwargs}
    with pytest.raises(InputError, match=message) as err:
        measure_controls(Untouchable(), load_task("math"), probe, progress=False, **args)
    assert "\n" not in str(err.value)


def test_a_probe_of_other_weights_fails_before_any_training(checkpoint, probe, monkeypatch):
    monkeypatch.setattr(regime_module, "train_adapter", Untouchable().fresh)
    monkeypatch.setattr(controls, "skill_accuracy", Untouchable().fresh)
    other = Probe(probe.scales, {n: {**ident, "hash": "0" * 64} for n, ident in probe.base.items()})
    with pytest.raises(InputError, match="hash mismatch"):
        measure_controls(ModelSource(checkpoint), load_task("math"), other, SETTINGS, n=N, n_rehearsal=N_REHEARSAL,
                         progress=False)
