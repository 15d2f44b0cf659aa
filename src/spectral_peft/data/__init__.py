"""The model-organism world: three reasoning skills, facts about invented people, instruction tasks, and text."""

from .corpus import documents, heldout_text
from .example import ANSWER_MARKER, Example, GeneratedTask, Task, final_answer, split_of
from .facts import RELATIONS, Edit, Fact, Relation, World
from .knowledge import QAItem, as_qa, fewshot_prompt, fewshot_windows, injection_pairs, load_jsonl, qa_line
from .registry import INSTRUCTION_TASKS, SKILLS, get_task, register_task

__all__ = [
    "ANSWER_MARKER", "Example", "GeneratedTask", "Task", "final_answer", "split_of",
    "RELATIONS", "Edit", "Fact", "Relation", "World",
    "QAItem", "as_qa", "fewshot_prompt", "fewshot_windows", "injection_pairs", "load_jsonl", "qa_line",
    "INSTRUCTION_TASKS", "SKILLS", "get_task", "register_task",
    "documents", "heldout_text",
]
