"""The PyTorch ground truth of every op (docs/ops.md §1).

Straightforward, batched, float64-safe code with no Python loop over samples.
It materialises the attention probabilities — that is what makes it simple
enough to trust, and what the kernels in this package avoid. Gradients come
from PyTorch autograd through these functions, so the reference backward is
autograd itself and the kernels' hand-written backwards are checked against it.

All functions assume validated inputs (see ``fused._validate``).
"""

from __future__ import annotations

import torch

from ._registry import FLOATS, register_backend

__all__ = [
    "attention",
    "attention_with_maps",
    "masked_attention",
    "otsu_mask",
    "otsu_vico",
    "otsu_skimage",
    "otsu_stat_dtype",
    "otsu_compute_dtype",
    "accumulation_dtype",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the attention kernels' softmax statistics and accumulators, and of the
    ``lse`` [B, H, N] their forward ops return: float64 for float64 inputs (gradcheck),
    float32 for every other dtype. The Triton launchers, the C++ kernels (checked by
    tests/ops/test_shared_rules.py) and the fake implementations all follow it (docs/ops.md §2.5)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_index: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    head_reduce: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q kᵀ·scale) v over the visible keys, and the probabilities of chosen key columns.

    q: [B, H, N, D], k/v: [B, H, L, D]; token_index: int64 [B, T] (−1 = no map) or None;
    key_mask: bool [B, L] or None. Returns out [B, H, N, D] and maps [B, T, N] ("mean")
    or [B, H, T, N] ("none"), both in q's dtype; maps is None without token_index.

    A hidden key contributes nothing: its score is replaced by -inf (not added to),
    and its key and value rows enter as zeros, so a NaN or Inf stored in a hidden key
    or value reaches neither the output nor the gradients (0 · NaN is NaN, so a zero
    probability alone would not keep it out; docs/ops.md §4.2). A batch row whose
    mask is all False attends uniformly to all keys (the paper's code fills with a
    large finite negative, which makes every score equal): it uses every value and
    no key (§4.3).
    """
    if key_mask is not None:
        rows_visible = key_mask[:, None, :, None]  # over the L rows of k and v
        any_visible = key_mask.any(dim=-1)[:, None, None, None]
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        k = torch.where(rows_visible, k, zero)
        v = torch.where(rows_visible | ~any_visible, v, zero)
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, N, L]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        scores = torch.where(any_visible, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v
    if token_index is None:
        return out, None
    B, H, N, _ = q.shape
    T = token_index.shape[1]
    valid = (token_index >= 0)[:, None, None, :]
    cols = token_index.clamp(min=0)[:, None, None, :].expand(B, H, N, T)
    # gather's backward scatter-adds, so duplicated columns accumulate gradient;
    # -1 slots are zero (a NaN in q included) with zero gradient (docs/ops.md §2.2).
    picked = torch.where(valid, probs.gather(-1, cols), torch.zeros((), dtype=probs.dtype, device=probs.device))
    maps = picked.transpose(-1, -2)  # [B, H, T, N]
    if head_reduce == "mean":
        maps = maps.mean(dim=1)
    return out, maps


def attention_with_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_index: torch.Tensor,
    scale: float,
    head_reduce: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of ``fused.cross_attention_with_maps``: ``attention`` with every key visible."""
    return attention(q, k, v, token_index, None, scale, head_reduce)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference of ``fused.masked_attention``: ``attention`` without maps."""
    return attention(q, k, v, None, key_mask, scale, "mean")[0]


def otsu_stat_dtype() -> torch.dtype:
    """Dtype of Otsu's class statistics (sums, weights, between-class variance).

    Accumulating them in float64 in every backend makes the backends agree on
    which candidate wins even when two candidates' variances are within a
    float32 rounding of each other; class membership itself is decided in the
    compute dtype exactly as docs/ops.md §3.1 says.
    """
    return torch.float64


def otsu_compute_dtype(maps: torch.Tensor) -> torch.dtype:
    """Dtype Otsu decides membership in (and returns thresholds in): fp32 for fp16/bf16 maps."""
    return torch.float32 if maps.dtype in (torch.float16, torch.bfloat16) else maps.dtype


def _between_class_variance(xn: torch.Tensor, xs: torch.Tensor, tau: torch.Tensor, n: int) -> torch.Tensor:
    """Otsu's between-class variance [..., C] of normalised maps ``xn`` [..., N] (``xs``: the same in the
    statistics dtype, [..., 1, N]) for thresholds ``tau`` [C]; -1 where a class is empty."""
    high = xn.unsqueeze(-2) >= tau[:, None]  # [..., C, N]
    n_high = high.sum(dim=-1).to(xs.dtype)
    n_low = n - n_high
    s_high = (xs * high).sum(dim=-1)
    s_low = (xs * ~high).sum(dim=-1)
    nonempty = (n_low > 0) & (n_high > 0)
    mu_low = s_low / n_low.clamp(min=1)
    mu_high = s_high / n_high.clamp(min=1)
    g = (n_low / n) * (n_high / n) * (mu_low - mu_high) ** 2
    return torch.where(nonempty, g, torch.full_like(g, -1.0))


def otsu_vico(maps: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ViCo's Otsu rule over the last dim (docs/ops.md §3.2, mode "vico").

    maps: [..., N] floating. Returns threshold [...] (normalised units, fp32 for
    fp16/bf16 maps, else the map's dtype) and mask bool [..., N].
    """
    x = maps.to(otsu_compute_dtype(maps))
    n = x.shape[-1]
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    constant = span == 0
    # IEEE division is correctly rounded on every PyTorch device.
    xn = (x - lo) / torch.where(constant, torch.ones_like(span), span)
    # τ_t = t/bins, rounded once to the compute dtype.
    tau = torch.arange(1, bins, dtype=x.dtype, device=x.device) / bins  # [C]
    sd = otsu_stat_dtype()
    xs = xn.to(sd).unsqueeze(-2)
    # candidates in chunks: the [..., chunk, N] temporaries stay ~2**20 elements whatever ``bins`` is
    chunk = max(1, 2**20 // max(xn.numel(), 1))
    g = torch.cat([_between_class_variance(xn, xs, part, n) for part in tau.split(chunk)], dim=-1)  # [..., C]
    best = g.argmax(dim=-1)  # first index of the maximum
    g_best = g.gather(-1, best[..., None])[..., 0]
    threshold = torch.where(g_best > 0, tau[best], torch.zeros_like(tau[best]))
    thr = threshold[..., None]
    mask = torch.where(thr > 0, xn >= thr, xn > 0)
    mask = mask | constant
    return threshold, mask


def otsu_skimage(maps: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``skimage.filters.threshold_otsu(m, nbins=bins)`` batched over the last dim.

    Bin edges as ``np.histogram`` builds them (``linspace`` in the map's
    dtype), bin membership by comparison with those edges, class means from
    bin centres, first argmax. mask = m > threshold. A constant map gives its
    value as threshold and an all-False mask.
    """
    x = maps.to(otsu_compute_dtype(maps))
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    constant = (hi == lo)[..., 0]
    step = (hi - lo) / bins
    steps = torch.arange(bins + 1, dtype=x.dtype, device=x.device)
    edges = steps * step + lo  # [..., bins + 1], numpy's linspace arithmetic
    edges = torch.cat([edges[..., :-1], hi], dim=-1)
    centres = (edges[..., :-1] + edges[..., 1:]) / 2  # [..., bins]
    # bin i holds edges[i] <= m < edges[i+1]; the last bin also holds the max.
    which = torch.searchsorted(edges.contiguous(), x.contiguous(), right=True) - 1
    which = which.clamp(0, bins - 1)
    sd = otsu_stat_dtype()
    counts = torch.zeros(x.shape[:-1] + (bins,), dtype=sd, device=x.device)
    counts.scatter_add_(-1, which, torch.ones_like(x, dtype=sd))
    weighted = counts * centres.to(sd)
    w1 = counts.cumsum(-1)
    w2 = counts.flip(-1).cumsum(-1).flip(-1)
    m1 = weighted.cumsum(-1) / w1
    m2 = weighted.flip(-1).cumsum(-1).flip(-1) / w2
    var12 = w1[..., :-1] * w2[..., 1:] * (m1[..., :-1] - m2[..., 1:]) ** 2
    var12 = torch.nan_to_num(var12, nan=-1.0)  # constant maps only; replaced below
    best = var12.argmax(dim=-1, keepdim=True)
    threshold = centres.gather(-1, best)[..., 0]
    threshold = torch.where(constant, lo[..., 0], threshold)
    mask = x > threshold[..., None]
    return threshold, mask


def otsu_mask(maps: torch.Tensor, bins: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu threshold and mask over the last dim; see ``otsu_vico``/``otsu_skimage``."""
    if mode == "vico":
        return otsu_vico(maps, bins)
    return otsu_skimage(maps, bins)


@register_backend("torch", devices={"*"}, dtypes={"attention": FLOATS, "otsu_mask": FLOATS},
                  note="this module: PyTorch autograd through the materialised probabilities")
def reference_backend():
    import sys

    return sys.modules[__name__]
