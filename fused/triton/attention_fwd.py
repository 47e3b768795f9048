"""Forward attention kernel with fused token-map extraction and an optional key mask.

One kernel serves ``cross_attention_with_maps`` (HAS_MAPS) and
``masked_attention`` (HAS_MASK). A program owns a block of queries of one
batch row and loops over the heads, so the head-mean of the maps accumulates
in registers: no atomics, no [B, H, T, N] buffer, and bit-for-bit the same
maps on every run (which keeps the Otsu masks computed from them reproducible).

Keys are visited in blocks with an online softmax, so any L works (77 text
tokens are one block; MMDiT joint attention has thousands). The chosen
columns' probabilities come from the final log-sum-exp in the epilogue,
p = exp(s_j − lse), with s_j picked out of the score tiles as they pass (fp32
and fp64: the very values lse is built from) or, for 16-bit inputs, recomputed
from k_j gathered by index; a batch row whose indices are all −1 skips that
work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from ._common import (INTERPRET, INTERPRET_META, autotuned_by_head_dim, launcher, needs_int64_offsets, next_pow2,
                      tl_dtype)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Maps, Index, KeyMask, AnyVisible,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, N, L, D, T, scale,
    HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr, KEEP_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    if WIDE:  # int64 batch/head bases for tensors past 2**31 elements (needs_int64_offsets)
        b = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    row_ok = offs_n < N
    d_ok = offs_d < D  # head dims like 40/80/160 are padded here, not by the caller
    neg_inf = float("-inf")

    if HAS_MAPS:
        offs_t = tl.arange(0, BLOCK_T)
        idx = tl.load(Index + b * T + offs_t, mask=offs_t < T, other=-1)
        idx_ok = idx >= 0
        idx_safe = tl.where(idx_ok, idx, 0)
        wants_maps = tl.max(idx, axis=0) >= 0
        maps_acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
    if HAS_MASK:
        uniform = tl.load(AnyVisible + b) == 0  # every key hidden: attend uniformly

    for h in range(H):
        hh = h
        if WIDE:
            hh = tl.cast(h, tl.int64)
        q = tl.load(
            Q + b * sqb + hh * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        m_i = tl.full([BLOCK_N], neg_inf, dtype=ACC)
        l_i = tl.zeros([BLOCK_N], dtype=ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        if KEEP_SCORES:
            s_sel = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)  # the chosen columns' scores, from the tiles below
        for j0 in range(0, L, BLOCK_L):
            cols = j0 + offs_l
            live = cols < L
            k = tl.load(
                K + b * skb + hh * skh + cols[:, None] * skl + offs_d[None, :] * skd,
                mask=live[:, None] & d_ok[None, :], other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * scale
            if KEEP_SCORES:
                if wants_maps:
                    # Keep the chosen columns' scores from this tile, the very values the
                    # log-sum-exp is built from: recomputing them by a second dot rounds
                    # differently, and exp(s - lse) then misses by a score's rounding
                    # error (3e-4 in fp32 maps with scores near 5000). 16-bit inputs
                    # recompute (below): their maps are stored with a coarser step
                    # (2**-11 near 1), and keeping costs registers (fp16, head dim 64:
                    # 8 of 10 configurations spill instead of 1, sm_90).
                    for t in range(T):
                        j_t = tl.load(Index + b * T + t)
                        hit = tl.sum(tl.where(cols[None, :] == j_t, s, 0.0), axis=1)  # 0 if j_t is elsewhere
                        s_sel += tl.where(offs_t[None, :] == t, hit[:, None], 0.0)
            if HAS_MASK:
                visible = tl.load(KeyMask + b * L + cols, mask=live, other=0) != 0
                s = tl.where(uniform, 0.0, s)
                live = live & (visible | uniform)
            s = tl.where(live[None, :], s, neg_inf)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Rows whose keys so far are all hidden keep m = -inf: shift by 0 so
            # exp gives 0 instead of NaN.
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                V + b * svb + hh * svh + cols[:, None] * svl + offs_d[None, :] * svd,
                mask=live[:, None] & d_ok[None, :], other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(ACC)
            m_i = m_new
        l_safe = tl.where(l_i == 0, 1.0, l_i)  # only padded rows past N
        out = acc / l_safe[:, None]
        lse = m_i + tl.log(l_safe)
        o_ptrs = Out + ((b * H + h) * N + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + (b * H + h) * N + offs_n, lse, mask=row_ok)
        if HAS_MAPS:
            if wants_maps:
                if not KEEP_SCORES:
                    k_sel = tl.load(
                        K + b * skb + hh * skh + idx_safe[:, None] * skl + offs_d[None, :] * skd,
                        mask=idx_ok[:, None] & d_ok[None, :], other=0.0,
                    )
                    s_sel = tl.dot(q, tl.trans(k_sel), input_precision=PRECISION).to(ACC) * scale
                chosen = idx_ok
                if HAS_MASK:  # a hidden column's probability is 0; a row hiding every key scores 0 everywhere
                    chosen = idx_ok & ((tl.load(KeyMask + b * L + idx_safe, mask=idx_ok, other=0) != 0) | uniform)
                    s_sel = tl.where(uniform, 0.0, s_sel)
                p_sel = tl.where(chosen[None, :], tl.exp(s_sel - lse[:, None]), 0.0)
                if HEAD_MEAN:
                    maps_acc += p_sel
                else:
                    m_ptrs = Maps + ((b * H + h) * T + offs_t[None, :]) * N + offs_n[:, None]
                    tl.store(m_ptrs, p_sel.to(Maps.dtype.element_ty), mask=row_ok[:, None] & (offs_t[None, :] < T))
    if HAS_MAPS:
        if HEAD_MEAN:
            m_ptrs = Maps + (b * T + offs_t[None, :]) * N + offs_n[:, None]
            tl.store(m_ptrs, (maps_acc / H).to(Maps.dtype.element_ty), mask=row_ok[:, None] & (offs_t[None, :] < T))


# Chosen from compile-only register/spill/shared-memory data (sm_90,
# tools/triton_config_sweep.py). 16-bit: none of these spills. fp32 (tf32x3
# dots on fp32 tiles) spills at every size; at D=160 by 2-3 KB per thread, which
# only splitting the head dim inside the kernel would cure.
FORWARD_CONFIGS = {
    2: {
        64: [(32, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 3)],
        128: [(32, 64, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 2)],
        256: [(32, 64, 8, 2), (32, 32, 4, 2)],
    },
    4: {
        64: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2), (128, 32, 8, 2)],
        128: [(16, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2)],
        256: [(16, 32, 4, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
    },
}
_forward_kernel = autotuned_by_head_dim(_attention_fwd_kernel, FORWARD_CONFIGS)
_FWD_META = INTERPRET_META if INTERPRET else {}


def precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every tl.dot. fp32 must not drop to plain TF32 (the ops
    promise ~1e-5 against fp64). On a GPU it uses "tf32x3" (three TF32 tensor-core
    products per dot, ~fp32 accuracy): compiled for sm_90, "ieee" fp32 dots become
    scalar FMA code that spills 2-24 KB per thread and needs up to 214 KB of shared
    memory at D=160 (tools/triton_compile_check.py --dtype fp32). The
    interpreter computes in numpy fp32/fp64 either way."""
    if dtype == torch.float64 or (dtype == torch.float32 and INTERPRET):
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def attention_forward(q, k, v, token_index=None, key_mask=None, scale: float = 1.0, head_mean: bool = True):
    """Launch the forward kernel. Returns out [B,H,N,D], maps (or None), lse [B,H,N] (fp32/fp64)."""
    B, H, N, D = q.shape
    L = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=acc, device=q.device)
    has_maps = token_index is not None
    T = token_index.shape[1] if has_maps else 1
    if has_maps:
        # "none" rows whose indices are all -1 are skipped by the kernel: zero them here.
        maps = torch.empty((B, T, N), dtype=q.dtype, device=q.device) if head_mean else \
            torch.zeros((B, H, T, N), dtype=q.dtype, device=q.device)
        index = token_index.to(torch.int64).contiguous()
    else:
        maps, index = out, lse  # unused placeholders
    if key_mask is not None:
        mask = key_mask.contiguous().to(torch.int8)
        any_visible = key_mask.any(dim=1).to(torch.int8)
    else:
        mask = any_visible = lse  # unused placeholders

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), B)

    block_d = next_pow2(D)
    launcher(_forward_kernel(block_d, q.dtype))[grid](
        q, k, v, out, lse, maps, index, mask, any_visible,
        *q.stride(), *k.stride(), *v.stride(),
        H, N, L, D, T, scale,
        HAS_MAPS=has_maps, HEAD_MEAN=head_mean, HAS_MASK=key_mask is not None,
        ACC=tl_dtype(acc), PRECISION=precision(q.dtype),
        WIDE=needs_int64_offsets(q, k, v, out, maps), KEEP_SCORES=has_maps and q.dtype in (torch.float32, torch.float64),
        BLOCK_D=block_d, BLOCK_T=next_pow2(T),
        **_FWD_META,
    )
    return out, (maps if has_maps else None), lse
