"""Markdown reports and matplotlib figures (Agg backend) from the experiments' results.

Figures: the probe ``|z - 1|`` over the singular index for every matrix (small multiples and a heat map), where
the probe's protected sets sit in the spectrum, SVF training curves, and the recall / skill-retention trade-off of
the injection methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .probe import Probe  # noqa: E402

MAX_PANELS = 36


def _short(name: str) -> str:
    """'model.layers.3.mlp.gate_proj' -> 'L3 gate_proj'."""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    return f"L{layer} {parts[-1]}" if layer is not None else parts[-1]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def probe_figures(probe: Probe, fig_dir: str | Path, svd: dict[str, torch.Tensor] | None = None,
                  rho: float = 0.1) -> list[Path]:
    """Three figures of the probe ``d = |z - 1|``:

    - ``probe_spectrum.png``: one panel per matrix (rows = layers, columns = matrix kinds), ``d`` over the singular
      index (0 = largest sigma), the top-``rho`` protected indices marked, sigma (normalised) in grey if given;
    - ``probe_heatmap.png``: every matrix as a row, ``d / max(d)`` over the singular index;
    - ``probe_position.png``: where the protected sets sit in the spectrum (histogram of relative index over all
      matrices; a top-by-sigma rule would put everything in the first bin), and the mean ``d`` per decile.
    """
    fig_dir = Path(fig_dir)
    names = list(probe.scales)
    paths = []
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    shown = layers if len(layers) * len(kinds) <= MAX_PANELS else _spread(layers, max(1, MAX_PANELS // len(kinds)))
    fig, axes = plt.subplots(len(shown), len(kinds), figsize=(3.6 * len(kinds), 2.0 * len(shown) + 0.6),
                             squeeze=False, sharex="col")
    for i, layer in enumerate(shown):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            name = f"{layer}.{kind}"
            if name not in probe.scales:
                ax.axis("off")
                continue
            d = probe.scores(name).numpy()
            idx = probe.select(name, "top_fraction", rho=rho).numpy()
            ax.plot(range(len(d)), d, lw=0.8, color="tab:blue")
            ax.scatter(idx, d[idx], s=6, color="tab:red", zorder=3, label=f"top {rho:.0%} (protected)")
            if svd is not None and name in svd:
                s = svd[name].numpy()
                ax2 = ax.twinx()
                ax2.plot(range(len(s)), s / s[0], color="0.6", lw=0.8, ls="--")
                ax2.set_ylim(0, 1.05)
                ax2.set_yticks([])
            ax.set_title(_short(name), fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("|z - 1|", fontsize=8)
            if i == len(shown) - 1:
                ax.set_xlabel("singular index (0 = largest sigma)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("SVF probe |z - 1| over the singular index (red: protected set; grey dashed: sigma / sigma_1)"
                 + ("" if shown == layers else f" — {len(shown)} of {len(layers)} layers"), fontsize=9)
    paths.append(_save(fig, fig_dir / "probe_spectrum.png"))

    width = max(probe.scales[n].numel() for n in names)
    grid = torch.full((len(names), width), float("nan"))
    for k, n in enumerate(names):
        d = probe.scores(n)
        grid[k, :d.numel()] = d / d.max() if d.max() > 0 else d
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(names) + 1.5))
    im = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_short(n) for n in names], fontsize=6 if len(names) > 24 else 8)
    ax.set_xlabel("singular index (0 = largest sigma)")
    ax.set_title("probe |z - 1| / max per matrix")
    fig.colorbar(im, ax=ax, fraction=0.03)
    paths.append(_save(fig, fig_dir / "probe_heatmap.png"))

    rel, deciles = [], torch.zeros(10)
    for n in names:
        d = probe.scores(n)
        r0 = d.numel()
        rel += (probe.select(n, "top_fraction", rho=rho).float() / r0).tolist()
        bins = (torch.arange(r0) * 10) // r0
        deciles += torch.stack([d[bins == b].mean() for b in range(10)]) / len(names)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
    a1.hist(rel, bins=10, range=(0, 1), color="tab:red", alpha=0.8)
    a1.axhline(len(rel) / 10, color="k", ls="--", lw=1, label="uniform")
    a1.set_xlabel("relative singular index of protected directions (0 = top)")
    a1.set_ylabel("count over all matrices")
    a1.set_title(f"where the probe's top-{rho:.0%} sets lie")
    a1.legend(fontsize=8)
    a2.bar(range(10), deciles.numpy(), color="tab:blue")
    a2.set_xticks(range(10))
    a2.set_xticklabels([f"{10 * b}-{10 * b + 10}%" for b in range(10)], rotation=45, fontsize=7)
    a2.set_ylabel("mean |z - 1|")
    a2.set_title("probe magnitude per spectrum decile (mean over matrices)")
    paths.append(_save(fig, fig_dir / "probe_position.png"))
    return paths


def probe_spread(probe: Probe, rho: float = 0.1) -> dict[str, float]:
    """How spread the protected sets are: the fraction of protected indices in the top decile of the spectrum,
    and their mean relative index (0.5 for a uniform spread, near 0 for a top-by-sigma rule)."""
    rel = []
    for n in probe.scales:
        r0 = probe.scales[n].numel()
        rel += (probe.select(n, "top_fraction", rho=rho).float() / r0).tolist()
    return {"fraction_in_top_decile": sum(r < 0.1 for r in rel) / len(rel), "mean_relative_index": sum(rel) / len(rel)}


def _spread(items: list, k: int) -> list:
    if k >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def plot_training(losses: Sequence[float], validation: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Training loss per step and validation score (if any) on a second axis."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", lw=0.8, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if validation:
        ax2 = ax.twinx()
        ax2.plot([v["step"] for v in validation], [v["score"] for v in validation], "o-", color="tab:orange",
                 label="val accuracy")
        ax2.set_ylabel("val accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Recall on injected facts (x) against mean skill retention (y), one point per method; optional CI keys
    ``recall_ci`` / ``retention_ci`` as (low, high)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, r in enumerate(rows):
        x, y = r["recall"], r["retention"]
        if x is None or y is None:
            continue
        xerr = yerr = None
        if r.get("recall_ci"):
            xerr = [[x - r["recall_ci"][0]], [r["recall_ci"][1] - x]]
        if r.get("retention_ci"):
            yerr = [[y - r["retention_ci"][0]], [r["retention_ci"][1] - y]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", color=f"C{k % 10}", capsize=3, label=r["method"])
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0.95, color="0.5", ls="--", lw=1, label="95% retention (PALoRA's claim)")
    ax.set_xlabel("recall on injected facts")
    ax.set_ylabel("mean skill retention (score / SVF expert)")
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "knowledge injection: recall vs skill retention", fontsize=9)
    return _save(fig, Path(path))


def plot_skill_bars(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per-skill scores of every model (reference models first), grouped bars."""
    skills = list(rows[0]["skills"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.4))
    w = 0.8 / len(skills)
    for j, s in enumerate(skills):
        ax.bar([i + j * w for i in range(len(rows))], [r["skills"][s] for r in rows], w, label=s)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("skill accuracy (test split)", fontsize=9)
    return _save(fig, Path(path))


def fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.3g}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` is a list of (key, header); values already formatted or formatted by fmt."""
    head = "| " + " | ".join(h for _, h in columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "\n".join("| " + " | ".join(r[k] if isinstance(r.get(k), str) else fmt(r.get(k)) for k, _ in columns)
                     + " |" for r in rows)
    return head + body + "\n"


def svf_report(m: dict[str, Any], figures: Sequence[Path]) -> str:
    """report.md of an SVF-expert run."""
    lines = [
        f"# SVF expert: `{m['skill']}` ({m['objective']})", "",
        f"- model: `{m['model']}`",
        f"- validation accuracy: base {fmt(m['base_val_accuracy'])}% -> expert {fmt(m['expert_val_accuracy'])}% "
        f"(best step {m['best_step']} of {m['steps']}; {m['train_seconds']:.0f} s)",
        f"- training loss: {m['first_loss']:.3f} (first step) -> {m['last_loss']:.3f} (last step)",
        f"- parameter overhead: {m['n_z']:,} z entries / {m['n_base_parameters']:,} base parameters = "
        f"{100 * m['parameter_overhead']:.4f}%", "",
        "## Figures", "",
    ]
    lines += [f"![{f.stem}]({f.as_posix()})" for f in figures]
    return "\n".join(lines) + "\n"


METRIC_COLUMNS = [
    ("method", "method"), ("trainable", "trainable params"), ("recall", "recall %"),
    ("paraphrase_recall", "paraphrase recall %"), ("highly_known_retention", "HighlyKnown retention %"),
    ("skills_str", "skills %"), ("mean_skill_retention", "skill retention %"), ("perplexity_str", "perplexity"),
]


def metric_row(method: str, m: dict[str, Any], trainable: int | None = None) -> dict[str, Any]:
    """A flat row of formatted cells for :data:`METRIC_COLUMNS`."""
    return {
        "method": method, "trainable": f"{trainable:,}" if trainable is not None else "–",
        "recall": m.get("recall"), "paraphrase_recall": m.get("paraphrase_recall"),
        "highly_known_retention": m.get("highly_known_retention"),
        "skills_str": " / ".join(f"{k} {fmt(v)}" for k, v in m["skills"].items()),
        "mean_skill_retention": m.get("mean_skill_retention"),
        "perplexity_str": f"{m['perplexity']:.3f}" if m.get("perplexity") is not None else "–",
    }


def demo_report(m: dict[str, Any], table_md: str, cfg: Any) -> str:
    """report.md of the demo."""
    svf, facts, spread = m["svf"], m["facts"], m["probe_spread"]
    ret = {n: v.get("mean_skill_retention") for n, v in m["models"].items() if n not in ("base", "svf-expert")}
    lines = [
        f"# spectral-peft demo: PALoRA on `{m['model']}` (seed {m['seed']})", "",
        "## What ran", "",
        f"1. SVF expert on `{m['skill']}` ({svf['objective']}, {svf['steps']} steps): validation accuracy "
        f"{fmt(svf['base_val_accuracy'])}% (base) -> {fmt(svf['expert_val_accuracy'])}% (expert, best step "
        f"{svf['best_step']}). Probe overhead: {m['n_z']:,} z entries / {m['n_base_parameters']:,} base parameters "
        f"= {100 * m['probe_overhead']:.4f}%.",
        f"2. Categorised facts on the expert: held-out candidates {facts['categories'].get('heldout_candidates')}, "
        f"known sample {facts['categories'].get('known_sample')}.",
        f"3. Injected {facts['n_inject']} Unknown facts ({facts['n_mix']} HighlyKnown mixed in) with "
        f"{', '.join(m['methods'])}: rank {cfg.adapter.r}, alpha {cfg.adapter.lora_alpha}, targets "
        f"`{cfg.adapter.targets}`, {cfg.training.epochs} epochs at lr {cfg.training.lr}, batch {cfg.training.batch_size}. "
        "Every method starts from the same expert.",
        f"4. Evaluated on {cfg.eval.n_skill} test problems per skill, {facts['n_retain']} HighlyKnown facts held out, "
        f"and {cfg.eval.n_ppl} held-out documents (perplexity).", "",
        "## Results", "",
        "Recall and retention in %; skill retention = mean over skills of score / the SVF expert's score; "
        "HighlyKnown retention = recall of held-out HighlyKnown facts / the expert's.", "",
        table_md,
        "",
        f"Probe spread: {100 * spread['fraction_in_top_decile']:.0f}% of the probe's protected directions lie in the "
        f"top decile of the spectrum (mean relative index {spread['mean_relative_index']:.2f}; uniform = 10% and 0.50).",
        "",
        "Skill retention >= 95%: " + ", ".join(f"{n} {'yes' if (v or 0) >= 0.95 else 'no'} ({fmt(v)}%)"
                                                for n, v in ret.items()) + ".",
        "",
        f"Wall time: {m['seconds']:.0f} s.", "",
        "## Figures", "",
        "![recall vs retention](figures/tradeoff.png)", "",
        "![skills](figures/skills.png)", "",
        "![probe over the spectrum](figures/probe_spectrum.png)", "",
        "![probe heat map](figures/probe_heatmap.png)", "",
        "![protected-set positions](figures/probe_position.png)", "",
        "![SVF training](figures/svf_training.png)", "",
    ]
    return "\n".join(lines)


def _ci(e: Any) -> str:
    if not e:
        return "–"
    if e.get("low") is None:
        return f"{100 * e['mean']:.1f}"
    return f"{100 * e['mean']:.1f} [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def study_figures(summary: dict[str, Any], fig_dir: str | Path) -> list[Path]:
    """The recall / retention trade-off with 95% intervals over seeds."""
    points = []
    for name, e in summary["models"].items():
        if name == "base" or not e.get("recall") or not e.get("mean_skill_retention"):
            continue
        r, t = e["recall"], e["mean_skill_retention"]
        points.append({"method": name, "recall": r["mean"], "retention": t["mean"],
                       "recall_ci": (r["low"], r["high"]) if r["low"] is not None else None,
                       "retention_ci": (t["low"], t["high"]) if t["low"] is not None else None})
    n = max(e["n_seeds"] for e in summary["models"].values())
    return [plot_tradeoff(points, Path(fig_dir) / "tradeoff.png",
                          title=f"recall vs skill retention, mean and 95% CI over {n} seeds")]


def study_markdown(summary: dict[str, Any], run_dir: str | Path) -> str:
    """The results table (mean [95% CI] over seeds) of a PALoRA study."""
    cols = [("method", "method"), ("trainable", "trainable params"), ("recall", "recall %"),
            ("paraphrase_recall", "paraphrase recall %"), ("highly_known_retention", "HighlyKnown retention %"),
            ("mean_skill_retention", "skill retention %"), ("skills", "per-skill retention %"),
            ("perplexity_increase", "perplexity increase")]
    rows = []
    for name, e in summary["models"].items():
        skills = [k[10:] for k in e if k.startswith("retention:")]
        ppl = e.get("perplexity_increase")
        rows.append({"method": name, "trainable": f"{e['trainable_parameters']:,}" if e.get("trainable_parameters") is not None else "–",
                     **{k: _ci(e.get(k)) for k in ("recall", "paraphrase_recall", "highly_known_retention",
                                                   "mean_skill_retention")},
                     "skills": " / ".join(f"{s} {100 * e['retention:' + s]['mean']:.0f}" for s in skills
                                          if e.get("retention:" + s)),
                     "perplexity_increase": f"{ppl['mean']:+.4f}" if ppl else "–"})
    return table(rows, cols)
