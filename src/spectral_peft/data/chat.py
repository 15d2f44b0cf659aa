"""Chat-template wrapping: a task whose prompts are rendered as one user turn of a chat model's template.

`ChatTask(inner, tokenizer)` rewrites every example's prompt to
`tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)`
and keeps everything else (target, answer, checker, `name`, `stop`, `max_new_tokens`) of the inner task. Few-shot
demonstrations are part of the inner prompt, so they sit inside the user message.

`apply_chat(task, tokenizer, mode)`: mode "auto" wraps when a tokenizer with a `chat_template` is given, "none"
never wraps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .example import Example
from ..errors import InputError

CHAT_MODES = ("auto", "none")


def check_chat_mode(mode: str) -> None:
    """Raise a one-line ValueError unless `mode` is a known chat-template mode."""
    if mode not in CHAT_MODES:
        raise InputError(f"chat_template must be one of {list(CHAT_MODES)}, got {mode!r}")


@dataclass
class ChatTask:
    """`inner` with every prompt rendered as a single user turn of `tokenizer`'s chat template."""

    inner: Any
    tokenizer: Any

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def stop(self) -> tuple[str, ...]:
        return self.inner.stop

    @property
    def max_new_tokens(self) -> int:
        return self.inner.max_new_tokens

    def render(self, prompt: str) -> str:
        """The chat-formatted prompt: one user message, then the template's assistant header."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        """The inner task's examples with chat-formatted prompts."""
        return [replace(e, prompt=self.render(e.prompt))
                for e in self.inner.examples(split, n=n, seed=seed, difficulty=difficulty)]

    def check(self, output: str, example: Example) -> bool:
        """The inner task's checker."""
        return self.inner.check(output, example)


def apply_chat(task: Any, tokenizer: Any = None, mode: str = "auto") -> Any:
    """`ChatTask(task, tokenizer)` when `mode` is "auto" and `tokenizer` has a chat template, else `task` itself."""
    check_chat_mode(mode)
    if mode == "auto" and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return ChatTask(task, tokenizer)
    return task
