"""An on-disk SVD cache that verifies every entry before using it.

Entries are safetensors files named ``<hash>-<method>-<k|full>.safetensors`` holding ``U`` (m x r), ``S`` (r) and
``V`` (n x r) in fp32, with ``r = k`` (or ``min(m, n)`` for ``full``). The file's metadata (all strings) repeats what
the entry is for::

    format = "spectral-peft-svd", version = "1", weight_hash = <hash>, shape = "[m, n]", method = <method>, k = <k|full>

On load an entry is used only if (cheapest first):

1. safetensors can read it (a truncated or garbage file cannot be);
2. its metadata equals the request's (format, version, hash, shape, method and k);
3. it holds exactly ``U``, ``S``, ``V`` in fp32 with the shapes above, and ``S`` is finite, non-negative and
   non-increasing;
4. the reconstruction check passes for ``i`` in {first, middle, last} of the kept triplets: ``||u_i||`` and
   ``||v_i||`` are 1, and the residuals ``||W v_i - sigma_i u_i|| / sigma_1`` and ``||W^T u_i - sigma_i v_i|| /
   sigma_1`` are at most ``16 eps sqrt(max(m, n))`` (``eps`` of fp32; torch's fp32 SVD stays 30-80x below that on
   random matrices from 32 x 48 to 2048 x 2048).
   Both residuals vanish only for singular triplets of ``W``, so the SVD of another matrix fails, whatever its
   metadata says. A randomised SVD is a Rayleigh-Ritz approximation from a range basis of the tall side of ``W``
   (``torch.svd_lowrank`` transposes a wide matrix): it satisfies the relation on that side to rounding, not the
   other, so only that side is checked (``W^T u_i = sigma_i v_i`` when ``m >= n``, else ``W v_i = sigma_i u_i``).

The check costs ``O(mn)`` (six matrix-vector products and one fp32 copy of ``W``) against ``O(mn min(m, n))`` for
the SVD. An entry that fails is never used and never raised: it is rebuilt with a one-line :class:`SVDCacheWarning`
naming the file and the reason. The checks catch corruption and misplaced entries, not a deliberate forgery: whoever
can write the cache directory can also write a consistent entry.

Several processes (the ranks of a ``torchrun`` job, or jobs sharing a cache) compute each entry once: a process that
finds no usable entry takes an exclusive ``fcntl.flock`` on the entry's lock file ``<entry name>.lock`` (empty,
removed again by its holder), looks again, and only then computes and writes; the others wait on the lock and then
read the entry. Locks are per entry, so different matrices are built in parallel, and the kernel releases a lock
when its holder dies. Where ``fcntl`` does not exist (Windows) there is no lock, and concurrent processes may compute
an entry more than once. Files are written to a temporary name and renamed into place, so no reader ever sees a
torn file. Files (entries and lock files) are created with mode ``0o666`` and directories with ``0o777``, less the
process's umask, like any file the process creates: ``0o644`` / ``0o755`` (readable by group and others) under the
usual umask ``022``, ``0o640`` under ``027``, private under ``077``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .svd import SVD, check_request, svd_full, svd_topk

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (module docstring)
    fcntl = None

FORMAT = "spectral-peft-svd"
VERSION = "1"
RESIDUAL_FACTOR = 16  # tolerance = RESIDUAL_FACTOR * eps_fp32 * sqrt(max(m, n))


class SVDCacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, truncated or for another request) and is being rebuilt."""


class InvalidEntry(Exception):
    """Why a cache entry cannot be used (internal: turned into an :class:`SVDCacheWarning`)."""


def weight_hash(weight: torch.Tensor) -> str:
    """BLAKE2b digest of a tensor's dtype, shape and raw bytes."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entry_metadata(digest: str, shape: tuple[int, ...], method: str, k: int | None) -> dict[str, str]:
    """The metadata an entry for this request carries."""
    return {"format": FORMAT, "version": VERSION, "weight_hash": digest, "shape": json.dumps(list(shape)),
            "method": method, "k": "full" if k is None else str(k)}


def save_tensors_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: Path) -> None:
    """Write a safetensors file to a fresh temporary name beside ``path``, then rename it into place. Its mode is
    that of a file newly created with ``0o666`` (the umask applied): ``save_file`` itself leaves ``0o600``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``<path>.lock`` inside the block (waiting for it); a no-op
    without ``fcntl``.

    The holder removes the lock file before releasing it, so none is left behind. A waiter that then acquires the
    removed file sees that the name no longer points to it and starts over on the current one: at any time only the
    holder of the file the name points to is inside the block."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f"{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # a lock file left behind (e.g. no permission to remove it) is harmless
            lock.unlink()
        os.close(fd)  # closing the descriptor releases the lock


def _read(path: Path, expected: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a readable entry whose metadata is ``expected`` (checks 1 and 2)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if not metadata:
                raise InvalidEntry("no metadata (written by an older version)")
            for key, value in expected.items():
                if metadata.get(key) != value:
                    raise InvalidEntry(f"metadata {key} is {metadata.get(key)!r}, expected {value!r}")
            names = f.keys()  # a safe_open handle, not a dict
            # copies: a tensor safetensors hands out may be a view of the mapped file, and any view kept by a
            # layer (a slice of S, say) would keep the whole file resident
            return {name: f.get_tensor(name).clone() for name in names}
    except (SafetensorError, OSError) as e:
        raise InvalidEntry(f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _check_tensors(t: dict[str, torch.Tensor], shape: tuple[int, ...], k: int | None) -> SVD:
    """Check 3: names, dtypes, shapes and a finite, non-negative, non-increasing spectrum."""
    if sorted(t) != ["S", "U", "V"]:
        raise InvalidEntry(f"tensors {sorted(t)}, expected ['S', 'U', 'V']")
    m, n = shape
    r = min(m, n) if k is None else k
    for name, want in (("U", (m, r)), ("S", (r,)), ("V", (n, r))):
        if tuple(t[name].shape) != want or t[name].dtype != torch.float32:
            raise InvalidEntry(f"{name} is {t[name].dtype} {tuple(t[name].shape)}, expected torch.float32 {want}")
    S = t["S"]
    if not (bool(torch.isfinite(S).all()) and bool((S >= 0).all()) and bool((S[:-1] >= S[1:]).all())):
        raise InvalidEntry("singular values are not finite, non-negative and non-increasing")
    return SVD(t["U"], S, t["V"])


def residual_tolerance(shape: tuple[int, ...]) -> float:
    """``16 eps sqrt(max(m, n))`` with ``eps`` the fp32 machine epsilon."""
    return RESIDUAL_FACTOR * torch.finfo(torch.float32).eps * math.sqrt(max(shape))


@torch.no_grad()
def check_reconstruction(weight: torch.Tensor, svd: SVD, method: str) -> None:
    """Check 4 (module docstring): unit vectors and small residuals at the first, middle and last kept triplet."""
    W = weight.detach().to(torch.float32)
    m, n = W.shape
    r = svd.rank
    idx = sorted({0, r // 2, r - 1})
    U, S, V = (x.to(W.device) for x in (svd.U[:, idx], svd.S[idx], svd.V[:, idx]))
    tol = residual_tolerance((m, n))
    scale = max(float(svd.S[0]), torch.finfo(torch.float32).tiny)
    right = torch.linalg.vector_norm(W @ V - U * S, dim=0) / scale  # ||W v_i - sigma_i u_i|| / sigma_1
    left = torch.linalg.vector_norm(W.T @ U - V * S, dim=0) / scale  # ||W^T u_i - sigma_i v_i|| / sigma_1
    norms = torch.cat([torch.linalg.vector_norm(U, dim=0), torch.linalg.vector_norm(V, dim=0)])
    if not float((norms - 1).abs().max()) <= tol:
        raise InvalidEntry("singular vectors are not unit vectors")
    checks = {"exact": {"right": right, "left": left}, "randomized": {"left": left} if m >= n else {"right": right}}
    for side, res in checks[method].items():
        worst = float(res.max())
        if not worst <= tol:
            raise InvalidEntry(f"{side} residual {worst:.2e} exceeds {tol:.1e} at triplet {idx[int(res.argmax())]}: "
                               "the SVD of another matrix")


def _verified(path: Path, metadata: dict[str, str], weight: torch.Tensor, k: int | None, method: str) -> SVD:
    """The entry at ``path`` after checks 1-4; raises :class:`InvalidEntry` saying why it is unusable."""
    svd = _check_tensors(_read(path, metadata), tuple(weight.shape), k)
    check_reconstruction(weight, svd, method)
    return svd


def _compute(weight: torch.Tensor, k: int | None, method: str) -> SVD:
    return svd_full(weight) if k is None else svd_topk(weight, k, method=method)


CACHE_ENV = "SPECTRAL_PEFT_SVD_CACHE"


class SVDCache:
    """Computes SVDs on demand and memoises them on disk under ``root`` (``~`` is expanded). ``root=None`` takes the
    directory named by the environment variable ``SPECTRAL_PEFT_SVD_CACHE`` and, when it is unset, keeps nothing on
    disk; so every command of a chain (``svf``, ``inject``, ``eval`` ...) can share one cache, as ``HF_HOME`` shares
    downloads."""

    def __init__(self, root: str | Path | None = None):
        root = root if root is not None else os.environ.get(CACHE_ENV) or None
        self.root = Path(root).expanduser() if root is not None else None

    def path(self, digest: str, method: str, k: int | None) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{digest}-{method}-{'full' if k is None else k}.safetensors"

    def get(self, weight: torch.Tensor, k: int | None = None, method: str = "exact", digest: str | None = None) -> SVD:
        """Top-``k`` SVD of ``weight`` (all triplets when ``k`` is None), from disk when a verified entry exists.

        ``digest`` is ``weight_hash(weight)`` when the caller already has it. An exact top-``k`` is sliced from a
        cached full SVD when there is one. Unusable entries are rebuilt with an :class:`SVDCacheWarning`.
        """
        check_request(tuple(weight.shape), k, method)
        if self.root is None:
            return _compute(weight, k, method)
        digest = digest or weight_hash(weight)
        path = self.path(digest, method, k)
        full = self.path(digest, "exact", None)
        if k is not None and method == "exact" and not path.exists() and full.exists():
            return self._load_or_build(weight, None, "exact", digest, full).top(k)
        return self._load_or_build(weight, k, method, digest, path)

    def _load_or_build(self, weight: torch.Tensor, k: int | None, method: str, digest: str, path: Path) -> SVD:
        """A verified entry if there is one; else, holding the entry's lock, one found after waiting for it or one
        computed and written (module docstring)."""
        metadata = entry_metadata(digest, tuple(weight.shape), method, k)
        if path.exists():
            with contextlib.suppress(InvalidEntry):
                return _verified(path, metadata, weight, k, method)
        with entry_lock(path):
            if path.exists():
                try:
                    return _verified(path, metadata, weight, k, method)
                except InvalidEntry as e:
                    warnings.warn(f"SVD cache entry {path} is unusable ({e}); rebuilding it", SVDCacheWarning,
                                  stacklevel=3)
            svd = _compute(weight, k, method)
            save_tensors_atomically({"U": svd.U, "S": svd.S, "V": svd.V}, metadata, path)
        return svd

    def get_many(
        self, weights: dict[str, torch.Tensor], k: int | None = None, method: str = "exact", progress: bool = True
    ) -> dict[str, SVD]:
        """SVDs of several named weights, with a progress bar over modules."""
        return {
            name: self.get(w, k=k, method=method)
            for name, w in tqdm(weights.items(), desc="SVD", unit="matrix", disable=not progress)
        }
