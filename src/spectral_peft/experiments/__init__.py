"""Experiments: each protocol as a function taking a config dataclass and returning a results object.

- :mod:`.svf_expert`: train an SVF expert on a skill and freeze it as a probe (PALoRA stage 1);
- :mod:`.inject`: inject Unknown facts into the expert with any method, and re-evaluate a saved run;
- :mod:`.demo`: the ``spectral-peft demo`` main job (expert, then LoRA / OPLoRA / PALoRA / HiP-LoRA injection);
- :mod:`.palora_study`: every method and the ablations over several seeds, for ``docs/results-palora.md``.
"""

from .common import ModelSource, atomic_run_dir, load_model, merge_expert
from .evaluate import EvalConfig, add_retention, evaluate
from .inject import InjectConfig, InjectTrainConfig, evaluate_run, inject, inject_method, prepare
from .knowledge_split import KnowledgeSplit, SplitConfig, find_split
from .methods import ABLATIONS, ALL_METHODS, INJECT_METHODS, MethodConfig, build_method_model
from .svf_expert import SVFExpertConfig, SVFExpertResult, train_svf_expert

__all__ = [
    "ABLATIONS", "ALL_METHODS", "EvalConfig", "INJECT_METHODS", "InjectConfig", "InjectTrainConfig", "KnowledgeSplit",
    "MethodConfig", "ModelSource", "SVFExpertConfig", "SVFExpertResult", "SplitConfig", "add_retention",
    "atomic_run_dir", "build_method_model", "evaluate", "evaluate_run", "find_split", "inject", "inject_method",
    "load_model", "merge_expert", "prepare", "train_svf_expert",
]
