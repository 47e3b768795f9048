"""Otsu thresholding in one Triton kernel: one program per map computes
min/max, the per-candidate class statistics, the between-class variance, the
first argmax, the threshold, and writes the boolean mask (docs/ops.md §3).

Class membership is decided in the compute dtype (float32 for fp16/bf16
maps) with correctly rounded arithmetic — ``tl.math.div_rn`` for float32
division and no FMA contraction (the launch passes ``enable_fp_fusion=False``)
— so the masks equal the reference's bit for bit; class statistics are float64
like every other backend (fused.reference.otsu_stat_dtype). Candidates are
compared with a whole chunk of the map at once ([candidates, chunk] tiles),
so there is no histogram scatter and no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import otsu_compute_dtype
from ._common import INTERPRET, launcher, next_pow2, tl_dtype


@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    if IS_FP64:
        return a / b  # float64 division is correctly rounded already
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _otsu_kernel(
    Maps, Thr, Mask, N, bins,
    VICO: tl.constexpr, COMPUTE: tl.constexpr, IS_FP64: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    base = Maps + r * N
    offs = tl.arange(0, CHUNK)
    lo = tl.full([CHUNK], float("inf"), COMPUTE)
    hi = tl.full([CHUNK], float("-inf"), COMPUTE)
    for c0 in range(0, N, CHUNK):
        ok = c0 + offs < N
        x = tl.load(base + c0 + offs, mask=ok, other=0.0).to(COMPUTE)
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
    lo_s = tl.min(lo, axis=0)
    hi_s = tl.max(hi, axis=0)
    span = hi_s - lo_s
    constant = span == 0
    n_total = N.to(tl.float64)
    cand = tl.arange(0, BLOCK_C)
    if VICO:
        # candidates tau_t = t/bins, t = 1..bins-1, rounded once to COMPUTE
        t = cand + 1
        cand_ok = t < bins
        tau = _div(t.to(COMPUTE), bins.to(COMPUTE), IS_FP64)
        span_safe = tl.where(constant, 1.0, span).to(COMPUTE)
        n_low = tl.zeros([BLOCK_C], tl.float64)
        s_low = tl.zeros([BLOCK_C], tl.float64)
        s_all = tl.zeros([CHUNK], tl.float64)
        for c0 in range(0, N, CHUNK):
            ok = c0 + offs < N
            x = tl.load(base + c0 + offs, mask=ok, other=0.0).to(COMPUTE)
            xn = _div(x - lo_s, span_safe, IS_FP64)
            low = (xn[None, :] < tau[:, None]) & ok[None, :]  # membership only by this comparison
            xn64 = tl.where(ok, xn.to(tl.float64), 0.0)
            n_low += tl.sum(low.to(tl.float64), axis=1)
            s_low += tl.sum(tl.where(low, xn64[None, :], 0.0), axis=1)
            s_all += xn64
        n_high = n_total - n_low
        s_high = tl.sum(s_all, axis=0) - s_low
        valid = cand_ok & (n_low > 0) & (n_high > 0)
        d = s_low / tl.where(n_low > 0, n_low, 1.0) - s_high / tl.where(n_high > 0, n_high, 1.0)
        g = (n_low / n_total) * (n_high / n_total) * (d * d)
        g = tl.where(valid, g, -1.0)
        best = tl.argmax(g, axis=0, tie_break_left=True)  # the first maximum
        g_best = tl.max(g, axis=0)
        thr = tl.sum(tl.where(cand == best, tau, 0.0), axis=0)
        thr = tl.where(g_best > 0, thr, 0.0).to(COMPUTE)
        thr = tl.where(constant, 0.0, thr).to(COMPUTE)
        tl.store(Thr + r, thr)
        for c0 in range(0, N, CHUNK):
            ok = c0 + offs < N
            x = tl.load(base + c0 + offs, mask=ok, other=0.0).to(COMPUTE)
            xn = _div(x - lo_s, span_safe, IS_FP64)
            # tau > 0: high class; tau = 0: everything above the minimum; constant: all
            m = tl.where(thr > 0, (xn >= thr).to(tl.int8), (xn > 0).to(tl.int8))
            m = tl.where(constant, 1, m)
            tl.store(Mask + r * N + c0 + offs, m != 0, mask=ok)
    else:
        # skimage: np.linspace edges in COMPUTE (i*step + lo, last = hi), bin i
        # holds edges[i] <= x < edges[i+1] (the last bin also holds hi).
        step = _div(span, bins.to(COMPUTE), IS_FP64)
        bin_ok = cand < bins
        e_lo = tl.where(cand == 0, lo_s, cand.to(COMPUTE) * step + lo_s).to(COMPUTE)
        e_hi = tl.where(cand + 1 >= bins, hi_s, (cand + 1).to(COMPUTE) * step + lo_s).to(COMPUTE)
        centre = ((e_lo + e_hi) / 2).to(COMPUTE)
        last = cand == bins - 1
        counts = tl.zeros([BLOCK_C], tl.float64)
        for c0 in range(0, N, CHUNK):
            ok = c0 + offs < N
            x = tl.load(base + c0 + offs, mask=ok, other=0.0).to(COMPUTE)
            inside = (x[None, :] >= e_lo[:, None]) & ((x[None, :] < e_hi[:, None]) | last[:, None])
            counts += tl.sum((inside & ok[None, :] & bin_ok[:, None]).to(tl.float64), axis=1)
        centre64 = centre.to(tl.float64)
        w1 = tl.cumsum(counts, axis=0)
        m1 = tl.cumsum(counts * centre64, axis=0)
        w2 = tl.sum(counts, axis=0) - w1
        m2 = tl.sum(counts * centre64, axis=0) - m1
        d = m1 / tl.where(w1 > 0, w1, 1.0) - m2 / tl.where(w2 > 0, w2, 1.0)
        var = (w1 * w2) * (d * d)
        var = tl.where((cand + 1 < bins) & (w1 > 0) & (w2 > 0), var, -1.0)
        best = tl.argmax(var, axis=0, tie_break_left=True)
        thr = tl.sum(tl.where(cand == best, centre, 0.0), axis=0).to(COMPUTE)
        thr = tl.where(constant, lo_s, thr).to(COMPUTE)
        tl.store(Thr + r, thr)
        for c0 in range(0, N, CHUNK):
            ok = c0 + offs < N
            x = tl.load(base + c0 + offs, mask=ok, other=0.0).to(COMPUTE)
            tl.store(Mask + r * N + c0 + offs, x > thr, mask=ok)


def otsu_forward(maps: torch.Tensor, bins: int, mode: str):
    """Threshold [...] (float32 for fp16/bf16 maps) and mask bool [..., N], one launch."""
    compute = otsu_compute_dtype(maps)
    n = maps.shape[-1]
    flat = maps.reshape(-1, n).contiguous()
    rows = flat.shape[0]
    thr = torch.empty(rows, dtype=compute, device=maps.device)
    mask = torch.empty((rows, n), dtype=torch.bool, device=maps.device)
    vico = mode == "vico"
    block_c = next_pow2(bins - 1 if vico else bins, minimum=2)
    # [candidates, chunk] tiles; sizes without register spills on sm_90 (compiled without a
    # GPU: 16K elements spill 408 B at 256 candidates, 8K none; benchmarks/RESULTS.md).
    tile = 16384 if block_c <= 16 else 8192
    chunk = min(next_pow2(n, minimum=16), 1024 if INTERPRET else max(16, tile // block_c))
    extra = {} if INTERPRET else dict(num_warps=8, enable_fp_fusion=False)
    launcher(_otsu_kernel)[(rows,)](
        flat, thr, mask, n, bins,
        VICO=vico, COMPUTE=tl_dtype(compute), IS_FP64=compute == torch.float64,
        CHUNK=chunk, BLOCK_C=block_c, **extra,
    )
    return thr.reshape(maps.shape[:-1]), mask.reshape(maps.shape)
