"""Spectral sanity check (HiP-LoRA Table 6) on a model: do large singular directions matter more for the loss?

For every target matrix, ``n_indices`` singular indices spread over its spectrum are perturbed one at a time
(``evaluation.sanity``: flip the sign, 10% noise on the singular vectors, or zero the triplet) and the change of the
LM loss on a fixed batch of held-out pretraining text is recorded. Reported per perturbation: Pearson r of
``|loss change|`` with ``log(1 + sigma)`` and Spearman rho with ``sigma``, with two-sided p-values, pooled over all
(matrix, index) pairs and per matrix type; a scatter plot per perturbation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..data import heldout_text
from ..evaluation.sanity import PERTURBATIONS, correlate, lm_loss, spectral_sanity
from .common import ProtocolRun, ModelSource, atomic_run_dir, seed_everything, write_json
from .finetune import md_table, save_figure, target_shapes


@dataclass
class SanityConfig:
    """``spectral-peft sanity``: ``targets`` (``mlp`` or ``all-linear``), ``n_indices`` per matrix, ``n_docs`` held-out
    documents in the loss batch, ``noise`` (relative), ``perturbations``. ``quick``: 6 indices, 8 documents."""

    model: str | None = None
    targets: str = "all-linear"
    n_indices: int = 24
    n_docs: int = 32
    noise: float = 0.1
    perturbations: tuple[str, ...] = PERTURBATIONS
    seed: int = 0
    threads: int | None = 1
    quick: bool = False

    def resolved(self) -> "SanityConfig":
        return replace(self, n_indices=min(self.n_indices, 6), n_docs=min(self.n_docs, 8)) if self.quick else self


def run_sanity(cfg: SanityConfig, out: str | Path) -> ProtocolRun:
    cfg = cfg.resolved()
    bad = [p for p in cfg.perturbations if p not in PERTURBATIONS]
    if bad:
        raise ValueError(f"unknown perturbation(s) {bad}; use {', '.join(PERTURBATIONS)}")
    if cfg.n_indices < 1 or cfg.n_docs < 1:
        raise ValueError("n_indices and n_docs must be >= 1")
    seed_everything(cfg.seed, cfg.threads)
    source = ModelSource(cfg.model)
    tok = source.tokenizer
    model = source.fresh()
    modules = list(target_shapes(model, cfg.targets))
    texts = heldout_text(cfg.n_docs, seed=cfg.seed)
    enc = [tok(t)["input_ids"][:256] for t in texts]
    width = max(map(len, enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    loss = lm_loss(ids, mask)
    results = {}
    from tqdm.auto import tqdm

    for kind in tqdm(cfg.perturbations, desc="sanity"):
        res = spectral_sanity(model, loss, modules, kind, cfg.n_indices, cfg.noise, cfg.seed)
        by_type = {}
        for mtype in sorted({e.module.rsplit(".", 1)[-1] for e in res.effects}):
            eff = [e for e in res.effects if e.module.rsplit(".", 1)[-1] == mtype]
            if len(eff) >= 3:
                by_type[mtype] = asdict(correlate([e.sigma for e in eff], [e.loss_change for e in eff]))
        results[kind] = {**res.to_dict(), "by_matrix_type": by_type}
    metrics = {"protocol": "sanity", "quick": cfg.quick, "targets": cfg.targets, "n_matrices": len(modules),
               "n_indices": cfg.n_indices, "n_docs": cfg.n_docs, "noise": cfg.noise, "perturbations": results}
    with atomic_run_dir(out) as tmp:
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        figs = [save_figure(plot_sanity(metrics), tmp / "figures" / "sanity.png")]
        (tmp / "report.md").write_text(sanity_report(metrics, figs))
    return ProtocolRun(metrics)


def plot_sanity(m: dict[str, Any]) -> Figure:
    kinds = list(m["perturbations"])
    fig = Figure(figsize=(4 * len(kinds), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    for ax, kind in zip(axes, kinds):
        res = m["perturbations"][kind]
        s = np.array([e["sigma"] for e in res["effects"]])
        d = np.abs(np.array([e["loss_change"] for e in res["effects"]]))
        ax.scatter(s, d, s=8, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        c = res["correlation"]
        ax.set_title(f"{kind}: Pearson {c['pearson_r']:.2f}, Spearman {c['spearman_rho']:.2f}", fontsize=9)
        ax.set_xlabel("sigma")
        ax.set_ylabel("|loss change|")
    fig.tight_layout()
    return fig


def sanity_report(m: dict[str, Any], figs: list[str]) -> str:
    lines = ["# Spectral sanity check", "",
             f"{m['n_matrices']} matrices ({m['targets']}), {m['n_indices']} singular indices each (spread over the "
             f"spectrum), loss on {m['n_docs']} held-out documents; noise {m['noise']}"
             + (" (quick mode)." if m["quick"] else "."), "",
             "| perturbation | base loss | Pearson r (log(1+sigma)) | p | Spearman rho (sigma) | p |",
             "|---|---|---|---|---|---|"]
    for kind, res in m["perturbations"].items():
        c = res["correlation"]
        lines.append(f"| {kind} | {res['base_loss']:.4f} | {c['pearson_r']:.3f} | {c['pearson_p']:.2g} | "
                     f"{c['spearman_rho']:.3f} | {c['spearman_p']:.2g} |")
    lines += ["", "Per matrix type:", ""]
    rows = [{"perturbation": kind, "matrix": t, "Pearson r": f"{c['pearson_r']:.3f}", "p (Pearson)": f"{c['pearson_p']:.2g}",
             "Spearman rho": f"{c['spearman_rho']:.3f}", "p (Spearman)": f"{c['spearman_p']:.2g}"}
            for kind, res in m["perturbations"].items() for t, c in res["by_matrix_type"].items()]
    lines.append(md_table(rows, ["perturbation", "matrix", "Pearson r", "p (Pearson)", "Spearman rho", "p (Spearman)"]))
    lines += [""] + [f"![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"
