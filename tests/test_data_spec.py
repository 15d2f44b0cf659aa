"""The one data spec: every form of `load_task`, custom checkers, chat templates, few-shot prefixes, one-line errors
before any work, and a cheap `check_task_spec`. Every source is a local fixture (no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from spectral_peft.data import (ChatTask, Example, OrganismTask, check_task_spec, get_task, load_task,
                                parse_task_spec)
from spectral_peft.data.real import RealTask, load_gsm8k

FIX = Path(__file__).parent / "fixtures"
REAL, CUSTOM = FIX / "real", FIX / "custom"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def half(n_rows: int) -> tuple[int, int]:
    """Transformer-squared's train/val sizes: the even- and odd-indexed rows of the source train split."""
    return (n_rows + 1) // 2, n_rows // 2


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    from spectral_peft.organism import CHECKPOINT_DIR

    return AutoTokenizer.from_pretrained(CHECKPOINT_DIR, local_files_only=True)


# --- every form --------------------------------------------------------------------------------------------------

def test_organism_names_resolve_with_generation_hints():
    for name in ("math", "code", "science", "reverse", "sort"):
        task = load_task(name)
        assert isinstance(task, OrganismTask) and task.task is get_task(name) and task.name == name
        assert task.stop == ("\n",) and isinstance(task.max_new_tokens, int) and task.max_new_tokens > 0
        exs = task.examples("test", n=4)
        assert exs == get_task(name).examples("test", n=4)
        assert all(task.check(e.target, e) for e in exs)


def test_name_at_level_fixes_the_difficulty():
    task = load_task("reverse@3")
    assert task.name == "reverse@3"
    for split in ("train", "test"):
        exs = task.examples(split, n=20, difficulty=5)  # the spec's level wins over a caller's difficulty
        assert {e.difficulty for e in exs} == {3} and all(len(e.answer.split()) == 3 for e in exs)
    assert {e.difficulty for e in load_task("count").examples("test", n=40)} == {4, 6, 8}  # the default test mix


@pytest.mark.parametrize("name,subset", [("arc-easy", "ARC-Easy"), ("arc-challenge", "ARC-Challenge")])
def test_arc_specs(name, subset):
    task = load_task(f"{name}:{REAL / 'ai2_arc'}")
    n_train, n_val = half(len(rows(REAL / "ai2_arc" / subset / "train.jsonl")))
    assert isinstance(task, RealTask) and task.name == name
    assert len(task.examples("train")) == n_train and len(task.examples("test")) == len(
        rows(REAL / "ai2_arc" / subset / "test.jsonl"))
    if n_val:
        assert len(task.examples("val")) == n_val


def test_gsm8k_spec_and_splits_option():
    task = load_task(f"gsm8k:{REAL / 'gsm8k'}")
    n_train, n_val = half(len(rows(REAL / "gsm8k/main/train.jsonl")))
    assert isinstance(task, RealTask) and task.name == "gsm8k" and task.stop == ("\n",)
    n_test = len(rows(REAL / "gsm8k/main/test.jsonl"))
    assert [len(task.examples(s)) for s in ("train", "val", "test")] == [n_train, n_val, n_test]
    source = load_task(f"gsm8k:{REAL / 'gsm8k'}?splits=source")
    assert len(source.examples("train")) == len(rows(REAL / "gsm8k/main/train.jsonl"))


def test_mbpp_spec_with_code_execution():
    task = load_task(f"mbpp:{REAL / 'mbpp'}?splits=source", allow_code_execution=True)
    assert isinstance(task, RealTask) and task.name == "mbpp" and task.stop == ("[DONE]",)
    assert len(task.examples("test")) == len(rows(REAL / "mbpp/full/test.jsonl"))
    ex = task.examples("test")[0]
    assert task.check(ex.target, ex) and not task.check("def nothing():\n    pass\n[DONE]", ex)


@pytest.mark.parametrize("fixture", ["numeric.jsonl", "exact.jsonl", "regex.jsonl"])
def test_custom_jsonl_holds_out_the_last_tenth(fixture):
    path = CUSTOM / fixture
    data = rows(path)
    held = max(1, round(0.1 * len(data)))
    task = load_task(str(path))
    assert isinstance(task, RealTask) and task.name == path.stem and task.stop == ("\n",)
    train, val, test = (task.examples(s) for s in ("train", "val", "test"))
    assert [e.prompt for e in train] == [r["prompt"] for r in data[:-held]]
    assert [e.prompt for e in val] == [r["prompt"] for r in data[-held:]] and test == val
    assert all(e.target.endswith("\n") and e.answer == e.target.strip() for e in train)


def test_custom_multiline_responses_stop_at_a_blank_line(tmp_path):
    path = tmp_path / "poems.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "response": f"line {i}\nline {i + 1}"}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n")
    task = load_task(str(path))
    assert task.stop == ("\n\n",) and task.check(" line 2\n line 3 ", task.examples("val")[0])


# --- checkers ----------------------------------------------------------------------------------------------------

def by_answer(task, answer: str) -> Example:
    return next(e for s in ("train", "val") for e in task.examples(s) if e.answer == answer)


def test_exact_checker_is_the_default():
    task = load_task(str(CUSTOM / "exact.jsonl"))
    ex = by_answer(task, "TWO WORDS")
    assert task.check(ex.target, ex) and task.check("  TWO \n WORDS ", ex)
    assert not task.check(" TWO WORD", ex) and not task.check(" two words", ex) and not task.check("", ex)
    assert load_task(f"{CUSTOM / 'exact.jsonl'}?checker=exact").check(" TWO WORDS", ex)


def test_numeric_checker():
    task = load_task(f"{CUSTOM / 'numeric.jsonl'}?checker=numeric")
    thousand = by_answer(task, "1,200")
    assert task.check(" 1200", thousand) and task.check(" 1 kg is 1000 g, so 1,200 grams", thousand)
    assert task.check(" 1200.0008", thousand)  # within 1e-6 relative
    assert not task.check(" 1201", thousand) and not task.check(" 1200 or 12", thousand)
    assert not task.check(" twelve hundred", thousand)
    tenth = by_answer(task, "0.3")
    assert task.check(" 0.30000000000000004", tenth) and not task.check(" 0.31", tenth)
    assert task.check(" -8", by_answer(task, "-8")) and not task.check(" 8", by_answer(task, "-8"))
    assert not load_task(str(CUSTOM / "numeric.jsonl")).check(" 1200", thousand)  # exact would reject it


def test_regex_checker():
    task = load_task(f"{CUSTOM / 'regex.jsonl'}?checker=regex")
    date = by_answer(task, r"\d{4}-\d{2}-\d{2}")
    assert task.check(" 2024-01-31\nand more text", date)
    assert not task.check(" 31/01/2024", date) and not task.check(" on 2024-01-31", date)
    yes = by_answer(task, "(?i)(yes|no)")
    assert task.check(" YES", yes) and not task.check(" yes, I think", yes)


def test_callable_checker_is_honoured():
    seen = []

    def banana(output: str, example: Example) -> bool:
        seen.append(example.prompt)
        return output.strip() == "banana"

    task = load_task(str(CUSTOM / "exact.jsonl"), checker=banana)
    ex = task.examples("val")[0]
    assert task.check("banana ", ex) and not task.check(ex.target, ex) and seen == [ex.prompt, ex.prompt]
    with pytest.raises(ValueError, match="conflicts"):
        load_task(f"{CUSTOM / 'exact.jsonl'}?checker=numeric", checker=banana)


def test_checker_rows_are_validated(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in [("a", "x"), ("b", "(")]))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: checker=numeric needs a number"):
        load_task(f"{path}?checker=numeric")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: checker=regex needs a valid regular expression"):
        load_task(f"{path}?checker=regex")


# --- chat template -----------------------------------------------------------------------------------------------

def test_chat_template_applied_when_the_tokenizer_has_one(tokenizer):
    tokenizer.chat_template = TEMPLATE
    plain = load_task("reverse@3")
    chat = load_task("reverse@3", tokenizer=tokenizer)
    assert isinstance(chat, ChatTask) and (chat.name, chat.stop, chat.max_new_tokens) == (
        plain.name, plain.stop, plain.max_new_tokens)
    for p, c in zip(plain.examples("test", n=5), chat.examples("test", n=5)):
        assert c.prompt == f"<|user|>{p.prompt}<|end|><|assistant|>" and (c.target, c.answer) == (p.target, p.answer)
        assert chat.check(c.target, c) and not chat.check(" z", c)
    off = load_task("reverse@3", tokenizer=tokenizer, chat_template="none")
    assert off.examples("test", n=5) == plain.examples("test", n=5)


def test_no_chat_template_without_one(tokenizer):
    assert tokenizer.chat_template is None
    task = load_task(str(CUSTOM / "exact.jsonl"), tokenizer=tokenizer)
    assert isinstance(task, RealTask)
    assert task.examples("train") == load_task(str(CUSTOM / "exact.jsonl")).examples("train")
    with pytest.raises(ValueError, match="chat_template must be one of"):
        load_task("math", tokenizer=tokenizer, chat_template="chatml")


def test_fewshot_exemplars_sit_inside_the_user_message(tokenizer):
    tokenizer.chat_template = TEMPLATE
    plain = load_task(f"gsm8k:{REAL / 'gsm8k'}").examples("train")
    ex = load_task(f"gsm8k:{REAL / 'gsm8k'}?fewshot=1", tokenizer=tokenizer).examples("test")[0]
    assert ex.prompt.startswith("<|user|>" + plain[0].prompt + plain[0].target) and ex.prompt.count("<|user|>") == 1
    assert ex.prompt.endswith("<|end|><|assistant|>")


# --- few-shot ----------------------------------------------------------------------------------------------------

def test_fewshot_custom_prefixes_exclude_the_example_itself():
    plain = load_task(str(CUSTOM / "numeric.jsonl"))
    shot = load_task(f"{CUSTOM / 'numeric.jsonl'}?fewshot=2")
    train = plain.examples("train")
    for own, e in zip(train, shot.examples("train")):
        assert e.prompt.endswith(own.prompt) and e.prompt.count(own.prompt) == 1 and e.prompt.count("Q: ") == 3
    first, second = shot.examples("train")[:2]
    assert first.prompt.startswith(train[1].prompt + train[1].target) and second.prompt.startswith(train[0].prompt)
    val = shot.examples("val")[0]
    assert val.prompt == train[0].prompt + train[0].target + "\n" + train[1].prompt + train[1].target + "\n" + \
        plain.examples("val")[0].prompt
    assert load_task(str(CUSTOM / "numeric.jsonl"), fewshot=2).examples("val") == shot.examples("val")


def test_fewshot_organism_prefixes_exclude_the_example_itself():
    plain, shot = load_task("reverse@3"), load_task("reverse@3?fewshot=2")
    train = plain.examples("train", n=3)
    for own, e in zip(train, shot.examples("train", n=3)):
        assert e.prompt.endswith(own.prompt) and e.prompt.count(own.prompt) == 1 and e.prompt.count("Reverse:") == 3
        assert e.target == own.target
    test = shot.examples("test", n=2)
    assert all(e.prompt.startswith(train[0].prompt + train[0].target + "\n" + train[1].prompt) for e in test)


def test_fewshot_real_matches_the_loader():
    spec = load_task(f"gsm8k:{REAL / 'gsm8k'}?fewshot=2")
    assert spec.examples("test") == load_gsm8k(REAL / "gsm8k", fewshot=2).examples("test")
    assert spec.examples("test") != load_gsm8k(REAL / "gsm8k").examples("test")


# --- errors before work ------------------------------------------------------------------------------------------

BAD = [
    ("nonsense", ValueError, "unknown task 'nonsense'.*reverse.*gsm8k"),
    ("squad:/tmp/x.jsonl", ValueError, "unknown data set 'squad'"),
    ("math:/tmp/x", ValueError, "takes no :PATH"),
    ("reverse@x", ValueError, "bad difficulty 'x'"),
    ("reverse@0", ValueError, "bad difficulty '0'"),
    ("/no/such/file.jsonl", FileNotFoundError, "/no/such/file.jsonl"),
    ("gsm8k:/no/such/dir", FileNotFoundError, "/no/such/dir"),
    (f"{CUSTOM / 'numeric.jsonl'}?chekcer=numeric", ValueError, "unknown option 'chekcer'.*checker, fewshot"),
    ("math?checker=exact", ValueError, "unknown option 'checker'.*fewshot"),
    (f"gsm8k:{REAL / 'gsm8k'}?checker=exact", ValueError, "unknown option 'checker'.*fewshot, splits"),
    (f"{CUSTOM / 'numeric.jsonl'}?checker=fuzzy", ValueError, "unknown checker 'fuzzy'"),
    ("math?fewshot=two", ValueError, "fewshot must be a non-negative integer"),
    ("math?fewshot", ValueError, "bad option 'fewshot'"),
    (f"gsm8k:{REAL / 'gsm8k'}?splits=random", ValueError, "splits must be one of"),
    (f"mbpp:{REAL / 'mbpp'}", ValueError, "--allow-code-execution"),
    (str(Path(__file__).parent / "helpers.py"), ValueError, "custom task files are .jsonl files"),
]


@pytest.mark.parametrize("spec,error,match", BAD)
def test_bad_specs_fail_in_one_line(spec, error, match):
    for call in (partial(check_task_spec, allow_code_execution=False), load_task):
        with pytest.raises(error, match=match) as info:
            call(spec)
        assert "\n" not in str(info.value)


def test_bad_load_arguments_fail_in_one_line():
    for kwargs, match in [({"checker": "numeric"}, "applies to .jsonl tasks only"), ({"fewshot": -1}, "fewshot"),
                          ({"chat_template": "yes"}, "chat_template")]:
        with pytest.raises(ValueError, match=match) as info:
            load_task("math", **kwargs)
        assert "\n" not in str(info.value)


def test_mbpp_allowed_with_code_execution():
    check_task_spec(f"mbpp:{REAL / 'mbpp'}", allow_code_execution=True)
    check_task_spec(f"mbpp:{REAL / 'mbpp'}")  # the execution opt-in is only checked when given
    assert parse_task_spec(f"mbpp:{REAL / 'mbpp'}").kind == "real"


def test_parse_task_spec_kinds():
    organism = parse_task_spec("reverse@4?fewshot=1")
    assert (organism.kind, organism.level, organism.options) == ("organism", 4, {"fewshot": 1})
    assert parse_task_spec("gsm8k").source == "" and parse_task_spec("arc-easy:allenai/ai2_arc").kind == "real"
    custom = parse_task_spec(f"{CUSTOM / 'numeric.jsonl'}?checker=numeric&fewshot=3")
    assert (custom.kind, custom.name, custom.options) == ("custom", "numeric", {"checker": "numeric", "fewshot": 3})


def test_check_task_spec_is_cheap():
    """A fresh interpreter validates every form in well under a second without importing torch, transformers or
    datasets (so no model is loaded and no data is read)."""
    specs = ["math", "reverse@3?fewshot=2", f"gsm8k:{REAL / 'gsm8k'}", "gsm8k", f"arc-easy:{REAL / 'ai2_arc'}",
             f"{CUSTOM / 'numeric.jsonl'}?checker=numeric&fewshot=1"]
    mbpp = f"mbpp:{REAL / 'mbpp'}"
    code = ("import sys, time, json\nfrom spectral_peft.data import check_task_spec\nt = time.perf_counter()\n"
            f"for s in {specs!r}: check_task_spec(s)\ncheck_task_spec({mbpp!r}, allow_code_execution=True)\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "print(json.dumps([time.perf_counter() - t, heavy]))")
    seconds, heavy = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout)
    assert seconds < 1.0 and heavy == []
