"""The model-organism world: three reasoning skills, facts about invented people, instruction tasks, and text."""

from .chat import CHAT_MODES, ChatTask, apply_chat
from .corpus import documents, heldout_text
from .custom_task import CHECKERS, load_custom
from .example import ANSWER_MARKER, Example, GeneratedTask, Task, final_answer, split_of
from .facts import RELATIONS, Edit, Fact, Relation, World
from .knowledge import QAItem, as_qa, fewshot_prompt, fewshot_windows, injection_pairs, load_jsonl, qa_line
from .registry import INSTRUCTION_TASKS, SKILLS, get_task, register_task
from .spec import OrganismTask, TaskSpec, check_task_spec, load_task, parse_task_spec

__all__ = [
    "ANSWER_MARKER", "Example", "GeneratedTask", "Task", "final_answer", "split_of",
    "RELATIONS", "Edit", "Fact", "Relation", "World",
    "QAItem", "as_qa", "fewshot_prompt", "fewshot_windows", "injection_pairs", "load_jsonl", "qa_line",
    "INSTRUCTION_TASKS", "SKILLS", "get_task", "register_task",
    "documents", "heldout_text",
    "CHAT_MODES", "CHECKERS", "ChatTask", "OrganismTask", "TaskSpec", "apply_chat", "check_task_spec", "load_custom",
    "load_task", "parse_task_spec",
]
