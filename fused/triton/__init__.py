"""The Triton backend: kernels in attention_fwd.py, attention_bwd.py and otsu.py,
registered as ``torch.ops.fused_triton.*`` by ``fused.triton.ops``.

Importing this package declares the backend without importing triton; the
dispatcher imports ``fused.triton.ops`` (and with it triton) on first use.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .._registry import FLOATS, BackendUnavailable, Refusal, register_backend

# Largest `bins` the Triton Otsu kernel takes, both modes: its candidates are one
# power-of-two block, and a [candidates, chunk] tile must stay within Triton's
# 2**20-element tensor limit at the chunk the launch picks (up to 1024 under the
# interpreter; 16 or more on a GPU). 1025 bins already fail inside the kernel launch.
MAX_BINS = 1024

INTERPRETER_BF16 = "the Triton interpreter (TRITON_INTERPRET=1) cannot compute bfloat16 attention"


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@register_backend(
    "triton", devices={"cuda"}, dtypes={"attention": FLOATS, "otsu_mask": FLOATS},
    max_bins={"vico": MAX_BINS, "skimage": MAX_BINS}, self_checked=True,
    also_runs_on=lambda device_type: device_type == "cpu" and interpreted(),
    refusals=(
        # Triton cannot compile the float64 attention kernels for a GPU: fp64 tl.dot with a
        # head dim of 160 trips "fp64 don't support largeK MMA", and the tiles need up to
        # 650 KB of shared memory (tools/triton_compile_check.py --dtype fp64).
        Refusal("attention", torch.float64, "cuda", ""),
        # The interpreter runs the kernels in numpy, which has no bfloat16: the attention
        # kernels' output was off by ~8e8 and their maps by ~0.5, without a word. Otsu loads
        # bf16 maps as fp32 and stays exact. Any device: the interpreter also runs CUDA
        # tensors' kernels on the host.
        Refusal("attention", torch.bfloat16, "*", INTERPRETER_BF16, interpreted),
    ),
    note="Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)",
)
def triton_backend():
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("triton is not installed")
    if not (torch.cuda.is_available() or interpreted()):
        raise BackendUnavailable("Triton needs a CUDA device or TRITON_INTERPRET=1")
    from . import ops

    return ops.backend
