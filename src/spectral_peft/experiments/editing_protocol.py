"""Knowledge editing with the organism's counterfactual edits (``data.World().edits``), per method.

One adapter per method and seed is trained on the edited facts (question template 0 only, answer = the new value;
``injection_pairs``), then ``evaluation.editing.evaluate_editing`` measures edit success (template 0), paraphrase
generalisation (templates 1-3, never trained), locality (unrelated known facts answered as before) and held-out
skill preservation (math, code, science accuracy after / before).

CIs: the answers are cached during the evaluation, so per-item outcomes (per edit, per paraphrase pooled per edit,
per unrelated fact, per skill problem) give 95% percentile-bootstrap CIs; method differences from the reference
(the first method) are paired on the same items. Per-item outcomes are averaged over seeds first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import SKILLS, World, get_task, injection_pairs, qa_line
from ..evaluation.editing import edit_questions, evaluate_editing, locality_facts, paraphrase_questions
from ..evaluation.generation import generate
from ..evaluation.matching import alias_match, normalize
from ..evaluation.skills import skill_accuracy
from ..evaluation.stats import joint_bootstrap
from .common import ProtocolRun, ModelSource, atomic_run_dir, seed_everything, write_json
from .finetune import (PROTOCOL_METHODS, AdapterSpec, TrainSettings, budget_table, final_budget_use, fmt_ci,
                       match_budgets, md_table, parse_specs, save_figure, train_adapter)

MEASURES = ("edit_success", "paraphrase_generalisation", "locality", "skill_preservation")


@dataclass
class EditingConfig:
    """``spectral-peft edit``: ``n_edits`` counterfactual edits trained for ``train.epochs`` epochs; ``n_local``
    unrelated facts, ``n_skill`` problems per skill. ``quick``: 16 edits, 40 unrelated facts, 12 problems, 1 seed."""

    methods: str = "lora,hiplora,hiplora:mode=penalty"
    model: str | None = None
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    n_edits: int = 50
    n_local: int = 200
    n_skill: int = 48
    skill_max_new_tokens: int = 96
    seeds: tuple[int, ...] = (0, 1)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=15, lr=5e-3, batch_size=8))
    match_budget: bool = True
    threads: int | None = 1
    quick: bool = False
    progress: bool = True

    def resolved(self) -> "EditingConfig":
        if not self.quick:
            return self
        methods = self.methods if self.methods != "lora,hiplora,hiplora:mode=penalty" else "lora,hiplora"
        return replace(self, methods=methods, n_edits=min(self.n_edits, 16), n_local=min(self.n_local, 40),
                       n_skill=min(self.n_skill, 12), seeds=self.seeds[:1], train=replace(self.train, epochs=min(self.train.epochs, 10)))


def run_editing(cfg: EditingConfig, out: str | Path) -> ProtocolRun:
    cfg = cfg.resolved()
    world = World()
    if not 1 <= cfg.n_edits <= len(world.edits):
        raise ValueError(f"n_edits must be in 1..{len(world.edits)}, got {cfg.n_edits}")
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model)
    tok = source.tokenizer
    specs = parse_specs(cfg.methods, AdapterSpec(r=cfg.r, k=cfg.k, targets=cfg.targets), allowed=PROTOCOL_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, source.fresh())
    edits = list(world.edits[:cfg.n_edits])
    unrelated = locality_facts(world.known_facts, edits)[:cfg.n_local]
    pairs = injection_pairs([e.edited for e in edits], paraphrases=1)
    skill_examples = {s: get_task(s).examples("test", n=cfg.n_skill) for s in SKILLS}
    cache: dict[tuple[int, tuple[str, ...]], list[str]] = {}

    def answer(model, questions):
        key = (id(model), tuple(questions))
        if key not in cache:
            cache[key] = generate(model, tok, [qa_line(q) for q in questions], max_new_tokens=12, progress=False)
        return cache[key]

    skill_flags: dict[tuple[int, str], np.ndarray] = {}

    def skill_fn(name):
        def f(model):
            key = (id(model), name)
            if key not in skill_flags:
                res = skill_accuracy(model, tok, name, skill_examples[name], max_new_tokens=cfg.skill_max_new_tokens,
                                     progress=False)
                skill_flags[key] = np.array(res.correct, dtype=float)
            return float(skill_flags[key].mean())
        return f

    before = source.fresh()
    questions_local = [f.question(0) for f in unrelated]
    base_edit_old = np.array([alias_match(o, e.fact.aliases) for o, e in zip(answer(before, edit_questions(edits)), edits)],
                             dtype=float)
    per_method, items_by_method = {}, {}
    for spec in specs:
        seed_items, results, uses = [], [], []
        for seed in cfg.seeds:
            seed_everything(seed, cfg.threads)
            model, _ = train_adapter(source.fresh(), tok, spec, pairs, cfg.train, seed,
                                     desc=f"edit {spec.label} s{seed}", progress=cfg.progress)
            use = final_budget_use(model)
            uses.append(max(use.values()) if use else None)
            res = evaluate_editing(before, model, edits, unrelated, answer, {s: skill_fn(s) for s in SKILLS})
            results.append(_editing_dict(res))
            para = paraphrase_questions(edits)
            flat = answer(model, [q for qs in para for q in qs])
            para_flags, start = [], 0
            for qs, e in zip(para, edits):
                para_flags.append(np.mean([alias_match(o, e.new_aliases) for o in flat[start:start + len(qs)]]))
                start += len(qs)
            seed_items.append({
                "edit_success": np.array([alias_match(o, e.new_aliases)
                                          for o, e in zip(answer(model, edit_questions(edits)), edits)], dtype=float),
                "paraphrase_generalisation": np.array(para_flags),
                "locality": np.array([normalize(b) == normalize(a) for b, a in
                                      zip(answer(before, questions_local), answer(model, questions_local))], dtype=float),
                # per problem: after - before, pooled over skills (preservation in points lost)
                "skill_change": np.concatenate([skill_flags[id(model), s] - skill_flags[id(before), s] for s in SKILLS]),
            })
            # drop cached answers of this model (its id may be reused after it is freed)
            for key in [k for k in cache if k[0] == id(model)]:
                del cache[key]
            for key in [k for k in skill_flags if k[0] == id(model)]:
                del skill_flags[key]
            del model
        items_by_method[spec.label] = {k: np.mean([s[k] for s in seed_items], axis=0) for k in seed_items[0]}
        per_method[spec.label] = {"spec": asdict(spec), "per_seed": results, "budget_use_max": uses,
                                  "skill_preservation": _mean_or_none([r["mean_skill_preservation"] for r in results])}
    first = specs[0].label
    cis = {}
    for measure in items_by_method[first]:
        cols = {label: it[measure] for label, it in items_by_method.items()}
        cols.update({f"{label}-{first}": items_by_method[label][measure] - items_by_method[first][measure]
                     for label in list(items_by_method)[1:]})
        cis[measure] = {k: v.to_dict() for k, v in joint_bootstrap(cols, n_resamples=4999).items()}
    for label, pm in per_method.items():
        pm["ci"] = {measure: cis[measure][label] for measure in cis}
        if label != first:
            pm["vs_reference"] = {measure: cis[measure][f"{label}-{first}"] for measure in cis}
    metrics = {
        "protocol": "editing", "seeds": list(cfg.seeds), "reference": first, "quick": cfg.quick,
        "sizes": {"n_edits": len(edits), "n_local": len(unrelated), "n_skill": cfg.n_skill, "epochs": cfg.train.epochs,
                  "lr": cfg.train.lr},
        "base_edit_old_answer_accuracy": float(base_edit_old.mean()),
        "budget_counts": budget_table(specs, source.fresh()), "methods": per_method,
    }
    with atomic_run_dir(out) as tmp:
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        figs = [save_figure(plot_editing(metrics), tmp / "figures" / "editing.png")]
        (tmp / "report.md").write_text(editing_report(metrics, figs))
    return ProtocolRun(metrics)


def _editing_dict(res) -> dict[str, Any]:
    """``EditingResult.to_dict`` without failing when a skill scores 0 before the edit (preservation undefined)."""
    d = asdict(res)
    try:
        d["skill_preservation"], d["mean_skill_preservation"] = res.skill_preservation, res.mean_skill_preservation
    except ValueError:
        d["skill_preservation"], d["mean_skill_preservation"] = None, None
    return d


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def plot_editing(m: dict[str, Any]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    measures = ["edit_success", "paraphrase_generalisation", "locality"]
    labels = list(m["methods"])
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ci = m["methods"][label]["ci"]
        est = [ci[k]["estimate"] for k in measures]
        err = [[ci[k]["estimate"] - ci[k]["low"] for k in measures], [ci[k]["high"] - ci[k]["estimate"] for k in measures]]
        ax.bar(np.arange(len(measures)) + i * width, est, width, yerr=err, capsize=2, label=label, color=f"C{i}")
    ax.set_xticks(np.arange(len(measures)) + 0.4 - width / 2, measures)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.set_title(f"knowledge editing ({m['sizes']['n_edits']} counterfactual edits)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def editing_report(m: dict[str, Any], figs: list[str]) -> str:
    s = m["sizes"]
    lines = [f"# Knowledge editing ({s['n_edits']} counterfactual edits)", "",
             f"Seeds {m['seeds']}; {s['epochs']} epochs at lr {s['lr']} on the edited questions (template 0); "
             f"locality on {s['n_local']} unrelated known facts; {s['n_skill']} problems per skill"
             + (" (quick mode)." if m["quick"] else ".")
             + f" The base model answers {100 * m['base_edit_old_answer_accuracy']:.1f}% of the edited facts with "
             "their original answer.", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in m["budget_counts"]],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Percent, 95% bootstrap CI over items (skill change: after - before, percentage points, pooled over "
             "math/code/science problems):", ""]
    rows = []
    for label, pm in m["methods"].items():
        ci = pm["ci"]
        rows.append({"method": label, "edit success": fmt_ci(ci["edit_success"]),
                     "paraphrase": fmt_ci(ci["paraphrase_generalisation"]), "locality": fmt_ci(ci["locality"]),
                     "skill change (pp)": fmt_ci(ci["skill_change"], signed=True),
                     "skill preservation (ratio)": "–" if pm["skill_preservation"] is None
                     else f"{pm['skill_preservation']:.3f}"})
    lines.append(md_table(rows, ["method", "edit success", "paraphrase", "locality", "skill change (pp)",
                                 "skill preservation (ratio)"]))
    rows = [{"method": f"{label} - {m['reference']}", **{k: fmt_ci(v, signed=True) for k, v in pm["vs_reference"].items()}}
            for label, pm in m["methods"].items() if "vs_reference" in pm]
    if rows:
        lines += ["", "Paired differences from the reference (percentage points):", "",
                  md_table(rows, ["method", "edit_success", "paraphrase_generalisation", "locality", "skill_change"])]
    lines += [""] + [f"![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"
