"""Which facts a knowledge-injection run trains on and which it checks for retention.

Following the protocol (methods.md, after Pletenev et al.): categorise held-out facts on the model that will be
injected (the SVF expert) and train on the ``Unknown`` ones; categorise a sample of known facts and keep the
``HighlyKnown`` ones, some of them optionally mixed into training, the others held out to measure retention.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..data import Fact, World
from ..evaluation import knowledge_categories


@dataclass
class SplitConfig:
    """``n_facts`` Unknown facts to inject (from ``n_candidates`` held-out facts categorised; default
    ``1.5 * n_facts + 8``); ``n_known`` known facts categorised, of which ``mix_known`` HighlyKnown go into training
    and up to ``n_known_eval`` others measure retention. ``n_windows``/``n_samples``: the categorisation probes."""

    n_facts: int = 64
    n_candidates: int | None = None
    n_known: int = 100
    n_known_eval: int = 80
    mix_known: int = 0
    n_windows: int = 10
    n_samples: int = 4
    seed: int = 0
    progress: bool = True


@dataclass
class KnowledgeSplit:
    """Fact ids: ``inject`` (Unknown, trained), ``mix`` (HighlyKnown, trained), ``retain`` (HighlyKnown, held out);
    and the category counts of the candidates."""

    inject: list[str]
    mix: list[str] = field(default_factory=list)
    retain: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def facts(self, world: World, which: str) -> list[Fact]:
        by_id = {f.id: f for f in world.facts}
        return [by_id[i] for i in getattr(self, which)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KnowledgeSplit":
        return cls(**{k: d[k] for k in ("inject", "mix", "retain", "counts") if k in d})


def find_split(model, tokenizer, world: World, cfg: SplitConfig) -> KnowledgeSplit:
    """Categorise candidates on ``model`` and return the split (seeded order of candidates)."""
    rng = random.Random(f"split/{cfg.seed}")
    heldout = list(world.heldout_facts)
    rng.shuffle(heldout)
    n_cand = min(len(heldout), cfg.n_candidates or int(1.5 * cfg.n_facts) + 8)
    known = list(world.known_facts)
    rng.shuffle(known)
    known = known[:cfg.n_known]
    probed = heldout[:n_cand] + known
    cats = knowledge_categories(model, tokenizer, probed, exemplar_pool=world.known_facts, n_windows=cfg.n_windows,
                                n_samples=cfg.n_samples, seed=cfg.seed, progress=cfg.progress)
    unknown = [f.id for f in heldout[:n_cand] if cats.categories[f.id].value == "Unknown"]
    if len(unknown) < cfg.n_facts:
        raise ValueError(f"only {len(unknown)} of {n_cand} held-out candidates are Unknown to the model; "
                         f"ask for fewer facts (n_facts={cfg.n_facts}) or more candidates")
    highly = [f.id for f in known if cats.categories[f.id].value == "HighlyKnown"]
    counts = {
        "heldout_candidates": _count(cats, heldout[:n_cand]),
        "known_sample": _count(cats, known),
    }
    mix = highly[:cfg.mix_known]
    return KnowledgeSplit(inject=unknown[:cfg.n_facts], mix=mix, retain=highly[len(mix):len(mix) + cfg.n_known_eval],
                          counts=counts)


def _count(cats, facts) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in facts:
        c = cats.categories[f.id].value
        out[c] = out.get(c, 0) + 1
    return out
