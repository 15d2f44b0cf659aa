"""Knowledge probing: recall of facts, and the knowledge categories of Pletenev et al. (after SliCK).

Categories (methods.md): for each question, `n_windows` few-shot prompts with different exemplar windows,
decoded greedily, plus `n_samples` sampled answers (T=0.7, top-p 0.9). HighlyKnown: all greedy answers
correct; MaybeKnown: some greedy answers correct; WeaklyKnown: no greedy answer correct but some sampled
answer is; Unknown: otherwise. Correct = a normalised alias is a substring of the normalised output.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from ..data import Fact, QAItem, as_qa, fewshot_prompt, fewshot_windows
from .generation import generate
from .matching import alias_match


class Category(str, Enum):
    """Knowledge category of a question."""

    HIGHLY_KNOWN = "HighlyKnown"
    MAYBE_KNOWN = "MaybeKnown"
    WEAKLY_KNOWN = "WeaklyKnown"
    UNKNOWN = "Unknown"


def categorize(greedy_correct: Sequence[bool], sampled_correct: Sequence[bool]) -> Category:
    """The category from one question's greedy and sampled correctness."""
    if greedy_correct and all(greedy_correct):
        return Category.HIGHLY_KNOWN
    if any(greedy_correct):
        return Category.MAYBE_KNOWN
    if any(sampled_correct):
        return Category.WEAKLY_KNOWN
    return Category.UNKNOWN


@dataclass
class CategoryResult:
    """Per-question categories and the correctness behind them (keyed by question id)."""

    categories: dict[str, Category]
    greedy_correct: dict[str, list[bool]]
    sampled_correct: dict[str, list[bool]]

    def counts(self) -> dict[str, int]:
        """Number of questions per category."""
        return {c.value: sum(v == c for v in self.categories.values()) for c in Category}

    def ids(self, category: Category | str) -> list[str]:
        """Ids of the questions in `category`."""
        return [k for k, v in self.categories.items() if v == Category(category)]


def knowledge_categories(model, tokenizer, facts: Sequence[Fact | QAItem], exemplar_pool: Sequence[Fact | QAItem] | None = None,
                         n_windows: int = 10, shots: int = 3, n_samples: int = 4, temperature: float = 0.7,
                         top_p: float = 0.9, seed: int = 0, max_new_tokens: int = 12, batch_size: int = 128,
                         progress: bool = True) -> CategoryResult:
    """Probe the model on every question and return its category (see the module docstring).

    Exemplar windows are drawn from `exemplar_pool` (default: the probed facts themselves), never containing
    the probed question. Sampled answer `j` uses window `j mod n_windows`.
    """
    items = [as_qa(f) for f in facts]
    pool = [as_qa(f) for f in (exemplar_pool if exemplar_pool is not None else facts)]
    windows = {it.id: fewshot_windows(pool, n_windows, shots, seed, exclude_id=it.id) for it in items}
    greedy_prompts = [fewshot_prompt(it.question, w) for it in items for w in windows[it.id]]
    sample_prompts = [fewshot_prompt(it.question, windows[it.id][j % n_windows]) for it in items for j in range(n_samples)]
    greedy = generate(model, tokenizer, greedy_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      progress=progress, desc="categories (greedy)")
    sampled = generate(model, tokenizer, sample_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       do_sample=True, temperature=temperature, top_p=top_p, seed=seed, progress=progress,
                       desc="categories (sampled)") if n_samples else []
    g_ok, s_ok, cats = {}, {}, {}
    for k, it in enumerate(items):
        g_ok[it.id] = [alias_match(o, it.aliases) for o in greedy[k * n_windows:(k + 1) * n_windows]]
        s_ok[it.id] = [alias_match(o, it.aliases) for o in sampled[k * n_samples:(k + 1) * n_samples]]
        cats[it.id] = categorize(g_ok[it.id], s_ok[it.id])
    return CategoryResult(cats, g_ok, s_ok)


@dataclass
class RecallResult:
    """Greedy recall: accuracy with per-question correctness and outputs."""

    accuracy: float
    correct: list[float]
    outputs: list[str]


def _question(item: QAItem, paraphrase: int) -> str | None:
    questions = (item.question, *item.paraphrases)
    return questions[paraphrase] if paraphrase < len(questions) else None


def recall(model, tokenizer, facts: Sequence[Fact | QAItem], paraphrase: int = 0, exemplars: Sequence[Fact | QAItem] = (),
           max_new_tokens: int = 12, batch_size: int = 128, progress: bool = True) -> RecallResult:
    """Greedy alias-match accuracy on the questions (question template `paraphrase`; 0 = the main one).

    `exemplars` are prepended as few-shot QA lines (useful for a general LM; the organism needs none).
    Items without that paraphrase are skipped.
    """
    shots = [as_qa(e) for e in exemplars]
    items = [it for it in map(as_qa, facts) if _question(it, paraphrase) is not None]
    prompts = [fewshot_prompt(_question(it, paraphrase), shots) for it in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress, desc="recall")
    correct = [alias_match(o, it.aliases) for o, it in zip(outputs, items)]
    return RecallResult(sum(correct) / max(1, len(correct)), correct, outputs)


def paraphrase_recall(model, tokenizer, facts: Sequence[Fact | QAItem], **kwargs) -> RecallResult:
    """Greedy recall on the paraphrased questions (templates 1, 2, ...): per fact, the fraction of its paraphrases
    answered correctly (`correct` holds these per-fact fractions; facts without paraphrases are skipped), and
    `accuracy` pooled over all paraphrase questions."""
    items = [it for it in map(as_qa, facts) if it.paraphrases]
    hits = {it.id: [] for it in items}
    outputs: list[str] = []
    for p in range(1, 1 + max((len(it.paraphrases) for it in items), default=0)):
        asked = [it for it in items if p <= len(it.paraphrases)]
        res = recall(model, tokenizer, asked, paraphrase=p, **kwargs)
        for it, ok in zip(asked, res.correct):
            hits[it.id].append(ok)
        outputs += res.outputs
    pooled = [ok for v in hits.values() for ok in v]
    return RecallResult(sum(pooled) / max(1, len(pooled)), [sum(v) / len(v) for v in hits.values()], outputs)
