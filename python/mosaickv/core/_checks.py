"""Input validation shared by every method: fail early with what was wrong and what is allowed."""

import torch

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Reject NaN/inf: one bad element would poison a segment's covariance and every softmax."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf element(s); only finite values can be cached")


def check_kv(k: torch.Tensor, v: torch.Tensor, *, allow_empty: bool) -> None:
    """Check a K/V pair: both [T, H_kv, D], same shape, dtype and device, finite.

    Args:
        k, v: [T, H_kv, D], float16 / bfloat16 / float32.
        allow_empty: whether T = 0 is accepted (append: yes, encode: no).
    """
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [T, H_kv, D], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [T, H_kv, D] (3 dims), got shape {tuple(x.shape)}")
        if x.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; allowed: float16, bfloat16, float32")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"k and v must share dtype and device, got {k.dtype}/{k.device} and {v.dtype}/{v.device}")
    if k.shape[0] == 0 and not allow_empty:
        raise ValueError("encode needs at least one token (T >= 1); got T = 0")
    if k.shape[1] == 0 or k.shape[2] == 0:
        raise ValueError(f"H_kv and D must be >= 1, got shape {tuple(k.shape)}")
    check_finite(k, "k")
    check_finite(v, "v")


def check_query(q: torch.Tensor, n_kv_heads: int, dim: int, name: str = "q") -> None:
    """Check a decode query [H_q, D] (or a query window [w, H_q, D] when ``name`` says so)."""
    if not isinstance(q, torch.Tensor) or q.dim() not in (2, 3):
        raise ValueError(f"{name} must be a tensor [H_q, D] (or [w, H_q, D] for q_window)")
    if q.dtype not in STORAGE_DTYPES:
        raise ValueError(f"{name} has dtype {q.dtype}; allowed: float16, bfloat16, float32")
    h_q, d = q.shape[-2], q.shape[-1]
    if d != dim:
        raise ValueError(f"{name} head dim {d} does not match the cache's D = {dim}")
    if h_q == 0 or h_q % n_kv_heads:
        raise ValueError(
            f"{name} has H_q = {h_q} query heads; it must be a positive multiple of H_kv = {n_kv_heads}")
    check_finite(q, name)


def check_ratio(value: float, name: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
