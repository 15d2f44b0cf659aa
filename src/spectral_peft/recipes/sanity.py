"""Spectral sanity check (HiP-LoRA, Table 6): does the loss react more to perturbing larger singular directions?

For every target matrix of the model, ``n_indices`` singular indices spread over its spectrum are perturbed one at a
time (``evaluation.sanity``: flip the sign of the triplet, ``noise`` relative noise on its singular vectors, zero
it, or ``fixed``: subtract the matrix's mean singular value along it, the fixed-norm control) and the change of the LM loss on a fixed batch of ``n_docs`` held-out pretraining documents is recorded; the
weights are restored bit-exactly after each perturbation. Reported per perturbation: Pearson r of ``|loss change|``
with ``log(1 + sigma)`` and Spearman rho with ``sigma``, each with its two-sided p-value, pooled over all (matrix,
index) pairs and per matrix type. Each perturbation kind is one resumable unit.

Writes ``metrics.json`` (every (matrix, index, sigma, loss change) effect), ``report.md`` and
``figures/sanity.png`` (|loss change| against sigma, one panel per perturbation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..data import heldout_text
from ..errors import InputError
from ..evaluation.sanity import PERTURBATIONS, correlate_by_matrix, spectral_sanity, text_loss
from ..loading import check_device, check_dtype, check_model_name, load_model, seed_everything
from ..methods import TARGETS, target_shapes
from ..report import md_table, save_figure
from ..runs import RunDir
from ..validation import check_at_least, check_distinct, check_positive


@dataclass
class Config:
    """Perturb single singular directions and correlate the loss change with the singular value.

    Attributes:
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        targets: the matrices to probe, mlp or all-linear.
        n_indices: singular indices per matrix, spread evenly over its spectrum (both ends included).
        n_docs: held-out pretraining documents in the fixed loss batch (each cut to 256 tokens).
        noise: relative size of the noise added to the singular vectors by the noise perturbation.
        perturbations: which perturbations to run, from flip, noise, zero and fixed (the fixed-norm control).
        seed: seed of the held-out documents and of the noise.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    targets: str = "all-linear"
    n_indices: int = 24
    n_docs: int = 32
    noise: float = 0.1
    perturbations: tuple[str, ...] = PERTURBATIONS
    seed: int = 0
    threads: int = 1
    progress: bool = True

    def validate(self) -> None:
        bad = [p for p in self.perturbations if p not in PERTURBATIONS]
        if bad or not self.perturbations:
            raise InputError(f"unknown perturbation(s) {bad}; use one or more of {', '.join(PERTURBATIONS)}")
        check_distinct("perturbations", self.perturbations)
        if self.targets not in TARGETS:
            raise InputError(f"targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        check_at_least(1, n_indices=self.n_indices, n_docs=self.n_docs, threads=self.threads)
        check_positive(noise=self.noise)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"n_indices": 6, "n_docs": 8}


@dataclass
class Result:
    """Per perturbation kind: the unperturbed loss, every direction's effect (``{"module", "index", "sigma",
    "loss_change"}``), the pooled correlation and the correlation per matrix type."""

    model: str
    targets: str
    n_matrices: int
    n_indices: int
    n_docs: int
    noise: float
    perturbations: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seed, cfg.threads)
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
    modules = list(target_shapes(model, cfg.targets))
    if not modules:
        raise InputError(f"the model has no {cfg.targets} target matrices to perturb")
    loss = text_loss(tok, heldout_text(cfg.n_docs, seed=cfg.seed))

    def perturb(kind: str) -> dict[str, Any]:
        res = spectral_sanity(model, loss, modules, kind, cfg.n_indices, cfg.noise, cfg.seed, progress=cfg.progress)
        return {**res.to_dict(), "by_matrix_type": {t: asdict(c) for t, c in correlate_by_matrix(res.effects).items()}}

    results = {kind: run.unit(f"sanity-{kind}", lambda kind=kind: perturb(kind)) for kind in cfg.perturbations}
    return Result(cfg.model, cfg.targets, len(modules), cfg.n_indices, cfg.n_docs, cfg.noise, results)


def plot_sanity(result: Result) -> Figure:
    """|loss change| against sigma (log x, symlog y), one panel per perturbation, with the pooled correlations."""
    kinds = list(result.perturbations)
    fig = Figure(figsize=(4 * len(kinds), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    for ax, kind in zip(axes, kinds):
        res = result.perturbations[kind]
        ax.scatter([e["sigma"] for e in res["effects"]], [abs(e["loss_change"]) for e in res["effects"]], s=8,
                   alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        c = res["correlation"]
        ax.set_title(f"{kind}: Pearson {c['pearson_r']:.2f}, Spearman {c['spearman_rho']:.2f}", fontsize=9)
        ax.set_xlabel("sigma")
        ax.set_ylabel("|loss change|")
    fig.tight_layout()
    return fig


def render(result: Result, run: RunDir) -> str:
    run.write_json("metrics.json", result.to_dict())
    fig = save_figure(plot_sanity(result), run.file("figures/sanity.png"))
    pooled = [{"perturbation": kind, "base loss": f"{res['base_loss']:.4f}",
               "Pearson r (log(1+sigma))": f"{res['correlation']['pearson_r']:.3f}",
               "p (Pearson)": f"{res['correlation']['pearson_p']:.2g}",
               "Spearman rho (sigma)": f"{res['correlation']['spearman_rho']:.3f}",
               "p (Spearman)": f"{res['correlation']['spearman_p']:.2g}"} for kind, res in result.perturbations.items()]
    typed = [{"perturbation": kind, "matrix": t, "Pearson r": f"{c['pearson_r']:.3f}",
              "p (Pearson)": f"{c['pearson_p']:.2g}", "Spearman rho": f"{c['spearman_rho']:.3f}",
              "p (Spearman)": f"{c['spearman_p']:.2g}"}
             for kind, res in result.perturbations.items() for t, c in res["by_matrix_type"].items()]
    lines = ["# Spectral sanity check", "",
             f"Model `{result.model}`: {result.n_matrices} matrices ({result.targets}), up to {result.n_indices} "
             f"singular indices each (spread over the spectrum), loss on {result.n_docs} held-out documents; noise "
             f"{result.noise}. Is |loss change| larger for larger singular values?", "",
             md_table(pooled, list(pooled[0])), "", "Per matrix type:", "",
             md_table(typed, ["perturbation", "matrix", "Pearson r", "p (Pearson)", "Spearman rho", "p (Spearman)"]),
             "", f"![{fig}](figures/{fig})"]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return "\n".join(f"{kind}: Pearson r {c['pearson_r']:.3f} (p {c['pearson_p']:.2g}), Spearman rho "
                     f"{c['spearman_rho']:.3f} (p {c['spearman_p']:.2g}) over {len(res['effects'])} directions"
                     for kind, res in result.perturbations.items() for c in [res["correlation"]])
