"""Figures (matplotlib, Agg backend) and markdown helpers for the recipes' reports.

The probe figures (``|z - 1|`` over the singular index for every matrix, as small multiples and a heat map, and where
the probe's protected sets sit in the spectrum), SVF training curves, the recall / skill-retention trade-off of the
injection methods and per-skill bars; then the helpers every recipe shares (markdown tables, intervals, figures).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def error_bars(estimates: Sequence[float], lows: Sequence[float], highs: Sequence[float],
               scale: float = 1.0) -> list[list[float]]:
    """Matplotlib's ``[[below...], [above...]]`` error bars (times ``scale``) of ``estimates`` for the intervals
    ``[low, high]``. A percentile bootstrap interval can lie wholly on one side of its estimate (a hierarchical one
    over few seeds, or one that collapses); the bar is then drawn from the estimate to the interval's far end, never
    with a negative length, which matplotlib refuses."""
    return [[scale * max(0.0, e - lo) for e, lo in zip(estimates, lows)],
            [scale * max(0.0, hi - e) for e, hi in zip(estimates, highs)]]


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Recall on injected facts (x) against mean skill retention (y), one point per method; optional CI keys
    ``recall_ci`` / ``retention_ci`` as (low, high), drawn by :func:`error_bars`."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, r in enumerate(rows):
        x, y = r["recall"], r["retention"]
        if x is None or y is None:
            continue
        xerr = yerr = None
        if r.get("recall_ci"):
            xerr = error_bars([x], [r["recall_ci"][0]], [r["recall_ci"][1]])
        if r.get("retention_ci"):
            yerr = error_bars([y], [r["retention_ci"][0]], [r["retention_ci"][1]])
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


# --- shared by every recipe: markdown tables, intervals, figures ------------------------------------------------------

def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) over ``columns``; ``None`` prints as an en dash."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    cell = lambda v: "–" if v is None else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def fmt_ci(ci: Any, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``estimate [low, high]`` of an interval (a :class:`~spectral_peft.evaluation.stats.CI` or its dict), scaled
    (percent by default)."""
    d = ci if isinstance(ci, dict) else ci.to_dict()
    sign = "+" if signed else ""
    return (f"{d['estimate'] * scale:{sign}.{digits}f} [{d['low'] * scale:{sign}.{digits}f}, "
            f"{d['high'] * scale:{sign}.{digits}f}]")


def save_figure(fig, path: str | Path) -> str:
    """Save a matplotlib figure (PNG, 110 dpi) and return its file name, for a report's image link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def plot_loss(losses_by_label: dict[str, Sequence[float]], title: str = "training loss"):
    """Training loss per step, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, losses in losses_by_label.items():
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_budget_use(logs_by_label: dict[str, Sequence[dict[str, float]]], title: str = "HiP-LoRA budget use"):
    """``max over layers of R(phi)/eps`` per step (solid) and the mean over layers (dotted), one colour per run; the
    dashed line is the budget."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (label, logs) in enumerate(logs_by_label.items()):
        rows = [r for r in logs if "budget_use_max" in r]
        if not rows:
            continue
        colour = f"C{k % 10}"
        ax.plot([r["step"] for r in rows], [r["budget_use_max"] for r in rows], color=colour, label=f"{label} (max)")
        ax.plot([r["step"] for r in rows], [r["budget_use_mean"] for r in rows], ":", color=colour,
                label=f"{label} (mean)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("R(phi) / eps")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fmt_steps(stops: Sequence[Mapping[str, Any]]) -> str:
    """Training steps of several fine-tunes (``{"steps", "reached_stop_at"}`` each): their median and range, and how
    many reached ``train.stop_at`` (matched task gain) when it was set, e.g. ``48 (40-64), 9/10 at stop_at``."""
    steps = [x["steps"] for x in stops]
    reached = [x["reached_stop_at"] for x in stops if x["reached_stop_at"] is not None]
    return (f"{int(statistics.median(steps))} ({min(steps)}-{max(steps)})"
            + (f", {sum(reached)}/{len(stops)} at stop_at" if reached else ""))

