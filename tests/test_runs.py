"""Run directories: refuse what is not ours, publish atomically, resume units, never touch a user's files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml

from spectral_peft.runs import MANIFEST, RunDir, check_out, is_run_dir


def test_new_run_is_published_only_at_finish(tmp_path):
    out = tmp_path / "r"
    run = RunDir(out, "finetune")
    run.write_json("metrics.json", {"a": 1})
    assert not out.exists() and run.path.name == ".r.partial"
    run.finish()
    assert json.loads((out / "metrics.json").read_text()) == {"a": 1}
    assert is_run_dir(out) and json.loads((out / MANIFEST).read_text())["status"] == "complete"
    assert not (tmp_path / ".r.partial").exists()


def test_existing_run_refused_without_overwrite_or_resume(tmp_path):
    out = tmp_path / "r"
    RunDir(out, "finetune").finish()
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        RunDir(out, "finetune")
    run = RunDir(out, "finetune", "overwrite")
    run.write_text("new.txt", "x")
    run.finish()
    assert (out / "new.txt").exists()


def test_foreign_directory_is_never_replaced(tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    for mode in ("new", "overwrite", "resume"):
        with pytest.raises(FileExistsError, match="not a spectral-peft run"):
            RunDir(out, "finetune", mode)
    assert (out / "thesis.txt").read_text() == "precious"
    file_out = tmp_path / "a_file"
    file_out.write_text("keep")
    with pytest.raises(FileExistsError):
        RunDir(file_out, "finetune", "overwrite")
    assert file_out.read_text() == "keep"


def test_cwd_root_and_package_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in (".", "", "/"):
        with pytest.raises(ValueError, match="current or root"):
            check_out(bad)
    import spectral_peft

    with pytest.raises(ValueError, match="inside the installed package"):
        check_out(f"{spectral_peft.__path__[0]}/toy/run")


def test_unfinished_run_refused_then_resumed_with_units_kept(tmp_path):
    out = tmp_path / "r"
    run = RunDir(out, "mergefail")
    calls = []
    assert run.unit("a", lambda: calls.append("a") or {"v": 1.5}) == {"v": 1.5}
    # killed here: the work directory stays, the run is not published
    with pytest.raises(FileExistsError, match="unfinished run"):
        RunDir(out, "mergefail")
    resumed = RunDir(out, "mergefail", "resume")
    assert resumed.unit("a", lambda: calls.append("a again") or {"v": 0}) == {"v": 1.5}
    assert resumed.unit("b", lambda: calls.append("b") or [1, 2]) == [1, 2]
    assert calls == ["a", "b"]
    resumed.finish()
    assert (out / "units" / "a.json").exists()
    # resuming a complete run reuses its units
    again = RunDir(out, "mergefail", "resume")
    assert again.unit("b", lambda: calls.append("b again")) == [1, 2]
    again.finish()
    assert calls == ["a", "b"]


def test_units_round_trip_through_json(tmp_path):
    import numpy as np

    run = RunDir(tmp_path / "r", "x")
    first = run.unit("k", lambda: {"flags": np.array([1.0, 0.0]), "t": (1, 2)})
    assert first == {"flags": [1.0, 0.0], "t": [1, 2]}  # what a resumed run would read back


@dataclass
class _Inner:
    lr: float = 0.1


@dataclass
class _Cfg:
    seeds: tuple[int, ...] = (0, 1)
    inner: _Inner = field(default_factory=_Inner)


def test_config_written_as_yaml(tmp_path):
    run = RunDir(tmp_path / "r", "x")
    run.write_config(_Cfg())
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == {"seeds": [0, 1], "inner": {"lr": 0.1}}


def test_abandoned_run_leaves_nothing_unless_it_has_units(tmp_path):
    empty = RunDir(tmp_path / "a", "x")
    empty.write_text("config.yaml", "x: 1")
    empty.abandon()
    assert not (tmp_path / ".a.partial").exists() and not (tmp_path / "a").exists()
    worked = RunDir(tmp_path / "b", "x")
    worked.unit("done", lambda: 1)
    worked.abandon()
    assert (tmp_path / ".b.partial" / "units" / "done.json").exists()  # kept for --resume


def test_json_is_strict(tmp_path):
    from spectral_peft.runs import write_json

    path = write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None],
                                                                                       "c": 2}


def test_units_keep_nan_for_the_recipe(tmp_path):
    import math

    run = RunDir(tmp_path / "r", "x")
    assert math.isnan(run.unit("k", lambda: {"v": float("nan")})["v"])
    assert math.isnan(run.unit("k", lambda: None)["v"])  # read back from disk
