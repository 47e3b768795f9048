"""Launch settings shared by the Triton kernels.

Under ``TRITON_INTERPRET=1`` (CPU CI) the kernels run in numpy, one program at
a time: a single, large-block configuration keeps that fast. On a GPU the
kernels are autotuned over a few configurations.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The kernels' softmax runs in base 2 (exp2/log2, the ex2/lg2 instructions tl.exp
# and tl.log lower to anyway): scores are scaled by scale·log2(e) once, and the lse
# the ops return (natural log, docs/ops.md §1.2) is converted at the store/load.
LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def row_index(idx_ptr, T, HAS_MAPS: tl.constexpr, BLOCK_T: tl.constexpr):
    """A batch row's chosen columns: (index with 0 for -1 slots, which slots are live,
    whether the row wants any map); all slots -1 without maps (``idx_ptr`` unread)."""
    offs_t = tl.arange(0, BLOCK_T)
    if HAS_MAPS:
        idx = tl.load(idx_ptr + offs_t, mask=offs_t < T, other=-1)
    else:
        idx = tl.full([BLOCK_T], -1, tl.int64)
    idx_ok = idx >= 0
    return tl.where(idx_ok, idx, 0), idx_ok, tl.max(idx, axis=0) >= 0


@triton.jit
def row_attends_uniformly(any_visible_ptr, b, HAS_MASK: tl.constexpr):
    """Whether batch row ``b`` hides every key (it then attends uniformly, docs/ops.md §4.3); False without a mask."""
    uniform = False
    if HAS_MASK:
        uniform = tl.load(any_visible_ptr + b) == 0
    return uniform


@triton.jit
def chosen_probabilities(s_sel, lse2, idx_ok, idx_safe, mask_row, uniform, HAS_MASK: tl.constexpr):
    """The chosen columns' probabilities [BLOCK_N, BLOCK_T] from their base-2 scores ``s_sel`` and the rows'
    base-2 lse ``lse2`` [BLOCK_N]: 0 in -1 slots (``idx_ok`` false) and, with a key mask (row ``mask_row``),
    in hidden columns; a row hiding every key (``uniform``) attends uniformly, so its columns score 0.
    The forward's maps and the backward's row term read the same rule from here (docs/ops.md §4.3)."""
    chosen = idx_ok
    if HAS_MASK:
        chosen = idx_ok & ((tl.load(mask_row + idx_safe, mask=idx_ok, other=0) != 0) | uniform)
        s_sel = tl.where(uniform, 0.0, s_sel)
    return tl.where(chosen[None, :], tl.exp2(s_sel - lse2[:, None]), 0.0)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Power-of-two block size >= n (tl.arange needs powers of two; tl.dot needs >= 16)."""
    return max(minimum, triton.next_power_of_2(int(n)))


def needs_int64_offsets(*tensors: torch.Tensor) -> bool:
    """True when an element offset into one of ``tensors`` can reach 2**31.

    The attention kernels compute offsets in int32 (64-bit offsets cost registers:
    compiled for sm_90, the fp16 forward at head dim 64 spills in 6 of 10
    configurations instead of 1) and are compiled with ``WIDE=True`` (int64 batch
    and head indices, so every offset built from them is int64) only for tensors
    this large: long video or joint sequences. What stays int32 in both is the
    offset within one head's rows (n·stride_n + d·stride_d), which would need
    2**31 elements in a single head."""
    return any(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 - 1
               for t in tensors if t.numel())


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


Configs = dict[int, dict[int, list[tuple[int, int, int, int]]]]
# What the attention kernels' best configuration depends on (autotune cache key).
ATTENTION_TUNE_KEY = ["H", "N", "L", "D", "T", "HAS_MAPS", "HEAD_MEAN", "HAS_MASK"]


def autotuned_by_head_dim(kernel, configs: Configs, key: list[str] = ATTENTION_TUNE_KEY):
    """One autotuner per (element size, padded head dim).

    ``configs[itemsize][BLOCK_D]`` lists ``(BLOCK_N, BLOCK_L, num_warps, num_stages)``
    for 16-bit (2) and 32-bit (4) inputs. Returns ``pick(block_d, dtype)`` giving the
    kernel to launch: autotuned over that list on a GPU, the plain kernel under the
    interpreter (launched with INTERPRET_META). A list per case, not one list pruned
    at launch, keeps the launch the plain ``kernel[grid](...)`` that torch.compile
    traces. The lists come from compiling for sm_90 without a GPU
    (tools/triton_config_sweep.py): the configurations that spill least, and
    every list holds one that fits in 99 KB of shared memory (sm_86/sm_89 cards).
    """
    if INTERPRET:
        return lambda block_d, dtype: kernel
    tuned = {
        (size, d): triton.autotune(
            configs=[triton.Config({"BLOCK_N": n, "BLOCK_L": l}, num_warps=w, num_stages=s) for n, l, w, s in rows],
            key=key,
        )(kernel)
        for size, by_dim in configs.items()
        for d, rows in by_dim.items()
    }

    dims = {size: sorted(by_dim) for size, by_dim in configs.items()}

    def pick(block_d: int, dtype: torch.dtype):
        size = 2 if dtype.itemsize <= 2 else 4
        return tuned[size, next((d for d in dims[size] if d >= block_d), dims[size][-1])]

    return pick


# One configuration under the interpreter: it runs programs one by one in numpy.
INTERPRET_META = dict(BLOCK_N=64, BLOCK_L=64, num_warps=4)


def launcher(kernel):
    """``kernel`` wrapped so torch.compile sees the launch inside a ``triton_op``
    (GPU); under the interpreter the ops are plain custom ops and launch directly."""
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)
