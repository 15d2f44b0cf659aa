"""SVD routines and the on-disk cache."""

import subprocess
import sys

import pytest
import torch

from spectral_peft.spectral import SVDCache, svd_full, svd_topk, weight_hash
from spectral_peft.spectral import cache as cache_module


def decaying(m=60, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    S = torch.arange(1, n + 1, dtype=torch.float32) ** -1.0 * 10
    return (U * S) @ V.T


def test_full_svd_reconstructs_orthonormal_sorted_and_sign_fixed():
    W = torch.randn(30, 20)
    svd = svd_full(W)
    assert torch.allclose(svd.reconstruct(), W, atol=1e-5)
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(20), atol=1e-5)
    assert torch.allclose(svd.V.T @ svd.V, torch.eye(20), atol=1e-5)
    assert bool((svd.S[:-1] >= svd.S[1:]).all())
    pivots = svd.U.gather(0, svd.U.abs().argmax(0, keepdim=True))
    assert bool((pivots > 0).all())


def test_sign_convention_removes_solver_choice():
    W = torch.randn(16, 12)
    a, b = svd_full(W), svd_full(-W)
    # -W = U diag(S) (-V)^T: the convention must pick the same U and flip V.
    assert torch.allclose(a.U, b.U, atol=1e-5) and torch.allclose(a.V, -b.V, atol=1e-5)


def test_bf16_weight_is_decomposed_in_fp32():
    W = torch.randn(24, 16).to(torch.bfloat16)
    svd = svd_full(W)
    assert svd.U.dtype == torch.float32
    assert torch.allclose(svd.reconstruct(), W.float(), atol=1e-5)


def test_topk_exact_matches_full_and_randomised_is_accurate():
    W = decaying()
    full, exact = svd_full(W), svd_topk(W, 8)
    assert torch.equal(exact.S, full.S[:8]) and torch.equal(exact.U, full.U[:, :8])
    torch.manual_seed(0)
    rnd = svd_topk(W, 8, method="randomized", oversample=10, niter=4)
    assert float(((rnd.S - full.S[:8]).abs() / full.S[:8]).max()) < 1e-3
    assert torch.allclose(rnd.U.abs(), full.U[:, :8].abs(), atol=1e-3)


@pytest.mark.parametrize("k", [0, 41])
def test_topk_out_of_range(k):
    with pytest.raises(ValueError, match="out of range"):
        svd_topk(decaying(), k)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown SVD method"):
        svd_topk(decaying(), 2, method="magic")


def test_hash_depends_on_content_dtype_and_shape():
    W = torch.randn(8, 4)
    assert weight_hash(W) == weight_hash(W.clone())
    W2 = W.clone()
    W2[0, 0] += 1e-3
    assert weight_hash(W) != weight_hash(W2)
    assert weight_hash(W) != weight_hash(W.double())
    assert weight_hash(W) != weight_hash(W.reshape(4, 8))


def test_cache_hits_disk_and_writes_atomically(tmp_path, monkeypatch):
    W = decaying()
    cache = SVDCache(tmp_path)
    first = cache.get(W, k=5)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".safetensors"] and weight_hash(W) in files[0].name
    calls = []
    monkeypatch.setattr(cache_module, "svd_topk", lambda *a, **k: calls.append(1))
    second = SVDCache(tmp_path).get(W, k=5)
    assert not calls and torch.equal(first.U, second.U) and torch.equal(first.S, second.S)
    full = SVDCache(tmp_path).get(W)  # full SVD is a different entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not list(tmp_path.glob("*.tmp"))
    sliced = SVDCache(tmp_path).get(W, k=3)  # an exact top-k is sliced from the full entry, not recomputed
    assert not calls and torch.equal(sliced.U, full.U[:, :3]) and len(list(tmp_path.glob("*.safetensors"))) == 2


BUILD = """
import sys, torch
from spectral_peft.spectral import SVDCache
g = torch.Generator().manual_seed(0)
SVDCache(sys.argv[1]).get(torch.randn(300, 200, generator=g))
"""


def test_concurrent_builders_leave_a_valid_file(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    assert len(list(tmp_path.iterdir())) == 1
    assert torch.allclose(SVDCache(tmp_path).get(W).reconstruct(), W, atol=1e-4)


def test_get_many_progress(tmp_path):
    out = SVDCache(None).get_many({"a": decaying(), "b": decaying(seed=1)}, k=3, progress=False)
    assert set(out) == {"a", "b"} and out["a"].rank == 3


def test_cache_root_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cache = SVDCache("~/svd")
    cache.get(torch.randn(6, 4), k=2)
    assert cache.root == tmp_path / "svd" and any(cache.root.iterdir())
    assert not (tmp_path / "~").exists()
