"""Backward of the attention kernels (docs/ops.md §2.5), flash-attention style.

P is recomputed from the saved log-sum-exp, never stored, in base 2 like the
forward: scores scaled by qk_scale = scale·log2(e), P = exp2(s₂ − lse·log2(e)).
With c = 1/H for the head mean (1 for per-head maps) the map gradient dM adds
one term to dP, c·dM[t, n] at column idx[t], and one to the row term
D = rowsum(dO ⊙ O) + c·Σ_t dM[t, n]·P[n, idx[t]]; then dS = P ⊙ (dP − D),
dq = scale·dS·k, dk = scale·dSᵀ·q, dv = Pᵀ·dO. Three kernels: the row term,
dk/dv (a program per key block, looping over queries) and dq (a program per
query block, looping over keys), so no gradient needs atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from ._common import (INTERPRET, INTERPRET_META, LOG2E, LOG2E_C, autotuned_by_head_dim, chosen_probabilities, launcher,
                      needs_int64_offsets, next_pow2, row_attends_uniformly, row_index, tl_dtype)
from .attention_fwd import precision


@triton.jit
def _scores(q, k, cols, L, b, KeyMask, uniform, qk_scale,
            HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of a tile in base 2 (times qk_scale = scale·log2(e)) with hidden keys at
    -inf (the forward's rule)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * qk_scale
    live = cols < L
    if HAS_MASK:
        visible = tl.load(KeyMask + b * L + cols, mask=live, other=0) != 0
        s = tl.where(uniform, 0.0, s)
        live = live & (visible | uniform)
    return tl.where(live[None, :], s, float("-inf"))


@triton.jit
def _key_rows_ok(cols, L, b, KeyMask, uniform, HAS_MASK: tl.constexpr):
    """Which rows of a key block to load as (keys, values); the others load as zeros.

    Hidden keys and values must not meet a dot at all: their dS and P are 0, but
    0 * NaN and 0 * Inf are NaN (docs/ops.md §4.2). A uniform row (every key
    hidden) attends every value and uses no key (§4.3).
    """
    live = cols < L
    k_ok = live
    v_ok = live
    if HAS_MASK:
        visible = tl.load(KeyMask + b * L + cols, mask=live, other=0) != 0
        k_ok = live & visible
        v_ok = live & (visible | uniform)
    return k_ok, v_ok


@triton.jit
def _map_grad_to_dp(DMaps, Index, b, h, H, N, T, offs_n, row_ok, cols, c,
                    HEAD_MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """c·Σ_t dM[t, n]·[idx[t] == col] for a [queries, keys] tile (duplicates add)."""
    offs_t = tl.arange(0, BLOCK_T)
    idx = tl.load(Index + b * T + offs_t, mask=offs_t < T, other=-1)
    if HEAD_MEAN:
        dm_ptrs = DMaps + (b * T + offs_t[None, :]) * N + offs_n[:, None]
    else:
        dm_ptrs = DMaps + ((b * H + h) * T + offs_t[None, :]) * N + offs_n[:, None]
    dm = tl.load(dm_ptrs, mask=row_ok[:, None] & (offs_t[None, :] < T), other=0.0).to(ACC)
    onehot = tl.where(idx[:, None] == cols[None, :], 1.0, 0.0).to(ACC)  # [T, keys]; -1 never matches
    return c * tl.dot(dm, onehot, input_precision="ieee")


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, cols, L, b, h, H, N, T, offs_n, row_ok, KeyMask, uniform,
                       DMaps, Index, qk_scale, c,
                       HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr):
    """P (recomputed from lse₂, the base-2 lse) and dS = P * (dP - D) of a [queries, keys] tile."""
    s = _scores(q, k, cols, L, b, KeyMask, uniform, qk_scale, HAS_MASK, ACC, PRECISION)
    p = tl.where(row_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC)
    if HAS_MAPS:
        dp += _map_grad_to_dp(DMaps, Index, b, h, H, N, T, offs_n, row_ok, cols, c, HEAD_MEAN, ACC, BLOCK_T)
    ds = p * (dp - delta[:, None])
    if HAS_MASK:
        ds = tl.where(uniform, 0.0, ds)  # uniform rows have constant scores: no dq, dk
    return p, ds


@triton.jit
def _attention_bwd_rowterm_kernel(
    Q, K, Out, DOut, Lse, Delta, DMaps, Index, KeyMask, AnyVisible,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd,
    H, N, L, D, T, qk_scale, c,
    HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    if WIDE:  # int64 bases (b, h follow) for tensors past 2**31 elements
        bh = bh.to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    tile = row_ok[:, None] & (offs_d[None, :] < D)
    rows = (bh * N + offs_n[:, None]) * D + offs_d[None, :]
    o = tl.load(Out + rows, mask=tile, other=0.0).to(ACC)
    do = tl.load(DOut + rows, mask=tile, other=0.0).to(ACC)
    delta = tl.sum(o * do, axis=1)
    if HAS_MAPS:
        offs_t = tl.arange(0, BLOCK_T)
        idx_safe, idx_ok, wants_maps = row_index(Index + b * T, T, HAS_MAPS, BLOCK_T)
        if wants_maps:
            q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=tile, other=0.0)
            k_sel = tl.load(K + b * skb + h * skh + idx_safe[:, None] * skl + offs_d[None, :] * skd,
                            mask=idx_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            lse2 = tl.load(Lse + bh * N + offs_n, mask=row_ok, other=0.0) * LOG2E_C
            s_sel = tl.dot(q, tl.trans(k_sel), input_precision=PRECISION).to(ACC) * qk_scale
            uniform = row_attends_uniformly(AnyVisible, b, HAS_MASK)
            p_sel = chosen_probabilities(s_sel, lse2, idx_ok, idx_safe, KeyMask + b * L, uniform, HAS_MASK)
            if HEAD_MEAN:
                dm_ptrs = DMaps + (b * T + offs_t[None, :]) * N + offs_n[:, None]
            else:
                dm_ptrs = DMaps + ((b * H + h) * T + offs_t[None, :]) * N + offs_n[:, None]
            dm = tl.load(dm_ptrs, mask=row_ok[:, None] & (offs_t[None, :] < T), other=0.0).to(ACC)
            delta += c * tl.sum(dm * p_sel, axis=1)
    tl.store(Delta + bh * N + offs_n, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DMaps, Index, KeyMask, AnyVisible, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, N, L, D, T, scale, qk_scale, c,
    HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_l = tl.program_id(0)
    bh = tl.program_id(1)
    if WIDE:  # int64 bases (b, h follow) for tensors past 2**31 elements
        bh = bh.to(tl.int64)
    b = bh // H
    h = bh % H
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < L
    d_ok = offs_d < D
    uniform = row_attends_uniformly(AnyVisible, b, HAS_MASK)
    k_ok, v_ok = _key_rows_ok(cols, L, b, KeyMask, uniform, HAS_MASK)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + offs_d[None, :] * skd,
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svl + offs_d[None, :] * svd,
                mask=v_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        tile = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=tile, other=0.0)
        do = tl.load(DOut + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=tile, other=0.0)
        lse2 = tl.load(Lse + bh * N + offs_n, mask=row_ok, other=0.0) * LOG2E_C
        delta = tl.load(Delta + bh * N + offs_n, mask=row_ok, other=0.0)
        p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, cols, L, b, h, H, N, T, offs_n, row_ok, KeyMask,
                                   uniform, DMaps, Index, qk_scale, c, HAS_MAPS, HEAD_MEAN, HAS_MASK, ACC, PRECISION,
                                   BLOCK_T)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION).to(ACC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION).to(ACC)
    out_rows = (bh * L + cols[:, None]) * D + offs_d[None, :]
    tl.store(DK + out_rows, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + out_rows, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DMaps, Index, KeyMask, AnyVisible, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, N, L, D, T, scale, qk_scale, c,
    HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    if WIDE:  # int64 bases (b, h follow) for tensors past 2**31 elements
        bh = bh.to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    d_ok = offs_d < D
    tile = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=tile, other=0.0)
    do = tl.load(DOut + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=tile, other=0.0)
    lse2 = tl.load(Lse + bh * N + offs_n, mask=row_ok, other=0.0) * LOG2E_C
    delta = tl.load(Delta + bh * N + offs_n, mask=row_ok, other=0.0)
    uniform = row_attends_uniformly(AnyVisible, b, HAS_MASK)
    dq = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for j0 in range(0, L, BLOCK_L):
        cols = j0 + tl.arange(0, BLOCK_L)
        k_ok, v_ok = _key_rows_ok(cols, L, b, KeyMask, uniform, HAS_MASK)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + offs_d[None, :] * skd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svl + offs_d[None, :] * svd,
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, cols, L, b, h, H, N, T, offs_n, row_ok, KeyMask,
                                   uniform, DMaps, Index, qk_scale, c, HAS_MAPS, HEAD_MEAN, HAS_MASK, ACC, PRECISION,
                                   BLOCK_T)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION).to(ACC)
    tl.store(DQ + (bh * N + offs_n[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=tile)


# Chosen like the forward's (sm_90, tools/triton_config_sweep.py). 16-bit: only
# dk/dv at D=160 spills (48-300 B). fp32 spills much more (KBs at D=160).
DKDV_CONFIGS = {
    2: {
        64: [(64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        128: [(32, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        256: [(64, 32, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    },
    4: {
        64: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 64, 4, 2)],
        128: [(16, 32, 4, 2), (32, 64, 8, 2)],
        256: [(64, 16, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
    },
}
DQ_CONFIGS = {
    2: {
        64: [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2)],
        128: [(64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        256: [(32, 64, 8, 2), (32, 32, 4, 2)],
    },
    4: {
        64: [(32, 32, 4, 2), (16, 32, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2)],
        128: [(16, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2)],
        256: [(16, 32, 4, 2), (16, 16, 4, 2), (16, 64, 4, 2)],
    },
}
_dkdv_kernel = autotuned_by_head_dim(_attention_bwd_dkdv_kernel, DKDV_CONFIGS)
_dq_kernel = autotuned_by_head_dim(_attention_bwd_dq_kernel, DQ_CONFIGS)
# The row term is cheap and never spills (<= 126 registers): one configuration.
_ROWTERM_META = dict(BLOCK_N=64, num_warps=4) if INTERPRET else dict(BLOCK_N=64, num_warps=4, num_stages=2)
_TILE_META = INTERPRET_META if INTERPRET else {}


def attention_backward(q, k, v, out, lse, grad_out, scale: float, token_index=None, grad_maps=None,
                       head_mean: bool = True, key_mask=None):
    """dq, dk, dv of the forward kernel's op (maps term when token_index and grad_maps are given)."""
    B, H, N, D = q.shape
    L = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    has_maps = token_index is not None and grad_maps is not None
    T = token_index.shape[1] if has_maps else 1
    index = token_index.to(torch.int64).contiguous() if has_maps else lse
    dmaps = grad_maps.contiguous() if has_maps else lse
    c = 1.0 / H if head_mean else 1.0
    if key_mask is not None:
        mask = key_mask.contiguous().to(torch.int8)
        any_visible = key_mask.any(dim=1).to(torch.int8)
    else:
        mask = any_visible = lse
    delta = torch.empty((B, H, N), dtype=acc, device=q.device)
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(
        (B, H, L, D), dtype=k.dtype, device=k.device), torch.empty((B, H, L, D), dtype=v.dtype, device=v.device)
    flags = dict(HAS_MAPS=has_maps, HEAD_MEAN=head_mean, ACC=tl_dtype(acc), PRECISION=precision(q.dtype),
                 WIDE=needs_int64_offsets(q, k, v, grad_out, dmaps), BLOCK_D=next_pow2(D), BLOCK_T=next_pow2(T))
    bn = _ROWTERM_META["BLOCK_N"]
    launcher(_attention_bwd_rowterm_kernel)[(triton.cdiv(N, bn), B * H)](
        q, k, out, grad_out, lse, delta, dmaps, index, mask, any_visible,
        *q.stride(), *k.stride(), H, N, L, D, T, scale * LOG2E, c, HAS_MASK=key_mask is not None, **flags,
        **_ROWTERM_META,
    )
    strides = (*q.stride(), *k.stride(), *v.stride())
    launcher(_dkdv_kernel(flags["BLOCK_D"], q.dtype))[lambda meta: (triton.cdiv(L, meta["BLOCK_L"]), B * H)](
        q, k, v, grad_out, lse, delta, dmaps, index, mask, any_visible, dk, dv,
        *strides, H, N, L, D, T, scale, scale * LOG2E, c, HAS_MASK=key_mask is not None, **flags, **_TILE_META,
    )
    launcher(_dq_kernel(flags["BLOCK_D"], q.dtype))[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, grad_out, lse, delta, dmaps, index, mask, any_visible, dq,
        *strides, H, N, L, D, T, scale, scale * LOG2E, c, HAS_MASK=key_mask is not None, **flags, **_TILE_META,
    )
    return dq, dk, dv
