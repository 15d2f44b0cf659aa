"""Evaluators for the organism and any HF causal LM: generation, answer matching, skills, knowledge, perplexity."""

from .generation import generate
from .knowledge import Category, CategoryResult, RecallResult, categorize, knowledge_categories, paraphrase_recall, recall
from .matching import alias_match, extract_answer, normalize
from .perplexity import PerplexityResult, perplexity
from .skills import SkillResult, skill_accuracy
from .continual import ContinualResult, backward_transfer, final_average_accuracy, forgetting, run_continual
from .editing import EditingResult, evaluate_editing
from .interference import Degradation, Interference, interference_table, pretraining_degradation, spectral_interference
from .mergefail import MERGEFAIL_SEEDS, MergeFailResult, mergefail, sample_instances
from .mergefail import summarize as summarize_mergefail
from .sanity import SanityResult, spectral_sanity
from .stats import CI, bootstrap_ci, joint_bootstrap, paired_difference_ci, proportion_ci, wilson_ci

__all__ = [
    "CI", "ContinualResult", "Degradation", "EditingResult", "Interference", "MERGEFAIL_SEEDS", "MergeFailResult",
    "SanityResult", "backward_transfer", "bootstrap_ci", "evaluate_editing", "final_average_accuracy", "forgetting",
    "interference_table", "joint_bootstrap", "mergefail", "paired_difference_ci", "pretraining_degradation",
    "proportion_ci", "run_continual", "sample_instances", "spectral_interference", "spectral_sanity",
    "summarize_mergefail",
    "Category", "CategoryResult", "PerplexityResult", "RecallResult", "SkillResult",
    "alias_match", "categorize", "extract_answer", "generate", "knowledge_categories", "normalize",
    "paraphrase_recall", "perplexity", "recall", "skill_accuracy", "wilson_ci",
]
