"""Matched task gain (docs/lab.md (d)): with ``FinetuneSettings.stop_at`` a fine-tune ends at the first validation
check whose task accuracy reaches it, and trains to the cap when none does; the check reads the task's validation
split, which is disjoint from its training and test examples; the recipes that fine-tune on a task (and edit, at an
edit success) record where each run ended, and bad settings are refused before any work.

Known answers come from a task whose checker is fixed (every output right, or every output wrong), so the stop step
is known exactly: the first check, at step ``check_every``, or the cap."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import save_tiny_organism, tiny_tokenizer

from spectral_peft.data import get_task
from spectral_peft.errors import InputError
from spectral_peft.methods import parse_method
from spectral_peft.organism import tiny_random_model
from spectral_peft.recipes import drift, edit, execute
from spectral_peft.training.adapter import FinetuneSettings, train_adapter
from spectral_peft.training.matched_gain import task_stop

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = parse_method("lora:r=2,targets=mlp")


class FixedChecker:
    """An organism task whose checker answers ``verdict`` whatever the output."""

    def __init__(self, name: str, verdict: bool):
        self.inner, self.verdict = get_task(name), verdict
        self.name, self.max_new_tokens = self.inner.name, 2
        self.seen: list[str] = []

    def examples(self, split, n=None, seed=0, difficulty=None):
        out = self.inner.examples(split, n=n, seed=seed, difficulty=difficulty)
        if split == "val":
            self.seen += [e.prompt for e in out]
        return out

    def check(self, output, example) -> bool:
        return self.verdict


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def fit(tok, task, settings):
    pairs = [(e.prompt, e.target) for e in task.examples("train", n=settings.n_train)]
    model = tiny_random_model(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    return train_adapter(model, tok, SPEC, pairs, settings, seed=0, progress=False,
                         **task_stop(task, tok, settings, max_new_tokens=2))[1]


SETTINGS = FinetuneSettings(n_train=16, n_eval=2, epochs=3, batch_size=4, lr=1e-3, check_every=2, n_val=3)


def test_stops_at_the_first_check_that_reaches_the_target(tok):
    history = fit(tok, FixedChecker("sort", True), replace(SETTINGS, stop_at=0.5))
    assert history.reached_stop_score is True and history.steps == 2  # the first check, at step check_every
    assert [v["score"] for v in history.validation] == [1.0]


def test_trains_to_the_cap_when_no_check_reaches_it(tok):
    task = FixedChecker("sort", False)
    history = fit(tok, task, replace(SETTINGS, stop_at=0.5))
    assert history.reached_stop_score is False and history.steps == 12  # 16 pairs / batch 4 x 3 epochs
    assert all(v["score"] == 0.0 for v in history.validation) and len(history.validation) >= 6
    # the checks read the validation split, disjoint from the training and test examples
    val = set(task.seen)
    assert len(val) == 3
    assert not val & {e.prompt for e in task.examples("train", n=2000)}
    assert not val & {e.prompt for e in task.examples("test", n=500)}


def test_without_stop_at_nothing_is_checked(tok):
    assert task_stop(get_task("sort"), tok, SETTINGS, 2) == {}
    history = fit(tok, FixedChecker("sort", True), SETTINGS)
    assert history.reached_stop_score is None and history.steps == 12 and history.validation == []


@pytest.mark.parametrize("bad", [{"stop_at": 0.0}, {"stop_at": 1.5}, {"check_every": 0}, {"n_val": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        FinetuneSettings(**bad)


def test_edit_stops_at_an_edit_success(tmp_path):
    checkpoint = save_tiny_organism(tmp_path / "organism", num_layers=2)
    settings = FinetuneSettings(epochs=2, lr=1e-3, batch_size=8, max_new_tokens=2, stop_at=1.0, check_every=1)
    cfg = edit.Config(methods="lora", model=checkpoint, seeds=(0,), r=2, k=4, targets="mlp", train=settings,
                      n_edits=8, n_local=4, n_skill=1, skills=("math",), progress=False)
    out = tmp_path / "edit"
    execute("edit", cfg, out)
    runs = json.loads((out / "metrics.json").read_text())["methods"]["lora"]["runs"]
    # a random tiny model cannot learn 8 edits in 2 steps: no check reaches 100%, so it trains to its cap
    assert runs[0]["stop"] == {"steps": 2, "reached_stop_at": False}
    assert "2 (2-2), 0/1 at stop_at" in (out / "report.md").read_text()


def test_drift_records_where_each_fine_tune_ended(tmp_path):
    checkpoint = save_tiny_organism(tmp_path / "organism", num_layers=2)
    settings = FinetuneSettings(n_train=16, n_eval=2, epochs=2, batch_size=8, lr=1e-3, max_new_tokens=2,
                                stop_at=1.0, check_every=1, n_val=2)
    cfg = drift.Config(methods="lora", model=checkpoint, seeds=(0,), r=2, k=4, targets="mlp", train=settings,
                       n_ppl=2, n_skill=1, n_facts=2, progress=False)
    out = tmp_path / "drift"
    execute("drift", cfg, out)
    stops = json.loads((out / "metrics.json").read_text())["methods"]["lora"]["training"]
    # a random tiny model cannot sort: no check reaches 100%, so the run trains to its cap of 4 steps
    assert stops == [{"steps": 4, "reached_stop_at": False}]
    assert "4 (4-4), 0/1 at stop_at" in (out / "report.md").read_text()
