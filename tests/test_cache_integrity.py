"""The SVD cache verifies every entry: corrupt, truncated or mismatched entries are rebuilt with a warning."""

from __future__ import annotations

import shutil
import time
import warnings

import pytest
import torch
from helpers import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spectral_peft import get_peft_model, method_config
from spectral_peft.model import find_targets
from spectral_peft.spectral import SVDCache, svd_full, svd_topk, weight_hash
from spectral_peft.spectral import cache as cache_module
from spectral_peft.spectral.cache import SVDCacheWarning, entry_metadata
from spectral_peft.budget import hip_layers


def matrix(m=60, n=40, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def count_svds(monkeypatch):
    """Count the cache's calls to the SVD functions (they still compute)."""
    calls = []

    def counted(fn):
        return lambda *a, **kw: calls.append(fn.__name__) or fn(*a, **kw)

    monkeypatch.setattr(cache_module, "svd_full", counted(svd_full))
    monkeypatch.setattr(cache_module, "svd_topk", counted(svd_topk))
    return calls


def assert_true_svd(svd, W, k):
    """``svd`` is the top-``k`` SVD of ``W``: it matches a fresh decomposition."""
    ref = svd_full(W).top(k)
    assert torch.allclose(svd.S, ref.S, atol=1e-5) and torch.allclose(svd.U, ref.U, atol=1e-4)


def rebuilt_with_warning(cache, W, k, path, reason, monkeypatch, method="exact"):
    """``get`` warns once (naming ``path`` and ``reason``), recomputes, returns the true SVD, rewrites a good entry."""
    calls = count_svds(monkeypatch)
    with pytest.warns(SVDCacheWarning) as record:
        svd = cache.get(W, k=k, method=method)
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and str(path) in message and reason in message, message
    assert calls, "the entry was not recomputed"
    if method == "exact":
        assert_true_svd(svd, W, k)
    assert metadata(path) == entry_metadata(weight_hash(W), tuple(W.shape), method, k)
    assert not list(path.parent.glob("*.tmp"))
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get(W, k=k, method=method)  # the rebuilt entry is used without a warning
    assert not calls


@pytest.mark.parametrize("keep", [0, 7, 100, -1], ids=["empty", "in-length", "in-header", "last-byte"])
def test_truncated_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch, keep):
    W, cache = matrix(), SVDCache(tmp_path)
    cache.get(W, k=5)
    path = cache.path(weight_hash(W), "exact", 5)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    rebuilt_with_warning(cache, W, 5, path, "unreadable", monkeypatch)


def test_garbage_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    W, cache = matrix(), SVDCache(tmp_path)
    path = cache.path(weight_hash(W), "exact", 5)
    noise = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    rebuilt_with_warning(cache, W, 5, path, "unreadable", monkeypatch)


def test_entry_without_metadata_is_rebuilt(tmp_path, monkeypatch):
    """An entry of the old format (tensors only) is not trusted."""
    W, cache = matrix(), SVDCache(tmp_path)
    path = cache.path(weight_hash(W), "exact", 5)
    svd = svd_full(W).top(5)
    save_file({"U": svd.U.contiguous(), "S": svd.S.contiguous(), "V": svd.V.contiguous()}, str(path))
    rebuilt_with_warning(cache, W, 5, path, "no metadata", monkeypatch)


@pytest.mark.parametrize(
    "key, value",
    [("shape", "[40, 60]"), ("method", "randomized"), ("k", "6"), ("weight_hash", "0" * 32), ("version", "0"),
     ("format", "other")],
)
def test_mismatched_metadata_is_rebuilt(tmp_path, monkeypatch, key, value):
    W, cache = matrix(), SVDCache(tmp_path)
    cache.get(W, k=5)
    path = cache.path(weight_hash(W), "exact", 5)
    tensors, meta = load_file(str(path)), metadata(path)
    save_file(tensors, str(path), metadata={**meta, key: value})
    rebuilt_with_warning(cache, W, 5, path, f"metadata {key}", monkeypatch)


@pytest.mark.parametrize(
    "edit, reason",
    [(lambda t: t.pop("V"), "tensors"), (lambda t: t.update(S=t["S"].double()), "S is torch.float64"),
     (lambda t: t.update(U=t["U"][:, :4].contiguous()), "U is"), (lambda t: t.update(S=t["S"].flip(0)), "singular"),
     (lambda t: t["S"].__setitem__(2, float("nan")), "singular"),
     (lambda t: t.update(U=t["U"] * 2, S=t["S"] / 2), "unit vectors")],
    ids=["missing-V", "dtype", "shape", "ascending", "nan", "not-unit"],
)
def test_malformed_tensors_are_rebuilt(tmp_path, monkeypatch, edit, reason):
    W, cache = matrix(), SVDCache(tmp_path)
    cache.get(W, k=5)
    path = cache.path(weight_hash(W), "exact", 5)
    tensors, meta = load_file(str(path)), metadata(path)
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)
    rebuilt_with_warning(cache, W, 5, path, reason, monkeypatch)


def plant(cache, W, other, k, method="exact", forge=True):
    """Put ``other``'s SVD under ``W``'s key: with ``W``'s metadata (forged) or ``other``'s (a copied file)."""
    path = cache.path(weight_hash(W), method, k)
    if forge:
        svd = svd_full(other) if k is None else svd_topk(other, k, method=method)
        tensors = {"U": svd.U.contiguous(), "S": svd.S.contiguous(), "V": svd.V.contiguous()}
        save_file(tensors, str(path), metadata=entry_metadata(weight_hash(W), tuple(W.shape), method, k))
    else:
        cache.get(other, k=k, method=method)
        shutil.copyfile(cache.path(weight_hash(other), method, k), path)
    return path


@pytest.mark.parametrize("forge, reason", [(True, "residual"), (False, "metadata weight_hash")])
@pytest.mark.parametrize("k", [5, None])
def test_another_matrix_svd_is_detected(tmp_path, monkeypatch, forge, reason, k):
    W, cache = matrix(), SVDCache(tmp_path)
    path = plant(cache, W, matrix(seed=1), k, forge=forge)
    rebuilt_with_warning(cache, W, k, path, reason, monkeypatch)


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)], ids=["tall", "wide"])
def test_randomized_entry_is_verified_on_its_exact_side(tmp_path, monkeypatch, shape):
    """A randomised SVD is accepted (its range side is exact) but another matrix's is not."""
    W, cache = matrix(*shape), SVDCache(tmp_path)
    first = cache.get(W, k=6, method="randomized")
    calls = count_svds(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.get(W, k=6, method="randomized").U, first.U)
    assert not calls
    path = plant(cache, W, matrix(*shape, seed=1), 6, method="randomized")
    rebuilt_with_warning(cache, W, 6, path, "residual", monkeypatch, method="randomized")


def test_corrupt_full_entry_is_rebuilt_before_slicing(tmp_path, monkeypatch):
    W, cache = matrix(), SVDCache(tmp_path)
    full = plant(cache, W, matrix(seed=1), None)
    with pytest.warns(SVDCacheWarning, match="residual"):
        sliced = cache.get(W, k=3)
    assert_true_svd(sliced, W, 3)
    assert [p.name for p in tmp_path.iterdir()] == [full.name]  # the full entry was rebuilt, no top-3 entry
    calls = count_svds(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.get(W, k=3).U, sliced.U)
    assert not calls


@pytest.mark.parametrize("forge", [True, False], ids=["forged-metadata", "copied-file"])
def test_hiplora_through_a_planted_cache_keeps_its_residual_orthogonal(tmp_path, forge):
    """HiP-LoRA's residual must avoid the top-k singular directions of the real ``W``: a planted SVD would make
    its projectors protect the wrong directions (leakage ~0.2); the cache rebuilds it and leakage stays ~1e-7."""
    k = 4
    model, cache = tiny_model(), SVDCache(tmp_path)
    config = method_config("hiplora", k=k)
    modules = dict(model.named_modules())
    names = find_targets(model, config)
    for i, name in enumerate(names):
        W = modules[name].weight
        plant(cache, W, torch.randn(W.shape, generator=torch.Generator().manual_seed(i)), k, forge=forge)
    with pytest.warns(SVDCacheWarning) as record:
        wrapped = get_peft_model(model, config, svd_cache=cache, progress=False)
    assert len([w for w in record if issubclass(w.category, SVDCacheWarning)]) == len(names)
    g = torch.Generator().manual_seed(0)
    leakage = []
    for layer in hip_layers(wrapped.spectral_layers().values()):
        with torch.no_grad():
            layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=g))
        B, A = layer.lora.factors()
        res = (B @ A).detach()
        true = svd_full(layer.base_layer.weight).top(k)
        leakage.append(float(max((true.U.T @ res).norm(), (res @ true.V).norm()) / res.norm()))
    assert len(leakage) == len(names) and max(leakage) < 1e-5


def test_good_entry_is_used_as_is(tmp_path, monkeypatch):
    W, cache = matrix(), SVDCache(tmp_path)
    first = {k: cache.get(W, k=k) for k in (5, None)}
    first["rnd"] = cache.get(W, k=5, method="randomized")
    calls = count_svds(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = {k: SVDCache(tmp_path).get(W, k=k) for k in (5, None)}
        again["rnd"] = SVDCache(tmp_path).get(W, k=5, method="randomized")
        sliced = SVDCache(tmp_path).get(W, k=3)
    assert calls == []
    for key, svd in first.items():
        assert all(torch.equal(a, b) for a, b in zip((svd.U, svd.S, svd.V), (again[key].U, again[key].S, again[key].V)))
    assert torch.equal(sliced.U, first[None].U[:, :3])


def test_bad_request_is_refused_before_any_lookup(tmp_path):
    W, cache = matrix(), SVDCache(tmp_path)
    cache.get(W)  # a full entry exists, from which k=0 or k=41 would be a silent slice
    for k in (0, 41):
        with pytest.raises(ValueError, match="out of range"):
            cache.get(W, k=k)
    with pytest.raises(ValueError, match="unknown SVD method"):
        cache.get(W, k=3, method="magic")


def best_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_verified_load_is_much_cheaper_than_recomputing(tmp_path):
    """Loading and verifying a cached 512 x 512 full SVD (hash, read, checks) beats recomputing it (~18x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        W, cache = matrix(512, 512), SVDCache(tmp_path)
        cache.get(W)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cached = best_time(lambda: cache.get(W))
        recompute = best_time(lambda: svd_full(W))
    finally:
        torch.set_num_threads(threads)
    assert recompute > 5 * cached, (cached, recompute)
