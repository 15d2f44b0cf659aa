"""Shared fixtures (the helpers they use live in ``helpers.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
