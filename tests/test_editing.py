"""Knowledge-editing measures on World edits and JSONL edit sets, with a lookup-table stand-in for the model."""

import json

import pytest
from torch import nn

from spectral_peft.data import World, as_qa
from spectral_peft.evaluation.editing import (
    EditCase, EditingResult, as_case, edit_success, evaluate_editing, load_edit_set, load_edits, locality,
    locality_facts, paraphrase_generalisation, skill_preservation,
)

WORLD = World(n_known=20, n_heldout=5, n_edits=4)
EDITS = WORLD.edits


class Table(nn.Module):
    """Answers a question from a lookup table ('?' when it does not know); ``skill`` maps a skill to its per-problem
    correctness."""

    def __init__(self, table, skill):
        super().__init__()
        self.table, self.skill = dict(table), skill


def answer(model, questions):
    return [model.table.get(q, "?") + "\nQ: junk" for q in questions]


def base_table():
    return {q: f"The answer is {f.answer}." for f in WORLD.known_facts
            for q in (as_qa(f).question, *as_qa(f).paraphrases)}


def test_world_edit_as_case():
    e = EDITS[0]
    case = as_case(e)
    assert case.question == e.fact.question(0) and case.paraphrases == tuple(e.fact.question(i) for i in (1, 2, 3))
    assert case.old_answer == e.fact.answer and case.new_answer == e.new_answer and case.new_aliases == e.new_aliases
    assert as_case(case) is case
    organism = load_edit_set("organism")
    assert len(organism) == len(World().edits) and organism[0] == as_case(World().edits[0])


def test_measures_on_hand_built_outputs():
    e0, e1 = EDITS[:2]
    assert edit_success([f"a {e0.new_answer}!", e1.fact.answer], [e0, e1]) == [1.0, 0.0]
    outs = [[e0.new_answer, "x", e0.new_answer.upper()], ["y", "z", "w"]]
    assert paraphrase_generalisation(outs, [e0, e1]) == pytest.approx([2 / 3, 0.0])
    assert locality(["Paris.", "the Baker", "1950"], ["paris", "baker!", "1951"]) == [1.0, 1.0, 0.0]
    assert skill_preservation({"math": 0.8, "code": 0.5}, {"math": 0.6, "code": 0.5}) == pytest.approx(
        {"code": 1.0, "math": 0.75})
    assert skill_preservation({"math": 0.0}, {"math": 0.5}) == {"math": None}
    unrelated = locality_facts(WORLD.facts, EDITS)
    touched = {e.fact.entity for e in EDITS}
    assert unrelated and all(f.in_pretraining and f.entity not in touched for f in unrelated)
    assert {f.entity for f in WORLD.known_facts} - touched == {f.entity for f in unrelated}


@pytest.mark.parametrize("call, match", [
    (lambda: edit_success(["a"], EDITS[:2]), "1 outputs for 2"),
    (lambda: edit_success([], []), "no edits"),
    (lambda: paraphrase_generalisation([[]], EDITS[:1]), "at least one paraphrased"),
    (lambda: locality(["a"], ["a", "b"]), "2 outputs for 1"),
    (lambda: skill_preservation({"a": 0.5}, {"b": 0.5}), "differ"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_evaluate_editing_end_to_end():
    before = Table(base_table(), skill={"math": [1, 1, 1, 1, 0]})
    after_table = base_table()
    for k, e in enumerate(EDITS):  # edits 0, 1 take on the main question; edit 0 also on its first paraphrase
        qa = as_qa(e.edited)
        if k < 2:
            after_table[qa.question] = f"The answer is {e.new_answer}."
        if k == 0:
            after_table[qa.paraphrases[0]] = e.new_answer
    unrelated = locality_facts(WORLD.facts, EDITS)
    after_table[as_qa(unrelated[0]).question] = "no idea"  # one unrelated fact breaks
    after = Table(after_table, skill={"math": [1, 1, 1, 0, 0]})
    skills = {"math": lambda m: m.skill["math"]}
    res = evaluate_editing(before, after, EDITS, unrelated, answer, skills)
    assert res.edit_success == [1.0, 1.0, 0.0, 0.0]
    assert res.paraphrase_generalisation == pytest.approx([1 / 3, 0, 0, 0])
    assert res.old_answer_before == [1.0] * 4
    assert res.locality == [0.0] + [1.0] * (len(unrelated) - 1)
    assert res.locality_correct_before == [1.0] * len(unrelated) and res.locality_correct_after == res.locality
    assert res.skills_before == {"math": [1, 1, 1, 1, 0]} and res.skills_after == {"math": [1, 1, 1, 0, 0]}
    assert res.skill_preservation == {"math": pytest.approx(0.75)}
    assert res.mean_skill_preservation == pytest.approx(0.75)
    assert res.means()["locality"] == pytest.approx(1 - 1 / len(unrelated))
    assert json.loads(json.dumps(res.to_dict()))["mean_skill_preservation"] == pytest.approx(0.75)
    # Locality compares the model with itself: a wrong but unchanged answer counts as kept.
    wrong = Table({as_qa(f).question: "?" for f in unrelated}, skill={"math": [0, 0]})
    same = evaluate_editing(wrong, wrong, EDITS, unrelated, answer, {"math": lambda m: m.skill["math"]})
    assert same.locality == [1.0] * len(unrelated) and same.locality_correct_after == [0.0] * len(unrelated)
    assert same.skill_preservation == {"math": None} and same.mean_skill_preservation is None
    with pytest.raises(ValueError, match="at least one skill"):
        evaluate_editing(before, after, EDITS, unrelated, answer, {})
    assert isinstance(res, EditingResult)


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ROW = {"question": "Who wrote Hamlet?", "old_answer": "Shakespeare", "new_answer": "Marlowe",
       "paraphrases": ["Hamlet was written by whom?", "Name the author of Hamlet."]}


def test_load_edits(tmp_path):
    path = write_rows(tmp_path / "e.jsonl", [ROW, "", {**ROW, "id": "x", "question": "Q2?", "paraphrases": ["P2?"]}])
    cases = load_edits(path)
    assert cases == [EditCase("1", ROW["question"], ("Shakespeare",), ("Marlowe",), tuple(ROW["paraphrases"])),
                     EditCase("x", "Q2?", ("Shakespeare",), ("Marlowe",), ("P2?",))]
    assert load_edit_set(str(path)) == cases


@pytest.mark.parametrize("rows, match", [
    (["{not json"], r"e.jsonl:1: not valid JSON"),
    ([[1, 2]], r"e.jsonl:1: expected a JSON object"),
    ([ROW, {k: v for k, v in ROW.items() if k != "new_answer"}], r"e.jsonl:2: missing new_answer"),
    ([{**ROW, "paraphrase": []}], r"unknown key\(s\) paraphrase"),
    ([{**ROW, "old_answer": ""}], "must be non-empty strings"),
    ([{**ROW, "paraphrases": []}], "paraphrases must be a non-empty list"),
    ([{**ROW, "paraphrases": "Who?"}], "paraphrases must be a non-empty list"),
    ([{**ROW, "new_answer": "shakespeare."}], "is the old answer"),
    ([""], "holds no edits"),
])
def test_malformed_edits_raise_one_line(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match) as err:
        load_edits(write_rows(tmp_path / "e.jsonl", rows))
    assert "\n" not in str(err.value)


def test_edit_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such edits file"):
        load_edit_set(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'organism' or a .jsonl file"):
        load_edit_set("counterfact")


def test_locality_excludes_people_a_jsonl_edit_mentions(tmp_path):
    fact = WORLD.known_facts[0]
    row = {**ROW, "question": f"Where does {fact.entity} work?", "paraphrases": ["?"]}
    cases = load_edits(write_rows(tmp_path / "e.jsonl", [row]))
    unrelated = locality_facts(WORLD.known_facts, cases)
    assert fact.entity not in {f.entity for f in unrelated}
    assert len(unrelated) == len(WORLD.known_facts) - sum(f.entity == fact.entity for f in WORLD.known_facts)
