"""Real data sets through local fixtures: loaders, Transformer-squared splits, checkers, load_task, and end-to-end
evaluation with a tiny random model (no downloads: every source here is a local file)."""

import json
import random
from pathlib import Path

import pytest

from spectral_peft.data import Example, QAItem, load_jsonl, load_task
from spectral_peft.data.real import (CodeExecutionNotAllowed, RealTask, extract_choice, extract_code, extract_number,
                                     load_arc, load_gsm8k, load_mbpp, load_qa)
from spectral_peft.data.real.mbpp import MBPPChecker, t2_split
from spectral_peft.evaluation import knowledge_categories, recall, skill_accuracy
from spectral_peft.organism import build_tokenizer, tiny_random_model

FIX = Path(__file__).parent / "fixtures" / "real"


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k(FIX / "gsm8k")


@pytest.fixture(scope="module")
def arc_easy():
    return load_task(f"arc-easy:{FIX / 'ai2_arc'}")


@pytest.fixture(scope="module")
def mbpp():
    return load_mbpp(FIX / "mbpp", allow_code_execution=True, t2_pool=5, t2_train=3)


@pytest.fixture(scope="module")
def tiny():
    texts = [p.read_text() for p in FIX.rglob("*.json*")] * 3
    tokenizer = build_tokenizer(texts, vocab_size=400)
    return tiny_random_model(tokenizer, seed=1, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), tokenizer


# --- GSM8K -------------------------------------------------------------------------------------------------------

def test_gsm8k_transformer_squared_split_and_format(gsm8k):
    train_rows, test_rows = rows(FIX / "gsm8k/main/train.jsonl"), rows(FIX / "gsm8k/main/test.jsonl")
    q = lambda e: e.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
    assert [q(e) for e in gsm8k.examples("train")] == [r["question"] for r in train_rows[0::2]]
    assert [q(e) for e in gsm8k.examples("val")] == [r["question"] for r in train_rows[1::2]]
    assert [q(e) for e in gsm8k.examples("test")] == [r["question"] for r in test_rows]
    ex = gsm8k.examples("train")[0]
    assert ex.target == " Mia has 4*6=24 pencils. After giving 5 away she has 24-5=19 pencils. #### 19\n"
    assert (ex.answer, ex.difficulty, ex.task) == ("19", 2, "gsm8k")
    comma = [e for e in gsm8k.examples("train") if "1,200" in e.prompt][0]
    assert comma.answer == "3600" and comma.target.endswith("#### 3600\n")
    kept = load_gsm8k(FIX / "gsm8k", keep_calculator=True).examples("train")[0]
    assert "<<4*6=24>>" in kept.target
    source = load_gsm8k(FIX / "gsm8k", splits="source")
    assert len(source.examples("train")) == len(train_rows)


def test_gsm8k_checker(gsm8k):
    ex = gsm8k.examples("test")[0]  # answer 24
    assert gsm8k.check(ex.target, ex)
    assert gsm8k.check(" 3 packs of 8 is 24. #### $24.00", ex)
    assert gsm8k.check(" She has 3*8 = 24 stickers.", ex)  # no marker: the last number
    assert not gsm8k.check(" 3*8 = 24. #### 25", ex)
    assert not gsm8k.check(" I do not know.", ex)
    assert extract_number(" costs $1,200. #### $1,200.") == "1200"
    assert extract_number("#### -3.5 apples") == "-3.5"


# --- ARC ---------------------------------------------------------------------------------------------------------

def test_arc_splits_labels_and_format(arc_easy):
    train = rows(FIX / "ai2_arc/ARC-Easy/train.jsonl")
    assert [dict(e.meta)["id"] for e in arc_easy.examples("train")] == [r["id"] for r in train[0::2]]
    assert [dict(e.meta)["id"] for e in arc_easy.examples("val")] == [r["id"] for r in train[1::2]]
    numeric = [e for e in arc_easy.examples("test") if dict(e.meta)["id"] == "E-9"][0]  # labels 1-4, key "2"
    assert numeric.answer == "B" and "\nB. 6\n" in numeric.prompt and numeric.target == " 6. #### B\n"
    ex = arc_easy.examples("train")[0]
    assert ex.prompt.endswith("D. seeds\nAnswer:") and ex.target == " roots. #### B\n"
    challenge = load_arc(FIX / "ai2_arc", "arc-challenge")
    assert challenge.name == "arc-challenge" and len(challenge.examples("test")) == 2
    assert challenge.examples("test")[1].answer == "C" and "E. atmosphere" in challenge.examples("test")[1].prompt
    assert len(load_arc(FIX / "ai2_arc", splits="source").examples("val")) == 1


def test_arc_checker(arc_easy):
    ex = arc_easy.examples("train")[0]  # B
    for good in (ex.target, " B", " (B)", " B. roots", " The answer is (B).", "roots #### B"):
        assert arc_easy.check(good, ex), good
    for bad in (" A", " roots", " #### C", "", " A plant takes water through roots"):
        assert not arc_easy.check(bad, ex), bad
    assert extract_choice(" nothing") is None


# --- MBPP --------------------------------------------------------------------------------------------------------

def test_mbpp_t2_split_matches_their_rule():
    exs = [Example(f"p{i}", "", "", task="mbpp") for i in range(378)]
    split = t2_split(exs)
    random.seed(16)  # exactly their code: random.seed(16); random.shuffle(total_ix)
    order = list(range(300))
    random.shuffle(order)
    assert [e.prompt for e in split["train"]] == [f"p{i}" for i in order[:200]]
    assert [e.prompt for e in split["val"]] == [f"p{i}" for i in order[200:]]
    assert [e.prompt for e in split["test"]] == [f"p{i}" for i in range(300, 378)]


def test_mbpp_loading_layouts_and_splits(mbpp):
    ids = {s: sorted(dict(e.meta)["task_id"] for e in mbpp.splits[s]) for s in ("train", "val", "test")}
    assert sorted(ids["train"] + ids["val"]) == [1, 2, 3, 4, 5] and ids["test"] == [6, 7, 8]
    assert len(ids["train"]) == 3 and mbpp.stop == ("[DONE]",)
    ex = [e for e in mbpp.splits["train"] + mbpp.splits["val"] if dict(e.meta)["task_id"] == 1][0]
    assert "\r" not in ex.target and ex.prompt.endswith("assert add(10, 5) == 15\n[BEGIN]\n")
    assert ex.target == "def add(a, b):\n    return a + b\n[DONE]\n"
    source = load_mbpp(FIX / "mbpp", splits="source")
    assert [dict(e.meta)["task_id"] for e in source.examples("test")] == [7, 8]
    sanitized = load_mbpp(FIX / "mbpp_sanitized.jsonl", t2_pool=4, t2_train=2)
    assert len(sanitized.examples("train")) == 2 and "count the vowels" in " ".join(
        e.prompt for e in sanitized.examples("train") + sanitized.examples("val"))


def test_mbpp_refuses_to_run_code_without_opt_in():
    task = load_mbpp(FIX / "mbpp_sanitized.jsonl", t2_pool=4, t2_train=2)
    ex = task.examples("train")[0]
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_execution=True"):
        task.check(ex.target, ex)
    with pytest.raises(ValueError, match="--allow-code-execution"):
        load_task(f"mbpp:{FIX / 'mbpp_sanitized.jsonl'}")


def test_mbpp_checker_runs_tests_in_the_sandbox(mbpp):
    ex = [e for e in mbpp.examples("test") if dict(e.meta)["task_id"] == 7][0]  # gcd, with setup code
    assert mbpp.check(ex.target, ex)
    assert mbpp.check("```python\n" + ex.answer + "\n```\nThis computes the gcd.", ex)
    assert not mbpp.check("def gcd(a, b):\n    return a * b\n[DONE]", ex)
    assert not MBPPChecker(allow_code_execution=True, timeout=1.0)("def gcd(a, b):\n    while True:\n        pass", ex)
    assert not mbpp.check("this is not python", ex)
    assert extract_code("[BEGIN]\nx = 1\n[DONE]\ntrailing") == "x = 1"


# --- sources, RealTask, load_task ----------------------------------------------------------------------------------

def test_sources_single_file_mapping_saved_and_parquet(tmp_path):
    import datasets

    single = load_gsm8k(FIX / "gsm8k/main/test.jsonl")  # one file = the source test split
    assert len(single.examples("test")) == 3
    with pytest.raises(ValueError, match="no 'train' examples"):
        single.examples("train")
    mapping = load_gsm8k({"train": str(FIX / "gsm8k/main/train.jsonl"), "test": str(FIX / "gsm8k/main/test.jsonl")})
    ds = datasets.load_dataset("json", data_files={"train": str(FIX / "gsm8k/main/train.jsonl"),
                                                   "test": str(FIX / "gsm8k/main/test.jsonl")})
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = load_gsm8k(tmp_path / "saved")
    ds["test"].to_parquet(str(tmp_path / "test.parquet"))
    parquet = load_gsm8k(tmp_path / "test.parquet")
    ref = load_gsm8k(FIX / "gsm8k")
    for task in (mapping, saved):
        assert task.splits == ref.splits
    assert parquet.examples("test") == ref.examples("test")
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "missing.jsonl")


def test_real_task_examples_interface(gsm8k):
    assert len(gsm8k.examples("train", n=2)) == 2 and len(gsm8k.examples("train", n=100)) == 3
    assert gsm8k.examples("train", seed=3) == gsm8k.examples("train", seed=3)
    assert sorted(e.prompt for e in gsm8k.examples("train", seed=3)) == sorted(e.prompt for e in gsm8k.examples("train"))
    assert all(e.difficulty == 1 for e in gsm8k.examples("train", difficulty=1))
    with pytest.raises(ValueError):
        gsm8k.examples("dev")


def test_fewshot_prefix(gsm8k):
    shot = load_gsm8k(FIX / "gsm8k", fewshot=2)
    train = gsm8k.examples("train")
    first = shot.examples("test")[0]
    assert first.prompt.startswith(train[0].prompt + train[0].target + "\n" + train[1].prompt + train[1].target)
    assert first.prompt.endswith(gsm8k.examples("test")[0].prompt) and first.target == gsm8k.examples("test")[0].target
    own = shot.examples("train")[0]  # never its own demonstration
    assert own.prompt.count(train[0].prompt) == 1


def test_load_task_real_specs():
    task = load_task(f"arc-challenge:{FIX / 'ai2_arc'}")
    assert isinstance(task, RealTask) and task.name == "arc-challenge"
    assert task.examples("test") == load_arc(FIX / "ai2_arc", "arc-challenge").examples("test")
    with pytest.raises(ValueError, match="unknown data set"):
        load_task("squad:/tmp/x.jsonl")


# --- end to end with a tiny random model ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["gsm8k", "arc-easy", "arc-challenge", "mbpp"])
def test_skill_accuracy_end_to_end(tiny, spec):
    model, tok = tiny
    source = {"gsm8k": "gsm8k", "arc-easy": "ai2_arc", "arc-challenge": "ai2_arc", "mbpp": "mbpp"}[spec]
    if spec == "mbpp":  # the fixture's 8 problems need a smaller Transformer-squared pool to leave a test split
        task = load_mbpp(FIX / source, allow_code_execution=True, t2_pool=5, t2_train=3)
    else:
        task = load_task(f"{spec}:{FIX / source}")
    result = skill_accuracy(model, tok, task, split="test", max_new_tokens=8, progress=False)
    assert result.task == task.name and result.n == len(task.examples("test")) and 0 <= result.accuracy <= 1
    assert len(result.outputs) == result.n
    # the checker accepts the reference targets: a perfect model would score 1
    assert all(task.check(e.target, e) for e in task.examples("test"))


def test_knowledge_set_flows_through_recall_and_categories(tiny, tmp_path):
    model, tok = tiny
    items = load_jsonl(FIX / "knowledge.jsonl")
    via_datasets = load_qa(FIX / "knowledge.jsonl")
    assert [i.question for i in items] == [i.question for i in via_datasets]
    assert via_datasets[0].aliases == ("Dornwick", "Dornwick, Elsmere") and via_datasets[4].answer == "1931"
    popqa = tmp_path / "popqa.jsonl"
    popqa.write_text(json.dumps({"question": "Q?", "possible_answers": "[\"x\", \"y\"]"}) + "\n")
    assert load_qa(popqa) == [QAItem("0", "Q?", "x", ("x", "y"))]
    res = recall(model, tok, via_datasets, exemplars=via_datasets[:1], max_new_tokens=6, progress=False)
    assert len(res.correct) == len(via_datasets) and 0 <= res.accuracy <= 1
    cats = knowledge_categories(model, tok, items, n_windows=2, shots=1, n_samples=1, max_new_tokens=6, progress=False)
    assert set(cats.categories) == {i.id for i in items} and sum(cats.counts().values()) == len(items)
