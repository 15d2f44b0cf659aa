"""Beyond one machine: DDP and FSDP2 train PALoRA and HiP-LoRA (2 gloo processes on the CPU, launched by torchrun;
``distributed_worker.py`` is one rank), DeepSpeed ZeRO-3 trains PALoRA (when deepspeed is installed) and refuses
HiP-LoRA's projection; the SVD cache computes each entry once for concurrent askers and writes files the group can
read, and the projection refuses a ``phi`` it cannot reach (single process).

The torchrun tests are ``slow``: one launch for the four DDP/FSDP2 runs and one for ZeRO-3, about 25-35 s each on 2
shared cores (ZeRO-3: plus about 2 minutes once per machine while DeepSpeed compiles its CPU communication op).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file

import spectral_peft.spectral.cache as cache_module
from spectral_peft import get_peft_model, load_adapter
from spectral_peft.adapters import method_config
from spectral_peft.errors import InputError
from spectral_peft.spectral import SVDCache, weight_hash
from spectral_peft.spectral.cache import entry_lock
from spectral_peft.budget import hip_layers

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).with_name("distributed_worker.py")
RUNS = [(s, m) for s in ("ddp", "fsdp2") for m in ("palora", "hiplora")]
STEPS, EPS = 3, 1e-4  # as in distributed_worker.py


def launch(out: Path, *strategies: str) -> Path:
    """Run the worker on 2 ranks for ``strategies``; ``out/<strategy>-<method>/`` holds each run's outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), *strategies]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("distributed"), "ddp", "fsdp2")


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    return launch(tmp_path_factory.mktemp("zero3"), "zero3")


def ranks(run: Path) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """Each rank's record and tensors (no tensors where the worker recorded an error)."""
    files = [run / f"rank{r}.safetensors" for r in range(2)]
    return ([json.loads((run / f"rank{r}.json").read_text()) for r in range(2)],
            [load_file(str(f)) for f in files if f.exists()])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method", RUNS)
def test_ranks_end_equal_after_training(runs, strategy, method):
    _, (a, b) = ranks(runs / f"{strategy}-{method}")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # rank-dependent batches: equal only if gradients were averaged
    assert any(bool(v.any()) for k, v in a.items() if k.endswith("lora_B"))  # B starts at zero: it trained
    if method == "hiplora":
        assert all(bool(v.any()) for k, v in a.items() if k.endswith("hip_phi"))


def assert_reloads(run: Path) -> None:
    """The saved adapter, loaded onto a fresh base in this process, gives the logits the trained model gave."""
    _, (trained, _) = ranks(run)
    model = load_adapter(tiny_model(), run / "adapter", svd_cache=run / "cache", progress=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method", RUNS)
def test_saved_adapter_reloads_to_the_trained_logits(runs, strategy, method):
    assert_reloads(runs / f"{strategy}-{method}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_hiplora_budget_binds_and_holds_after_every_step(runs, strategy):
    records, _ = ranks(runs / f"{strategy}-hiplora")
    for rec in records:
        assert rec["projections"] == STEPS  # once per optimiser step
        assert len(rec["before"]) == len(rec["after"]) == STEPS and rec["eps"] == [EPS] * len(rec["eps"])
        assert all(max(step) > 2 * EPS for step in rec["before"])  # the step left the ball: the projection acted
        assert all(R <= EPS * (1 + 1e-5) for step in rec["after"] for R in step)
        assert max(rec["deviation"]) <= 1e-7  # the whole vector was projected, as in one process


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method", RUNS)
def test_each_svd_is_computed_once_across_ranks(runs, strategy, method):
    run = runs / f"{strategy}-{method}"
    records, _ = ranks(run)
    computed = [c for rec in records for c in rec["computed"]]
    entries = list((run / "cache").glob("*.safetensors"))
    assert entries and len(computed) == len(entries)  # the cache started empty: each entry computed by one rank
    assert not list((run / "cache").glob("*.lock"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["palora", "hiplora"])
def test_ddp_broadcasts_no_derived_state(runs, method):
    records, _ = ranks(runs / f"ddp-{method}")
    derived, broadcast = set(records[0]["derived"]), set(records[0]["broadcast"])
    assert derived and broadcast and not derived & broadcast
    assert any(name.endswith("U_St") for name in derived)  # the singular vectors are among the derived tensors


@pytest.mark.slow
def test_zero3_trains_palora_as_ddp_does(runs, zero3_runs):
    """DeepSpeed ZeRO-3 (every parameter partitioned) on the same data, init and optimiser ends where DDP ends."""
    _, (a, b) = ranks(zero3_runs / "zero3-palora")
    _, (ddp, _) = ranks(runs / "ddp-palora")
    assert a.keys() == ddp.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in a:
        torch.testing.assert_close(a[key], ddp[key], rtol=0, atol=1e-5)
    assert_reloads(zero3_runs / "zero3-palora")


@pytest.mark.slow
def test_zero3_refuses_the_budget_projection(zero3_runs):
    records, _ = ranks(zero3_runs / "zero3-hiplora")
    assert all("cannot act under DeepSpeed ZeRO" in (rec["error"] or "") for rec in records)


def test_projection_refuses_a_phi_it_cannot_reach():
    model = get_peft_model(tiny_model(), method_config("hiplora", r=2, k=4, target_modules=["q_proj"]), progress=False)
    layer = hip_layers(model.spectral_layers().values())[0]
    layer.hip_phi._hp_mapping = None  # what DeepSpeed ZeRO-1/2 marks its parameters with
    with pytest.raises(InputError, match="DeepSpeed"):
        model.project_budgets()
    layer.hip_phi = torch.nn.Parameter(torch.zeros(2))  # a rank's flat slice of phi, as FSDP1 leaves it
    with pytest.raises(InputError, match="2 of its 4 entries"):
        model.project_budgets()


def slow_compute(calls: list, seconds: float = 0.3):
    """``cache._compute`` that records each call and takes at least ``seconds`` (a window for a second asker)."""
    compute = cache_module._compute

    def run(weight, k, method):
        calls.append(weight_hash(weight))
        time.sleep(seconds)
        return compute(weight, k, method)

    return run


def test_concurrent_askers_compute_an_entry_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cache_module, "_compute", slow_compute(calls))
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    start, results = threading.Barrier(3), []

    def ask():
        start.wait()
        results.append(SVDCache(tmp_path).get(W, k=4))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and len(results) == 3
    assert all(torch.equal(r.U, results[0].U) and torch.equal(r.S, results[0].S) for r in results)
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]  # no lock or temporary file left


def test_locks_are_per_entry(tmp_path):
    cache = SVDCache(tmp_path)
    A, B = (torch.randn(24, 16, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    done = []
    with entry_lock(cache.path(weight_hash(A), "exact", 4)):
        worker = threading.Thread(target=lambda: done.append(cache.get(B, k=4)))
        worker.start()
        worker.join(timeout=60)
        assert done  # B was built while A's lock was held
        asker = threading.Thread(target=lambda: done.append(cache.get(A, k=4)))
        asker.start()
        asker.join(timeout=1)
        assert asker.is_alive()  # A waits for its lock
    asker.join(timeout=60)
    assert len(done) == 2


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
                         ids=["umask022", "umask027"])
def test_cache_and_adapter_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        cache = SVDCache(tmp_path / "cache" / "svd")
        model = get_peft_model(tiny_model(), method_config("hiplora", r=2, k=2, target_modules=["q_proj"]),
                               svd_cache=cache, progress=False)
        model.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    entries = list(cache.root.glob("*.safetensors"))
    assert entries and all(p.stat().st_mode & 0o777 == file_mode for p in entries)
    assert all(p.stat().st_mode & 0o777 == dir_mode for p in (cache.root, cache.root.parent))
    assert all(p.stat().st_mode & 0o777 == file_mode for p in (tmp_path / "adapter").iterdir())
