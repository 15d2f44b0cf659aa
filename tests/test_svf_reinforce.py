"""The SVF expert's REINFORCE with sampled rollouts and a group-mean baseline, and best-state selection with step 0
(the base) as a candidate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spectral_peft import get_peft_model, method_config
from spectral_peft.data import Example, load_task
from spectral_peft.errors import InputError
from spectral_peft.organism import tiny_random_model
from spectral_peft.training import svf_expert
from spectral_peft.training.objectives import ReinforceObjective, group_advantages
from spectral_peft.training.svf_expert import SVFSettings, check_objective, train_svf_expert

from helpers import PAIRS, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny(tok):
    return tiny_random_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


class AlwaysRight:
    name = "stub"

    def check(self, output, example):
        return True


def test_group_advantage_is_reward_minus_the_group_mean():
    same = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    assert torch.equal(group_advantages(same, 3), torch.zeros(6))
    mixed = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    adv = group_advantages(mixed, 4)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -1.5, 0.5]))
    assert torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2))
    assert torch.equal(group_advantages(mixed, 4, baseline="none"), mixed)
    with pytest.raises(InputError, match="baseline"):
        group_advantages(mixed, 4, baseline="max")


def test_group_baseline_gives_no_gradient_when_every_sample_gets_the_same_reward(tok):
    model = get_peft_model(tiny(tok), method_config("svf"), progress=False)
    examples = [Example(prompt=p, target=t, answer=t.strip()) for p, t in PAIRS]
    grouped = ReinforceObjective(tok, AlwaysRight(), max_new_tokens=6, samples=3, temperature=1.0, baseline="group")
    torch.manual_seed(0)
    outputs, rewards = grouped.rollouts(model, examples)
    assert len(outputs) == 3 * len(examples) and rewards.tolist() == [1.0] * len(outputs)
    assert any(len(set(outputs[3 * i:3 * i + 3])) > 1 for i in range(len(examples)))  # samples, not greedy copies
    torch.manual_seed(0)
    assert grouped.rollouts(model, examples)[0] == outputs  # seeded from torch's generator: reproducible

    loss, logs = grouped.loss(model, examples)
    loss.backward()
    assert loss.item() == 0.0 and logs["uniform_groups"] == 1.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.count_nonzero(g) == 0 for g in grads)

    model.zero_grad()
    plain = ReinforceObjective(tok, AlwaysRight(), max_new_tokens=6, samples=3, temperature=1.0, baseline="none")
    loss, _ = plain.loss(model, examples)
    loss.backward()
    assert loss.item() > 0  # without the baseline the same rollouts do push the likelihood
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.parameters() if p.requires_grad)


def test_bad_reinforce_settings_fail_at_once(tok):
    with pytest.raises(InputError, match="samples"):
        ReinforceObjective(tok, AlwaysRight(), samples=0)
    with pytest.raises(InputError, match="baseline"):
        ReinforceObjective(tok, AlwaysRight(), baseline="mean")
    with pytest.raises(InputError, match="samples must be >= 2"):
        SVFSettings(samples=1).validate()
    with pytest.raises(InputError, match="unknown objective"):
        check_objective("grpo")


def scripted_evaluator(scores):
    """A stand-in for ``skill_accuracy`` whose k-th call scores ``scores(k)`` on every example (call 0: the base)."""
    calls = []

    def evaluate(model, tokenizer, task, examples, max_new_tokens, progress):
        score = scores(len(calls))
        calls.append(score)
        return SimpleNamespace(accuracy=score, correct=[score] * len(examples))

    return evaluate, calls


def expert(tok, monkeypatch, scores, objective="sft", keep="best"):
    evaluate, calls = scripted_evaluator(scores)
    monkeypatch.setattr(svf_expert, "skill_accuracy", evaluate)
    task = load_task("math")
    settings = SVFSettings(n_train=16, n_val=4, batch_size=4, eval_every=1, lr=0.2, max_new_tokens=6, keep=keep)
    return train_svf_expert(tiny(tok), tok, task, settings, objective, seed=0, progress=False), calls


def test_the_base_is_kept_when_training_only_hurts(tok, monkeypatch):
    trained, calls = expert(tok, monkeypatch, lambda k: 1.0 if k == 0 else 0.5)
    assert len(calls) == 1 + 4  # the base, then steps 1-4
    h = trained.history
    assert h.best_step == 0 and h.best_score == 1.0
    assert h.validation[0] == {"step": 0, "score": 1.0, "accuracy": 1.0}
    assert trained.val_correct == trained.base_val_correct == [1.0] * 4
    assert all(torch.equal(z, torch.ones_like(z)) for z in trained.probe.scales.values())  # z = 1: the base
    assert trained.metrics(1)["best_step"] == 0


def test_a_trained_step_that_beats_the_base_is_kept(tok, monkeypatch):
    trained, _ = expert(tok, monkeypatch, lambda k: [0.25, 0.5, 1.0, 0.75, 0.5][k])
    h = trained.history
    assert h.best_step == 2 and [v["step"] for v in h.validation] == [0, 1, 2, 3, 4]
    assert trained.val_correct == [1.0] * 4 and trained.base_val_correct == [0.25] * 4
    assert any(not torch.equal(z, torch.ones_like(z)) for z in trained.probe.scales.values())


def test_a_null_probe_keeps_the_last_state_even_when_the_base_scores_higher(tok, monkeypatch):
    trained, _ = expert(tok, monkeypatch, lambda k: [1.0, 0.5, 0.75, 0.25, 0.0][k], keep="last")
    h = trained.history
    assert h.best_step == 4 and h.best_score == 0.0 and [v["step"] for v in h.validation] == [0, 1, 2, 3, 4]
    assert trained.val_correct == [0.0] * 4 and trained.base_val_correct == [1.0] * 4
    assert any(not torch.equal(z, torch.ones_like(z)) for z in trained.probe.scales.values())
    with pytest.raises(InputError, match="keep"):
        SVFSettings(keep="first").validate()


def test_a_tie_with_the_base_keeps_the_earliest_best_trained_step(tok, monkeypatch):
    trained, _ = expert(tok, monkeypatch, lambda k: 0.5)
    assert trained.history.best_step == 1
    assert any(not torch.equal(z, torch.ones_like(z)) for z in trained.probe.scales.values())


def test_reinforce_group_trains_an_expert_with_sampled_rollouts(tok, monkeypatch):
    trained, _ = expert(tok, monkeypatch, lambda k: k / 10, objective="reinforce-group")
    logs = trained.history.logs
    assert len(logs) == 4 and all("uniform_groups" in log and 0 <= log["uniform_groups"] <= 1 for log in logs)
    assert trained.history.best_step == 4
