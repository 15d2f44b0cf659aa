"""Continual tuning (methods.md): train tasks T1..Tn in sequence and evaluate every task after each stage.

Each stage merges the previous stage's adapter into the weights (``merge_and_unload``) and trains a fresh adapter
of the same method on the next task, so a spectral method always protects the top-k directions of the *current*
model (its SVD is recomputed at each stage) and every method keeps a fresh rank-r update per stage. This is our
reading; the paper's recap does not say whether the adapter is reset between tasks.

Reported per method: the accuracy matrix ``R`` (``evaluation.continual``), the final average accuracy (ACC) and the
backward transfer (BWT), with 95% percentile-bootstrap CIs over evaluation examples (example ``i`` of every task
forms one row, so ACC and BWT are row means; rows are resampled jointly for all methods, which pairs the method
differences). Per-example correctness is averaged over seeds first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.continual import ContinualResult, plot_accuracy_matrix, run_continual
from ..evaluation.stats import joint_bootstrap
from .common import ProtocolRun, ModelSource, atomic_run_dir, seed_everything, write_json
from .finetune import (PROTOCOL_METHODS, AdapterSpec, TrainSettings, budget_table, eval_examples, final_budget_use,
                       fmt_ci, match_budgets, md_table, parse_specs, resolve_task, save_figure, score_flags, task_pairs,
                       train_adapter, unwrap)


@dataclass
class ContinualConfig:
    """``spectral-peft continual``: ``methods`` (specs), ``tasks`` in order (at least 2; 4 by default), ``seeds``.
    ``quick``: LoRA and HiP-LoRA, 1 seed, :meth:`TrainSettings.quick` sizes."""

    methods: str = "lora,hiplora,hiplora:mode=penalty"
    tasks: tuple[str, ...] = ("count", "max", "reverse@3", "sort")
    model: str | None = None
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    seeds: tuple[int, ...] = (0, 1)
    train: TrainSettings = field(default_factory=TrainSettings)
    match_budget: bool = True
    threads: int | None = 1
    quick: bool = False
    progress: bool = True

    def resolved(self) -> "ContinualConfig":
        if not self.quick:
            return self
        methods = self.methods if self.methods != "lora,hiplora,hiplora:mode=penalty" else "lora,hiplora"
        return replace(self, methods=methods, seeds=self.seeds[:1], train=self.train.quick())


def run_continual_protocol(cfg: ContinualConfig, out: str | Path) -> ProtocolRun:
    cfg = cfg.resolved()
    if len(cfg.tasks) < 2 or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(f"continual tuning needs at least 2 distinct tasks, got {list(cfg.tasks)}")
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model)
    tok = source.tokenizer
    specs = parse_specs(cfg.methods, AdapterSpec(r=cfg.r, k=cfg.k, targets=cfg.targets), allowed=PROTOCOL_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, source.fresh())
    tasks = {name: resolve_task(name) for name in cfg.tasks}
    data = {n: (task_pairs(t, cfg.train.n_train), eval_examples(t, cfg.train.n_eval)) for n, t in tasks.items()}
    n_eval = min(len(d[1]) for d in data.values())
    base = source.fresh()
    base_acc = {n: float(score_flags(base, tok, tasks[n], data[n][1][:n_eval], cfg.train.max_new_tokens).mean())
                for n in tasks}
    per_method: dict[str, Any] = {}
    flags_by_method: dict[str, np.ndarray] = {}
    for spec in specs:
        matrices, flag_runs, uses = [], [], []
        for seed in cfg.seeds:
            seed_everything(seed, cfg.threads)
            flags: list[np.ndarray] = []

            def train_stage(model, name, seed=seed):
                plain = unwrap(model)
                wrapped, _ = train_adapter(plain, tok, spec, data[name][0], cfg.train, seed,
                                           desc=f"continual {spec.label} {name} s{seed}", progress=cfg.progress)
                use = final_budget_use(wrapped)
                uses.append(max(use.values()) if use else None)
                return wrapped

            def evaluate(model, name, flags=flags):
                f = score_flags(model, tok, tasks[name], data[name][1][:n_eval], cfg.train.max_new_tokens)
                flags.append(f)
                return float(f.mean())

            res = run_continual(source.fresh(), list(cfg.tasks), train_stage, evaluate)
            matrices.append(res)
            n = len(cfg.tasks)
            flag_runs.append(np.stack(flags).reshape(n, n, n_eval))  # stage x task x example
        mean_flags = np.mean(flag_runs, axis=0)
        flags_by_method[spec.label] = mean_flags
        R = mean_flags.mean(axis=2)
        per_method[spec.label] = {
            "spec": asdict(spec), "R_per_seed": [r.R for r in matrices], "R": R.tolist(),
            "final_average_accuracy_per_seed": [r.final_average_accuracy for r in matrices],
            "backward_transfer_per_seed": [r.backward_transfer for r in matrices],
            "forgetting_per_seed": [r.forgetting for r in matrices],
            "budget_use_max": uses,
        }
    cols = {}
    for label, F in flags_by_method.items():
        cols[f"{label}|ACC"] = F[-1].mean(axis=0)                         # per example: mean over tasks
        cols[f"{label}|BWT"] = (F[-1, :-1] - F[np.arange(len(F) - 1), np.arange(len(F) - 1)]).mean(axis=0)
    first = specs[0].label
    for label in list(flags_by_method)[1:]:
        for key in ("ACC", "BWT"):
            cols[f"{label}-{first}|{key}"] = cols[f"{label}|{key}"] - cols[f"{first}|{key}"]
    cis = {k: v.to_dict() for k, v in joint_bootstrap(cols, n_resamples=4999).items()}
    for label, pm in per_method.items():
        pm["final_average_accuracy"] = cis[f"{label}|ACC"]
        pm["backward_transfer"] = cis[f"{label}|BWT"]
        if label != first:
            pm["vs_reference"] = {"ACC": cis[f"{label}-{first}|ACC"], "BWT": cis[f"{label}-{first}|BWT"]}
    metrics = {
        "protocol": "continual", "tasks": list(cfg.tasks), "seeds": list(cfg.seeds), "reference": first,
        "quick": cfg.quick, "sizes": {"n_train": cfg.train.n_train, "n_eval": n_eval, "epochs": cfg.train.epochs},
        "budget_counts": budget_table(specs, source.fresh()), "base_accuracy": base_acc, "methods": per_method,
    }
    with atomic_run_dir(out) as tmp:
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        figs = []
        for k, (label, pm) in enumerate(per_method.items()):
            fig = plot_accuracy_matrix(ContinualResult(list(cfg.tasks), pm["R"]), title=f"continual: {label}")
            figs.append(save_figure(fig, tmp / "figures" / f"accuracy_matrix_{k}.png"))
        (tmp / "report.md").write_text(continual_report(metrics, figs))
    return ProtocolRun(metrics)


def continual_report(m: dict[str, Any], figs: list[str]) -> str:
    s = m["sizes"]
    lines = [f"# Continual tuning: {' -> '.join(m['tasks'])}", "",
             f"Seeds {m['seeds']}; per stage {s['n_train']} training pairs x {s['epochs']} epoch(s); {s['n_eval']} "
             f"test examples per task" + (" (quick mode)." if m["quick"] else ".") + " Each stage merges the previous "
             "adapter and trains a fresh one.", "",
             "Base accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["base_accuracy"].items()) + ".", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in m["budget_counts"]],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Final average accuracy (ACC) and backward transfer (BWT), % with 95% bootstrap CI over examples:", ""]
    rows = []
    for label, pm in m["methods"].items():
        v = pm.get("vs_reference", {})
        rows.append({"method": label, "ACC": fmt_ci(pm["final_average_accuracy"]),
                     "BWT": fmt_ci(pm["backward_transfer"], signed=True),
                     f"ACC - {m['reference']}": fmt_ci(v["ACC"], signed=True) if v else "",
                     f"BWT - {m['reference']}": fmt_ci(v["BWT"], signed=True) if v else ""})
    lines.append(md_table(rows, ["method", "ACC", "BWT", f"ACC - {m['reference']}", f"BWT - {m['reference']}"]))
    lines += ["", "Accuracy matrices R (row: after stage, column: task):", ""]
    for label, pm in m["methods"].items():
        lines += [f"`{label}`:", "", md_table([{"after": t, **{u: f"{100 * x:.1f}" for u, x in zip(m["tasks"], row)}}
                                               for t, row in zip(m["tasks"], pm["R"])], ["after", *m["tasks"]]), ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"
