"""Spectral drift and pretraining degradation of fine-tuned adapters (HiP-LoRA paper, methods.md).

For each method (spec) and seed, one adapter is trained on a task (default ``sort``) from the same base. Then:

- interference of every adapted matrix (``evaluation.interference``): top-k energy fraction of ``dW``, principal
  angles between the top-k singular subspaces of ``W`` and ``W + dW``, relative change of the top-k singular values
  (``k = interference_k``, default HiP-LoRA's ``k``);
- pretraining degradation: change of the pooled NLL on held-out pretraining text (``data.heldout_text``) and the
  percentage-point change on the skills (math, code, science) and on known facts, adapted minus base.

CIs: paired percentile bootstrap over evaluation items (documents / problems / facts; each item's adapted score is
averaged over seeds first), and, per method, the paired CI of its difference from the reference method (LoRA)
on the same items. Base evaluations are shared by every method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..data import SKILLS, World, get_task, heldout_text
from ..evaluation.interference import INTERFERENCE_METRICS, InterferenceRow, interference_table, plot_interference
from ..evaluation.knowledge import recall
from ..evaluation.skills import skill_accuracy
from ..evaluation.stats import joint_bootstrap
from ..merging import adapter_deltas
from .common import ProtocolRun, ModelSource, atomic_run_dir, seed_everything, write_json
from .finetune import (PROTOCOL_METHODS, AdapterSpec, TrainSettings, budget_table, doc_nll, final_budget_use,
                       fmt_ci, match_budgets, md_table, parse_specs, plot_budget_use, resolve_task, save_figure,
                       score_flags, task_pairs, eval_examples)

DEFAULT_DRIFT_METHODS = "lora,hiplora:rho=0.02,hiplora,hiplora:rho=0.5,hiplora:mode=penalty,oplora"


@dataclass
class DriftConfig:
    """``spectral-peft drift``. ``methods``: comma-separated specs (``finetune`` syntax); the first is the reference
    for the paired differences unless ``reference`` names another. ``quick``: 3 methods, 1 seed, small sizes."""

    methods: str = DEFAULT_DRIFT_METHODS
    reference: str | None = None
    task: str = "max"
    model: str | None = None
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainSettings = field(default_factory=TrainSettings)
    n_ppl: int = 100
    n_skill: int = 64
    n_facts: int = 100
    skill_max_new_tokens: int = 96
    interference_k: int | None = None
    match_budget: bool = True
    threads: int | None = 1
    quick: bool = False
    progress: bool = True

    def resolved(self) -> "DriftConfig":
        if not self.quick:
            return self
        return replace(self, methods=self.methods if self.methods != DEFAULT_DRIFT_METHODS else "lora,hiplora,hiplora:mode=penalty",
                       seeds=self.seeds[:1], n_ppl=min(self.n_ppl, 32), n_skill=min(self.n_skill, 16),
                       n_facts=min(self.n_facts, 40),
                       train=self.train.quick())


def _items(model, tok, cfg: DriftConfig, texts, skill_examples, facts) -> dict[str, np.ndarray]:
    """Per-item scores: ``nll`` (per-document NLL sums, with ``tokens``), one 0/1 column per skill and ``facts``."""
    sums, counts = doc_nll(model, tok, texts)
    out = {"nll": sums, "tokens": counts}
    for skill, exs in skill_examples.items():
        res = skill_accuracy(model, tok, skill, exs, max_new_tokens=cfg.skill_max_new_tokens, progress=False)
        out[skill] = np.array(res.correct, dtype=float)
    out["facts"] = np.array(recall(model, tok, facts, progress=False).correct, dtype=float)
    return out


def run_drift(cfg: DriftConfig, out: str | Path) -> ProtocolRun:
    """Train every method on ``cfg.task`` and measure interference and degradation; write the run directory."""
    cfg = cfg.resolved()
    defaults = AdapterSpec(r=cfg.r, k=cfg.k, targets=cfg.targets)
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model)
    tok = source.tokenizer
    specs = parse_specs(cfg.methods, defaults, allowed=PROTOCOL_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, source.fresh())
    labels = [s.label for s in specs]
    reference = cfg.reference or labels[0]
    if reference not in labels:
        raise ValueError(f"reference {reference!r} is not one of the methods {labels}")
    task = resolve_task(cfg.task)
    pairs, examples = task_pairs(task, cfg.train.n_train), eval_examples(task, cfg.train.n_eval)
    texts = heldout_text(cfg.n_ppl)
    skill_examples = {s: get_task(s).examples("test", n=cfg.n_skill) for s in SKILLS}
    facts = World().known_facts[:cfg.n_facts]
    k_int = cfg.interference_k or cfg.k

    base = source.fresh()
    base_items = _items(base, tok, cfg, texts, skill_examples, facts)
    base_task = score_flags(base, tok, task, examples, cfg.train.max_new_tokens)
    per_method: dict[str, dict[str, Any]] = {}
    rows_by_method: dict[str, list[InterferenceRow]] = {}
    logs_by_label: dict[str, list] = {}
    for spec in specs:
        seed_items, task_flags, rows_all, uses, counts = [], [], [], [], None
        for seed in cfg.seeds:
            seed_everything(seed, cfg.threads)
            from .finetune import train_adapter

            model, history = train_adapter(source.fresh(), tok, spec, pairs, cfg.train, seed,
                                           desc=f"drift {spec.label} s{seed}", progress=cfg.progress)
            if seed == cfg.seeds[0]:
                logs_by_label[spec.label] = history.logs
            from .methods import count_trainable

            counts = count_trainable(model)
            uses.append(final_budget_use(model))
            task_flags.append(score_flags(model, tok, task, examples, cfg.train.max_new_tokens))
            seed_items.append(_items(model, tok, cfg, texts, skill_examples, facts))
            rows_all.append(interference_table(base, adapter_deltas(model), k_int))
        rows_by_method[spec.label] = rows_all[0]
        items = {key: np.mean([s[key] for s in seed_items], axis=0) for key in seed_items[0]}
        per_method[spec.label] = {
            "spec": asdict(spec), "trainable_parameters": counts, "items": items,
            "task_accuracy_per_seed": [float(f.mean()) for f in task_flags],
            "task_accuracy": float(np.mean([f.mean() for f in task_flags])),
            "budget_use_max": [max(u.values()) if u else None for u in uses],
            "interference": [[r.to_dict() for r in rows] for rows in rows_all],
            "interference_mean": {m: float(np.nanmean([getattr(r.metrics, m) for rows in rows_all for r in rows]))
                                  for m in INTERFERENCE_METRICS},
        }

    # degradation CIs: columns per item, joint bootstrap (paired across methods; base shared)
    n_tok_base = base_items["tokens"].sum()
    columns: dict[str, np.ndarray] = {}
    n_doc = len(texts)
    for label, pm in per_method.items():
        it = pm["items"]
        # per-document contribution to the pooled delta NLL: (adapted - base) sums scaled by the doc count
        columns[f"{label}|delta_nll"] = (it["nll"] - base_items["nll"]) * n_doc / n_tok_base
        if label != reference:
            ref = per_method[reference]["items"]
            columns[f"{label}-ref|delta_nll"] = (it["nll"] - ref["nll"]) * n_doc / n_tok_base
    doc_cis = joint_bootstrap(columns, n_resamples=4999)
    score_cis = {}
    for name in (*SKILLS, "facts"):
        cols = {}
        for label, pm in per_method.items():
            cols[label] = pm["items"][name] - base_items[name]
            if label != reference:
                cols[f"{label}-ref"] = pm["items"][name] - per_method[reference]["items"][name]
        score_cis[name] = joint_bootstrap(cols, n_resamples=4999)

    methods_out = {}
    for label, pm in per_method.items():
        deg = {"delta_nll": doc_cis[f"{label}|delta_nll"].to_dict(),
               "points": {n: {k: 100 * v for k, v in score_cis[n][label].to_dict().items() if k != "confidence"}
                          for n in score_cis},
               "scores": {n: float(pm["items"][n].mean()) for n in score_cis},
               "nll": float(pm["items"]["nll"].sum() / pm["items"]["tokens"].sum())}
        if label != reference:
            deg["vs_reference"] = {"delta_nll": doc_cis[f"{label}-ref|delta_nll"].to_dict(),
                                   **{n: {k: 100 * v for k, v in score_cis[n][f"{label}-ref"].to_dict().items()
                                          if k != "confidence"} for n in score_cis}}
        methods_out[label] = {k: v for k, v in pm.items() if k != "items"} | {"degradation": deg}
    metrics = {
        "protocol": "drift", "task": task.name, "reference": reference, "seeds": list(cfg.seeds),
        "interference_k": k_int, "quick": cfg.quick,
        "sizes": {"n_train": len(pairs), "n_eval": len(examples), "epochs": cfg.train.epochs, "n_ppl": n_doc,
                  "n_skill": cfg.n_skill, "n_facts": len(facts)},
        "budget_counts": budget_table(specs, source.fresh()),
        "base": {"nll": float(base_items["nll"].sum() / n_tok_base), "task_accuracy": float(base_task.mean()),
                 "scores": {n: float(base_items[n].mean()) for n in score_cis}},
        "methods": methods_out,
    }
    with atomic_run_dir(out) as tmp:
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        figs = []
        for metric in ("energy_fraction", "left_angle_max", "right_angle_max", "sv_rel_change"):
            figs.append(save_figure(plot_interference(rows_by_method, metric, title=f"{metric} per layer ({task.name})"),
                                    tmp / "figures" / f"interference_{metric}.png"))
        figs.append(save_figure(plot_degradation(metrics), tmp / "figures" / "degradation.png"))
        if any("budget_use_max" in r for logs in logs_by_label.values() for r in logs):
            figs.append(save_figure(plot_budget_use({k: v for k, v in logs_by_label.items()}),
                                    tmp / "figures" / "budget_use.png"))
        (tmp / "report.md").write_text(drift_report(metrics, figs))
    return ProtocolRun(metrics)


def plot_degradation(metrics: dict[str, Any]) -> Figure:
    """Left: delta NLL per method; right: percentage-point change per general task and method; 95% CI bars."""
    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.2]})
    labels = list(metrics["methods"])
    d = [metrics["methods"][m]["degradation"]["delta_nll"] for m in labels]
    ax1.bar(range(len(labels)), [x["estimate"] for x in d], color=[f"C{i}" for i in range(len(labels))],
            yerr=[[x["estimate"] - x["low"] for x in d], [x["high"] - x["estimate"] for x in d]], capsize=3)
    ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel("delta NLL (nats/token)")
    ax1.axhline(0, color="k", lw=0.6)
    names = list(metrics["base"]["scores"])
    width = 0.8 / len(labels)
    for i, m in enumerate(labels):
        pts = metrics["methods"][m]["degradation"]["points"]
        est = [pts[n]["estimate"] for n in names]
        err = [[pts[n]["estimate"] - pts[n]["low"] for n in names], [pts[n]["high"] - pts[n]["estimate"] for n in names]]
        ax2.bar(np.arange(len(names)) + i * width, est, width, yerr=err, capsize=2, label=m, color=f"C{i}")
    ax2.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax2.set_ylabel("change (percentage points)")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.legend(fontsize=7)
    fig.suptitle(f"pretraining degradation after fine-tuning on {metrics['task']}")
    fig.tight_layout()
    return fig


def drift_report(m: dict[str, Any], figs: list[str]) -> str:
    s = m["sizes"]
    lines = [f"# Spectral drift and pretraining degradation (`{m['task']}`)", "",
             f"Seeds {m['seeds']}; {s['n_train']} training pairs x {s['epochs']} epoch(s); degradation on {s['n_ppl']} "
             f"held-out documents, {s['n_skill']} problems per skill, {s['n_facts']} known facts"
             + (" (quick mode)." if m["quick"] else "."), "",
             f"Base: NLL {m['base']['nll']:.4f}; " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m['base']['scores'].items())
             + f"; task {100 * m['base']['task_accuracy']:.1f}%.", "",
             "Trainable parameters:", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in m["budget_counts"]],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Degradation (adapted - base; 95% paired bootstrap CI over items):", ""]
    names = list(m["base"]["scores"])
    rows = []
    for label, pm in m["methods"].items():
        d = pm["degradation"]
        rows.append({"method": label, "task acc": f"{100 * pm['task_accuracy']:.1f}",
                     "delta NLL": fmt_ci(d["delta_nll"], 1, 4, True),
                     **{f"{n} (pp)": fmt_ci(d["points"][n], 1, 1, True) for n in names},
                     "budget use": ", ".join("–" if u is None else f"{u:.2f}" for u in pm["budget_use_max"])})
    lines.append(md_table(rows, ["method", "task acc", "delta NLL", *[f"{n} (pp)" for n in names], "budget use"]))
    lines += ["", f"Difference from `{m['reference']}` (method - reference, paired 95% CI):", ""]
    rows = []
    for label, pm in m["methods"].items():
        v = pm["degradation"].get("vs_reference")
        if v:
            rows.append({"method": label, "delta NLL": fmt_ci(v["delta_nll"], 1, 4, True),
                         **{f"{n} (pp)": fmt_ci(v[n], 1, 1, True) for n in names}})
    lines.append(md_table(rows, ["method", "delta NLL", *[f"{n} (pp)" for n in names]]))
    lines += ["", f"Interference (mean over matrices and seeds, k = {m['interference_k']}):", ""]
    rows = [{"method": label, **{k: f"{v:.4g}" for k, v in pm["interference_mean"].items()}}
            for label, pm in m["methods"].items()]
    lines.append(md_table(rows, ["method", "energy_fraction", "left_angle_max", "right_angle_max", "sv_rel_change",
                                 "sv_max_rel_change"]))
    lines += [""] + [f"![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"
