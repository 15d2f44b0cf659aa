"""Resumable training: a crash at step k and a resume end bitwise where an uninterrupted run ends (SFT drawing on
both random generators, HiP-LoRA's budget projection, best-state keeping, the SVF expert's validation path); a
checkpoint of another run is refused; only the loop's own files are removed. And for real: ``kill -9`` of
``spectral-peft finetune`` / ``inject`` once a checkpoint exists, then ``--resume``, reproduces an uninterrupted run's
metrics and adapter bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import PAIRS, save_tiny_organism, tiny_tokenizer
from spectral_peft import get_peft_model, method_config
from spectral_peft.cli import main
from spectral_peft.data import load_task
from spectral_peft.errors import InputError
from spectral_peft.loading import ModelSource
from spectral_peft.organism import tiny_random_model
from spectral_peft.recipes import execute, recipe
from spectral_peft.training import SFTObjective, TrainConfig, train
from spectral_peft.training.svf_expert import SVFSettings, train_svf_expert

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("org") / "model")


class Crash(Exception):
    """The simulated interruption."""


class Scripted:
    """An objective wrapper that counts optimiser steps (from ``start``), draws on Python's and torch's generators
    (so a resume that did not restore them changes the loss), and raises :class:`Crash` on call ``crash_at``."""

    def __init__(self, inner, start: int = 0, crash_at: int | None = None):
        self.inner, self.step, self.calls, self.crash_at = inner, start, 0, crash_at
        random.seed(0)  # as a fresh process seeds it (the loop seeds torch itself)

    def collate(self, items):
        return self.inner.collate(items)

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash
        self.step += 1
        loss, logs = self.inner.loss(model, batch)
        noise = (1 + 0.05 * random.random()) * (1 + 0.05 * torch.rand(()).item())
        return loss * noise, {**logs, "noise": noise}


def checkpoint_step(directory: Path) -> int:
    """The step of the one checkpoint in ``directory`` (writing a newer one removes the older)."""
    (only,) = directory.glob("step-*")
    return json.loads((only / "state.json").read_text())["step"]


def train_with_crashes(make_model, data, tok, cfg: TrainConfig, crashes: tuple[int, ...], validate=None):
    """Train, crashing on the given call of each attempt in turn, then once more to the end; returns the model, the
    result, the objective of the last attempt and the checkpoint steps each resume started from."""
    starts, start = [], 0
    for at in crashes:
        obj = Scripted(SFTObjective(tok), start=start, crash_at=at)
        with pytest.raises(Crash):
            train(make_model(), data, obj, cfg, validate=None if validate is None else validate(obj))
        start = checkpoint_step(Path(cfg.checkpoint_dir))
        starts.append(start)
    obj = Scripted(SFTObjective(tok), start=start)
    model = make_model()
    result = train(model, data, obj, cfg, validate=None if validate is None else validate(obj))
    return model, result, obj, starts


def assert_same_training(a, b):
    (model_a, res_a), (model_b, res_b) = a, b
    state_a = {n: p for n, p in model_a.named_parameters() if p.requires_grad}
    state_b = {n: p for n, p in model_b.named_parameters() if p.requires_grad}
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)
    assert res_a.losses == res_b.losses and res_a.logs == res_b.logs and res_a.steps == res_b.steps
    assert res_a.validation == res_b.validation
    assert (res_a.best_step, res_a.best_score) == (res_b.best_step, res_b.best_score)


def tiny(tok):
    return tiny_random_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


CASES = {
    # 12 steps, 3 per epoch: crash in step 6 (resume from the checkpoint at 4, mid-epoch), then in step 8 (resume
    # from 6, an epoch's end)
    "lora-sft": (dict(method="lora", r=4, target_modules="all-linear"),
                 dict(epochs=4, batch_size=4, lr=5e-2, warmup_ratio=0.2, checkpoint_every=2), (6, 4)),
    # 13 of 15 steps (max_steps), cosine schedule: crash in step 8, resume from 6
    "hiplora-projection": (dict(method="hiplora", r=2, k=4, budget_rho=0.01),
                           dict(epochs=5, batch_size=4, lr=0.5, schedule="cosine", max_steps=13, checkpoint_every=3),
                           (8,)),
}


@pytest.mark.parametrize("case", CASES)
def test_crash_and_resume_end_bitwise_like_an_uninterrupted_run(tok, tmp_path, case):
    adapter, settings, crashes = CASES[case]
    kw = dict(adapter)
    method = kw.pop("method")

    def make_model():
        return get_peft_model(tiny(tok), method_config(method, **kw), progress=False)

    data = PAIRS * 3
    cfg = TrainConfig(progress=False, **settings)
    plain = make_model()
    reference = train(plain, data, Scripted(SFTObjective(tok)), cfg)
    ckpt = tmp_path / "checkpoint"
    cfg = TrainConfig(progress=False, checkpoint_dir=ckpt, **settings)
    model, result, last, starts = train_with_crashes(make_model, data, tok, cfg, crashes)
    assert starts == sorted(starts) and starts[0] > 0
    assert last.calls == reference.steps - starts[-1]  # the resumed run skipped the steps already done
    assert_same_training((plain, reference), (model, result))
    assert not ckpt.exists()  # removed when training completed
    if method == "hiplora":
        use = model.budget_use()
        assert 0.5 < max(use.values()) <= 1 + 1e-4  # the projection binds, so resuming had to replay it exactly


SCORES = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.5, 6: 0.4, 7: 0.8, 8: 0.6}


def test_best_state_survives_a_resume(tok, tmp_path):
    """Scores peak at step 2 and the crash comes after step 7 (checkpoint at 6): the kept state must come from the
    checkpoint, and later, lower scores must not displace it."""

    def make_model():
        return get_peft_model(tiny(tok), method_config("svf"), progress=False)

    def validate(obj):
        return lambda model: {"score": SCORES[obj.step], "correct": [obj.step % 2, 1.0]}

    settings = dict(epochs=2, batch_size=2, lr=5e-2, eval_every=1, keep_best=True, progress=False)
    plain = make_model()
    obj = Scripted(SFTObjective(tok))
    reference = train(plain, PAIRS * 2, obj, TrainConfig(**settings), validate=validate(obj))
    assert reference.best_step == 2 and reference.steps == 8
    cfg = TrainConfig(checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, **settings)
    model, result, _, starts = train_with_crashes(make_model, PAIRS * 2, tok, cfg, (8,), validate=validate)
    assert starts == [6]
    assert_same_training((plain, reference), (model, result))
    assert result.validation[1] == {"step": 2, "score": 0.9, "correct": [0.0, 1.0]}


class CrashingTask:
    """A task whose checker raises :class:`Crash` on its ``at``-th call (inside a validation)."""

    def __init__(self, task, at: int | None):
        self._task, self._at, self.checks = task, at, 0

    def __getattr__(self, name):
        return getattr(self._task, name)

    def check(self, output, example):
        self.checks += 1
        if self.checks == self._at:
            raise Crash
        return self._task.check(output, example)


def test_svf_expert_resumes_with_its_kept_validation_outcomes(organism, tmp_path):
    source = ModelSource(organism)
    task = load_task("math", tokenizer=source.tokenizer)
    settings = SVFSettings(n_train=16, n_val=4, batch_size=2, eval_every=1, lr=0.2, max_new_tokens=12)

    def expert(at=None, ckpt=None):
        return train_svf_expert(source.fresh(), source.tokenizer, CrashingTask(task, at), settings, seed=0,
                                progress=False, checkpoint_dir=ckpt, checkpoint_every=2)

    reference = expert()
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        expert(at=4 + 4 * 4 + 1, ckpt=ckpt)  # base validation, steps 1-4 validated, crash validating step 5
    assert checkpoint_step(ckpt) == 4
    resumed = expert(ckpt=ckpt)
    h, r = reference.history, resumed.history
    assert r.steps == h.steps == 8 and r.losses == h.losses and r.validation == h.validation
    assert r.best_step == h.best_step and h.best_step < 8
    assert "correct" not in r.validation[0]
    assert resumed.val_correct == reference.val_correct and resumed.base_val_correct == reference.base_val_correct
    assert reference.probe.scales.keys() == resumed.probe.scales.keys()
    assert all(torch.equal(reference.probe.scales[n], resumed.probe.scales[n]) for n in reference.probe.scales)
    assert not ckpt.exists()


def test_a_checkpoint_of_another_run_is_refused_and_only_our_files_are_removed(tok, tmp_path):
    def make_model():
        return get_peft_model(tiny(tok), method_config("lora", r=2), progress=False)

    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, progress=False, checkpoint_dir=ckpt, checkpoint_every=1)
    with pytest.raises(Crash):
        train(make_model(), PAIRS * 2, Scripted(SFTObjective(tok), crash_at=3), cfg)
    assert checkpoint_step(ckpt) == 2
    other = TrainConfig(epochs=2, batch_size=4, lr=2e-2, progress=False, checkpoint_dir=ckpt, checkpoint_every=1)
    with pytest.raises(InputError, match="another training run"):
        train(make_model(), PAIRS * 2, SFTObjective(tok), other)
    (ckpt / ".tmp-step-00000003").mkdir()  # what a kill during a checkpoint write leaves
    (ckpt / ".tmp-step-00000003" / "state.json").write_text("{trunc")
    (ckpt / "notes.txt").write_text("not the loop's")
    result = train(make_model(), PAIRS * 2, SFTObjective(tok), cfg)
    assert result.steps == 4 and len(result.losses) == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]


# --- kill -9, then --resume, through the command line ---------------------------------------------------------------

CLI = "import sys; from spectral_peft.cli import main; sys.exit(main())"
TIMING = ("train_seconds", "seconds")


def untimed(obj):
    """``obj`` without wall-clock entries (the only thing a resumed run may change)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def kill_at_first_checkpoint(argv: list[str], out: Path, log: Path, timeout: float = 300.0) -> int:
    """Start ``spectral-peft ARGV --out OUT`` in a subprocess, SIGKILL it as soon as a checkpoint is on disk, and
    return that checkpoint's step."""
    checkpoint = out.with_name(f".{out.name}.partial") / "checkpoint"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CLI, *argv, "--out", str(out)], stdout=subprocess.DEVNULL,
                                stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline and not any(checkpoint.glob("step-*")):
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before a checkpoint appeared:\n{log.read_text()}"
    steps = [int(p.name.removeprefix("step-")) for p in checkpoint.glob("step-*")]
    assert steps, f"no checkpoint within {timeout:.0f} s:\n{log.read_text()}"
    assert not out.exists()
    return max(steps)  # a kill between writing a checkpoint and removing the older one leaves both


def resume_matches_uninterrupted(argv: list[str], tmp_path: Path, capsys) -> None:
    killed_at = kill_at_first_checkpoint(argv, tmp_path / "killed", tmp_path / "killed.log")
    assert killed_at > 0
    assert main([*argv, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert f"resuming at step {killed_at} of " in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    killed, plain = tmp_path / "killed", tmp_path / "plain"
    m_killed = json.loads((killed / "metrics.json").read_text())
    m_plain = json.loads((plain / "metrics.json").read_text())
    assert untimed(m_killed["items"]) == untimed(m_plain["items"])
    assert untimed(m_killed) == untimed(m_plain)
    adapter = "adapter/adapter_model.safetensors"
    assert (killed / adapter).read_bytes() == (plain / adapter).read_bytes()
    assert not (killed / "checkpoint").exists() and not (plain / "checkpoint").exists()


@pytest.mark.slow
def test_kill_9_then_resume_finetune(organism, tmp_path, capsys):
    argv = ["finetune", "--model", organism, "--method", "hiplora", "--r", "4", "--k", "4", "--task", "sort",
            "--train.n-train", "64", "--train.batch-size", "1", "--train.epochs", "6", "--train.n-eval", "4",
            "--train.max-new-tokens", "4", "--threads", "1", "--progress", "false"]
    resume_matches_uninterrupted(argv, tmp_path, capsys)


@pytest.mark.slow
def test_kill_9_then_resume_inject(organism, tmp_path, capsys):
    svf = recipe("svf").Config(model=organism, train=SVFSettings(n_train=16, n_val=4, eval_every=1, max_new_tokens=12),
                               threads=1, progress=False)
    execute("svf", svf, tmp_path / "svf")
    argv = ["inject", "--model", organism, "--probe", str(tmp_path / "svf"), "--method", "palora", "--r", "4",
            "--n-facts", "4", "--split.n-known", "6", "--split.n-windows", "2", "--split.n-samples", "1",
            "--train.epochs", "100", "--train.batch-size", "1", "--eval.n-skill", "3", "--eval.n-ppl", "4",
            "--eval.max-new-tokens", "12", "--threads", "1", "--progress", "false"]
    resume_matches_uninterrupted(argv, tmp_path, capsys)
