"""Which facts a knowledge-injection run trains on and which measure retention (after Pletenev et al.).

Facts (``facts``): ``organism``, the world's held-out facts (never in pretraining) are the candidates for injection
and a sample of its known facts the candidates for retention; or a QA file (JSONL rows with ``question``,
``answers``/``aliases``, optional ``paraphrases``, read with :func:`spectral_peft.data.real.load_qa`), whose rows are
candidates for both. The candidates are categorised on the model that will be injected (the SVF expert) with
:func:`~spectral_peft.evaluation.knowledge_categories` (few-shot exemplar windows from the world's known facts or from
the same file, never the probed question): the first ``n_facts`` Unknown ones are injected, the HighlyKnown ones
(``mix_known`` of them trained too) measure retention.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data import QAItem, World, as_qa, injection_pairs
from .knowledge import knowledge_categories
from ..errors import InputError, MissingInputError

ORGANISM_FACTS = "organism"


@dataclass
class SplitSettings:
    """How candidate facts are categorised on the expert and split.

    Attributes:
        n_candidates: candidates categorised for injection (organism: held-out facts; a QA file: rows, plus n_known);
            None: 1.5 * n_facts + 8.
        n_known: organism: known facts categorised as retention candidates; a QA file: rows probed beyond n_candidates.
        n_known_eval: HighlyKnown facts held out to measure retention (at most).
        mix_known: HighlyKnown facts mixed into the injection training.
        n_windows: few-shot exemplar windows per question (greedy probes).
        n_samples: sampled answers per question (T=0.7, top-p 0.9).
    """

    n_candidates: int | None = None
    n_known: int = 100
    n_known_eval: int = 80
    mix_known: int = 0
    n_windows: int = 10
    n_samples: int = 4

    def validate(self) -> None:
        if self.n_candidates is not None and self.n_candidates < 1:
            raise InputError(f"split.n_candidates must be >= 1 (or None), got {self.n_candidates}")
        if min(self.n_known, self.n_known_eval, self.mix_known, self.n_samples) < 0 or self.n_windows < 1:
            raise InputError("split sizes must be >= 0 (n_windows >= 1)")


@dataclass
class FactPool:
    """Candidate facts: ``candidates`` for injection, ``known`` for retention (the same rows for a QA file, where
    ``shared`` is true), and the few-shot ``exemplars`` of the categorisation."""

    name: str
    candidates: list[QAItem]
    known: list[QAItem]
    exemplars: list[QAItem]
    shared: bool


def check_facts_spec(spec: str) -> None:
    """``organism`` or an existing QA file; a one-line error otherwise."""
    if spec != ORGANISM_FACTS and not Path(spec).expanduser().is_file():
        raise MissingInputError(f"--facts {spec}: no such file; give organism or a QA JSONL file "
                                "(question, answers/aliases, paraphrases rows)")


def load_facts(spec: str) -> FactPool:
    """The facts ``spec`` names (see the module docstring)."""
    check_facts_spec(spec)
    if spec == ORGANISM_FACTS:
        world = World()
        known = [as_qa(f) for f in world.known_facts]
        return FactPool(spec, [as_qa(f) for f in world.heldout_facts], known, known, shared=False)
    from ..data.real import load_qa

    rows = load_qa(str(Path(spec).expanduser()))
    if len(rows) < 4:
        raise InputError(f"--facts {spec}: {len(rows)} rows; a QA file needs at least 4 (3 few-shot exemplars + 1)")
    return FactPool(str(Path(spec).expanduser().absolute()), rows, rows, rows, shared=True)


def _qa_from_dict(d: Mapping[str, Any]) -> QAItem:
    return QAItem(d["id"], d["question"], d["answer"], tuple(d["aliases"]), tuple(d.get("paraphrases", ())))


@dataclass
class KnowledgeSplit:
    """The facts of one injection run: ``inject`` (Unknown, trained), ``mix`` (HighlyKnown, trained), ``retain``
    (HighlyKnown, held out) and the category counts of the probed candidates."""

    inject: list[QAItem]
    mix: list[QAItem] = field(default_factory=list)
    retain: list[QAItem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def training_pairs(self, paraphrases: int = 1) -> list[tuple[str, str]]:
        """QA pairs of the trained facts (``inject`` then ``mix``)."""
        return injection_pairs(self.inject + self.mix, paraphrases=paraphrases)

    def to_dict(self) -> dict[str, Any]:
        return {"inject": [asdict(f) for f in self.inject], "mix": [asdict(f) for f in self.mix],
                "retain": [asdict(f) for f in self.retain], "counts": self.counts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KnowledgeSplit":
        return cls(*([_qa_from_dict(f) for f in d[k]] for k in ("inject", "mix", "retain")), counts=dict(d["counts"]))


def find_split(model, tokenizer, pool: FactPool, n_facts: int, settings: SplitSettings, seed: int = 0,
               progress: bool = True) -> KnowledgeSplit:
    """Categorise a seeded sample of the pool's candidates on ``model`` and split them (module docstring)."""
    rng = random.Random(f"split/{seed}")
    n_cand = settings.n_candidates or int(1.5 * n_facts) + 8
    if pool.shared:
        rows = list(pool.candidates)
        rng.shuffle(rows)
        probed = rows[:n_cand + settings.n_known]
        injectable, retainable, groups = probed, probed, {"probed": probed}
    else:
        heldout, known = list(pool.candidates), list(pool.known)
        rng.shuffle(heldout)
        rng.shuffle(known)
        injectable, retainable = heldout[:n_cand], known[:settings.n_known]
        probed = injectable + retainable
        groups = {"heldout_candidates": injectable, "known_sample": retainable}
    cats = knowledge_categories(model, tokenizer, probed, exemplar_pool=pool.exemplars, n_windows=settings.n_windows,
                                n_samples=settings.n_samples, seed=seed, progress=progress)
    unknown = [f for f in injectable if cats.categories[f.id].value == "Unknown"]
    if len(unknown) < n_facts:
        raise InputError(f"only {len(unknown)} of {len(injectable)} candidate facts are Unknown to the expert; ask for "
                         f"fewer facts (--n-facts, now {n_facts}) or more candidates (--split.n-candidates)")
    highly = [f for f in retainable if cats.categories[f.id].value == "HighlyKnown"]
    counts = {g: _count(cats, facts) for g, facts in groups.items()}
    mix = highly[:settings.mix_known]
    return KnowledgeSplit(unknown[:n_facts], mix, highly[len(mix):len(mix) + settings.n_known_eval], counts)


def _count(cats, facts: Sequence[QAItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in facts:
        c = cats.categories[f.id].value
        out[c] = out.get(c, 0) + 1
    return out
