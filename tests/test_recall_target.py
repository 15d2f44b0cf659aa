"""Knowledge injection at matched recall (criterion (d) of docs/lab.md): with ``InjectSettings.recall_target`` training
stops at the first recall check that reaches the target, and the model at that step is the result; without a target
the training is bitwise the fixed-epoch one; the checks themselves do not perturb training; a stopped run resumes from
its checkpoint bitwise; bad settings are refused before any training.

A tiny random Llama (hidden 32, 2 layers) learns 4 held-out organism facts with LoRA r=4 on every linear layer at
lr 3e-3, one fact per step: recall climbs from 0 through 0.25 and 0.5 within a few hundred steps."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_tokenizer
from spectral_peft.data import World, as_qa
from spectral_peft.errors import InputError
from spectral_peft.evaluation.injection import EvalSettings, Suite
from spectral_peft.evaluation.knowledge import recall
from spectral_peft.evaluation.knowledge_split import KnowledgeSplit
from spectral_peft.methods import parse_method
from spectral_peft.organism import tiny_random_model
from spectral_peft.training import injection
from spectral_peft.training.adapter import FinetuneSettings, train_adapter
from spectral_peft.training.injection import InjectSettings, train_injection

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = parse_method("lora:r=4,targets=all-linear")
CAP_EPOCHS = 100  # 4 facts, batch 1: 400 steps at most


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def suite():
    facts = [as_qa(f) for f in World().heldout_facts[:4]]
    return Suite(KnowledgeSplit(facts), {"math": (None, [])}, [], EvalSettings())


def base(tok):
    return tiny_random_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


def inject(tok, suite, **settings):
    kw = dict(epochs=CAP_EPOCHS, lr=3e-3, batch_size=1, check_every=4) | settings
    checkpoint = {k: kw.pop(k) for k in ("checkpoint_dir", "checkpoint_every") if k in kw}
    return train_injection(base(tok), tok, SPEC, suite, InjectSettings(**kw), seed=0, probe=None, progress=False,
                           **checkpoint)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_weights(a, b) -> bool:
    wa, wb = trainable(a), trainable(b)
    return wa.keys() == wb.keys() and len(wa) > 0 and all(torch.equal(wa[n], wb[n]) for n in wa)


def test_training_stops_at_the_first_check_that_reaches_the_target(tok, suite):
    target, every = 0.5, 4
    model, history = inject(tok, suite, recall_target=target, check_every=every)
    checks = history.validation
    cap = CAP_EPOCHS * len(suite.split.inject)
    assert history.reached_stop_score is True
    assert history.steps < cap  # stopped early
    assert [c["step"] for c in checks] == list(range(every, history.steps + 1, every))  # every check_every steps
    assert checks[-1]["step"] == history.steps and checks[-1]["score"] >= target
    assert len(checks) >= 2 and all(c["score"] < target for c in checks[:-1])  # the first check to reach it
    assert len(history.losses) == history.steps
    # the returned model is the one at the stop: its recall is the recorded one (not a better or later state)
    assert recall(model, tok, suite.split.inject, progress=False).accuracy == checks[-1]["score"]


def test_a_target_not_reached_within_the_cap_is_reported(tok, suite):
    model, history = inject(tok, suite, epochs=5, recall_target=1.0, check_every=4)
    assert history.reached_stop_score is False
    assert history.steps == 5 * len(suite.split.inject)  # trained to the cap
    assert history.validation[-1]["step"] == history.steps and history.validation[-1]["score"] < 1.0
    # the recall checks do not perturb training: the weights are bitwise those of a run without checks
    plain, plain_history = inject(tok, suite, epochs=5)
    assert same_weights(model, plain) and history.losses == plain_history.losses


def test_no_target_is_the_fixed_epoch_training_bitwise(tok, suite):
    model, history = inject(tok, suite, epochs=10, recall_target=0.0)
    pairs = suite.split.training_pairs()
    settings = FinetuneSettings(n_train=len(pairs), n_eval=1, epochs=10, lr=3e-3, batch_size=1)
    reference, reference_history = train_adapter(base(tok), tok, SPEC, pairs, settings, seed=0, progress=False)
    assert same_weights(model, reference)
    assert history.steps == reference_history.steps == 10 * len(pairs)
    assert history.losses == reference_history.losses
    assert history.validation == [] and history.reached_stop_score is None


class Crash(Exception):
    """The simulated interruption."""


def test_a_run_with_a_target_resumes_bitwise(tok, suite, tmp_path, monkeypatch):
    reference, reference_history = inject(tok, suite, recall_target=0.5)
    ckpt = tmp_path / "ckpt"
    calls = []

    def crashing_recall(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the check at step 12; the checkpoint at step 8 holds the first two
            raise Crash
        return recall(*args, **kwargs)

    monkeypatch.setattr(injection, "recall", crashing_recall)
    with pytest.raises(Crash):
        inject(tok, suite, recall_target=0.5, checkpoint_dir=ckpt, checkpoint_every=4)
    monkeypatch.setattr(injection, "recall", recall)
    assert [p.name for p in ckpt.glob("step-*")] == ["step-00000008"]
    with pytest.raises(InputError, match="another training run"):  # another target is another run
        inject(tok, suite, recall_target=0.75, checkpoint_dir=ckpt, checkpoint_every=4)
    model, history = inject(tok, suite, recall_target=0.5, checkpoint_dir=ckpt, checkpoint_every=4)
    assert same_weights(model, reference)
    assert history.validation == reference_history.validation and history.losses == reference_history.losses
    assert (history.steps, history.reached_stop_score) == (reference_history.steps, True)
    assert not ckpt.exists()


@pytest.mark.parametrize("bad", [dict(recall_target=-0.1), dict(recall_target=1.5), dict(recall_target=math.nan),
                                 dict(check_every=0), dict(check_every=-3)])
def test_bad_settings_are_refused_before_training(suite, bad):
    settings = InjectSettings(**bad)
    with pytest.raises(InputError) as err:
        settings.validate()
    assert "\n" not in str(err.value)
    with pytest.raises(InputError):  # base=None: any training would fail otherwise
        train_injection(None, None, SPEC, suite, settings, seed=0, probe=None, progress=False)


def test_a_target_needs_injected_facts():
    empty = Suite(KnowledgeSplit([]), {"math": (None, [])}, [], EvalSettings())
    with pytest.raises(InputError, match="injected facts"):
        train_injection(None, None, SPEC, empty, InjectSettings(recall_target=0.5), seed=0, probe=None)
