"""The C++ backend against the PyTorch reference: forward and backward of every op.

Shapes are chosen to cross the kernel's tiling: N > 128 (several query blocks),
L > 256 (several key blocks, i.e. the online softmax), D = 40/80/160 (SD's head
dims) and L = 77 (SD's text tokens)."""

import pytest
import torch

import fused
from fused import _cpp, reference

from .conftest import rand

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

ATTN_SHAPES = [  # B, H, N, L, D
    (2, 2, 64, 77, 40),
    (1, 2, 130, 77, 80),
    (2, 1, 16, 77, 160),
    (1, 2, 150, 600, 24),
    (2, 3, 7, 5, 3),
]


def _grads(fn, inputs, cotangents):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    return outs, torch.autograd.grad(loss, inputs)


def _qkv(B, H, N, L, D, dtype):
    return (
        rand(B, H, N, D, dtype=dtype, seed=1).requires_grad_(),
        rand(B, H, L, D, dtype=dtype, seed=2).requires_grad_(),
        rand(B, H, L, D, dtype=dtype, seed=3).requires_grad_(),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_with_maps_forward_backward(cpp_backend, shape, head_reduce, dtype):
    B, H, N, L, D = shape
    q, k, v = _qkv(B, H, N, L, D, dtype)
    idx = torch.tensor([[0, L - 1, -1, 0], [L // 2, -1, -1, 1 % L]][:B])
    scale = D ** -0.5

    def fused_fn(q, k, v):
        return fused.cross_attention_with_maps(q, k, v, idx, head_reduce=head_reduce, backend="cpp")

    def ref_fn(q, k, v):
        return reference.attention_with_maps(q, k, v, idx, scale, head_reduce)

    ref_out = ref_fn(q, k, v)
    cot = [rand(*o.shape, dtype=dtype, seed=20 + i) for i, o in enumerate(ref_out)]
    got, got_g = _grads(fused_fn, (q, k, v), cot)
    want, want_g = _grads(ref_fn, (q, k, v), cot)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 2, 40, 77, 40), (2, 2, 130, 700, 16)])
def test_masked_attention_forward_backward(cpp_backend, shape, dtype):
    B, H, N, L, D = shape
    q, k, v = _qkv(B, H, N, L, D, dtype)
    g = torch.Generator().manual_seed(4)
    key_mask = torch.rand(B, L, generator=g) > 0.6
    key_mask[0] = False  # fully masked row: uniform attention
    key_mask[1, : L // 2] = False  # a whole key block hidden for the long case
    cot = [rand(B, H, N, D, dtype=dtype, seed=30)]
    got, got_g = _grads(lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend="cpp"), (q, k, v), cot)
    want, want_g = _grads(lambda q, k, v: reference.masked_attention(q, k, v, key_mask, D ** -0.5), (q, k, v), cot)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_maps_gradient_only_from_maps(cpp_backend):
    """A loss on the maps alone (ViCo's regulariser) backpropagates correctly."""
    q, k, v = _qkv(2, 2, 20, 9, 8, torch.float64)
    idx = torch.tensor([[2, 2], [-1, 8]])
    got = torch.autograd.grad(fused.cross_attention_with_maps(q, k, v, idx, backend="cpp")[1].square().sum(), (q, k))
    want = torch.autograd.grad(reference.attention_with_maps(q, k, v, idx, 8 ** -0.5, "mean")[1].square().sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_gradcheck_attention_with_maps(cpp_backend, head_reduce):
    q, k, v = _qkv(1, 2, 5, 4, 3, torch.float64)
    idx = torch.tensor([[1, -1, 1]])
    fn = lambda q, k, v: fused.cross_attention_with_maps(q, k, v, idx, head_reduce=head_reduce, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_gradcheck_masked_attention(cpp_backend):
    q, k, v = _qkv(2, 1, 4, 6, 3, torch.float64)
    key_mask = torch.tensor([[True, False, True, True, False, False], [False] * 6])
    fn = lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_non_contiguous_inputs(cpp_backend):
    base = rand(2, 50, 3, 16, seed=5)  # [B, N, H, D] as a projection produces it
    q = base.transpose(1, 2)
    k = rand(2, 30, 3, 16, seed=6).transpose(1, 2)
    v = rand(2, 30, 3, 16, seed=7).transpose(1, 2)
    assert not q.is_contiguous()
    idx = torch.tensor([[1], [29]])
    got = fused.cross_attention_with_maps(q, k, v, idx, backend="cpp")
    want = reference.attention_with_maps(q, k, v, idx, 0.25, "mean")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    maps = rand(4, 40, seed=8).t()  # non-contiguous maps
    for a, b in zip(fused.otsu_mask(maps, backend="cpp"), reference.otsu_mask(maps, 10, "vico")):
        assert torch.equal(a, b)


def test_cross_attention_with_mask_composes_the_two_ops(cpu_backend):
    q, k, v = _qkv(2, 4, 64, 77, 40, torch.float64)
    idx = torch.tensor([[5], [9]])
    out, maps, mask = fused.cross_attention_with_mask(q, k, v, idx, backend=cpu_backend)
    want_out, want_maps = reference.attention_with_maps(q, k, v, idx, 40 ** -0.5, "mean")
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps, want_maps, rtol=1e-10, atol=1e-12)
    assert torch.equal(mask, reference.otsu_vico(maps.detach(), 10)[1])
    assert mask.shape == (2, 1, 64) and mask.any() and not mask.all()


def test_build_cache_key_tracks_sources_and_versions(monkeypatch, tmp_path):
    key = _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS)
    assert torch.__version__.replace("+", "_") in key and (torch.version.cuda or "cpu") in key
    fake_src = tmp_path / "csrc"
    fake_src.mkdir()
    for name in _cpp.CPU_SOURCES + _cpp.CPU_HEADERS:
        (fake_src / name).write_bytes((_cpp.source_dir() / name).read_bytes())
    monkeypatch.setattr(_cpp, "source_dir", lambda: fake_src)
    assert _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS) == key
    (fake_src / "otsu_cpu.cpp").write_text("// changed\n")
    assert _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS) != key


def test_missing_compiler_gives_clear_error(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("FUSED_CACHE_DIR", str(tmp_path))
    with pytest.raises(_cpp.BuildError, match="C\\+\\+17 compiler"):
        _cpp._build("fused_cpp", _cpp.CPU_SOURCES, _cpp.CPU_HEADERS)
