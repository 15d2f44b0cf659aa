"""Stage 1 of PALoRA: train an SVF expert on a skill and freeze it as a probe.

Objective ``sft`` (default): cross-entropy on the skill's worked solutions. Objective ``reinforce``: greedy
rollouts rewarded +1/-1 by the skill's checker, optionally with a KL penalty to the base. Validation accuracy
(greedy, exact final answer, on the skill's val split) is logged every ``eval_every`` steps and the best
checkpoint is kept. The run directory holds ``probe/`` (``probe_config.json``, ``probe.safetensors``),
``adapter/`` (the SVF adapter), ``config.json``, ``metrics.json``, ``figures/*.png`` and ``report.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters import method_config
from ..adapters.base import MLP_MODULES
from ..data import SKILLS, get_task
from ..evaluation import skill_accuracy
from ..model import get_peft_model
from ..probe import Probe
from ..training import ReinforceObjective, SFTObjective, TrainConfig, train
from .common import ModelSource, atomic_run_dir, seed_everything, write_json

OBJECTIVES = ("sft", "reinforce")


@dataclass
class SVFExpertConfig:
    """What ``spectral-peft svf`` runs. ``model``: ``None``/``"organism"``, a checkpoint directory or an HF id."""

    skill: str = "math"
    objective: str = "sft"
    model: str | None = None
    n_train: int = 1024
    n_val: int = 64
    epochs: int = 1
    lr: float = 5e-3
    batch_size: int = 16
    eval_every: int = 16
    kl_coef: float = 0.0
    parameterisation: str = "plain"
    targets: list[str] = field(default_factory=lambda: list(MLP_MODULES))
    max_new_tokens: int = 96
    seed: int = 0
    threads: int | None = 2
    progress: bool = True

    def validate(self) -> None:
        if self.skill not in SKILLS:
            get_task(self.skill)  # raises a one-line KeyError for unknown names; instruction tasks are allowed
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")


@dataclass
class SVFExpertResult:
    """Where the run is, the probe, and the measured numbers."""

    run_dir: Path
    probe: Probe
    metrics: dict

    @property
    def probe_dir(self) -> Path:
        return self.run_dir / "probe"


def train_svf_expert(cfg: SVFExpertConfig, out: str | Path, source: ModelSource | None = None) -> SVFExpertResult:
    """Train the expert, save the probe, figures and report into ``out`` (atomically); return the result."""
    from .. import report

    cfg.validate()
    seed_everything(cfg.seed, cfg.threads)
    source = source or ModelSource(cfg.model)
    tokenizer = source.tokenizer
    task = get_task(cfg.skill)
    train_ex = task.examples("train", n=cfg.n_train, seed=cfg.seed)
    val_ex = task.examples("val", n=cfg.n_val, seed=cfg.seed)

    def val_accuracy(m) -> dict:
        r = skill_accuracy(m, tokenizer, task, examples=val_ex, max_new_tokens=cfg.max_new_tokens, progress=False)
        return {"score": r.accuracy, "accuracy": r.accuracy}

    base = source.fresh()
    base_val = val_accuracy(base)["accuracy"]
    model = get_peft_model(base, method_config("svf", parameterisation=cfg.parameterisation,
                                               target_modules=cfg.targets), progress=cfg.progress)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, schedule="cosine",
                       warmup_ratio=0.05, eval_every=cfg.eval_every, keep_best=True, progress=cfg.progress,
                       desc=f"svf {cfg.skill} ({cfg.objective})")
    if cfg.objective == "sft":
        objective, data = SFTObjective(tokenizer), [(e.prompt, e.target) for e in train_ex]
    else:
        objective = ReinforceObjective(tokenizer, task, kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens)
        data = train_ex
    history = train(model, data, objective, tcfg, validate=val_accuracy)
    expert_val = history.best_score if history.best_score is not None else base_val
    n_base = source.n_parameters
    probe = Probe.from_model(model, meta={"skill": cfg.skill, "objective": cfg.objective, "seed": cfg.seed,
                                          "model": source.name, "val_accuracy": expert_val,
                                          "base_val_accuracy": base_val})
    scores = {n: probe.scores(n) for n in probe.scales}
    metrics = {
        "skill": cfg.skill, "objective": cfg.objective, "model": source.name,
        "base_val_accuracy": base_val, "expert_val_accuracy": expert_val,
        "best_step": history.best_step, "steps": history.steps, "train_seconds": history.seconds,
        "first_loss": history.losses[0], "last_loss": history.losses[-1],
        "n_z": probe.num_parameters(), "n_base_parameters": n_base,
        "parameter_overhead": probe.num_parameters() / n_base,
        "probe_mean_abs_dz": {n: float(s.mean()) for n, s in scores.items()},
        "validation": history.validation, "losses": history.losses,
    }
    with atomic_run_dir(out) as tmp:
        probe.save(tmp / "probe")
        model.save_pretrained(tmp / "adapter")
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        figures = report.probe_figures(probe, tmp / "figures", svd=_singular_values(model))
        figures.append(report.plot_training(history.losses, history.validation, tmp / "figures" / "svf_training.png",
                                            title=f"SVF expert on {cfg.skill} ({cfg.objective})"))
        (tmp / "report.md").write_text(report.svf_report(metrics, [f.relative_to(tmp) for f in figures]))
    probe.source = str(Path(out) / "probe")
    return SVFExpertResult(Path(out), probe, metrics)


def _singular_values(model) -> dict:
    return {n: layer.S.detach().cpu() for n, layer in model.spectral_layers().items()}
