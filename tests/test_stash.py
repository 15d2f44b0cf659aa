"""The weight stash behind PALoRA's in-place fold, and the SVD cache named by the environment."""

from __future__ import annotations

import gc

import pytest
import torch

from spectral_peft.spectral import SVDCache, weight_hash
from spectral_peft.spectral.stash import StashError, WeightStash


def test_stash_restores_bit_for_bit_and_refuses_a_changed_file(tmp_path):
    W = torch.randn(24, 40).to(torch.bfloat16)
    digest = weight_hash(W)
    stash = WeightStash(tmp_path)
    stash.put(W, digest)
    live = W.clone()
    live.add_(1.0)  # the adapter overwrote it in place
    stash.restore(digest, live)
    assert torch.equal(live, W) and weight_hash(live) == digest
    other = torch.zeros(24, 40, dtype=torch.bfloat16)
    stash.put(other, digest)  # an existing entry is never rewritten
    stash.restore(digest, live)
    assert torch.equal(live, W)
    path = stash.path(digest)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # corrupt the last entries
    with pytest.raises(StashError, match="no longer holds the stashed weight"):
        stash.restore(digest, live)
    with pytest.raises(StashError, match="missing or unreadable"):
        stash.restore("0" * 32, live)


def test_private_stash_directory_goes_with_the_stash():
    stash = WeightStash()
    W = torch.randn(4, 6)
    stash.put(W, weight_hash(W))
    root = stash.root
    assert root.is_dir() and any(root.iterdir())
    del stash
    gc.collect()
    assert not root.exists()


def test_svd_cache_defaults_to_the_directory_in_the_environment(tmp_path, monkeypatch):
    W = torch.randn(12, 8)
    monkeypatch.delenv("SPECTRAL_PEFT_SVD_CACHE", raising=False)
    assert SVDCache().root is None
    monkeypatch.setenv("SPECTRAL_PEFT_SVD_CACHE", str(tmp_path / "svd"))
    cache = SVDCache()
    cache.get(W)
    assert cache.root == tmp_path / "svd" and len(list(cache.root.glob("*.safetensors"))) == 1
    assert SVDCache(tmp_path / "elsewhere").root == tmp_path / "elsewhere"  # an explicit root wins
