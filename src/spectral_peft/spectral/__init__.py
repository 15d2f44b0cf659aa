"""SVD of frozen weights: full and top-k (exact or randomised), fp32, fixed signs, and an on-disk cache."""

from .cache import SVDCache, weight_hash
from .svd import SVD, fix_signs, svd_full, svd_topk

__all__ = ["SVD", "SVDCache", "fix_signs", "svd_full", "svd_topk", "weight_hash"]
