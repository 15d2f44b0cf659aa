"""Recipes: each protocol of the papers as one self-contained file that reads top to bottom.

Every recipe module defines, in this order:

- ``Config``, a dataclass whose fields (documented in its docstring) are the recipe's every setting and default.
  The command line is generated from it, so ``spectral-peft NAME --help`` lists exactly these fields;
- ``QUICK``, the named ``--quick`` preset (``{"field" or "nested.field": value}``), small sizes that finish in
  a few minutes;
- ``run(cfg, run) -> Result``, the work, writing its artefacts into ``run`` (a :class:`~spectral_peft.runs.RunDir`);
- ``Result``, a dataclass of what was measured (``to_dict()`` is ``metrics.json``);
- ``render(result, run) -> str``: ``metrics.json``, ``report.md`` and figures into ``run``, and the summary printed on
  the console.

No recipe imports another: what two recipes share is a component (``data``, ``methods``, ``training``,
``evaluation``, ``runs``, ``report``). :func:`execute` runs a recipe from Python as the command line does.
"""

from __future__ import annotations

import importlib
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from ..runs import RunDir
from ..errors import InputError

RECIPES = {
    "svf": "train an SVF expert on a skill and freeze it as a probe",
    "inject": "inject Unknown facts into the SVF expert with one method; recall and retention",
    "eval": "re-evaluate a saved injection run",
    "demo": "the main job: SVF expert, then LoRA / OPLoRA / PALoRA / HiP-LoRA injection, table and report",
    "palora-study": "every injection method and ablation over seeds, with hierarchical bootstrap CIs",
    "finetune": "train one adapter (a method spec) on one task and score it",
    "merge": "merge adapters on their weight updates dW (sum or TIES) into a checkpoint",
    "drift": "spectral interference and pretraining degradation of fine-tuned adapters",
    "mergefail": "how often merging single-task adapters breaks one of the tasks",
    "continual": "continual tuning over tasks in sequence: final accuracy and backward transfer",
    "edit": "knowledge editing: success, paraphrase generalisation, locality, skill preservation",
    "sanity": "spectral sanity check: loss change from perturbing single singular directions vs sigma",
    "lab-check": "can the lab tell methods apart? measure the validity criteria of docs/lab.md",
}


def recipe(name: str) -> ModuleType:
    """The recipe module called ``name`` (e.g. ``"palora-study"``)."""
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return importlib.import_module(f".{name.replace('-', '_')}", __name__)


def with_preset(cfg: Any, preset: dict[str, Any]) -> Any:
    """``cfg`` with the preset's values set (dotted keys reach nested dataclasses)."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in preset.items():
        head, dot, rest = key.partition(".")
        (nested.setdefault(head, {}).__setitem__(rest, value) if dot else top.__setitem__(head, value))
    for head, sub in nested.items():
        top[head] = with_preset(getattr(cfg, head), sub)
    names = {f.name for f in fields(cfg)} if is_dataclass(cfg) else set()
    unknown = sorted(set(top) - names)
    if unknown:
        raise InputError(f"preset keys {unknown} are not fields of {type(cfg).__name__}")
    return replace(cfg, **top)


def execute(name: str, cfg: Any = None, out: str | Path | None = None, mode: str = "new", quick: bool = False):
    """Run recipe ``name`` with ``cfg`` (default: its defaults, with the ``--quick`` preset if ``quick``) into
    ``out`` (default ``runs/<name>``); returns ``(result, summary)``. ``mode``: ``new``, ``overwrite`` or ``resume``."""
    module = recipe(name)
    cfg = cfg if cfg is not None else module.Config()
    if quick:
        cfg = with_preset(cfg, module.QUICK)
    cfg.validate()
    run = RunDir(out or f"runs/{name}", name, mode)
    try:
        run.write_config(cfg)
        result = module.run(cfg, run)
        summary = module.render(result, run)
    except BaseException:
        run.abandon()
        raise
    run.finish()
    return result, summary
