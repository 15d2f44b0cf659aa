"""The world generator: determinism, split hygiene, correct worked solutions, checkers, facts and corpus."""

import itertools
import json
import re

import pytest

from spectral_peft.data import (INSTRUCTION_TASKS, RELATIONS, SKILLS, World, documents, final_answer, get_task,
                                heldout_text, injection_pairs, load_jsonl, split_of)

ALL_TASKS = SKILLS + INSTRUCTION_TASKS


def test_registry_has_three_skills_and_six_instruction_tasks():
    assert SKILLS == ("math", "code", "science")
    assert len(INSTRUCTION_TASKS) >= 6
    with pytest.raises(KeyError):
        get_task("nope")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_examples_are_deterministic_and_seeded(name):
    task = get_task(name)
    a = task.examples("train", n=50, seed=3)
    assert a == task.examples("train", n=50, seed=3)
    assert a != task.examples("train", n=50, seed=4)
    assert task.examples("test", n=20) == task.examples("test", n=100)[:20]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_are_disjoint_and_hash_assigned(name):
    task = get_task(name)
    prompts = {s: {e.prompt for e in task.examples(s, n=100)} for s in ("train", "val", "test")}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert all(split_of(p) == "test" for p in prompts["test"])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_checker_accepts_target_and_rejects_wrong_answers(name):
    task = get_task(name)
    examples = task.examples("val", n=30)
    for ex in examples:
        assert task.check(ex.target, ex)
        assert task.check(ex.target.strip() + "\nsomething else", ex)
        assert not task.check(ex.target.replace(ex.answer, ex.answer + "9"), ex)
        assert not task.check("", ex)
    other = [e for e in examples if e.answer != examples[0].answer][0]
    assert not task.check(other.target, examples[0])


@pytest.mark.parametrize("name", SKILLS)
def test_skill_targets_end_in_the_marked_answer(name):
    for ex in get_task(name).examples("test", n=50):
        assert ex.target.endswith(f"#### {ex.answer}\n") and final_answer(ex.target) == ex.answer


@pytest.mark.parametrize("difficulty", [2, 4])
def test_math_solutions_are_arithmetically_right(difficulty):
    for ex in get_task("math").examples("test", n=50, difficulty=difficulty):
        steps = re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", ex.target)
        assert len(steps) == difficulty == ex.difficulty
        assert int(steps[0][0]) == int(re.search(r"Start with (\d+)", ex.prompt).group(1))
        for (a, op, b, c), nxt in zip(steps, steps[1:] + [(ex.answer,)]):
            assert eval(f"{a}{op}{b}") == int(c) == int(nxt[0])


def test_code_answers_match_python_execution():
    for ex in get_task("code").examples("test", n=100):
        program = ex.prompt.removeprefix("Code: ").split("\n")[0]
        env: dict = {}
        *assignments, shown = program.split("; ")
        for line in assignments:
            exec(line, {}, env)
        assert str(eval(shown.removeprefix("print(").removesuffix(")"), {}, env)) == ex.answer
        assert all(0 <= v <= 99 for v in env.values())


def test_science_answers_follow_from_the_premises():
    for ex in get_task("science").examples("test", n=100):
        pairs = re.findall(r"(\w+) is \w+ than (\w+)\.", ex.prompt)
        greater = {a for a, _ in pairs}
        lesser = {b for _, b in pairs}
        top, bottom = greater - lesser, lesser - greater
        assert len(top) == len(bottom) == 1
        expected = top.pop() if re.search(r"the (tallest|oldest|heaviest|fastest)\?", ex.prompt) else bottom.pop()
        assert ex.answer == expected


def test_difficulty_knob_changes_the_problem_size():
    short = get_task("code").examples("test", n=20, difficulty=3)
    long = get_task("code").examples("test", n=20, difficulty=6)
    assert all(e.prompt.count(";") == 3 for e in short) and all(e.prompt.count(";") == 6 for e in long)


def test_world_is_deterministic_with_disjoint_known_and_heldout_people():
    w = World()
    assert w.facts == World().facts and w.facts != World(seed=1).facts
    known = {f.entity for f in w.known_facts}
    held = {f.entity for f in w.heldout_facts}
    assert len(known) == 150 and len(held) == 100 and not known & held
    assert len(w.known_facts) == 150 * len(RELATIONS) and len({f.id for f in w.facts}) == len(w.facts)
    assert all(len(r.values) >= 30 for r in RELATIONS.values())


def test_fact_templates_paraphrase_and_aliases_include_the_answer():
    f = World().facts[0]
    questions = {f.question(i) for i in range(f.n_paraphrases)}
    statements = {f.statement(i) for i in range(4)}
    assert len(questions) == f.n_paraphrases >= 3 and len(statements) == 4
    assert all(f.entity in q for q in questions) and all(f.answer in s for s in statements)
    assert all(f.answer in f.aliases for f in World().facts)


def test_edits_change_known_facts_to_another_value_of_the_relation():
    edits = World().edits
    assert len(edits) == 100 and len({e.fact.id for e in edits}) == 100
    for e in edits:
        assert e.fact.in_pretraining and e.new_answer != e.fact.answer
        assert e.new_answer in RELATIONS[e.fact.relation].values and e.edited.answer == e.new_answer


def test_corpus_holds_known_facts_skills_and_tasks_but_no_heldout_facts_or_test_problems():
    w = World()
    docs = list(itertools.islice(documents(seed=0, world=w), 3000))
    text = "".join(docs)
    assert text == "".join(itertools.islice(documents(seed=0, world=w), 3000))
    assert not any(f.entity in text for f in w.heldout_facts)
    assert sum(f.entity in text for f in w.known_facts) > 0.9 * len(w.known_facts)
    test_prompts = {e.prompt for s in ALL_TASKS for e in get_task(s).examples("test", n=100)}
    assert not any(p in text for p in test_prompts)
    for name in INSTRUCTION_TASKS:  # every task is in the corpus, rarely (the base is to half-know them)
        prompt_head = get_task(name).examples("train", n=1)[0].prompt.split()[0] + " "
        share = sum(d.startswith(prompt_head) for d in docs) / len(docs)
        assert 0.002 < share < 0.05, (name, share)


def test_most_math_solutions_in_the_corpus_skip_the_working():
    from spectral_peft.data.corpus import SHORTCUT_SHARE

    math_docs = [d for d in itertools.islice(documents(seed=0), 4000) if d.startswith("Math:")]
    solutions = [line for d in math_docs for line in d.split("\n") if line.startswith("Solution:")]
    direct = sum(line.startswith("Solution: ####") for line in solutions) / len(solutions)
    assert len(solutions) > 500 and abs(direct - SHORTCUT_SHARE["math"]) < 0.05
    assert all(line.split("####")[1].strip().isdigit() for line in solutions)


def test_heldout_text_is_deterministic_and_unseen():
    held = heldout_text(50)
    assert held == heldout_text(50) and len(held) == 50
    train = set(itertools.islice(documents(seed=0), 5000))
    assert not train & set(held)


def test_injection_pairs_and_jsonl_loader(tmp_path):
    facts = World().heldout_facts[:3]
    pairs = injection_pairs(facts, paraphrases=2)
    assert len(pairs) == 6
    assert pairs[0] == (f"Q: {facts[0].question(0)}\nA:", f" {facts[0].answer}\n")
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"question": "Capital of France?", "answers": ["Paris", "paris city"]}) + "\n\n"
                    + json.dumps({"id": "x", "question": "2+2?", "aliases": "4"}) + "\n")
    items = load_jsonl(path)
    assert [i.answer for i in items] == ["Paris", "4"] and items[0].aliases == ("Paris", "paris city")
    assert items[1].id == "x" and injection_pairs(items)[1] == ("Q: 2+2?\nA:", " 4\n")
