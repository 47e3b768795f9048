"""Backend selection: one module decides, fallbacks warn, bad requests raise."""

import subprocess
import sys
import warnings

import pytest
import torch

import fused
from fused import _dispatch

from ..conftest import rand


def test_available_backends_on_cpu(cpp_backend):
    assert fused.available_backends() [:2] == ["torch", "cpp"]
    assert fused.available_backends("cpu")[:2] == ["torch", "cpp"]
    assert "cuda" not in fused.available_backends("cpu")
    assert fused.available_backends("meta") == ["torch"]


def test_cpu_default_is_cpp(cpp_backend):
    assert _dispatch.resolve("attention", "cpu", torch.float32, None) == "cpp"
    assert _dispatch.resolve("otsu_mask", "cpu", torch.float16, None) == "cpp"  # upcast inside


def test_half_attention_on_cpu_warns_and_uses_sdpa(cpp_backend):
    q = rand(1, 2, 8, 4, dtype=torch.float16)
    k = rand(1, 2, 5, 4, dtype=torch.float16, seed=1)
    _dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to the sdpa backend .*cpp has no torch.float16 kernel"):
        out, maps = fused.cross_attention_with_maps(q, k, k, torch.tensor([[1]]))
    assert out.dtype == maps.dtype == torch.float16
    with pytest.raises(TypeError, match="backend 'cpp' does not support torch.float16"):
        fused.cross_attention_with_maps(q, k, k, torch.tensor([[1]]), backend="cpp")


def test_unavailable_cpp_falls_back_with_warning(monkeypatch):
    real = _dispatch.backend_status
    monkeypatch.setattr(
        _dispatch, "backend_status", lambda name: (False, "no compiler") if name == "cpp" else real(name)
    )
    _dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="cpp: no compiler"):
        name = _dispatch.resolve("attention", "cpu", torch.float32, None)
    assert name == "sdpa"  # torch's fused attention, never the materialising reference, when it can run
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available: no compiler"):
        _dispatch.resolve("attention", "cpu", torch.float32, "cpp")


def test_no_warning_when_the_preferred_backend_runs(cpp_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused.otsu_mask(torch.rand(2, 30))


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        _dispatch.resolve("otsu_mask", "cpu", torch.float32, "triton")


def test_import_fused_imports_neither_diffusers_nor_triton():
    code = "import sys, fused; print(sorted(m for m in ('diffusers', 'triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_float64_attention_on_cuda_skips_triton_with_warning(triton_backend):
    """Triton cannot compile the fp64 attention kernels for a GPU (see _supports_dtype);
    on CUDA tensors fp64 attention goes to the reference with a warning, fp64 Otsu and
    every other dtype stay on Triton. Decided from the device *type*: no GPU needed."""
    _dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to the PyTorch reference .*triton has no torch.float64 kernel"):
        assert _dispatch.resolve("attention", "cuda", torch.float64, None) == "torch"
    with pytest.raises(TypeError, match="does not support torch.float64 for attention on cuda"):
        _dispatch.resolve("attention", "cuda", torch.float64, "triton")
    assert _dispatch.resolve("otsu_mask", "cuda", torch.float64, None) == "triton"
    # bf16 attention is refused while the interpreter is on (tests/ops/test_refusals_and_hidden_keys.py).
    dtypes = (torch.float16, torch.float32) + (() if fused.triton.interpreted() else (torch.bfloat16,))
    for dtype in dtypes:
        assert _dispatch.resolve("attention", "cuda", dtype, None) == "triton"
    assert _dispatch.resolve("attention", "cpu", torch.float64, "triton") == "triton"  # interpreter
