"""An on-disk SVD cache: safetensors files keyed by a content hash of the weight, the method and k.

Files are written to a temporary name and renamed into place, so concurrent builders never leave a torn file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .svd import SVD, svd_full, svd_topk


def weight_hash(weight: torch.Tensor) -> str:
    """BLAKE2b digest of a tensor's dtype, shape and raw bytes."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SVDCache:
    """Computes SVDs on demand and memoises them on disk (``root=None`` keeps nothing on disk; ``~`` is expanded)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else None

    def path(self, digest: str, method: str, k: int | None) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{digest}-{method}-{'full' if k is None else k}.safetensors"

    def get(self, weight: torch.Tensor, k: int | None = None, method: str = "exact", digest: str | None = None) -> SVD:
        """Top-``k`` SVD of ``weight`` (all triplets when ``k`` is None), from disk when cached."""
        digest = digest or weight_hash(weight)
        path = self.path(digest, method, k)
        full = self.path(digest, "exact", None)
        if path is not None and path.exists():
            t = load_file(str(path))
            return SVD(t["U"], t["S"], t["V"])
        if method == "exact" and full is not None and full.exists():  # an exact top-k is a slice of the full SVD
            t = load_file(str(full))
            return SVD(t["U"], t["S"], t["V"]).top(k)
        svd = svd_full(weight) if k is None else svd_topk(weight, k, method=method)
        if path is not None:
            _atomic_save({"U": svd.U, "S": svd.S, "V": svd.V}, path)
        return svd

    def get_many(
        self, weights: dict[str, torch.Tensor], k: int | None = None, method: str = "exact", progress: bool = True
    ) -> dict[str, SVD]:
        """SVDs of several named weights, with a progress bar over modules."""
        return {
            name: self.get(w, k=k, method=method)
            for name, w in tqdm(weights.items(), desc="SVD", unit="matrix", disable=not progress)
        }
