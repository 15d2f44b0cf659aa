"""What an adapter keeps alive: derived state (cached singular vectors) is never a buffer, so DDP does not broadcast
it, ``.to()``/``.double()`` still move it, and the top-k methods keep only top-k columns."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_model
from test_adapters import config_for

from spectral_peft import get_peft_model
from spectral_peft.adapters.derived import DerivedState

SPECTRAL = ("svf", "svft", "oplora", "palora", "hiplora", "milora")


def derived(wrapped) -> dict[str, torch.Tensor]:
    """``{module.name: tensor}`` of every derived tensor of the wrapped model."""
    return {f"{path}.{n}": t for path, m in wrapped.named_modules() if isinstance(m, DerivedState)
            for n, t in m.derived_tensors().items()}


@pytest.mark.parametrize("method", SPECTRAL)
def test_no_derived_tensor_is_a_buffer_and_double_moves_them(method, one_thread):
    wrapped = get_peft_model(tiny_model(), config_for(method), progress=False)
    cached = derived(wrapped)
    assert cached, "the method caches nothing"
    buffers = {t.data_ptr() for t in wrapped.buffers()}
    assert not buffers & {t.data_ptr() for t in cached.values() if t.numel()}
    assert not any(k.split(".")[-1] in ("U", "S", "V", "U_St", "V_St", "expert_weight")
                   for k, _ in wrapped.named_buffers())
    assert not any(".U" in k or ".V" in k for k in wrapped.state_dict())
    wrapped.double()
    moved = derived(wrapped)
    assert moved.keys() == cached.keys()
    for name, t in moved.items():
        assert t.dtype == (torch.float64 if cached[name].is_floating_point() else cached[name].dtype), name
    wrapped.to(torch.float32)
    assert all(t.dtype != torch.float64 for t in derived(wrapped).values())


def test_ddp_broadcasts_no_derived_tensor(tmp_path, one_thread):
    wrapped = get_peft_model(tiny_model(), config_for("palora"), progress=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped)
        broadcast = {t.data_ptr() for t in ddp.modules_buffers}
    finally:
        dist.destroy_process_group()
    assert broadcast, "the adapter's saved state (expert scales, protected sets) should remain buffers"
    assert not broadcast & {t.data_ptr() for t in derived(wrapped).values() if t.numel()}


@pytest.mark.parametrize("method", ["oplora", "hiplora"])
def test_top_k_methods_keep_only_k_columns(method, one_thread):
    wrapped = get_peft_model(tiny_model(), config_for(method), progress=False)
    k = wrapped.peft_config.k
    for name, t in derived(wrapped).items():
        assert t.dim() == 1 and t.numel() <= k or t.dim() == 2 and t.shape[0] <= k, (name, tuple(t.shape))


@pytest.mark.parametrize("method", SPECTRAL)
def test_no_derived_tensor_keeps_a_larger_storage_alive(method, tmp_path, one_thread):
    """A derived tensor that is a slice of a full SVD (or of a cache file safetensors maps into memory) would keep
    the whole of it resident; each must own exactly its bytes, also when the SVDs come from a cache of full SVDs."""
    from spectral_peft.adapters.matrices import matrix_weights
    from spectral_peft.model import find_targets
    from spectral_peft.spectral import SVDCache

    model, config = tiny_model(), config_for(method)
    cache = SVDCache(tmp_path)
    for W in matrix_weights(model, find_targets(model, config)).values():
        cache.get(W)  # full SVDs on disk: top-k methods slice them
    wrapped = get_peft_model(model, config, svd_cache=SVDCache(tmp_path), progress=False)
    for name, t in derived(wrapped).items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
