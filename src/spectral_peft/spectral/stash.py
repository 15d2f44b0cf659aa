"""A content-addressed stash of frozen weights on disk, so an adapter can overwrite a weight in place and still put
back the original bit for bit.

``put(W, digest)`` writes ``W`` (its own dtype) to ``<root>/weights/<digest>.safetensors`` unless that file exists;
``digest`` is :func:`.cache.weight_hash` of ``W``, so one file serves every adapter made on the same weight, and a
file never goes stale. ``restore(digest, W)`` reads it back into ``W`` (same shape and dtype) after checking that
its content still hashes to ``digest``: a truncated, corrupted or swapped file is refused in one line, never copied.

``root=None`` uses a private temporary directory, created on the first ``put`` and removed with the stash object
(also at interpreter exit). The cost of the stash is disk, not memory: one copy of each stashed weight.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import SpectralPeftError
from .cache import save_tensors_atomically, weight_hash


class StashError(SpectralPeftError):
    """A stashed weight is missing or no longer the weight that was stashed."""


class WeightStash:
    """Frozen weights on disk, addressed by their content hash (``root=None``: a private temporary directory)."""

    def __init__(self, root: str | Path | None = None):
        self._root = Path(root).expanduser() / "weights" if root is not None else None
        self._cleanup = None

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="spectral-peft-stash-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._root), True)
        return self._root

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.safetensors"

    def put(self, weight: torch.Tensor, digest: str) -> None:
        """Stash ``weight`` (whose :func:`weight_hash` is ``digest``) unless it is already there."""
        path = self.path(digest)
        if not path.exists():
            save_tensors_atomically({"weight": weight.detach()}, {"format": "spectral-peft-stash", "weight_hash": digest}, path)

    @torch.no_grad()
    def restore(self, digest: str, into: torch.Tensor) -> None:
        """Copy the stashed weight ``digest`` into ``into`` after checking its shape, dtype and hash."""
        path = self.path(digest)
        try:
            saved = load_file(str(path))["weight"]
        except (FileNotFoundError, SafetensorError, KeyError) as e:
            raise StashError(f"cannot restore a weight: {path} is missing or unreadable ({type(e).__name__}); "
                             "reload the base model from its checkpoint") from None
        if saved.shape != into.shape or saved.dtype != into.dtype or weight_hash(saved) != digest:
            raise StashError(f"cannot restore a weight: {path} no longer holds the stashed weight; reload the base "
                             "model from its checkpoint")
        into.copy_(saved.to(into.device))
