"""Evaluators for the organism and any HF causal LM: generation, answer matching, skills, knowledge, perplexity."""

from .generation import generate
from .knowledge import Category, CategoryResult, RecallResult, categorize, knowledge_categories, paraphrase_recall, recall
from .matching import alias_match, extract_answer, normalize
from .perplexity import PerplexityResult, perplexity
from .skills import SkillResult, skill_accuracy

__all__ = [
    "Category", "CategoryResult", "PerplexityResult", "RecallResult", "SkillResult",
    "alias_match", "categorize", "extract_answer", "generate", "knowledge_categories", "normalize",
    "paraphrase_recall", "perplexity", "recall", "skill_accuracy",
]
