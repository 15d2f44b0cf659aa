"""Derived state: tensors an adapter recomputes from the base weights (cached singular vectors, projectors, index
patterns), kept as plain attributes instead of buffers.

``torch.nn.parallel.DistributedDataParallel`` broadcasts every tensor of ``module.named_buffers()`` from rank 0 on
each forward (``broadcast_buffers=True``, its default), and ``state_dict`` and ``buffers()`` list them. Singular
vectors are the same on every rank (each rank derives them from the same weights, and the recorded base hashes say
so), so broadcasting them is pure traffic. A :class:`DerivedState` module names such tensors in ``derived``; they
are ordinary attributes, invisible to ``buffers()``, ``state_dict()`` and DDP, and :meth:`_apply` moves and casts
them exactly as ``.to()``, ``.cuda()``, ``.double()`` or ``.half()`` would move and cast a buffer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class DerivedState(nn.Module):
    """A module whose attributes named in ``derived`` are tensors (or ``None``) that ``_apply`` moves like buffers."""

    derived: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for name in self.derived:
            t = self.__dict__.get(name)
            if isinstance(t, torch.Tensor):
                self.__dict__[name] = fn(t)
        return self

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of this module's own derived tensors (not its children's)."""
        return {n: t for n in self.derived if isinstance(t := self.__dict__.get(n), torch.Tensor)}
