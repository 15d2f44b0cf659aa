"""Run directories: refuse what is not ours, publish atomically, resume units, never touch a user's files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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


# --- publishing without a gap, stale leftovers, portable paths ----------------------------------------------------

def _exchange_supported(tmp_path) -> bool:
    import shutil

    from spectral_peft.runs import exchange

    a, b = tmp_path / "probe" / "a", tmp_path / "probe" / "b"
    a.mkdir(parents=True), b.mkdir()
    (a / "x").write_text("a")
    ok = exchange(a, b)
    if ok:
        assert (b / "x").read_text() == "a" and not (a / "x").exists()  # swapped, both names still there
    shutil.rmtree(tmp_path / "probe")
    return ok


def _run_with(out, text, mode="new"):
    run = RunDir(out, "x", mode)
    run.write_text("content.txt", text)
    return run


def test_finish_swaps_old_and_new_in_one_step(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    import spectral_peft.runs as runs

    out = tmp_path / "r"
    _run_with(out, "old").finish()
    run = _run_with(out, "new", "overwrite")
    replace = runs.os.replace

    def file_replace_only(a, b):
        assert not Path(a).is_dir(), "the swap must not fall back to two renames"
        replace(a, b)

    monkeypatch.setattr(runs.os, "replace", file_replace_only)
    run.finish()
    monkeypatch.undo()
    assert (out / "content.txt").read_text() == "new" and read_status(out) == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no .r.partial, no .r.old


def read_status(path):
    return json.loads((path / MANIFEST).read_text())["status"]


def test_a_kill_right_after_the_swap_keeps_the_new_run_and_the_leftover_is_cleared(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    import spectral_peft.runs as runs

    out = tmp_path / "r"
    old = _run_with(out, "old")
    old.unit("u", lambda: "old unit")
    old.finish()
    new = _run_with(out, "new", "overwrite")
    new.unit("u", lambda: "new unit")

    def killed(path):
        raise KeyboardInterrupt  # the process dies before it removes the old run

    monkeypatch.setattr(runs, "_remove_ours", killed)
    with pytest.raises(KeyboardInterrupt):
        new.finish()
    monkeypatch.undo()
    work = tmp_path / ".r.partial"
    assert (out / "content.txt").read_text() == "new" and (work / "content.txt").read_text() == "old"
    assert read_status(work) == "replaced"
    # the leftover holds the old run: it is stale, not an unfinished run to resume from
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunDir(out, "x")
    resumed = RunDir(out, "x", "resume")
    assert resumed.unit("u", lambda: pytest.fail("recomputed")) == "new unit"
    assert (resumed.path / "content.txt").read_text() == "new"


def test_a_kill_before_the_swap_leaves_the_old_run_published(tmp_path, monkeypatch):
    import spectral_peft.runs as runs

    out = tmp_path / "r"
    _run_with(out, "old").finish()
    run = _run_with(out, "new", "overwrite")

    def killed(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "exchange", killed)
    with pytest.raises(KeyboardInterrupt):
        run.finish()
    assert (out / "content.txt").read_text() == "old" and is_run_dir(out)


def test_fallback_without_exchange_publishes_and_leaves_nothing(tmp_path, monkeypatch):
    import spectral_peft.runs as runs

    monkeypatch.setattr(runs, "exchange", lambda a, b: False)
    out = tmp_path / "r"
    _run_with(out, "old").finish()
    _run_with(out, "new", "overwrite").finish()
    assert (out / "content.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_first_publication_never_replaces_what_appeared_meanwhile(tmp_path):
    out = tmp_path / "r"
    run = _run_with(out, "new")
    out.mkdir()  # a user's (empty) directory appears while the run works
    with pytest.raises(FileExistsError, match="appeared during the run"):
        run.finish()
    assert out.is_dir() and not any(out.iterdir()) and (run.path / "content.txt").read_text() == "new"


def _leftover(path, status="running", pid=None, files=("config.yaml",)):
    path.mkdir()
    manifest = {"tool": "spectral-peft", "recipe": "x", "version": "0", "status": status}
    if pid is not None:
        import socket

        manifest.update(pid=pid, host=socket.gethostname())
    (path / MANIFEST).write_text(json.dumps(manifest))
    for f in files:
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        (path / f).write_text("x")


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "r"
    _leftover(tmp_path / ".r.partial", pid=_dead_pid())  # killed before any work: only the manifest and config
    _leftover(tmp_path / ".r.old", status="replaced", files=("content.txt",))  # killed between the two renames
    run = _run_with(out, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.partial"] and (run.path / "content.txt").exists()
    run.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    (tmp_path / ".s.partial").mkdir()  # a kill between mkdir and the manifest: empty, removed without loss
    RunDir(tmp_path / "s", "x").finish()
    assert not (tmp_path / ".s.partial").exists()


def test_leftover_names_that_are_not_ours_are_never_touched(tmp_path):
    for name in (".r.partial", ".r.old"):
        foreign = tmp_path / name
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        for mode in ("new", "overwrite", "resume"):
            with pytest.raises(FileExistsError, match="not a spectral-peft run; move it away"):
                RunDir(tmp_path / "r", "x", mode)
        assert (foreign / "notes.txt").read_text() == "mine"
        (foreign / "notes.txt").unlink()
        foreign.rmdir()


def test_a_work_directory_of_a_live_run_is_refused(tmp_path):
    import os

    _leftover(tmp_path / ".r.partial", pid=os.getppid())  # a live process on this host
    for mode in ("new", "overwrite", "resume"):
        with pytest.raises(FileExistsError, match=f"pid {os.getppid()}"):
            RunDir(tmp_path / "r", "x", mode)
    assert (tmp_path / ".r.partial" / "config.yaml").exists()


def test_out_under_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ValueError, match="is a file"):
        check_out(tmp_path / "f" / "run")
    assert (tmp_path / "f").read_text() == "keep"


def test_files_stay_inside_the_run(tmp_path):
    run = RunDir(tmp_path / "r", "x")
    for bad in ("../escape.txt", "/tmp/escape.txt", "a/../../escape.txt"):
        with pytest.raises(ValueError, match="not a path inside the run"):
            run.file(bad)
    assert not (tmp_path / "escape.txt").exists()


@dataclass
class _Paths:
    model: str = "organism"
    probe: str = ""
    task: str = "sort"
    data: str = ""
    hub: str = "Qwen/Qwen2-0.5B"
    adapters: tuple[str, ...] = ()


def test_config_paths_are_written_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("ckpt", "data", "a", "b", "sort"):
        (tmp_path / d).mkdir()
    (tmp_path / "data" / "qa.jsonl").write_text("")
    run = RunDir(tmp_path / "r", "x")
    run.write_config(_Paths(model="./ckpt", probe="a/", data="gsm8k:data/qa.jsonl?fewshot=2",
                            adapters=("a", "./b", "missing/dir")))
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    assert cfg == {"model": str(tmp_path / "ckpt"), "probe": str(tmp_path / "a"), "task": "sort",
                   "data": f"gsm8k:{tmp_path / 'data' / 'qa.jsonl'}?fewshot=2", "hub": "Qwen/Qwen2-0.5B",
                   "adapters": ["a", str(tmp_path / "b"), "missing/dir"]}


def test_resume_continues_only_a_run_of_the_same_recipe(tmp_path):
    out = tmp_path / "r"
    RunDir(out, "finetune").unit("u", lambda: 1)  # killed with work done
    with pytest.raises(FileExistsError, match="holds a finetune run, not a mergefail run"):
        RunDir(out, "mergefail", "resume")
    assert (tmp_path / ".r.partial" / "units" / "u.json").exists()
    RunDir(out, "mergefail", "overwrite").finish()
    assert json.loads((out / MANIFEST).read_text())["recipe"] == "mergefail"


def test_a_run_published_through_a_link_is_replaced_without_following_it(tmp_path):
    target = tmp_path / "elsewhere"
    _run_with(target, "old").finish()
    link = tmp_path / "r"
    link.symlink_to(target)
    _run_with(link, "new", "overwrite").finish()
    assert not link.is_symlink() and (link / "content.txt").read_text() == "new"
    assert (target / "content.txt").read_text() == "old"  # the link was replaced, not emptied through
