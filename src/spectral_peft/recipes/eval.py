"""Re-evaluate a saved injection run: rebuild base, expert and adapter, and measure recall and retention again.

``spectral-peft eval --run-dir runs/inject`` reads the run's ``metrics.json`` (method spec, the probe's absolute path,
model, retained skills, evaluation sizes) and ``facts.json`` (the injected and held-out facts themselves), folds the
probe's expert into a fresh base (PALoRA applies it inside its layers instead), loads ``adapter/`` and evaluates expert
and injected model on the same items (``spectral_peft.evaluation.injection``). With the run's sizes the outcomes are
the saved ones, item for item. PiSSA and CorDA adapters rewrite the base weights when they are created, so their
saved adapters cannot be re-applied to the original base; their runs are refused.

Writes ``metrics.json`` (per-item outcomes under ``items``) and ``report.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..data import check_task_spec
from ..errors import InputError, MissingInputError
from ..evaluation.injection import (EvalSettings, InjectionOutcome, evaluate_injection, make_suite, retention,
                                    summarise, summary_table)
from ..evaluation.knowledge_split import KnowledgeSplit
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import MethodSpec
from ..model import load_adapter
from ..adapters.svf_fold import fold_expert
from ..probe import load_probe
from ..report import md_table
from ..runs import RunDir, read_json
from ..validation import check_adapter, check_at_least, check_probe, read_json_file

EXPERT = "svf-expert"
NOT_RELOADABLE = ("pissa", "corda")


@dataclass
class Config:
    """Re-evaluate a saved injection run.

    Attributes:
        run_dir: an injection run directory (from spectral-peft inject).
        model: the base model; None: the run's.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        skill: the skills whose retention is measured (data specs); empty: the run's.
        n_skill: test problems per retained skill; None: the run's.
        n_ppl: held-out documents for perplexity (0: skip); None: the run's.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        threads: torch CPU threads.
        progress: show progress bars.
    """

    run_dir: str = "runs/inject"
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    skill: tuple[str, ...] = ()
    n_skill: int | None = None
    n_ppl: int | None = None
    allow_code_execution: bool = False
    threads: int = 2
    progress: bool = True

    def saved(self) -> dict[str, Any]:
        """The injection run's ``metrics.json``."""
        return read_json(Path(self.run_dir).expanduser() / "metrics.json")

    def validate(self) -> None:
        check_at_least(1, threads=self.threads)
        if self.n_skill is not None:
            check_at_least(1, n_skill=self.n_skill)
        if self.n_ppl is not None:
            check_at_least(0, n_ppl=self.n_ppl)
        for spec in self.skill:
            check_task_spec(spec, allow_code_execution=self.allow_code_execution)
        path = Path(self.run_dir).expanduser()
        if not all((path / f).exists() for f in ("metrics.json", "facts.json", "adapter")):
            raise MissingInputError(f"{self.run_dir} is not an injection run directory (needs metrics.json, "
                                    "facts.json and adapter/ from spectral-peft inject)")
        saved = read_json_file(path / "metrics.json", "an injection run's metrics")
        needed = ("method", "spec", "probe", "model", "eval", "skills", "chat_template")
        if not isinstance(saved, dict) or not all(k in saved for k in needed) or "method" not in saved["spec"]:
            raise InputError(f"{path / 'metrics.json'} is not from spectral-peft inject (it needs {', '.join(needed)})")
        read_json_file(path / "facts.json", "the injected facts")
        method = saved["spec"]["method"]
        if method in NOT_RELOADABLE:
            raise InputError(f"{saved['method']}: a {method} adapter rewrites the base weights when created and cannot "
                             f"be re-applied to the original base; its numbers are in {self.run_dir}/metrics.json")
        check_adapter(path / "adapter")
        check_probe(saved["probe"])
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model if self.model is not None else saved["model"])


QUICK = {"n_skill": 24, "n_ppl": 10}


@dataclass
class Result:
    """The expert's and the reloaded model's per-item outcomes, beside the saved run's aggregates."""

    run_dir: str
    method: str
    model: str
    eval: EvalSettings
    expert: InjectionOutcome
    injected: InjectionOutcome
    saved: dict[str, Any]

    def summary(self) -> dict[str, dict[str, Any]]:
        return summarise([{EXPERT: self.expert, self.method: self.injected}], EXPERT, baseline=EXPERT)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "method": self.method, "model": self.model, "eval": asdict(self.eval),
                "expert": {**self.expert.aggregates(), **retention(self.expert, self.expert)},
                "injected": {**self.injected.aggregates(), **retention(self.injected, self.expert)},
                "summary": self.summary(), "saved": {k: self.saved[k] for k in ("expert", "injected")},
                "items": {"expert": self.expert.to_dict(), "injected": self.injected.to_dict()}}


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(0, cfg.threads)
    path = Path(cfg.run_dir).expanduser()
    saved = cfg.saved()
    spec = MethodSpec(**{**saved["spec"], "explicit": tuple(saved["spec"]["explicit"])})
    overrides = {k: v for k, v in (("n_skill", cfg.n_skill), ("n_ppl", cfg.n_ppl)) if v is not None}
    settings = EvalSettings(**{**{f.name: saved["eval"][f.name] for f in fields(EvalSettings)}, **overrides})
    probe = load_probe(saved["probe"])
    source = ModelSource(cfg.model or saved["model"], cfg.device, cfg.dtype)
    tok = source.tokenizer
    split = KnowledgeSplit.from_dict(read_json(path / "facts.json"))
    suite = make_suite(split, list(cfg.skill) or saved["skills"], tok, settings, saved["chat_template"],
                       cfg.allow_code_execution)
    expert = evaluate_injection(fold_expert(source.fresh(), probe), tok, suite, cfg.progress)
    base = source.fresh()
    if not spec.needs_probe:
        fold_expert(base, probe)
    model = load_adapter(base, path / "adapter", progress=False)
    return Result(run_dir=str(path.absolute()), method=spec.label, model=source.name, eval=settings, expert=expert,
                  injected=evaluate_injection(model, tok, suite, cfg.progress), saved=saved)


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    run.write_json("metrics.json", m)
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    keys = ("recall", "paraphrase_recall", "highly_known_retention", "mean_skill_retention")
    compare = [{"metric": k, "saved run": pct(result.saved["injected"].get(k)), "now": pct(m["injected"][k])}
               for k in keys]
    lines = [f"# Re-evaluation of `{result.run_dir}` (`{result.method}`)", "",
             f"Model `{result.model}`; {result.eval.n_skill} test problems per skill, {result.eval.n_ppl} held-out "
             "documents. Estimates with 95% intervals:", "",
             summary_table(m["summary"]),
             f"Paired differences, {result.method} minus the SVF expert (percentage points):", "",
             summary_table(m["summary"], which="vs_baseline"),
             "Against the saved run:", "", md_table(compare, ["metric", "saved run", "now"])]
    run.write_text("report.md", "\n".join(lines) + "\n")
    inj = m["injected"]
    return (f"{result.method} reloaded from {result.run_dir}: recall {pct(inj['recall'])}, paraphrase recall "
            f"{pct(inj['paraphrase_recall'])}, HighlyKnown retention {pct(inj['highly_known_retention'])}, skill "
            f"retention {pct(inj['mean_skill_retention'])}\n" + summary_table(m["summary"]))
