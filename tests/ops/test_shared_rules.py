"""One source for each rule the backends share (docs/ops.md §1.2, §6).

The dtype rules live once in ``fused.reference`` (``accumulation_dtype`` for the
attention ops' ``lse``, ``otsu_compute_dtype`` for the Otsu threshold) and the
fake implementations call them; C++ cannot import them, so the compiled ops'
real outputs are checked here against the fakes (``torch.library.opcheck``,
fake-tensor test) and against the rule directly. The CUDA Otsu kernel's bin
limits are compiled in from ``fused._cpp.CUDA_MAX_BINS``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fused  # noqa: F401  (loads the op namespaces the fixtures build)
from fused import _cpp, _dispatch
from fused.reference import accumulation_dtype, otsu_compute_dtype

from ..conftest import rand

def _ops(kernel_backend: str):
    _dispatch.implementation(kernel_backend)  # builds / registers torch.ops.fused_<backend>
    return getattr(torch.ops, f"fused_{kernel_backend}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lse_and_outputs_follow_the_accumulation_rule_and_the_fakes(kernel_backend, dtype):
    ops = _ops(kernel_backend)
    q, k, v = rand(2, 2, 16, 16, dtype=dtype), rand(2, 2, 8, 16, dtype=dtype, seed=1), rand(2, 2, 8, 16, dtype=dtype,
                                                                                             seed=2)
    index = torch.tensor([[1, 3], [2, -1]])
    key_mask = torch.tensor([[True] * 5 + [False] * 3, [False] * 8])
    for idx, mask in ((index, None), (None, key_mask), (index, key_mask)):
        for head_mean in (True, False):
            out, maps, lse = ops.attention(q, k, v, idx, mask, 0.25, head_mean)
            assert (out.dtype, maps.dtype, lse.dtype) == (dtype, dtype, accumulation_dtype(dtype))
            torch.library.opcheck(ops.attention, (q, k, v, idx, mask, 0.25, head_mean),
                                  test_utils=("test_faketensor",))
        grad = rand(*out.shape, dtype=dtype, seed=3)
        grad_maps = None if idx is None else rand(*maps.shape, dtype=dtype, seed=4)
        torch.library.opcheck(ops.attention_backward,
                              (q, k, v, idx, mask, out, lse, grad, grad_maps, 0.25, False),
                              test_utils=("test_faketensor",))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_otsu_threshold_follows_the_compute_rule_and_the_fake(otsu_kernel_backend, dtype):
    kernel_backend = otsu_kernel_backend
    maps = rand(3, 64, dtype=torch.float64).abs().to(dtype)
    if kernel_backend == "cpp" and dtype == torch.float16:
        maps_in = maps.float()  # the C++ op takes fp32/fp64; its Python wrapper upcasts half maps
    else:
        maps_in = maps
    ops = _ops(kernel_backend)
    for mode, bins in (("vico", 10), ("skimage", 256)):
        threshold, mask = ops.otsu_mask(maps_in, bins, mode)
        assert threshold.dtype == otsu_compute_dtype(maps) and mask.dtype == torch.bool
        torch.library.opcheck(ops.otsu_mask, (maps_in, bins, mode), test_utils=("test_faketensor",))
    # What users see: the public op returns the same threshold dtype on every backend.
    assert fused.otsu_mask(maps, backend=kernel_backend)[0].dtype == otsu_compute_dtype(maps)


def test_cuda_bin_limits_have_one_source():
    source = (Path(__file__).resolve().parents[2] / "csrc" / "otsu_cuda.cu").read_text()
    assert re.search(r"kMax\w*Bins\s*=\s*\d", source) is None, "otsu_cuda.cu hard-codes a bin limit"
    for mode, define in (("vico", "FUSED_MAX_VICO_BINS"), ("skimage", "FUSED_MAX_SKIMAGE_BINS")):
        assert define in source
        assert f"-D{define}={_cpp.CUDA_MAX_BINS[mode]}" in _cpp.CUDA_CFLAGS
        assert _dispatch.max_bins("cuda", mode) == _cpp.CUDA_MAX_BINS[mode]
    # Dispatch refuses before it reaches torch.ops.fused_cuda (no GPU needed to see it).
    with pytest.raises(ValueError, match=r"bins=65 exceeds the cuda Otsu kernel's limit of 64 bins for mode 'vico'"):
        _dispatch.check_bins_for_backend(65, "vico", "cuda")
