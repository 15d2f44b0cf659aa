"""No unpickling anywhere: a scan of the source tree for the calls that can run code hidden in a data file.

Flagged: ``torch.load(`` without ``weights_only=True``; ``import pickle`` / ``from pickle import`` / ``pickle.<attr>``,
``cPickle`` and ``_pickle``; ``read_pickle(``; ``allow_pickle=True``; ``np.load(`` / ``numpy.load(`` without
``allow_pickle=False``. The scan is textual, so code inside strings (scripts run in a subprocess) counts too. A call's
arguments are the text up to its matching parenthesis.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("src", "benchmarks", "tests")

PATTERNS = {
    "pickle import": re.compile(r"\bimport\s+(?:[\w.]+(?:\s+as\s+\w+)?\s*,\s*)*(?:c|_)?pickle\b"
                                r"|\bfrom\s+(?:c|_)?pickle\s+import\b"),
    "pickle call": re.compile(r"\b(?:c|_)?pickle\.\w"),
    "cPickle": re.compile(r"\bcPickle\b"),
    "read_pickle": re.compile(r"\bread_pickle\s*\("),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*True\b"),
}
# a call, and the keyword argument that makes it safe
CALLS = {
    "torch.load without weights_only=True": (re.compile(r"\btorch(?:\.serialization)?\.load\s*\("),
                                             re.compile(r"\bweights_only\s*=\s*True\b")),
    "np.load without allow_pickle=False": (re.compile(r"\b(?:np|numpy)\.load\s*\("),
                                           re.compile(r"\ballow_pickle\s*=\s*False\b")),
}


def _arguments(text: str, open_paren: int) -> str:
    """The text between the parenthesis at ``open_paren`` and its match (the rest of the text if unmatched)."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren + 1:i]
    return text[open_paren + 1:]


def violations(text: str) -> list[str]:
    """``"line N: what"`` for each unpickling hazard in ``text``."""
    found = [(m.start(), what) for what, pattern in PATTERNS.items() for m in pattern.finditer(text)]
    for what, (call, safe) in CALLS.items():
        found += [(m.start(), what) for m in call.finditer(text) if not safe.search(_arguments(text, m.end() - 1))]
    return [f"line {text.count(chr(10), 0, at) + 1}: {what}" for at, what in sorted(found)]


def scanned_files() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py")) if ".venv" not in p.parts]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_the_source_tree_has_no_unpickling():
    files = scanned_files()
    assert any(p.name == "pretrain.py" for p in files) and any(p.parent.name == "tests" for p in files)
    bad = [f"{p.relative_to(ROOT)} {v}" for p in files for v in violations(p.read_text(encoding="utf-8"))]
    assert not bad, "unpickling hazards:\n" + "\n".join(bad)


@pytest.mark.parametrize("snippet", [
    "state = torch.load(path)",
    "state = torch.load(path, weights_only=False)",
    "state = torch.load(\n    path,\n    map_location='cpu',\n)",
    "x = torch.serialization.load(f)",
    "import pickle",
    "import numpy as np, pickle",
    "from pickle import loads",
    "import cPickle as pickle",
    "import _pickle",
    "obj = pickle.loads(blob)",
    "df = pd.read_pickle('x.pkl')",
    "a = np.load('x.npy', allow_pickle=True)",
    "a = np.load('x.npz')",
    "a = numpy.load(f, mmap_mode='r')",
    "code = 'import torch; torch.load(sys.argv[1])'",
])
def test_the_scan_flags_a_planted_hazard(snippet):
    assert violations(f"from __future__ import annotations\n\n{snippet}\n")[0].startswith("line 3: ")


@pytest.mark.parametrize("snippet", [
    "state = torch.load(path, weights_only=True)",
    "state = torch.load(\n    path, map_location=device_of(x),\n    weights_only=True)",
    "a = np.load('x.npy', allow_pickle=False)",
    "\"\"\"Nothing is pickled, so a crafted file cannot run code; see pickle.\"\"\"",
    "model = AutoModel.from_pretrained(path, use_safetensors=True)",
    "weights = safetensors.torch.load_file(path)",
])
def test_the_scan_passes_safe_code(snippet):
    assert violations(snippet) == []
