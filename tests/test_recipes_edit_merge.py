"""The edit and merge recipes: planted known answers, and end-to-end runs on a tiny organism through
``recipes.execute`` and the command line (exit codes, one-line errors, ``--quick`` in config.yaml)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import save_tiny_organism

from spectral_peft.cli import main
from spectral_peft.data import World, as_qa
from spectral_peft.evaluation.editing import as_case, evaluate_editing, load_edits, locality_facts
from spectral_peft.loading import load_model
from spectral_peft.methods import MethodSpec, build_model, parse_method
from spectral_peft.model import load_adapter
from spectral_peft.recipes import edit, execute, merge
from spectral_peft.runs import RunDir
from spectral_peft.training.adapter import FinetuneSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = FinetuneSettings(epochs=1, lr=1e-2, batch_size=8, max_new_tokens=4)
SMALL = ["--r", "4", "--k", "4", "--n-edits", "2", "--n-local", "3", "--n-skill", "1", "--train.epochs", "1",
         "--train.max-new-tokens", "4", "--progress", "false"]
ROWS = [{"question": "Who wrote the Velmora saga?", "old_answer": "Tasrin", "new_answer": "Bolvek",
         "paraphrases": ["The Velmora saga was written by whom?", "Name the author of the Velmora saga."]},
        {"question": "What colour is the Kesh flag?", "old_answer": "green", "new_answer": "purple",
         "paraphrases": ["Which colour does the Kesh flag have?"]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism-edit-merge"))


@pytest.fixture
def edits_file(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def one_line_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err


# --- edit: planted answer functions ------------------------------------------------------------------------------

WORLD = World(n_known=20, n_heldout=5, n_edits=4)


class Planted(nn.Module):
    """A stand-in model: answers from a table ('?' when it does not know) and solves the skill problems in
    ``solved``."""

    def __init__(self, table, solved):
        super().__init__()
        self.table, self.solved = dict(table), list(solved)


def answer(model, questions):
    return [model.table.get(q, "?") for q in questions]


SKILLS = {"math": lambda m: m.solved[:3], "code": lambda m: m.solved[3:]}


def planted_pair(cases, unrelated):
    """The model before the edit (old answers everywhere) and one that answers every edited question and paraphrase
    with the new value and everything else as before."""
    base = {q: f.answer for f in unrelated for q in (as_qa(f).question, *as_qa(f).paraphrases)}
    base.update({q: c.old_answer for c in cases for q in (c.question, *c.paraphrases)})
    after = {**base, **{q: f"It is {c.new_answer}." for c in cases for q in (c.question, *c.paraphrases)}}
    return Planted(base, [1, 0, 1, 1, 1]), Planted(after, [1, 0, 1, 1, 1])


def test_planted_edit_is_perfect_and_one_changed_fact_costs_one_over_n_local():
    edits = WORLD.edits
    unrelated = locality_facts(WORLD.known_facts, edits)
    before, after = planted_pair([as_case(e) for e in edits], unrelated)
    res = evaluate_editing(before, after, edits, unrelated, answer, SKILLS)
    assert res.edit_success == [1.0] * len(edits) and res.paraphrase_generalisation == [1.0] * len(edits)
    assert res.locality == [1.0] * len(unrelated) and res.old_answer_before == [1.0] * len(edits)
    assert res.skill_preservation == {"code": 1.0, "math": 1.0} and res.mean_skill_preservation == 1.0
    after.table[as_qa(unrelated[3]).question] = "somewhere else"
    changed = evaluate_editing(before, after, edits, unrelated, answer, SKILLS)
    assert np.mean(changed.locality) == pytest.approx(np.mean(res.locality) - 1 / len(unrelated), abs=1e-12)
    assert changed.edit_success == res.edit_success and changed.skills_after == res.skills_after


def planted_result(n_local_changed: int) -> tuple[edit.Result, int]:
    """An edit Result whose second method is the planted perfect editor with ``n_local_changed`` unrelated facts
    changed, and whose reference (first) method never edits."""
    cases = [as_case(e) for e in WORLD.edits]
    unrelated = locality_facts(WORLD.known_facts, WORLD.edits)
    before, after = planted_pair(cases, unrelated)
    for f in unrelated[:n_local_changed]:
        after.table[as_qa(f).question] = "changed"
    outcomes = {"none": evaluate_editing(before, before, cases, unrelated, answer, SKILLS),
                "planted": evaluate_editing(before, after, cases, unrelated, answer, SKILLS)}
    items = {label: {"edit_success": [r.edit_success], "paraphrase": [r.paraphrase_generalisation],
                     "locality": [r.locality], "skill": [r.skills_after["math"] + r.skills_after["code"]]}
             for label, r in outcomes.items()}
    r = outcomes["planted"]
    result = edit.Result(
        specs=[MethodSpec(label="none"), MethodSpec(method="hiplora", label="planted")], task="organism", seeds=[0],
        edits=cases, skills=["math", "code"], skill_sizes=[3, 2], items=items,
        base={"old_answer": r.old_answer_before, "locality_correct": r.locality_correct_before,
              "skill": r.skills_before["math"] + r.skills_before["code"]},
        runs={label: [{"seed": 0, "losses": [1.0, 0.5], "stop": {"steps": 2, "reached_stop_at": None}}]
             for label in outcomes}, budget_counts=[],
        n_local=len(unrelated), settings=TINY)
    return result, len(unrelated)


def test_recipe_statistics_on_planted_outcomes(tmp_path):
    result, n_local = planted_result(n_local_changed=1)
    assert result.ci("planted", "edit_success").estimate == 1.0 and result.ci("none", "edit_success").estimate == 0
    assert result.ci("planted", "paraphrase").estimate == 1.0
    assert result.ci("planted", "locality").estimate == pytest.approx(1 - 1 / n_local)
    assert result.vs_reference("planted", "locality").estimate == pytest.approx(-1 / n_local)
    assert result.vs_reference("planted", "edit_success").estimate == 1.0
    assert result.skill_change("planted").estimate == 0 and result.preservation("planted") == {"code": 1.0, "math": 1.0}
    run = RunDir(tmp_path / "planted", "edit")
    summary = edit.render(result, run)
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["methods"]["planted"]["ci"]["locality"]["estimate"] == pytest.approx(1 - 1 / n_local)
    assert m["methods"]["none"]["vs_reference"] is None and m["methods"]["planted"]["mean_skill_preservation"] == 1
    assert "planted: edit success 100.0%" in summary and (run.path / "figures" / "editing.png").exists()


def test_jsonl_paraphrases_are_used_for_generalisation(edits_file):
    cases = load_edits(edits_file)
    assert [c.question for c in cases] == [r["question"] for r in ROWS]
    assert [list(c.paraphrases) for c in cases] == [r["paraphrases"] for r in ROWS]
    before = Planted({q: c.old_answer for c in cases for q in (c.question, *c.paraphrases)}, [1, 1, 1, 1, 1])
    # edit 0 generalises to one of its two paraphrases, edit 1 to none; both trained questions are edited
    after = Planted({**before.table, **{c.question: c.new_answer for c in cases},
                     ROWS[0]["paraphrases"][1]: "Bolvek"}, before.solved)
    res = evaluate_editing(before, after, cases, locality_facts(WORLD.known_facts, cases)[:5], answer, SKILLS)
    assert res.edit_success == [1.0, 1.0] and res.paraphrase_generalisation == [0.5, 0.0]


# --- edit: end to end ------------------------------------------------------------------------------------------

def test_edit_recipe_on_a_jsonl_edit_set_and_resume(checkpoint, edits_file, tmp_path):
    cfg = edit.Config(methods="lora,hiplora", task=str(edits_file), model=checkpoint, seeds=(0, 1), r=4, k=4,
                      n_local=3, n_skill=1, skills=("math", "code"), train=TINY, progress=False)
    result, summary = execute("edit", cfg, tmp_path / "e")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["edits"] == ROWS and m["sizes"]["n_edits"] == 2 and m["sizes"]["n_local"] == 3
    for label in ("lora", "hiplora"):
        items = m["methods"][label]["items"]
        assert np.shape(items["edit_success"]) == np.shape(items["paraphrase"]) == (2, 2)
        assert np.shape(items["locality"]) == (2, 3) and np.shape(items["skill"]) == (2, 2)
        for measure in edit.MEASURES:
            ci = m["methods"][label]["ci"][measure]
            assert 0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1
    assert m["methods"]["lora"]["vs_reference"] is None and set(m["methods"]["hiplora"]["vs_reference"]) == set(
        edit.MEASURES)
    assert len(list((tmp_path / "e" / "units").glob("*.json"))) == 4 and "hiplora: edit success" in summary
    assert (tmp_path / "e" / "figures" / "editing.png").exists() and (tmp_path / "e" / "report.md").exists()
    resumed, _ = execute("edit", cfg, tmp_path / "e", mode="resume")  # every unit is read back, none retrained
    assert resumed.items == result.items and resumed.runs == result.runs


def test_edit_through_the_cli(checkpoint, edits_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["edit", "--quick", "--model", checkpoint, "--out", str(out), *SMALL]) == 0
    assert "lora: edit success" in capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["methods"] == "lora,hiplora" and cfg["seeds"] == [0]  # from the preset
    assert cfg["n_edits"] == 2 and cfg["train"]["epochs"] == 1  # explicit flags win over it
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["methods"]) == {"lora", "hiplora"} and m["seeds"] == [0] and m["task"] == "organism"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({k: v for k, v in ROWS[1].items() if k != "new_answer"}))
    one_line_error(capsys, ["edit", "--task", str(bad), "--out", str(tmp_path / "b")],
                   "bad.jsonl:2: missing new_answer")
    one_line_error(capsys, ["edit", "--methods", "lora,palora", "--out", str(tmp_path / "b")], "cannot be used here")
    one_line_error(capsys, ["edit", "--skills", "juggling", "--out", str(tmp_path / "b")], "unknown task 'juggling'")
    assert not (tmp_path / "b").exists()


# --- merge -----------------------------------------------------------------------------------------------------

def lora_adapter(checkpoint, path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A LoRA adapter with random B (seeded, times ``scale``) saved to ``path``; returns its dW = (alpha/r) B A."""
    base, _ = load_model(checkpoint)
    model = build_model(parse_method("lora:r=2", MethodSpec(targets="all-linear")), base, seed=0)
    from peft.tuners.lora import LoraLayer

    gen, deltas = torch.Generator().manual_seed(1), {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            B = layer.lora_B["default"].weight
            with torch.no_grad():
                B.copy_(scale * torch.randn(B.shape, generator=gen))
            A = layer.lora_A["default"].weight
            deltas[name.removeprefix("base_model.model.")] = (layer.scaling["default"] * B @ A).detach()
    model.save_pretrained(path)
    return deltas


def hiplora_adapter(checkpoint, path) -> dict[str, torch.Tensor]:
    """A HiP-LoRA adapter with every trainable tensor perturbed, saved to ``path``; returns the dW it reloads with."""
    base, _ = load_model(checkpoint)
    model = build_model(parse_method("hiplora:r=2,k=4,mode=none", MethodSpec(targets="all-linear")), base, seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    reloaded = load_adapter(load_model(checkpoint)[0], path, progress=False)
    with torch.no_grad():
        return {n: layer.delta_weight().detach() for n, layer in reloaded.spectral_layers().items()}


def saved_weights(path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_merge_sum_is_w_plus_the_updates_in_the_saved_checkpoint(checkpoint, tmp_path, capsys):
    d1 = lora_adapter(checkpoint, tmp_path / "lora")
    d2 = hiplora_adapter(checkpoint, tmp_path / "hip")
    assert set(d1) == set(d2) and all(float(d.abs().max()) > 1e-3 for d in [*d1.values(), *d2.values()])
    out = tmp_path / "merged"
    assert main(["merge", "--adapters", f"{tmp_path / 'lora'},{tmp_path / 'hip'}", "--model", checkpoint,
                 "--out", str(out)]) == 0
    assert "merged 2 adapter(s) with sum" in capsys.readouterr().out
    base = {n: m.weight for n, m in load_model(checkpoint)[0].named_modules() if isinstance(m, nn.Linear)}
    merged = saved_weights(out / "model")
    for name, W in base.items():
        expected = W + d1.get(name, 0) + d2.get(name, 0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-5)
    recipe = json.loads((out / "merge.json").read_text())
    assert recipe["how"] == "sum" and recipe["weights"] == [1.0, 1.0] and recipe["methods"] == ["lora", "hiplora"]
    assert (out / "model" / "tokenizer.json").exists() or (out / "model" / "tokenizer_config.json").exists()


def test_merge_ties_with_density_one_and_agreeing_signs_is_the_sum(checkpoint, tmp_path):
    """dW2 = 3 dW1 agree in sign everywhere; TIES is the weighted mean of the agreeing updates, so with weights
    summing to 1 and nothing trimmed it equals the weighted sum: W + 0.5 dW1 + 0.5 dW2 = W + 2 dW1."""
    d1 = lora_adapter(checkpoint, tmp_path / "a")
    lora_adapter(checkpoint, tmp_path / "b", scale=3.0)
    adapters = (str(tmp_path / "a"), str(tmp_path / "b"))
    runs = {how: tmp_path / how for how in ("sum", "ties")}
    for how, out in runs.items():
        execute("merge", merge.Config(adapters=adapters, model=checkpoint, how=how, weights=(0.5, 0.5), density=1.0),
                out)
    base = {n: m.weight for n, m in load_model(checkpoint)[0].named_modules() if isinstance(m, nn.Linear)}
    summed, ties = saved_weights(runs["sum"] / "model"), saved_weights(runs["ties"] / "model")
    for name, W in base.items():
        torch.testing.assert_close(ties[name], summed[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(ties[name], W + 2 * d1.get(name, 0), rtol=0, atol=1e-5)
    assert json.loads((runs["ties"] / "merge.json").read_text())["density"] == 1.0


def test_merge_errors_and_quick(checkpoint, tmp_path, capsys):
    lora_adapter(checkpoint, tmp_path / "a")
    one_line_error(capsys, ["merge", "--adapters", f"{tmp_path / 'a'},/nonexistent/adapter", "--out",
                            str(tmp_path / "m")], "no such adapter directory: /nonexistent/adapter")
    one_line_error(capsys, ["merge", "--adapters", str(tmp_path / "a"), "--how", "avg", "--out", str(tmp_path / "m")],
                   "unknown merge operator 'avg'; use one of sum, ties")
    one_line_error(capsys, ["merge", "--adapters", str(tmp_path), "--out", str(tmp_path / "m")],
                   "is not an adapter directory")
    one_line_error(capsys, ["merge", "--adapters", str(tmp_path / "a"), "--weights", "1,2", "--out",
                            str(tmp_path / "m")], "2 weights for 1 adapters")
    one_line_error(capsys, ["merge", "--out", str(tmp_path / "m")], "give at least one adapter directory")
    assert not (tmp_path / "m").exists()
    assert merge.QUICK == {}  # merging has no sizes: --quick changes nothing
    assert main(["merge", "--quick", "--adapters", str(tmp_path / "a"), "--model", checkpoint, "--out",
                 str(tmp_path / "q")]) == 0
    cfg = yaml.safe_load((tmp_path / "q" / "config.yaml").read_text())
    assert cfg == {"adapters": [str(tmp_path / "a")], "model": checkpoint, "how": "sum", "weights": [], "density": 0.2,
                   "device": "auto", "dtype": "auto"}
