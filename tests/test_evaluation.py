"""Evaluators: generation (batched = one by one, stops, pad handling), matching, categories, recall, perplexity."""

import itertools
import math

import pytest
import torch

import spectral_peft.evaluation.knowledge as knowledge_module
from spectral_peft.data import QAItem, documents
from spectral_peft.evaluation import (Category, alias_match, categorize, extract_answer, generate, knowledge_categories,
                                     normalize, perplexity, recall, skill_accuracy)
from spectral_peft.organism import build_tokenizer, tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(itertools.islice(documents(seed=5), 300), vocab_size=400)
    return tiny_random_model(tokenizer, seed=1, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2), tokenizer


PROMPTS = ["Q: Where does Ab live?\nA:", "Math: Start with 12. Add 3.\nSolution:", "x", "Code: a = 1; print(a)\nSolution:"]


def test_batched_greedy_generation_equals_one_by_one(tiny):
    model, tok = tiny
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, stop=(), progress=False)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1, stop=(), progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_generation_cuts_at_stop_strings(tiny):
    model, tok = tiny
    full = generate(model, tok, PROMPTS, max_new_tokens=20, stop=(), progress=False)
    cut = generate(model, tok, PROMPTS, max_new_tokens=20, stop=("e",), progress=False)
    for f, c in zip(full, cut):
        assert c == f.split("e")[0] and "e" not in c


def test_generation_sets_a_missing_pad_token_and_restores_it(tiny):
    model, tok = tiny
    ref = generate(model, tok, PROMPTS, max_new_tokens=6, progress=False)
    pad = tok.pad_token
    tok.pad_token = None
    try:
        assert generate(model, tok, PROMPTS, max_new_tokens=6, progress=False) == ref
        assert tok.pad_token is None
    finally:
        tok.pad_token = pad


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = generate(model, tok, PROMPTS * 3, max_new_tokens=8, do_sample=True, seed=3, progress=False)
    assert a == generate(model, tok, PROMPTS * 3, max_new_tokens=8, do_sample=True, seed=3, progress=False)
    assert a != generate(model, tok, PROMPTS * 3, max_new_tokens=8, do_sample=True, seed=4, progress=False)


def test_normalize_and_alias_match():
    assert normalize("  The Élan,  of-York! ") == "elan of york"
    assert alias_match("He lives in Port Velmora.", ["velmora"])
    assert alias_match("a Baker", ["the baker"])
    assert not alias_match("He lives in Velm.", ["Velmora"])
    assert not alias_match("anything", ["", "the"])
    assert extract_answer(" 3+4=7. #### 7\nmore") == "7" and extract_answer(" b a \nc") == "b a"


def test_categorize_rules():
    assert categorize([True] * 10, [False]) == Category.HIGHLY_KNOWN
    assert categorize([True] + [False] * 9, [False]) == Category.MAYBE_KNOWN
    assert categorize([False] * 10, [False, True]) == Category.WEAKLY_KNOWN
    assert categorize([False] * 10, [False] * 4) == Category.UNKNOWN


def test_knowledge_categories_hand_checked_case(monkeypatch):
    """A scripted model: A always right; B right only when exemplar 'x' is in the window; C right only when
    sampling; D never right. Windows of 1 shot from a pool of 3 exemplars, 6 windows, 2 samples."""
    items = [QAItem("A", "qa?", "alpha", ("alpha",)), QAItem("B", "qb?", "beta", ("beta",)),
             QAItem("C", "qc?", "gamma", ("gamma",)), QAItem("D", "qd?", "delta", ("delta", "dd"))]
    pool = [QAItem("x", "ex1?", "one", ("one",)), QAItem("y", "ex2?", "two", ("two",)), QAItem("z", "ex3?", "3", ("3",))]
    calls = []

    def scripted(model, tokenizer, prompts, do_sample=False, **kw):
        calls.append((len(prompts), do_sample))
        outs = []
        for p in prompts:
            q = p.rsplit("Q: ", 1)[1]
            if q.startswith("qa"):
                outs.append(" Alpha!")
            elif q.startswith("qb"):
                outs.append(" beta" if "Q: ex1?" in p else " gamma")
            elif q.startswith("qc"):
                outs.append(" the Gamma" if do_sample else " alpha")
            else:
                outs.append(" nothing")
        return outs

    monkeypatch.setattr(knowledge_module, "generate", scripted)
    res = knowledge_categories(None, None, items, exemplar_pool=pool, n_windows=6, shots=1, n_samples=2, seed=0)
    windows_with_x = sum("x" in [e.id for e in w] for w in knowledge_module.fewshot_windows(pool, 6, 1, 0, exclude_id="B"))
    assert 0 < windows_with_x < 6  # the seed gives a mixed case for B
    assert res.categories == {"A": Category.HIGHLY_KNOWN, "B": Category.MAYBE_KNOWN,
                              "C": Category.WEAKLY_KNOWN, "D": Category.UNKNOWN}
    assert sum(res.greedy_correct["B"]) == windows_with_x
    assert calls == [(24, False), (8, True)]
    assert res.counts() == {"HighlyKnown": 1, "MaybeKnown": 1, "WeaklyKnown": 1, "Unknown": 1}
    assert res.ids("Unknown") == ["D"]


def test_recall_uses_the_chosen_paraphrase(monkeypatch):
    items = [QAItem("a", "main?", "yes", ("yes",), ("para?",))]
    monkeypatch.setattr(knowledge_module, "generate", lambda m, t, prompts, **kw: [" yes" if "para?" in p else " no" for p in prompts])
    assert recall(None, None, items).accuracy == 0.0
    assert recall(None, None, items, paraphrase=1).accuracy == 1.0
    assert recall(None, None, items, paraphrase=2).correct == []


def test_perplexity_matches_the_model_loss_and_ignores_padding(tiny):
    model, tok = tiny
    texts = ["Math: Start with 12. Add 3.\nSolution: 12+3=15. #### 15\n", "Q: Where?\nA: here\n"]
    ids = tok(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    single = perplexity(model, tok, texts[:1], progress=False)
    assert single.n_tokens == ids.shape[1] - 1 and math.isclose(single.nll, loss, rel_tol=1e-4)
    together = perplexity(model, tok, texts, batch_size=2, progress=False)
    apart = [perplexity(model, tok, [t], progress=False) for t in texts]
    pooled = sum(r.nll * r.n_tokens for r in apart) / sum(r.n_tokens for r in apart)
    assert math.isclose(together.nll, pooled, rel_tol=1e-4) and math.isclose(together.perplexity, math.exp(pooled), rel_tol=1e-4)


def test_skill_accuracy_checks_outputs_with_the_task(tiny):
    model, tok = tiny
    res = skill_accuracy(model, tok, "max", n=8, max_new_tokens=4, progress=False)
    assert res.task == "max" and res.n == 8 and len(res.outputs) == 8
    assert res.accuracy == sum(res.correct) / 8


def test_tradeoff_plot_draws_an_interval_on_one_side_of_its_estimate(tmp_path):
    """A percentile bootstrap interval may exclude its estimate; the plot still draws (bars never negative)."""
    from spectral_peft.report import error_bars, plot_tradeoff

    assert error_bars([0.5, 0.5], [0.6, 0.25], [0.9, 0.75]) == [[0.0, 0.25], [pytest.approx(0.4), 0.25]]
    assert error_bars([0.5], [0.25], [0.75], scale=100) == [[25.0], [25.0]]
    rows = [{"method": "a", "recall": 0.5, "retention": 0.9, "recall_ci": (0.55, 0.8), "retention_ci": (0.7, 0.85)}]
    assert plot_tradeoff(rows, tmp_path / "t.png").stat().st_size > 0
