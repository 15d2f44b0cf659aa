"""The rehearsal at Llama-3.1-8B's layer shapes (benchmarks/rehearsal.py): every stage runs from the command line in
bf16 and writes its files. Slow: 2 layers of 4096 x 14336 MLPs, one fp32 SVD per matrix on the CPU (see
docs/performance.md, "Rehearsal at 8B shapes", for its time)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "rehearsal.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("rehearsal", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_stage_at_8b_shapes_exits_0_and_writes_its_files(tmp_path):
    rehearsal = load_benchmark()
    assert rehearsal.main(["--out", str(tmp_path), "--threads", "2", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "rehearsal.json").read_text())
    assert list(rows) == list(rehearsal.STAGES)
    for stage, expected in rehearsal.EXPECTED.items():
        assert rows[stage]["rc"] == 0, (tmp_path / f"{stage}.log").read_text()[-2000:]
        assert (tmp_path / stage / expected).exists(), stage
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (4096, 14336)
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
