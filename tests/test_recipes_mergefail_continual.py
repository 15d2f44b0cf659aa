"""The mergefail and continual recipes: end to end on a tiny organism (Python and CLI), known answers on planted
effects, distinct-evaluation counting, and resumption without retraining."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import save_tiny_organism

from spectral_peft.cli import main
from spectral_peft.evaluation.continual import backward_transfer, run_continual
from spectral_peft.evaluation.mergefail import mergefail, sample_instances, summarize
from spectral_peft.evaluation.stats import wilson_ci
from spectral_peft.methods import parse_method
from spectral_peft.recipes import continual, execute, mergefail as mergefail_recipe
from spectral_peft.runs import RunDir
from spectral_peft.training.adapter import FinetuneSettings

TINY = FinetuneSettings(n_train=8, n_eval=3, epochs=1, batch_size=8, lr=2e-3, max_new_tokens=4)
SMALL = ["--r", "2", "--k", "2", "--train.n-train", "8", "--train.n-eval", "2", "--train.max-new-tokens", "4",
         "--progress", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism-mf"))


def counting(monkeypatch, module, fail_at: int | None = None) -> list[str]:
    """Replace ``module.train_adapter`` by a wrapper that records each call (and raises on call ``fail_at``)."""
    calls: list[str] = []
    real = module.train_adapter

    def train_adapter(*args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        if len(calls) == fail_at:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train_adapter", train_adapter)
    return calls


# --- MergeFail: planted deltas and scores -------------------------------------------------------------------------

TASKS = ("a", "b", "c", "d")


class Diagonal(nn.Module):
    """Task ``j``'s score is ``W[j, j]`` of a zero-initialised 4 x 4 weight."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)
        nn.init.zeros_(self.lin.weight)


def planted(destroy: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter adds 1 on its own task's entry; a destroying one also subtracts 1 from every other task's."""
    out = {}
    for j, task in enumerate(TASKS):
        dW = -torch.eye(4) if destroy else torch.zeros(4, 4)
        dW[j, j] = 1.0
        out[task] = {"lin": dW}
    return out


def test_planted_merges_give_known_fail_rates_over_distinct_evaluations():
    seeds, n_merge, operators = (42, 100, 2024), 20, ("sum", "ties")
    evaluate = lambda model, task: float(model.lin.weight.detach()[TASKS.index(task), TASKS.index(task)])  # noqa: E731
    results = [mergefail({s: planted(destroy) for s in seeds}, None, evaluate, Diagonal(), method=name, seeds=seeds,
                         operators=operators, n_merge=n_merge, density=1.0, progress=False)
               for name, destroy in (("orthogonal", False), ("destroying", True))]
    summary = summarize(results)
    rates = {(r.method, r.operator, r.t): r for r in summary.rates}
    # distinct (seed, subset, operator) triples, straight from the sampler
    triples = {(s, subset, op) for s, t, op in product(seeds, (2, 3, 4), operators)
               for subset in sample_instances(TASKS, t, n_merge, s)}
    for op in operators:
        # every merge of destroying adapters leaves each task at 1 - (t - 1) <= 0 (sum) or 0 / -1 (TIES) < 0.9
        assert rates["destroying", op, None].rate.estimate == 1.0
        assert rates["orthogonal", op, None].rate.estimate == 0.0
        n_op = sum(1 for *_, o in triples if o == op)  # 33: the interval counts distinct evaluations, not 180 draws
        assert rates["orthogonal", op, None].rate.high == pytest.approx(wilson_ci(0, n_op).high)
        for t in (2, 3, 4):
            assert rates["destroying", op, t].rate.estimate == 1.0 and rates["orthogonal", op, t].rate.estimate == 0.0
            assert rates["destroying", op, t].n_distinct == sum(1 for s, x, o in triples if o == op and len(x) == t)
        pooled = rates["destroying", op, None]
        assert pooled.n == len(seeds) * n_merge * 3
        assert pooled.n_distinct == pooled.n_used == n_op
        diff = next(d.difference for d in summary.differences
                    if (d.method, d.reference, d.operator, d.t) == ("destroying", "orthogonal", op, None))
        assert (diff.estimate, diff.low, diff.high) == (1.0, 1.0, 1.0)
    retention = {(r.method, r.operator): r.retention for r in summary.retention}
    assert (retention["orthogonal", "sum"].estimate, retention["orthogonal", "sum"].low) == (1.0, 1.0)


# --- continual: planted train/evaluate pairs ----------------------------------------------------------------------

class Learner(nn.Module):
    """Answers each task's ``N`` examples with 1 where it knows them."""

    N = 4

    def __init__(self):
        super().__init__()
        self.known: set[str] = set()


def wipe(model, task):
    """A stage that learns its task and wipes every earlier one."""
    model.known = {task}
    return model


def learn_and_keep(model, task):
    model.known = model.known | {task}
    return model


def answer(model, task):
    return [float(task in model.known)] * Learner.N


def planted_result(train_stages: dict[str, object], seeds=(0, 1), tasks=("a", "b", "c")) -> continual.Result:
    outcomes = {label: [run_continual(Learner(), list(tasks), stage, answer).outcomes for _ in seeds]
                for label, stage in train_stages.items()}
    return continual.Result(specs=[parse_method(label) for label in train_stages], tasks=list(tasks),
                            seeds=list(seeds), settings=TINY, base_correct={t: [0.0] * Learner.N for t in tasks},
                            outcomes=outcomes, budget_use_max={label: [[None] * len(tasks)] * len(seeds)
                                                               for label in train_stages},
                            stops={label: [[{"steps": 1, "reached_stop_at": None}] * len(tasks)] * len(seeds)
                                   for label in train_stages},
                            budget_counts=[])


def test_planted_continual_stages_give_exact_backward_transfer(tmp_path):
    result = planted_result({"lora": wipe, "hiplora": learn_and_keep})
    wiped, kept = result.backward_transfer("lora"), result.backward_transfer("hiplora")
    assert (wiped.estimate, wiped.low, wiped.high) == (-1.0, -1.0, -1.0)
    assert (kept.estimate, kept.low, kept.high) == (0.0, 0.0, 0.0)
    assert result.accuracy("lora").estimate == pytest.approx(1 / 3) and result.accuracy("hiplora").estimate == 1.0
    diff = result.vs_reference("hiplora")
    assert (diff["BWT"].estimate, diff["BWT"].low, diff["BWT"].high) == (1.0, 1.0, 1.0)
    assert diff["ACC"].estimate == pytest.approx(2 / 3)
    noop = planted_result({"lora": lambda model, task: model})  # a stage that changes nothing
    assert noop.backward_transfer("lora").estimate == 0.0 and noop.accuracy("lora").estimate == 0.0
    run = RunDir(tmp_path / "planted", "continual")
    summary = continual.render(result, run)
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["methods"]["lora"]["backward_transfer"]["estimate"] == -1.0
    assert m["methods"]["lora"]["backward_transfer_per_seed"] == [-1.0, -1.0]
    assert m["methods"]["hiplora"]["vs_reference"]["BWT"]["estimate"] == 1.0 and "BWT -100.0" in summary
    assert (run.path / "figures" / "accuracy_matrix_1.png").exists()


# --- end to end ---------------------------------------------------------------------------------------------------

def test_mergefail_end_to_end_resumes_without_retraining(checkpoint, tmp_path, monkeypatch):
    seeds, tasks, n_merge = (42, 100), ("count", "max", "reverse@3"), 3
    cfg = mergefail_recipe.Config(methods="lora,hiplora", tasks=tasks, model=checkpoint, seeds=seeds, r=2, k=2,
                                  n_merge=n_merge, train=TINY, progress=False)
    out, total = tmp_path / "mf", 2 * len(seeds) * len(tasks)
    calls = counting(monkeypatch, mergefail_recipe, fail_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        execute("mergefail", cfg, out)
    assert not out.exists() and (tmp_path / ".mf.partial").is_dir() and len(calls) == 3
    monkeypatch.undo()
    calls = counting(monkeypatch, mergefail_recipe)
    result, summary = execute("mergefail", cfg, out, mode="resume")
    assert len(calls) == total - 2  # the two adapters finished before the kill are reloaded
    m = json.loads((out / "metrics.json").read_text())
    adapters = sorted(p.parent for p in (out / "adapters").rglob("adapter_config.json"))
    assert len(adapters) == total
    # per-instance outcomes: the fail rule on the recorded merged and single scores
    for label, instances in m["items"]["instances"].items():
        assert len(instances) == len(seeds) * 2 * n_merge * 2  # seeds x sizes {2, 3} x draws x operators
        for i in instances:
            single = {t: np.mean(m["items"]["single_correct"][label][str(i["seed"])][t]) for t in i["tasks"]}
            assert i["single"] == pytest.approx(single)
            assert i["failed"] == any(i["scores"][t] < 0.9 * single[t] for t in i["tasks"])
    triples = {(s, x, op) for s, t, op in product(seeds, (2, 3), ("sum", "ties"))
               for x in sample_instances(tasks, t, n_merge, s)}
    for r in m["summary"]["rates"]:
        assert r["n_distinct"] == sum(1 for s, x, op in triples if op == r["operator"] and r["t"] in (None, len(x)))
        assert 0 <= r["rate"]["low"] <= r["rate"]["estimate"] <= r["rate"]["high"] <= 1
    assert {(d["method"], d["reference"]) for d in m["summary"]["differences"]} == {("hiplora", "lora")}
    assert "hiplora|sum: fail rate" in summary and (out / "figures" / "mergefail.png").exists()
    # resuming the complete run retrains nothing and writes no adapter
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")}
    calls.clear()
    again, _ = execute("mergefail", cfg, out, mode="resume")
    assert calls == [] and {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")} == stamps
    assert [r.instances for r in again.results] == [r.instances for r in result.results]


def test_continual_end_to_end_and_resume(checkpoint, tmp_path, monkeypatch):
    seeds, tasks = (0, 1), ("reverse", "sort", "max")
    cfg = continual.Config(methods="lora,hiplora", tasks=tasks, model=checkpoint, seeds=seeds, r=2, k=2, train=TINY,
                           progress=False)
    calls = counting(monkeypatch, continual)
    result, summary = execute("continual", cfg, tmp_path / "c")
    assert len(calls) == 2 * len(seeds) * len(tasks)
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    for label, pm in m["methods"].items():
        O = np.asarray(m["items"]["outcomes"][label])
        assert O.shape == (len(seeds), 3, 3, TINY.n_eval) and set(np.unique(O)) <= {0.0, 1.0}
        assert np.allclose(pm["R"], O.mean(axis=(0, 3)))
        assert pm["final_average_accuracy"]["estimate"] == pytest.approx(np.mean(pm["R"][-1]))
        assert pm["backward_transfer"]["estimate"] == pytest.approx(backward_transfer(pm["R"]))
    assert m["methods"]["lora"]["vs_reference"] is None and set(m["methods"]["hiplora"]["vs_reference"]) == {"ACC",
                                                                                                           "BWT"}
    assert len(list((tmp_path / "c" / "figures").glob("accuracy_matrix_*.png"))) == 2 and "hiplora: ACC" in summary
    calls.clear()
    again, _ = execute("continual", cfg, tmp_path / "c", mode="resume")
    assert calls == [] and again.outcomes == result.outcomes


@pytest.mark.parametrize("name, preset", [("mergefail", mergefail_recipe.QUICK), ("continual", continual.QUICK)])
def test_quick_through_the_cli_is_recorded(checkpoint, tmp_path, capsys, name, preset):
    out = tmp_path / name
    assert main([name, "--quick", "--model", checkpoint, "--out", str(out), *SMALL]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for key, value in preset.items():
        head, _, rest = key.partition(".")
        if key not in ("train.n_train", "train.n_eval"):  # given on the command line, which wins over the preset
            got = cfg[head][rest] if rest else cfg[head]
            assert got == (list(value) if isinstance(value, tuple) else value), key
    assert cfg["train"]["n_train"] == 8 and cfg["r"] == 2
    assert main([name, "--quick", "--model", checkpoint, "--out", str(out), *SMALL]) == 2  # refuses to overwrite
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["mergefail", "--tasks", "sort"], "MergeFail needs at least 2 distinct tasks"),
    (["mergefail", "--operators", "sum,mean"], "unknown or repeated merge operator"),
    (["mergefail", "--tau", "1.5"], "tau must be in (0, 1]"),
    (["mergefail", "--methods", "lora,palora"], "cannot be used here"),
    (["continual", "--tasks", "sort,nosuch"], "unknown task 'nosuch'"),
    (["continual", "--tasks", "sort,sort"], "at least 2 distinct tasks"),
    (["continual", "--seeds", "a,b"], "seeds"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".never.partial").exists()
