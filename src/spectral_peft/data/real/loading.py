"""Shared logic of the real-data loaders: reading rows through `datasets`, and the `RealTask` wrapper.

A source is a local file (.json/.jsonl/.parquet/.arrow/.csv: one split, named by `single_split`), a local
directory (a `save_to_disk` dataset, or data files whose names start with their split, e.g. `train.jsonl`,
`test-00000-of-00001.parquet`, `prompt.jsonl`, as in a hub snapshot; a subdirectory named after the config,
e.g. `main/` or `ARC-Easy/`, is used when present), a mapping {split: file}, or a hub name (needs network; never
used by the tests).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..example import SPLITS, Example
from ...errors import InputError, MissingInputError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def _builder(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in BUILDERS:
        raise InputError(f"unsupported data file {path} (expected one of {sorted(BUILDERS)})")
    return BUILDERS[suffix]


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in BUILDERS or "\\" in source


def _split_files(directory: Path) -> dict[str, list[str]]:
    """Data files directly in `directory`, grouped by split = the file name up to the first '-' or '.'
    ('train.jsonl', 'test-00000-of-00001.parquet', 'prompt.jsonl' -> 'train', 'test', 'prompt')."""
    files: dict[str, list[str]] = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.suffix.lower() in BUILDERS and not f.name.startswith("."):
            files.setdefault(re.split(r"[-.]", f.name, maxsplit=1)[0], []).append(str(f))
    return files


def _load_files(files: dict[str, list[str]]) -> dict:
    """Each split loaded on its own (so an all-empty column in one split cannot clash with another's type)."""
    import datasets

    out = {}
    for split, paths in files.items():
        builders = {_builder(f) for f in paths}
        if len(builders) != 1:
            raise InputError(f"split {split!r}: data files of mixed formats {sorted(builders)}")
        out[split] = datasets.load_dataset(builders.pop(), data_files={split: paths}, split=split)
    return out


def load_rows(source: str | Path | Mapping[str, str], config: str | None = None,
              single_split: str = "test") -> dict[str, list[dict]]:
    """All rows of `source`, per source split name (e.g. 'train', 'validation', 'test'), as plain dicts."""
    import datasets

    if isinstance(source, Mapping):
        loaded = _load_files({k: [str(Path(v).expanduser())] for k, v in source.items()})
    else:
        path = Path(str(source)).expanduser()
        if path.is_file():
            loaded = datasets.load_dataset(_builder(path), data_files={single_split: str(path)})
        elif path.is_dir():
            if config and (path / config).is_dir():
                path = path / config
            files = _split_files(path)
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(str(path))
            elif files:
                loaded = _load_files(files)
            else:
                loaded = datasets.load_dataset(str(path))
        elif _looks_local(str(source)):
            raise MissingInputError(f"no such data file or directory: {source}")
        else:  # a hub name: needs network (or a warm HF cache)
            loaded = datasets.load_dataset(str(source), config)
    if isinstance(loaded, datasets.Dataset):
        return {single_split: loaded.to_list()}
    return {name: ds.to_list() for name, ds in loaded.items()}


def interleaved(rows: list, offset: int) -> list:
    """Every other row starting at `offset` (Transformer-squared's train/val split: even / odd indices)."""
    return rows[offset::2]


@dataclass
class RealTask:
    """A real data set as a task with the organism's interface (`name`, `examples`, `check`).

    `splits` maps 'train'/'val'/'test' to examples in a fixed order. `stop` and `max_new_tokens` are
    generation hints for evaluators (multi-line outputs, e.g. code, need a stop other than a newline).
    """

    name: str
    splits: dict[str, list[Example]]
    checker: Callable[[str, Example], bool]
    source: str = ""
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 256
    info: dict = field(default_factory=dict)

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        """The first `n` examples of `split` (all when `n` is None or larger than the split).

        `seed=0` keeps the data set's order; another seed takes a seeded random order first. `difficulty`
        keeps only examples of that level (GSM8K: number of solution steps; ARC, MBPP: 0).
        """
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        pool = self.splits.get(split, [])
        if not pool:
            have = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
            raise InputError(f"{self.name}: no {split!r} examples in {self.source or 'the data'} ({have})")
        if difficulty is not None:
            pool = [e for e in pool if e.difficulty == difficulty]
        if seed:
            pool = random.Random(f"{self.name}/{split}/{seed}").sample(pool, len(pool))
        return list(pool if n is None else pool[:n])

    def check(self, output: str, example: Example) -> bool:
        """Whether `output` answers `example` correctly (the data set's own checker)."""
        return self.checker(output, example)


def with_fewshot(splits: dict[str, list[Example]], k: int, sep: str = "\n") -> dict[str, list[Example]]:
    """Prefix every prompt with the first `k` train examples (prompt + target), never the example itself."""
    if k <= 0:
        return splits
    pool = splits.get("train", [])
    if len(pool) < k + 1:
        raise InputError(f"fewshot={k} needs at least {k + 1} train examples, got {len(pool)}")

    def shots(ex: Example) -> str:
        chosen = [p for p in pool[:k + 1] if p.prompt != ex.prompt][:k]
        return "".join(p.prompt + p.target + sep for p in chosen)

    out = {}
    for name, exs in splits.items():
        out[name] = [Example(shots(e) + e.prompt, e.target, e.answer, e.aliases, e.task, e.difficulty, e.meta) for e in exs]
    return out


def meta_value(example: Example, key: str, default=None):
    """The value stored under `key` in an example's `meta` (a tuple of (key, value) pairs)."""
    return dict(example.meta).get(key, default)
