"""Forward attention kernel with fused token-map extraction and an optional key mask.

One kernel body (``_attend_one_head``) serves the attention op with maps
(HAS_MAPS), a key mask (HAS_MASK) or both, launched on one of two grids:

- **per head** (``_attention_fwd_heads_kernel``): a program per (query block,
  batch row, head), B·H·cdiv(N, BLOCK_N) programs, what SDPA launches. Per-head
  maps are stored once; for the head mean into a [B, H, T, N] buffer in the
  accumulation dtype, which ``_head_mean_kernel`` sums over heads in order
  (no atomics).
- **head loop** (``_attention_fwd_kernel``): a program per (query block, batch
  row) loops over the heads and sums the head mean in registers: no buffer, no
  second launch, but H times fewer programs.

Both add the heads' fp32 probabilities in the same order and divide by H once,
so both give the same bits, on every run (which keeps the Otsu masks computed
from the maps reproducible). ``use_head_loop`` picks the grid.

Keys are visited in blocks with an online softmax in base 2 (scores scaled by
scale·log2(e), as in Triton's fused-attention tutorial), so any L works (77
text tokens are one block; MMDiT joint attention has thousands). The chosen
columns' probabilities come from the final log-sum-exp in the epilogue,
p = exp2(s_j − lse₂), with s_j picked out of the score tiles as they pass (fp32
and fp64: the very values lse is built from) or, for 16-bit inputs, recomputed
from k_j gathered by index; a batch row whose indices are all −1 skips that
work. The lse stored for the backward is in natural log.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from ._common import (INTERPRET, INTERPRET_META, LN2, LOG2E, autotuned_by_head_dim, chosen_probabilities, launcher,
                      needs_int64_offsets, next_pow2, row_attends_uniformly, row_index, tl_dtype)


@triton.jit
def _store_maps(maps_ptr, p, offs_n, N, T, BLOCK_T: tl.constexpr):
    """Store a [BLOCK_N, BLOCK_T] tile into maps laid out [T, N] from ``maps_ptr``."""
    offs_t = tl.arange(0, BLOCK_T)
    tl.store(maps_ptr + offs_t[None, :] * N + offs_n[:, None], p.to(maps_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_t[None, :] < T))


@triton.jit
def _attend_one_head(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, mask_ptr,
    sqn, sqd, skl, skd, svl, svd, offs_n, N, L, D, T, qk_scale,
    idx_safe, idx_ok, wants_maps, uniform,
    HAS_MAPS: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    KEEP_SCORES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Attention of one head for one block of queries (pointers at that head's rows).

    Stores out [BLOCK_N, D] and the natural-log lse; returns the chosen columns'
    probabilities [BLOCK_N, BLOCK_T] in ACC: zero in -1 slots, and everywhere
    when HAS_MAPS is off or the row wants no maps."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    offs_t = tl.arange(0, BLOCK_T)
    row_ok = offs_n < N
    d_ok = offs_d < D  # head dims like 40/80/160 are padded here, not by the caller
    neg_inf = float("-inf")
    q = tl.load(q_ptr + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_N], neg_inf, dtype=ACC)  # running max and sum, base 2
    l_i = tl.zeros([BLOCK_N], dtype=ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    if KEEP_SCORES:
        s_sel = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)  # the chosen columns' scores, from the tiles below
    for j0 in range(0, L, BLOCK_L):
        cols = j0 + offs_l
        live = cols < L
        k = tl.load(k_ptr + cols[:, None] * skl + offs_d[None, :] * skd, mask=live[:, None] & d_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * qk_scale
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
                    j_t = tl.load(idx_ptr + t)
                    hit = tl.sum(tl.where(cols[None, :] == j_t, s, 0.0), axis=1)  # 0 if j_t is elsewhere
                    s_sel += tl.where(offs_t[None, :] == t, hit[:, None], 0.0)
        if HAS_MASK:
            visible = tl.load(mask_ptr + cols, mask=live, other=0) != 0
            s = tl.where(uniform, 0.0, s)
            live = live & (visible | uniform)
        s = tl.where(live[None, :], s, neg_inf)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows whose keys so far are all hidden keep m = -inf: shift by 0 so
        # exp2 gives 0 instead of NaN.
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + cols[:, None] * svl + offs_d[None, :] * svd, mask=live[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(ACC)
        m_i = m_new
    l_safe = tl.where(l_i == 0, 1.0, l_i)  # only padded rows past N
    lse2 = m_i + tl.log2(l_safe)
    tl.store(o_ptr + offs_n[:, None] * D + offs_d[None, :], (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + offs_n, lse2 * LN2, mask=row_ok)
    p_sel = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
    if HAS_MAPS:
        if wants_maps:
            if not KEEP_SCORES:
                k_sel = tl.load(k_ptr + idx_safe[:, None] * skl + offs_d[None, :] * skd,
                                mask=idx_ok[:, None] & d_ok[None, :], other=0.0)
                s_sel = tl.dot(q, tl.trans(k_sel), input_precision=PRECISION).to(ACC) * qk_scale
            p_sel = chosen_probabilities(s_sel, lse2, idx_ok, idx_safe, mask_ptr, uniform, HAS_MASK)
    return p_sel


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Maps, Index, KeyMask, AnyVisible,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, N, L, D, T, qk_scale,
    HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr, KEEP_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Head loop: grid (cdiv(N, BLOCK_N), B); the head mean of the maps sums in registers."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    if WIDE:  # int64 batch/head bases for tensors past 2**31 elements (needs_int64_offsets)
        b = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    idx_safe, idx_ok, wants_maps = row_index(Index + b * T, T, HAS_MAPS, BLOCK_T)
    uniform = row_attends_uniformly(AnyVisible, b, HAS_MASK)
    maps_acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
    for h in range(H):
        hh = h
        if WIDE:
            hh = tl.cast(h, tl.int64)
        bh = b * H + hh
        p_sel = _attend_one_head(
            Q + b * sqb + hh * sqh, K + b * skb + hh * skh, V + b * svb + hh * svh, Out + bh * N * D, Lse + bh * N,
            Index + b * T, KeyMask + b * L, sqn, sqd, skl, skd, svl, svd, offs_n, N, L, D, T, qk_scale,
            idx_safe, idx_ok, wants_maps, uniform,
            HAS_MAPS, HAS_MASK, ACC, PRECISION, KEEP_SCORES, BLOCK_N, BLOCK_L, BLOCK_D, BLOCK_T,
        )
        if HAS_MAPS:
            if HEAD_MEAN:
                maps_acc += p_sel
            elif wants_maps:
                _store_maps(Maps + bh * T * N, p_sel, offs_n, N, T, BLOCK_T)
    if HAS_MAPS:
        if HEAD_MEAN:
            _store_maps(Maps + b * T * N, maps_acc / H, offs_n, N, T, BLOCK_T)


@triton.jit
def _attention_fwd_heads_kernel(
    Q, K, V, Out, Lse, Maps, Index, KeyMask, AnyVisible,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, N, L, D, T, qk_scale,
    HAS_MAPS: tl.constexpr, HEAD_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr, KEEP_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per head: grid (cdiv(N, BLOCK_N), B·H). Maps [B, H, T, N]: the op's per-head maps,
    or (HEAD_MEAN) the accumulation-dtype buffer _head_mean_kernel reduces, written
    for every row since that pass reads every row."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    if WIDE:  # int64 bases (b, h follow) for tensors past 2**31 elements
        bh = bh.to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    idx_safe, idx_ok, wants_maps = row_index(Index + b * T, T, HAS_MAPS, BLOCK_T)
    uniform = row_attends_uniformly(AnyVisible, b, HAS_MASK)
    p_sel = _attend_one_head(
        Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, Out + bh * N * D, Lse + bh * N,
        Index + b * T, KeyMask + b * L, sqn, sqd, skl, skd, svl, svd, offs_n, N, L, D, T, qk_scale,
        idx_safe, idx_ok, wants_maps, uniform,
        HAS_MAPS, HAS_MASK, ACC, PRECISION, KEEP_SCORES, BLOCK_N, BLOCK_L, BLOCK_D, BLOCK_T,
    )
    if HAS_MAPS:
        if HEAD_MEAN:
            _store_maps(Maps + bh * T * N, p_sel, offs_n, N, T, BLOCK_T)
        elif wants_maps:
            _store_maps(Maps + bh * T * N, p_sel, offs_n, N, T, BLOCK_T)


@triton.jit
def _head_mean_kernel(PerHead, Maps, H, TN, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Maps[b] = Σ_h PerHead[b, h] / H over flat [T·N] rows, heads added in order
    (the head loop's order, so both grids give the same bits); grid (cdiv(T·N, BLOCK), B)."""
    b = tl.program_id(1)
    if WIDE:
        b = b.to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TN
    total = tl.zeros([BLOCK], dtype=PerHead.dtype.element_ty)
    for h in range(H):
        total += tl.load(PerHead + (b * H + h) * TN + offs, mask=ok, other=0.0)
    tl.store(Maps + b * TN + offs, (total / H).to(Maps.dtype.element_ty), mask=ok)


# The head loop's, chosen from compile-only register/spill/shared-memory data
# (sm_90, tools/triton_config_sweep.py --grid loop). 16-bit: none of these
# spills. fp32 (tf32x3 dots on fp32 tiles) spills at every size; at D=160 by 2-3
# KB per thread, which only splitting the head dim inside the kernel would cure.
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
# The per-head kernel's, from the same sweep (--grid heads). 16-bit: none spills
# on sm_90 (on sm_80 some by 8-16 B); each list has a BLOCK_N=32 entry, for small
# N where programs are few. fp32 on sm_90: none spills at D=40, at D=80 only
# (32, 64, 8 warps) by 8-16 B; at D=160 the least (24-48 B) are kept, as above.
# (64, 64, 4 warps) fp32 at D=40 is left out: 0 B on sm_90 but 4.8-7.5 KB on sm_80.
FORWARD_HEADS_CONFIGS = {
    2: {
        64: [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 32, 8, 2)],
        128: [(32, 64, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 2)],
        256: [(32, 64, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
    },
    4: {
        64: [(32, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
        128: [(32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
        256: [(16, 32, 4, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    },
}
_forward_kernel = autotuned_by_head_dim(_attention_fwd_kernel, FORWARD_CONFIGS)
_forward_heads_kernel = autotuned_by_head_dim(_attention_fwd_heads_kernel, FORWARD_HEADS_CONFIGS)
_FWD_META = INTERPRET_META if INTERPRET else {}
_MEAN_META = dict(BLOCK=1024) if INTERPRET else dict(BLOCK=1024, num_warps=4)

GRID_ENV = "FUSED_TRITON_FORWARD_GRID"
# The grid rule counts programs at this BLOCK_N (the autotuner picks the real one
# after the grid is chosen; 64 is the middle of the lists above).
RULE_BLOCK_N = 64
# SMs assumed off a GPU (the interpreter), so the rule picks as on an H100 SXM.
DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def use_head_loop(B: int, H: int, N: int, head_mean_maps: bool, device: torch.device) -> bool:
    """Which forward grid to launch: the head loop (True) or a program per head.

    The head loop only saves work for head-mean maps (no [B, H, T, N] buffer and no
    second pass), and pays with H times fewer programs: B·cdiv(N, 64) instead of
    B·H·cdiv(N, 64). It is taken when its own grid already gives every SM a program,
    B·H·cdiv(N, 64) ≥ H·SMs, i.e. B·cdiv(N, 64) ≥ SMs (SMs from the device, 132 off a
    GPU); every other launch takes the per-head grid. SD 1.5 at batch 2 on an
    H100 (132 SMs) takes the per-head grid at every resolution (N = 4096: 128
    head-loop programs). ``$FUSED_TRITON_FORWARD_GRID`` = ``heads`` or ``loop``
    forces one (tests, comparisons); ``auto`` or unset applies the rule."""
    choice = os.environ.get(GRID_ENV, "auto")
    if choice not in ("auto", "heads", "loop"):
        raise ValueError(f"{GRID_ENV} must be auto, heads or loop, got {choice!r}")
    if choice != "auto":
        return choice == "loop"
    return head_mean_maps and B * triton.cdiv(N, RULE_BLOCK_N) >= _sm_count(device)


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
    head_loop = use_head_loop(B, H, N, has_maps and head_mean, q.device)
    T = token_index.shape[1] if has_maps else 1
    if has_maps:
        if not head_mean:  # rows whose indices are all -1 are skipped by the kernels: zero them here
            maps = kernel_maps = torch.zeros((B, H, T, N), dtype=q.dtype, device=q.device)
        else:
            maps = kernel_maps = torch.empty((B, T, N), dtype=q.dtype, device=q.device)
            if not head_loop:
                kernel_maps = torch.empty((B, H, T, N), dtype=acc, device=q.device)
        index = token_index.to(torch.int64).contiguous()
    else:
        maps = kernel_maps = index = lse  # unused placeholders
    if key_mask is not None:
        mask = key_mask.contiguous().to(torch.int8)
        any_visible = key_mask.any(dim=1).to(torch.int8)
    else:
        mask = any_visible = lse  # unused placeholders

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), B if head_loop else B * H)

    block_d = next_pow2(D)
    pick = _forward_kernel if head_loop else _forward_heads_kernel
    wide = needs_int64_offsets(q, k, v, out, kernel_maps)
    launcher(pick(block_d, q.dtype))[grid](
        q, k, v, out, lse, kernel_maps, index, mask, any_visible,
        *q.stride(), *k.stride(), *v.stride(),
        H, N, L, D, T, scale * LOG2E,
        HAS_MAPS=has_maps, HEAD_MEAN=head_mean, HAS_MASK=key_mask is not None,
        ACC=tl_dtype(acc), PRECISION=precision(q.dtype),
        WIDE=wide, KEEP_SCORES=has_maps and q.dtype in (torch.float32, torch.float64),
        BLOCK_D=block_d, BLOCK_T=next_pow2(T),
        **_FWD_META,
    )
    if kernel_maps is not maps:
        launcher(_head_mean_kernel)[(triton.cdiv(T * N, _MEAN_META["BLOCK"]), B)](
            kernel_maps, maps, H, T * N, WIDE=wide, **_MEAN_META)
    return out, (maps if has_maps else None), lse
