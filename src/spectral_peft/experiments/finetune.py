"""Fine-tune one adapter on a task, and the pieces every HiP-LoRA protocol shares.

``spectral-peft finetune --method <spec>`` trains one adapter on an organism task (a skill or an instruction task,
by name) or on a JSONL file of ``{"prompt": ..., "response": ...}`` rows, and writes ``adapter/``, ``metrics.json``,
``report.md`` and ``figures/`` (training loss; HiP-LoRA's budget use ``R(phi)/eps`` per step).

Method specs: ``name[:key=value,...]``, e.g. ``lora``, ``hiplora``, ``hiplora:rho=0.5``, ``hiplora:mode=penalty,lam=1``,
``oplora:k=32``, ``lora:r=9``. Keys: ``r``, ``k``, ``alpha``, ``mode`` (``constraint``/``penalty``/``none``), ``rho``,
``lam``, ``p`` (budget power), ``eps``, ``targets`` (``mlp``/``all-linear``). A spec's label is the spec string.

Matched budgets: HiP-LoRA(r, k) trains ``r (m + n) + k`` parameters per ``m x n`` matrix, LoRA(r') trains
``r' (m + n)``. With ``match_budget`` every non-HiP method without an explicit ``r`` gets the rank
:func:`matched_rank` that brings its count closest to HiP-LoRA's (same targets); the counts are reported side by
side. On the organism (192 x 512 MLP matrices, k = 16) that rank is r itself: k adds 16 / (8 * 704) = 0.3%.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..adapters import method_config
from ..data import Example, get_task
from ..evaluation.generation import generate
from ..training import SFTObjective, TrainConfig, TrainResult, masked_nll, train
from .common import ModelSource, atomic_run_dir, seed_everything, write_json
from .methods import TARGETS, count_trainable

FINETUNE_METHODS = ("hiplora", "lora", "dora", "oplora", "milora", "svft", "pissa")
# methods whose update is an additive dW on the untouched base (mergeable, comparable across seeds)
PROTOCOL_METHODS = ("hiplora", "lora", "dora", "oplora", "milora", "svft")
SPEC_KEYS = {"r": ("r", int), "k": ("k", int), "alpha": ("lora_alpha", float), "mode": ("budget_mode", str),
             "rho": ("budget_rho", float), "lam": ("budget_lambda", float), "p": ("budget_power", float),
             "eps": ("budget_eps", float), "targets": ("targets", str)}


@dataclass
class AdapterSpec:
    """One method with its hyper-parameters (see the module docstring for the spec syntax)."""

    method: str = "hiplora"
    r: int = 8
    k: int = 16
    lora_alpha: float = 16.0
    targets: str = "mlp"
    budget_mode: str = "constraint"
    budget_rho: float = 0.1
    budget_lambda: float = 0.1
    budget_power: float = 1.0
    budget_eps: float | None = None
    label: str = ""
    explicit: tuple[str, ...] = ()

    def adapter_config(self):
        targets = TARGETS[self.targets]
        common = dict(r=self.r, lora_alpha=self.lora_alpha, target_modules=targets)
        if self.method == "hiplora":
            return method_config("hiplora", k=self.k, budget_mode=self.budget_mode, budget_rho=self.budget_rho,
                                 budget_lambda=self.budget_lambda, budget_power=self.budget_power,
                                 budget_eps=self.budget_eps, **common)
        if self.method == "oplora":
            return method_config("oplora", k=self.k, **common)
        if self.method == "svft":
            return method_config("svft", pattern="plain", target_modules=targets)
        return method_config(self.method, **common)


def parse_spec(spec: str, defaults: AdapterSpec | None = None) -> AdapterSpec:
    """``name[:key=value,...]`` -> :class:`AdapterSpec` (unknown names or keys raise a one-line ``ValueError``)."""
    base = defaults or AdapterSpec()
    name, _, opts = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in FINETUNE_METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(FINETUNE_METHODS)}")
    out = replace(base, method=name, label=spec.strip(), explicit=())
    explicit = []
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in SPEC_KEYS:
            raise ValueError(f"bad option {item!r} in method spec {spec!r}; use key=value with keys {', '.join(SPEC_KEYS)}")
        field_name, cast = SPEC_KEYS[key.strip()]
        try:
            setattr(out, field_name, cast(value.strip()))
        except ValueError:
            raise ValueError(f"bad value {value!r} for {key!r} in method spec {spec!r}") from None
        explicit.append(field_name)
    out.explicit = tuple(explicit)
    if out.targets not in TARGETS:
        raise ValueError(f"targets must be one of {tuple(TARGETS)}, got {out.targets!r}")
    if out.method == "hiplora" and out.budget_mode not in ("constraint", "penalty", "none"):
        raise ValueError(f"mode must be constraint, penalty or none, got {out.budget_mode!r}")
    out.adapter_config()  # validate ranges now, with the config's own message
    return out


def parse_specs(specs: str | Sequence[str], defaults: AdapterSpec | None = None,
                allowed: Sequence[str] = FINETUNE_METHODS) -> list[AdapterSpec]:
    items = [s for s in (specs.split(";") if isinstance(specs, str) else specs) if s.strip()]
    if isinstance(specs, str) and ";" not in specs:  # "lora,hiplora:rho=0.5" -> split on commas before a name
        items = _split_methods(specs)
    out = [parse_spec(s, defaults) for s in items]
    bad = [s.label for s in out if s.method not in allowed]
    if bad:
        raise ValueError(f"method(s) {bad} cannot be used here; choose from {', '.join(allowed)}")
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels) or not out:
        raise ValueError(f"give at least one method, each once (got {labels})")
    return out


def _split_methods(text: str) -> list[str]:
    """Split ``"lora,hiplora:rho=0.5,k=8,oplora"`` into specs: a comma starts a new spec when a method name follows."""
    out: list[str] = []
    for part in text.split(","):
        head = part.split(":", 1)[0].strip().lower()
        if out and not (head in FINETUNE_METHODS and "=" not in part.split(":", 1)[0]):
            out[-1] += "," + part
        else:
            out.append(part)
    return [p.strip() for p in out if p.strip()]


# --- matched budgets ---------------------------------------------------------------------------------------------

def target_shapes(model: nn.Module, targets: str) -> dict[str, tuple[int, int]]:
    from ..model import find_targets

    names = find_targets(model, method_config("hiplora", target_modules=TARGETS[targets], r=1, k=1))
    modules = dict(model.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}


def expected_count(spec: AdapterSpec, shapes: dict[str, tuple[int, int]]) -> int:
    """Trainable parameters of ``spec`` on matrices of ``shapes`` (analytic)."""
    total = 0
    for m, n in shapes.values():
        lora = spec.r * (m + n)
        total += {"hiplora": lora + spec.k, "dora": lora + m, "svft": min(m, n)}.get(spec.method, lora)
    return total


def matched_rank(hip: AdapterSpec, shapes: dict[str, tuple[int, int]]) -> int:
    """The LoRA rank whose count is closest to HiP-LoRA(r, k)'s on the same matrices."""
    target = expected_count(hip, shapes)
    per_rank = sum(m + n for m, n in shapes.values())
    return max(1, round(target / per_rank))


def match_budgets(specs: list[AdapterSpec], model: nn.Module, reference: AdapterSpec | None = None) -> list[AdapterSpec]:
    """Give every LoRA-family spec without an explicit ``r`` the rank matching HiP-LoRA's count (the first HiP-LoRA
    spec, or ``reference``)."""
    ref = reference or next((s for s in specs if s.method == "hiplora"), None)
    if ref is None:
        return specs
    out = []
    for s in specs:
        if s.method in ("lora", "dora", "oplora", "milora", "pissa") and "r" not in s.explicit:
            s = replace(s, r=matched_rank(ref, target_shapes(model, s.targets)))
        out.append(s)
    return out


def budget_table(specs: Sequence[AdapterSpec], model: nn.Module) -> list[dict[str, Any]]:
    """Side-by-side trainable-parameter counts (relative to the first HiP-LoRA spec, or the first spec)."""
    ref = next((s for s in specs if s.method == "hiplora"), specs[0])
    ref_n = expected_count(ref, target_shapes(model, ref.targets))
    rows = []
    for s in specs:
        n = expected_count(s, target_shapes(model, s.targets))
        rows.append({"method": s.label, "r": s.r, "k": s.k if s.method in ("hiplora", "oplora") else None,
                     "trainable": n, "vs_reference": n / ref_n - 1})
    return rows


# --- tasks -------------------------------------------------------------------------------------------------------

@dataclass
class JsonlTask:
    """A task from a JSONL file of ``{"prompt", "response"}`` rows; exact match (whitespace-normalised) of the
    generated text against the response; the last ``eval_fraction`` of rows (at least 1) is held out."""

    path: str
    rows: list[Example]
    eval_fraction: float = 0.1

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @classmethod
    def load(cls, path: str | Path) -> "JsonlTask":
        path = Path(path)
        rows = []
        for k, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k + 1}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
                raise ValueError(f"{path}:{k + 1}: each row needs string fields 'prompt' and 'response'")
            resp = row["response"]
            rows.append(Example(row["prompt"], resp if resp.endswith("\n") else resp + "\n", resp.strip(),
                                task=path.stem))
        if len(rows) < 2:
            raise ValueError(f"{path}: needs at least 2 prompt/response rows, has {len(rows)}")
        return cls(str(path), rows)

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        cut = len(self.rows) - max(1, int(round(self.eval_fraction * len(self.rows))))
        part = self.rows[:cut] if split == "train" else self.rows[cut:]
        return part if n is None else part[:n]

    def check(self, output: str, example: Example) -> bool:
        return " ".join(output.split()) == " ".join(example.answer.split())


@dataclass
class FixedDifficulty:
    """An organism task restricted to one difficulty level (spelled ``name@level``, e.g. ``reverse@3``)."""

    task: Any
    level: int

    @property
    def name(self) -> str:
        return f"{self.task.name}@{self.level}"

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        return self.task.examples(split, n=n, seed=seed, difficulty=self.level)

    def check(self, output: str, example: Example) -> bool:
        return self.task.check(output, example)


def resolve_task(task: str):
    """An organism task by name (``name@level`` fixes its difficulty), or a :class:`JsonlTask` for a JSONL path."""
    if task.endswith(".jsonl") or Path(task).is_file():
        if not Path(task).is_file():
            raise FileNotFoundError(f"data file {task} does not exist")
        return JsonlTask.load(task)
    name, at, level = task.partition("@")
    if not at:
        return get_task(task)
    try:
        return FixedDifficulty(get_task(name), int(level))
    except ValueError:
        raise ValueError(f"bad difficulty {level!r} in task {task!r} (use name@<integer>)") from None


@dataclass
class TrainSettings:
    """Per-task training and evaluation sizes shared by the protocols."""

    n_train: int = 512
    n_eval: int = 64
    epochs: int = 3
    lr: float = 5e-3
    batch_size: int = 16
    max_new_tokens: int = 24

    def quick(self) -> "TrainSettings":
        """The --quick sizes: at most 256 training pairs, 2 epochs, 32 evaluation examples."""
        return replace(self, n_train=min(self.n_train, 256), n_eval=min(self.n_eval, 32), epochs=min(self.epochs, 2))


def task_pairs(task, n: int) -> list[tuple[str, str]]:
    return [(e.prompt, e.target) for e in task.examples("train", n=n)]


def eval_examples(task, n: int) -> list[Example]:
    split = "val" if isinstance(task, JsonlTask) else "test"
    return task.examples(split, n=n)


def score_flags(model: nn.Module, tokenizer, task, examples: Sequence[Example], max_new_tokens: int = 24,
                progress: bool = False) -> np.ndarray:
    """0/1 correctness of greedy outputs (cut at the first newline, or a blank line for multi-line answers)."""
    multi = any("\n" in e.answer for e in examples)
    outputs = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                       stop=("\n\n",) if multi else ("\n",), progress=progress, desc=f"eval {task.name}")
    return np.array([float(task.check(o, e)) for o, e in zip(outputs, examples)])


# --- training ------------------------------------------------------------------------------------------------------

class BudgetLogging:
    """Objective wrapper: adds HiP-LoRA's budget use (max and mean of ``R(phi)/eps`` over layers) to each step's logs."""

    def __init__(self, inner):
        self.inner = inner

    def collate(self, items):
        return self.inner.collate(items)

    def loss(self, model, batch):
        loss, logs = self.inner.loss(model, batch)
        with torch.no_grad():
            use = model.budget_use() if hasattr(model, "budget_use") else {}
        if use:
            logs = {**logs, "budget_use_max": max(use.values()), "budget_use_mean": float(np.mean(list(use.values())))}
        return loss, logs


def build_adapter(base: nn.Module, spec: AdapterSpec, seed: int) -> nn.Module:
    """Wrap ``base`` (modified in place) with ``spec``'s adapter, initialised under ``seed``."""
    from ..model import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, spec.adapter_config(), progress=False)


def train_adapter(base: nn.Module, tokenizer, spec: AdapterSpec, pairs: Sequence[tuple[str, str]],
                  settings: TrainSettings, seed: int, desc: str = "train", progress: bool = True
                  ) -> tuple[nn.Module, TrainResult]:
    """Wrap ``base`` with ``spec`` and train it on ``pairs`` (SFT, linear decay, 3% warm-up) with the shared loop."""
    model = build_adapter(base, spec, seed)
    cfg = TrainConfig(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, schedule="linear",
                      warmup_ratio=0.03, seed=seed, keep_best=False, progress=progress, desc=desc)
    history = train(model, list(pairs), BudgetLogging(SFTObjective(tokenizer)), cfg)
    return model, history


@torch.no_grad()
def final_budget_use(model: nn.Module) -> dict[str, float] | None:
    use = model.budget_use() if hasattr(model, "budget_use") else {}
    return dict(use) if use else None


def unwrap(model: nn.Module) -> nn.Module:
    """Merge the adapter into the weights and return the plain model (spectral or PEFT)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# --- figures and report helpers ----------------------------------------------------------------------------------

def save_figure(fig: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path.name)


def plot_budget_use(logs_by_label: dict[str, list[dict[str, float]]], title: str = "HiP-LoRA budget use") -> Figure:
    """``max_layers R(phi)/eps`` per step (solid) and the mean over layers (dotted), one colour per run."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for k, (label, logs) in enumerate(logs_by_label.items()):
        rows = [r for r in logs if "budget_use_max" in r]
        if not rows:
            continue
        colour = f"C{k % 10}"
        ax.plot([r["step"] for r in rows], [r["budget_use_max"] for r in rows], color=colour, label=f"{label} (max)")
        ax.plot([r["step"] for r in rows], [r["budget_use_mean"] for r in rows], ":", color=colour, label=f"{label} (mean)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("R(phi) / eps")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_loss(losses_by_label: dict[str, list[float]], title: str = "training loss") -> Figure:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for label, losses in losses_by_label.items():
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fmt_ci(ci: Any, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``est [low, high]`` of a CI (dataclass or dict), scaled (percent by default)."""
    d = ci if isinstance(ci, dict) else asdict(ci)
    sign = "+" if signed else ""
    return (f"{d['estimate'] * scale:{sign}.{digits}f} [{d['low'] * scale:{sign}.{digits}f}, "
            f"{d['high'] * scale:{sign}.{digits}f}]")


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    cell = lambda v: "–" if v is None else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def parse_list(text: str | Sequence[Any], cast: Callable = str) -> list:
    if isinstance(text, str):
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    return [cast(x) for x in text]


# --- the finetune protocol -------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """``spectral-peft finetune``: one method (spec) on one task (organism name or JSONL path).

    ``r``, ``k``, ``budget_*``: defaults for the spec. ``match_budget``: a non-HiP method without an explicit ``r``
    gets the rank matching HiP-LoRA(r, k). ``quick``: :meth:`TrainSettings.quick`.
    """

    method: str = "hiplora"
    task: str = "sort"
    model: str | None = None
    r: int = 8
    k: int = 16
    lora_alpha: float = 16.0
    targets: str = "all-linear"
    budget_mode: str = "constraint"
    budget_rho: float = 0.1
    budget_lambda: float = 0.1
    budget_power: float = 1.0
    match_budget: bool = True
    train: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0
    threads: int | None = 1
    quick: bool = False
    progress: bool = True

    def defaults(self) -> AdapterSpec:
        return AdapterSpec(r=self.r, k=self.k, lora_alpha=self.lora_alpha, targets=self.targets,
                           budget_mode=self.budget_mode, budget_rho=self.budget_rho,
                           budget_lambda=self.budget_lambda, budget_power=self.budget_power)

    def settings(self) -> TrainSettings:
        if self.quick:
            return self.train.quick()
        return self.train


@dataclass
class FinetuneResult:
    metrics: dict[str, Any]
    out: Path

    def to_dict(self) -> dict[str, Any]:
        return self.metrics


def finetune(cfg: FinetuneConfig, out: str | Path) -> FinetuneResult:
    """Train ``cfg.method`` on ``cfg.task``; write ``adapter/``, ``config.json``, ``metrics.json``, ``report.md``,
    ``figures/loss.png`` and (HiP-LoRA) ``figures/budget_use.png`` to ``out`` atomically."""
    spec = parse_spec(cfg.method, cfg.defaults())
    task = resolve_task(cfg.task)
    settings = cfg.settings()
    seed_everything(cfg.seed, cfg.threads)
    source = ModelSource(cfg.model)
    reference = AdapterSpec(**{**asdict(cfg.defaults()), "method": "hiplora", "label": "hiplora"})
    if cfg.match_budget and spec.method != "hiplora":
        spec = match_budgets([spec], source.fresh(), reference)[0]
    pairs = task_pairs(task, settings.n_train)
    examples = eval_examples(task, settings.n_eval)
    base_flags = score_flags(source.fresh(), source.tokenizer, task, examples, settings.max_new_tokens)
    model, history = train_adapter(source.fresh(), source.tokenizer, spec, pairs, settings, cfg.seed,
                                   desc=f"finetune {spec.label}", progress=cfg.progress)
    flags = score_flags(model, source.tokenizer, task, examples, settings.max_new_tokens)
    from ..evaluation.stats import bootstrap_ci, paired_difference_ci

    use = final_budget_use(model)
    counts = budget_table([reference, spec] if spec.method != "hiplora" else [spec], source.fresh())
    metrics = {
        "method": spec.label, "spec": asdict(spec), "task": task.name, "n_train": len(pairs), "n_eval": len(examples),
        "epochs": settings.epochs, "lr": settings.lr, "steps": history.steps, "train_seconds": history.seconds,
        "first_loss": history.losses[0], "last_loss": history.losses[-1],
        "trainable_parameters": count_trainable(model), "budget_counts": counts,
        "base_accuracy": float(base_flags.mean()), "accuracy": float(flags.mean()),
        "accuracy_ci": bootstrap_ci(flags).to_dict() if len(flags) > 1 else None,
        "gain_ci": paired_difference_ci(flags, base_flags).to_dict() if len(flags) > 1 else None,
        "budget_use": use, "budget_use_max": max(use.values()) if use else None,
        "budget_use_trace": [{k: r[k] for k in ("step", "budget_use_max", "budget_use_mean")}
                             for r in history.logs if "budget_use_max" in r],
        "quick": cfg.quick,
    }
    with atomic_run_dir(out) as tmp:
        model.save_pretrained(tmp / "adapter")
        write_json(tmp / "config.json", {**asdict(cfg), "resolved_spec": asdict(spec)})
        write_json(tmp / "metrics.json", metrics)
        figs = [save_figure(plot_loss({spec.label: history.losses}, f"{spec.label} on {task.name}"),
                            tmp / "figures" / "loss.png")]
        if use:
            figs.append(save_figure(plot_budget_use({spec.label: history.logs}), tmp / "figures" / "budget_use.png"))
        (tmp / "report.md").write_text(_finetune_report(metrics, figs))
    return FinetuneResult(metrics, Path(out))


def _finetune_report(m: dict[str, Any], figs: list[str]) -> str:
    lines = [f"# Fine-tune `{m['method']}` on `{m['task']}`", "",
             f"{m['n_train']} training pairs, {m['epochs']} epoch(s) at lr {m['lr']} ({m['steps']} steps, "
             f"{m['train_seconds']:.0f} s); {m['n_eval']} evaluation examples.", "",
             f"- accuracy: {100 * m['base_accuracy']:.1f}% (base) -> {100 * m['accuracy']:.1f}%"
             + (f", 95% CI {fmt_ci(m['accuracy_ci'])}" if m["accuracy_ci"] else ""),
             f"- trainable parameters: {m['trainable_parameters']:,}"]
    if m["budget_use_max"] is not None:
        lines.append(f"- final budget use R(phi)/eps: max over layers {m['budget_use_max']:.3f}")
    lines += ["", "Matched budgets:", "", md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"}
                                                  for r in m["budget_counts"]],
                                                 ["method", "r", "k", "trainable", "vs_reference"]), ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"


def check_finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def doc_nll(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-document summed next-token NLL and token counts (so the pooled NLL is ``sum / sum``)."""
    from ..training.objectives import IGNORE_INDEX

    sums, counts = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", 2048)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = [tokenizer(t)["input_ids"][:max_len] for t in texts[i:i + batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            labels = torch.full((len(enc), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(enc):
                ids[row, :len(e)] = torch.tensor(e)
                labels[row, :len(e)] = torch.tensor(e)
                mask[row, :len(e)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            sums.append(masked_nll(logits, labels.to(device), reduction="sum_per_row").cpu().numpy())
            counts.append((labels[:, 1:] != IGNORE_INDEX).sum(1).numpy())
    return np.concatenate(sums).astype(np.float64), np.concatenate(counts).astype(np.float64)
