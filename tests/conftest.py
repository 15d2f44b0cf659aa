"""Shared fixtures (the helpers they use live in ``helpers.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (tiny models: threads only add overhead on a shared machine); the
    previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
