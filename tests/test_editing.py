"""Knowledge-editing measures on World edits, with a lookup-table stand-in for the model."""

import json

import pytest
from torch import nn

from spectral_peft.data import World, as_qa
from spectral_peft.evaluation.editing import (
    EditingResult, edit_questions, edit_success, evaluate_editing, locality, locality_facts,
    paraphrase_generalisation, paraphrase_questions, skill_preservation,
)

WORLD = World(n_known=20, n_heldout=5, n_edits=4)
EDITS = WORLD.edits


class Table(nn.Module):
    """Answers a question from a lookup table ('?' when it does not know)."""

    def __init__(self, table, skill):
        super().__init__()
        self.table, self.skill = dict(table), skill


def answer(model, questions):
    return [model.table.get(q, "?") + "\nQ: junk" for q in questions]


def base_table():
    return {q: f"The answer is {f.answer}." for f in WORLD.known_facts for q in (as_qa(f).question, *as_qa(f).paraphrases)}


def test_measures_on_hand_built_outputs():
    e0, e1 = EDITS[:2]
    assert edit_questions([e0]) == [e0.fact.question(0)] and len(paraphrase_questions([e0])[0]) == 3
    assert edit_success([f"a {e0.new_answer}!", e1.fact.answer], [e0, e1]) == 0.5
    outs = [[e0.new_answer, "x", e0.new_answer.upper()], ["y", "z", "w"]]
    assert paraphrase_generalisation(outs, [e0, e1]) == pytest.approx(2 / 6)
    assert locality(["Paris.", "the Baker", "1950"], ["paris", "baker!", "1951"]) == pytest.approx(2 / 3)
    assert skill_preservation({"math": 0.8, "code": 0.5}, {"math": 0.6, "code": 0.5}) == pytest.approx({"code": 1.0, "math": 0.75})
    unrelated = locality_facts(WORLD.facts, EDITS)
    assert unrelated and all(f.in_pretraining and f.entity not in {e.fact.entity for e in EDITS} for f in unrelated)


@pytest.mark.parametrize("call, match", [
    (lambda: edit_success(["a"], EDITS[:2]), "1 outputs for 2"),
    (lambda: edit_success([], []), "no edits"),
    (lambda: paraphrase_generalisation([[]], EDITS[:1]), "no paraphrased"),
    (lambda: locality(["a"], ["a", "b"]), "2 outputs for 1"),
    (lambda: skill_preservation({"a": 0.0}, {"a": 0.5}), "score of 0"),
    (lambda: skill_preservation({"a": 0.5}, {"b": 0.5}), "differ"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_evaluate_editing_end_to_end():
    before = Table(base_table(), skill={"math": 0.8})
    after_table = base_table()
    for k, e in enumerate(EDITS):  # edits 0, 1 take on the main question; edit 0 also on its first paraphrase
        qa = as_qa(e.edited)
        if k < 2:
            after_table[qa.question] = f"The answer is {e.new_answer}."
        if k == 0:
            after_table[qa.paraphrases[0]] = e.new_answer
    unrelated = locality_facts(WORLD.facts, EDITS)
    after_table[as_qa(unrelated[0]).question] = "no idea"  # one unrelated fact breaks
    after = Table(after_table, skill={"math": 0.6})
    skills = {"math": lambda m: m.skill["math"]}
    res = evaluate_editing(before, after, EDITS, unrelated, answer, skills)
    assert res.edit_success == pytest.approx(2 / 4)
    assert res.paraphrase_generalisation == pytest.approx(1 / 12)
    assert res.locality == pytest.approx(1 - 1 / len(unrelated))
    assert res.locality_accuracy_before == 1.0 and res.locality_accuracy_after == pytest.approx(res.locality)
    assert res.skill_preservation == {"math": pytest.approx(0.75)} and res.mean_skill_preservation == pytest.approx(0.75)
    assert json.loads(json.dumps(res.to_dict()))["mean_skill_preservation"] == pytest.approx(0.75)
    # Locality compares the model with itself: a wrong but unchanged answer counts as kept.
    wrong = Table({as_qa(f).question: "?" for f in unrelated}, skill={"math": 0.8})
    same = evaluate_editing(wrong, wrong, EDITS, unrelated, answer, skills)
    assert same.locality == 1.0 and same.locality_accuracy_after == 0.0
    with pytest.raises(ValueError, match="at least one skill"):
        evaluate_editing(before, after, EDITS, unrelated, answer, {})
    assert isinstance(res, EditingResult)
