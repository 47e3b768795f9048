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

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def next_pow2(n: int, minimum: int = 16) -> int:
    """Power-of-two block size >= n (tl.arange needs powers of two; tl.dot needs >= 16)."""
    return max(minimum, triton.next_power_of_2(int(n)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


def launcher(kernel):
    """``kernel`` wrapped so torch.compile sees the launch inside a ``triton_op``
    (GPU); under the interpreter the ops are plain custom ops and launch directly."""
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)
