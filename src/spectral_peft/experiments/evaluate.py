"""Evaluation of an injected model: fact recall (main and paraphrased questions), retention of HighlyKnown facts,
skill scores and their retention relative to the SVF expert, perplexity on held-out pretraining text, and the
parameter overhead."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..data import SKILLS, World, heldout_text
from ..evaluation import paraphrase_recall, perplexity, recall, skill_accuracy
from .knowledge_split import KnowledgeSplit


@dataclass
class EvalConfig:
    """Sizes of the evaluation: ``n_skill`` test problems per skill in ``skills``, ``n_ppl`` held-out documents."""

    skills: tuple[str, ...] = SKILLS
    n_skill: int = 100
    n_ppl: int = 50
    skill_split: str = "test"
    max_new_tokens: int = 96
    batch_size: int = 64
    progress: bool = True


def evaluate(model, tokenizer, world: World, split: KnowledgeSplit, cfg: EvalConfig | None = None) -> dict:
    """Raw metrics of ``model`` (no ratios; see :func:`add_retention`)."""
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    inject = split.facts(world, "inject")
    retain = split.facts(world, "retain")
    out: dict = {}
    kw = dict(progress=cfg.progress, batch_size=128)
    out["recall"] = recall(model, tokenizer, inject, **kw).accuracy if inject else None
    out["paraphrase_recall"] = paraphrase_recall(model, tokenizer, inject, **kw) if inject else None
    out["highly_known_recall"] = recall(model, tokenizer, retain, **kw).accuracy if retain else None
    out["skills"] = {
        s: skill_accuracy(model, tokenizer, s, n=cfg.n_skill, split=cfg.skill_split, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.batch_size, progress=cfg.progress).accuracy
        for s in cfg.skills
    }
    if cfg.n_ppl:
        ppl = perplexity(model, tokenizer, heldout_text(cfg.n_ppl, world=world), progress=cfg.progress)
        out["perplexity"], out["nll"] = ppl.perplexity, ppl.nll
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_retention(metrics: dict, expert: dict) -> dict:
    """Add ``skill_retention`` (score / the SVF expert's score, per skill), its mean, and ``highly_known_retention``
    (recall of the HighlyKnown facts / the expert's), and the perplexity increase over the expert."""
    m = dict(metrics)
    m["skill_retention"] = {s: ratio(v, expert["skills"].get(s)) for s, v in metrics["skills"].items()}
    vals = [v for v in m["skill_retention"].values() if v is not None]
    m["mean_skill_retention"] = sum(vals) / len(vals) if vals else None
    m["highly_known_retention"] = ratio(metrics.get("highly_known_recall"), expert.get("highly_known_recall"))
    if "perplexity" in metrics and "perplexity" in expert:
        m["perplexity_increase"] = metrics["perplexity"] - expert["perplexity"]
    return m
