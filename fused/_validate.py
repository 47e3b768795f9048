"""Input checks shared by every op and backend.

Shape, dtype and device checks always run (they only read metadata). Checks
that need the data (index range, NaN/Inf) run eagerly on CPU tensors or when
``validate=True``; on CUDA they are queued with ``torch._assert_async`` so the
default path never synchronises with the host and stays capturable in a CUDA
graph (docs/dispatch.md §5).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_REDUCTIONS = ("mean", "none")
OTSU_MODES = ("vico", "skimage")
DEFAULT_BINS = {"vico": 10, "skimage": 256}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def _require_nonempty(name: str, t: torch.Tensor, expected: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(t)}); expected {expected} with every size >= 1")


def _data_check(cond_fn, message: str, tensor: torch.Tensor, validate: bool) -> None:
    """Run a data-dependent check without ever syncing a CUDA stream by default."""
    if torch.compiler.is_compiling():
        # Inside a traced graph a Python branch on data would break the graph;
        # an async assert stays in it.
        torch._assert_async(cond_fn(), message)
        return
    if tensor.device.type == "cpu" or validate:
        if not bool(cond_fn()):
            raise ValueError(message)
    else:
        torch._assert_async(cond_fn(), message)


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: ``scale`` or ``head_dim ** -0.5`` when None."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_qkv(q: object, k: object, v: object) -> None:
    """q: [B, H, N, D], k and v: [B, H, L, D]; same floating dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, t)
        if t.dim() != 4:
            want = "[B, H, N, D]" if name == "q" else "[B, H, L, D]"
            raise ValueError(f"{name} must be 4-D {want}, got shape {_shape(t)}")
        _require_float(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, H={H}, L, D={D}] to match q {_shape(q)}, got {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the same shape as k {_shape(k)} ([B, H, L, D]), got {_shape(v)}")
    _require_nonempty("q", q, "[B, H, N, D]")
    _require_nonempty("k", k, "[B, H, L, D]")


def check_token_index(token_index: object, q: torch.Tensor, k: torch.Tensor, validate: bool) -> torch.Tensor:
    """int [B, T] on q's device with values in [-1, L); returns it as int64."""
    _require_tensor("token_index", token_index)
    if token_index.dtype.is_floating_point or token_index.dtype.is_complex or token_index.dtype == torch.bool:
        raise TypeError(f"token_index must be an integer tensor (int64), got {token_index.dtype}")
    B, L = q.shape[0], k.shape[2]
    if token_index.dim() != 2 or token_index.shape[0] != B:
        raise ValueError(f"token_index must have shape [B={B}, T], got {_shape(token_index)}")
    _require_nonempty("token_index", token_index, f"[B={B}, T]")
    if token_index.device != q.device:
        raise ValueError(f"token_index is on {token_index.device} but q is on {q.device}")
    token_index = token_index.to(torch.int64)
    _data_check(
        lambda: ((token_index >= -1) & (token_index < L)).all(),
        f"token_index values must lie in [-1, {L - 1}] (L = {L} keys; -1 means no map)",
        token_index,
        validate,
    )
    return token_index


def check_key_mask(key_mask: object, q: torch.Tensor, k: torch.Tensor) -> None:
    """bool [B, L] on q's device."""
    _require_tensor("key_mask", key_mask)
    B, L = q.shape[0], k.shape[2]
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor [B={B}, L={L}], got {key_mask.dtype}")
    if tuple(key_mask.shape) != (B, L):
        raise ValueError(f"key_mask must have shape [B={B}, L={L}], got {_shape(key_mask)}")
    if key_mask.device != q.device:
        raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}")


def check_head_reduce(head_reduce: object) -> str:
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    return head_reduce


def check_mode(mode: object) -> str:
    if mode not in OTSU_MODES:
        raise ValueError(f"mode must be one of {OTSU_MODES}, got {mode!r}")
    return mode


def check_bins(bins: object, mode: str) -> int:
    """bins: an int >= 2, or None for the mode's default (10 "vico", 256 "skimage")."""
    if bins is None:
        return DEFAULT_BINS[mode]
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"bins must be an int or None, got {type(bins).__name__}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return bins


def check_otsu_args(maps: object, bins: int | None, mode: object, validate: bool) -> int:
    """maps: floating [..., N] without NaN/Inf; returns the number of bins."""
    check_mode(mode)
    _require_tensor("maps", maps)
    _require_float("maps", maps)
    if maps.dim() < 1:
        raise ValueError("maps must have at least one dim [..., N], got a 0-d tensor")
    _require_nonempty("maps", maps, "[..., N]")
    bins = check_bins(bins, mode)
    # min and max carry any NaN or Inf, and one fused min/max pass costs ~5x less
    # than materialising isfinite(maps) (measurable next to the ~0.1 ms C++ Otsu).
    _data_check(lambda: torch.isfinite(torch.stack(torch.aminmax(maps))).all(), "maps contains NaN or Inf", maps,
                validate)
    return bins
