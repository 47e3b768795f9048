"""Issue 16, items 4-7 and part of 9: the ops refuse what they cannot do, loudly.

- a second derivative through a compiled backend raises (it returned zeros);
- every ``torch.ops.fused_cpp.*`` entry point checks every argument (it read
  out of bounds on a short key_mask, lse or grad_maps);
- NaN/Inf stored in a hidden key or value never reaches the output or the
  gradients, in every backend (docs/ops.md §4.2);
- Triton under the interpreter refuses bf16 attention, with a reason;
- too many Otsu bins for Triton is a ValueError before any launch.
"""

from __future__ import annotations

import pytest
import torch

import fused
from fused import _dispatch, reference

from ..conftest import rand


def _qkv(B: int, H: int, N: int, L: int, D: int, dtype=torch.float64, grad: bool = True):
    q = rand(B, H, N, D, dtype=dtype, seed=1)
    k = rand(B, H, L, D, dtype=dtype, seed=2)
    v = rand(B, H, L, D, dtype=dtype, seed=3)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


# --- item 4: no silent double backward ------------------------------------


def _maps_loss(backend: str):
    idx = torch.tensor([[1, -1, 3]])
    return lambda q, k, v: sum(t.sum() for t in fused.cross_attention_with_maps(q, k, v, idx, backend=backend))


def _masked_loss(backend: str):
    key_mask = torch.tensor([[True, False, True, True, False]])
    return lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend=backend).sum()


@pytest.mark.parametrize("make_loss", [_maps_loss, _masked_loss], ids=["attention_with_maps", "masked_attention"])
def test_double_backward_raises(kernel_backend, make_loss):
    """First-order gradients under create_graph=True stay right; differentiating them
    again raises instead of giving zeros (C++ did, after a mere UserWarning)."""
    q, k, v = _qkv(1, 2, 4, 5, 3)
    loss = make_loss(kernel_backend)
    grads = torch.autograd.grad(loss(q, k, v), (q, k, v), create_graph=True)
    want = torch.autograd.grad(make_loss("torch")(q, k, v), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"double backward .* not implemented .*backend='torch'"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))


def test_gradgradcheck_raises_for_cpp(cpp_backend):
    q, k, v = _qkv(1, 1, 3, 5, 2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(_masked_loss(cpp_backend), (q, k, v))


# --- item 5: the raw C++ ops check every argument ---------------------------

B, H, N, L, D, T = 2, 2, 5, 6, 4, 3


def _valid():
    """Valid arguments of the fused_cpp ops, built by the forward op itself."""
    q, k, v = _qkv(B, H, N, L, D, dtype=torch.float32, grad=False)
    idx = torch.tensor([[0, -1, 5], [2, 2, 1]])
    mask = torch.ones(B, L, dtype=torch.bool)
    out, maps, lse = torch.ops.fused_cpp.attention(q, k, v, idx, None, 0.5, True)
    m_out, _, m_lse = torch.ops.fused_cpp.attention(q, k, v, None, mask, 0.5, True)
    return dict(q=q, k=k, v=v, idx=idx, mask=mask, out=out, maps=maps, lse=lse, m_out=m_out, m_lse=m_lse,
                maps_none=torch.zeros(B, H, T, N))


def _maps_fwd(a, **over):
    a = {**a, **over}
    return torch.ops.fused_cpp.attention(a["q"], a["k"], a["v"], a["idx"], None, 0.5, a.get("head_mean", True))


def _maps_bwd(a, **over):
    a = {**a, **over}
    return torch.ops.fused_cpp.attention_backward(
        a["q"], a["k"], a["v"], a["idx"], None, a["out"], a["lse"], a.get("grad_out", a["out"]),
        a.get("grad_maps", a["maps"]), 0.5, a.get("head_mean", True))


def _masked_fwd(a, **over):
    a = {**a, **over}
    return torch.ops.fused_cpp.attention(a["q"], a["k"], a["v"], None, a["mask"], 0.5, True)


def _masked_bwd(a, **over):
    a = {**a, **over}
    return torch.ops.fused_cpp.attention_backward(
        a["q"], a["k"], a["v"], None, a["mask"], a.get("out", a["m_out"]), a.get("lse", a["m_lse"]),
        a.get("grad_out", a["m_out"]), a.get("grad_maps"), 0.5, True)


BAD_CPP_CALLS = [
    # masked_attention: the 1-element mask read out of bounds (SIGSEGV at large L)
    ("mask-1-element", _masked_fwd, lambda a: dict(mask=torch.ones(1, dtype=torch.bool)),
     r"key_mask must have shape \[B=2, L=6\], got \[1\]"),
    ("mask-short", _masked_fwd, lambda a: dict(mask=a["mask"][:, :5]), r"key_mask must have shape \[B=2, L=6\]"),
    ("mask-float", _masked_fwd, lambda a: dict(mask=a["mask"].float()), r"key_mask must be bool, got Float"),
    ("mask-bwd-short", _masked_bwd, lambda a: dict(mask=a["mask"][:1]), r"key_mask must have shape"),
    ("masked-bwd-short-lse", _masked_bwd, lambda a: dict(lse=a["m_lse"][..., :2]),
     r"lse must have shape \[2, 2, 5\], got \[2, 2, 2\]"),
    ("masked-bwd-grad-out", _masked_bwd, lambda a: dict(grad_out=a["m_out"][:, :1]), r"grad_out must have shape"),
    # q, k, v
    ("q-half", _masked_fwd, lambda a: dict(q=a["q"].half(), k=a["k"].half(), v=a["v"].half()),
     r"q must be float32 or float64, got Half"),
    ("k-double", _maps_fwd, lambda a: dict(k=a["k"].double()), r"q, k, v must share one dtype"),
    ("q-3d", _maps_fwd, lambda a: dict(q=a["q"][0]), r"q must be 4-D"),
    ("k-head-dim", _maps_fwd, lambda a: dict(k=a["k"][..., :3], v=a["v"][..., :3]), r"k must be \[B, H, L, D\]"),
    ("v-shape", _maps_fwd, lambda a: dict(v=a["v"][:, :, :4]), r"v must have k's shape"),
    ("no-keys", _masked_fwd, lambda a: dict(k=a["k"][:, :, :0], v=a["v"][:, :, :0], mask=a["mask"][:, :0]),
     r"k needs L >= 1 keys"),
    # token_index
    ("index-float", _maps_fwd, lambda a: dict(idx=a["idx"].float()), r"token_index must be int64, got Float"),
    ("index-int32", _maps_fwd, lambda a: dict(idx=a["idx"].int()), r"token_index must be int64, got Int"),
    ("index-rows", _maps_fwd, lambda a: dict(idx=a["idx"][:1]), r"token_index must be \[B=2, T\]"),
    ("index-1d", _maps_fwd, lambda a: dict(idx=a["idx"][0]), r"token_index must be \[B=2, T\]"),
    ("index-range", _maps_fwd, lambda a: dict(idx=torch.tensor([[0], [6]])), r"values must lie in \[-1, 5\], got 6"),
    ("index-bwd-float", _maps_bwd, lambda a: dict(idx=a["idx"].double()), r"token_index must be int64"),
    ("bwd-grad-maps-without-index", _masked_bwd, lambda a: dict(grad_maps=a["maps"]),
     r"grad_maps was given but token_index was not"),
    # attention_backward: what the forward saved
    ("bwd-short-lse", _maps_bwd, lambda a: dict(lse=a["lse"][:, :, :1]), r"lse must have shape \[2, 2, 5\]"),
    ("bwd-lse-dtype", _maps_bwd, lambda a: dict(lse=a["lse"].double()), r"lse must have q's dtype Float"),
    ("bwd-out", _maps_bwd, lambda a: dict(out=a["out"][:, :, :2]), r"out must have shape \[2, 2, 5, 4\]"),
    ("bwd-grad-out-dtype", _maps_bwd, lambda a: dict(grad_out=a["out"].double()), r"grad_out must have q's dtype"),
    ("bwd-short-grad-maps", _maps_bwd, lambda a: dict(grad_maps=a["maps"][..., :1]),
     r"grad_maps must have shape \[2, 3, 5\], got \[2, 3, 1\]"),
    ("bwd-grad-maps-per-head", _maps_bwd, lambda a: dict(head_mean=False),
     r"grad_maps must have shape \[2, 2, 3, 5\], got \[2, 3, 5\]"),
    ("bwd-grad-maps-dtype", _maps_bwd, lambda a: dict(grad_maps=a["maps"].double()), r"grad_maps must have q's dtype"),
]


@pytest.mark.parametrize("call, change, pattern", [pytest.param(*c[1:], id=c[0]) for c in BAD_CPP_CALLS])
def test_raw_cpp_attention_ops_check_every_argument(cpp_backend, call, change, pattern):
    a = _valid()
    with pytest.raises(RuntimeError, match=pattern):
        call(a, **change(a))


def test_raw_cpp_ops_accept_what_the_python_layer_passes(cpp_backend):
    a = _valid()
    _maps_bwd(a)
    _maps_bwd(a, grad_maps=None)
    _maps_bwd(a, head_mean=False, grad_maps=a["maps_none"])
    _masked_bwd(a)
    _maps_fwd(a, q=a["q"].transpose(2, 3).contiguous().transpose(2, 3))  # strides are fine: copied inside


@pytest.mark.parametrize(
    "maps, bins, mode, pattern",
    [
        (torch.rand(2, 8).half(), 10, "vico", r"maps must be float32 or float64 .*got Half"),
        (torch.arange(8).reshape(2, 4), 10, "vico", r"maps must be float32 or float64 .*got Long"),
        (torch.rand(2, 0), 10, "vico", r"maps must be non-empty \[\.\.\., N\], got shape \[2, 0\]"),
        (torch.tensor(0.5), 10, "skimage", r"maps must be non-empty"),
        (torch.rand(2, 8), 1, "vico", r"bins must be in \[2, 2\^31 - 1\], got 1"),
        (torch.rand(2, 8), 2 ** 31, "skimage", r"bins must be in \[2, 2\^31 - 1\]"),
        (torch.rand(2, 8), 10, "otsu", r"unknown mode otsu"),
    ],
)
def test_raw_cpp_otsu_checks_every_argument(cpp_backend, maps, bins, mode, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.fused_cpp.otsu_mask(maps, bins, mode)


# --- item 6: NaN/Inf in hidden keys and values, one rule everywhere ---------


# The interpreter's numpy matmul of a q tile with an Inf key warns before the score is replaced.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["key", "value"])
def test_hidden_nan_inf_never_reaches_output_or_gradients(cpu_backend, where, bad):
    """Row 0 hides keys 1 and 4; row 1 hides every key (uniform: its values are
    attended, its keys unused, so only its keys get the poison). The result with
    poisoned hidden entries equals the reference on clean ones, gradients included,
    and the gradients at hidden positions of row 0 are zero (docs/ops.md §4.2)."""
    key_mask = torch.tensor([[True, False, True, True, False, True, True], [False] * 7])
    q, k, v = _qkv(2, 2, 6, 7, 4, grad=False)
    poisoned = (k if where == "key" else v).clone()
    poisoned[0, :, 1] = bad
    poisoned[0, 1, 4, 2] = bad
    if where == "key":
        poisoned[1, :, 3] = bad
    k_bad, v_bad = (poisoned, v) if where == "key" else (k, poisoned)

    inputs = [t.clone().requires_grad_() for t in (q, k_bad, v_bad)]
    out = fused.masked_attention(*inputs, key_mask, backend=cpu_backend)
    cotangent = rand(*out.shape, seed=9)
    grads = torch.autograd.grad((out * cotangent).sum(), inputs)

    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    want = reference.masked_attention(*clean, key_mask, 0.5)
    want_grads = torch.autograd.grad((want * cotangent).sum(), clean)

    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for name, got, ref in zip("qkv", grads, want_grads):
        assert torch.isfinite(got).all(), f"d{name} is not finite"
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=f"d{name}")
    assert not grads[1][0, :, [1, 4]].any() and not grads[2][0, :, [1, 4]].any()


def test_poisoned_value_of_a_fully_masked_row_propagates(cpu_backend):
    """The other half of the rule: a uniform row attends every value, so a NaN
    there is attended, in every backend alike."""
    key_mask = torch.tensor([[False] * 5])
    q, k, v = _qkv(1, 1, 3, 5, 4, grad=False)
    v = v.clone()
    v[0, 0, 2, 1] = float("nan")
    out = fused.masked_attention(q, k, v, key_mask, backend=cpu_backend)
    assert out[..., 1].isnan().all() and torch.isfinite(out[..., [0, 2, 3]]).all()


# --- item 7: bf16 under the Triton interpreter --------------------------------


# Item 7 concerns the interpreter itself; conftest switches it on where there is no GPU.
interpreted = pytest.mark.skipif(not fused.triton.interpreted(), reason="needs TRITON_INTERPRET=1")


def _bf16_qkv():
    return tuple(t.bfloat16() for t in _qkv(1, 2, 8, 5, 16, dtype=torch.float32, grad=False))


@interpreted
def test_triton_interpreter_refuses_bf16_attention(triton_backend):
    q, k, v = _bf16_qkv()
    with pytest.raises(TypeError, match=r"does not support torch.bfloat16 .*Triton interpreter \(TRITON_INTERPRET=1\)"):
        fused.cross_attention_with_maps(q, k, v, torch.tensor([[1]]), backend="triton")
    with pytest.raises(TypeError, match=r"TRITON_INTERPRET=1"):
        fused.masked_attention(q, k, v, torch.ones(1, 5, dtype=torch.bool), backend="triton")
    with pytest.raises(TypeError, match=r"TRITON_INTERPRET=1"):
        fused.cross_attention_with_mask(q, k, v, torch.tensor([[1]]), backend="triton")
    # Otsu reads bf16 maps as fp32 and is exact under the interpreter: still allowed.
    maps = torch.rand(3, 40).bfloat16()
    got = fused.otsu_mask(maps, backend="triton")
    want = reference.otsu_mask(maps, 10, "vico")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bf16_attention_falls_back_with_the_interpreter_named(monkeypatch):
    """backend=None: Triton is skipped with the reason, torch's fused attention runs, with the usual warning."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch._warn_once.cache_clear()
    reason = r"triton has no torch.bfloat16 kernel: the Triton interpreter \(TRITON_INTERPRET=1\) cannot compute"
    with pytest.warns(RuntimeWarning, match=r"falls back to the sdpa backend .*" + reason):
        assert _dispatch.resolve("attention", "cuda", torch.bfloat16, None) == "sdpa"
    assert _dispatch.REGISTRY["triton"].refusal("otsu_mask", torch.bfloat16, "cuda") is None  # exact: allowed
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled for a GPU, bf16 attention is fine
    assert _dispatch.REGISTRY["triton"].refusal("attention", torch.bfloat16, "cuda") is None


def test_bf16_attention_on_cpu_runs_torch_fused_attention(cpp_backend):
    q, k, v = _bf16_qkv()
    _dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to the sdpa backend .*cpp has no torch.bfloat16 kernel"):
        out, maps = fused.cross_attention_with_maps(q, k, v, torch.tensor([[1]]))
    want_out, want_maps = reference.attention_with_maps(q.double(), k.double(), v.double(), torch.tensor([[1]]),
                                                        0.25, "mean")
    assert out.dtype == maps.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2e-2)
    torch.testing.assert_close(maps.double(), want_maps, rtol=0, atol=1e-2)


# --- item 9 (part): Otsu bins beyond the Triton kernel ----------------------------


@pytest.mark.parametrize("mode", ["vico", "skimage"])
def test_triton_too_many_bins_is_a_value_error_before_launch(triton_backend, monkeypatch, mode):
    def no_launch(*args):
        raise AssertionError("the kernel was launched")

    monkeypatch.setattr(_dispatch.implementation("triton"), "otsu_mask", no_launch)
    maps = torch.rand(2, 30)
    with pytest.raises(ValueError, match=r"bins=1000000 exceeds the triton Otsu kernel's limit of 1024 bins"):
        fused.otsu_mask(maps, bins=10 ** 6, mode=mode, backend="triton")
    with pytest.raises(ValueError, match=r"bins=1025 exceeds .*limit of 1024"):
        fused.otsu_mask(maps, bins=fused.triton.MAX_BINS + 1, mode=mode, backend="triton")
    q, k, v = _qkv(1, 1, 4, 3, 2, grad=False)
    with pytest.raises(ValueError, match=r"bins=1000000 exceeds the triton Otsu kernel's limit"):
        fused.cross_attention_with_mask(q, k, v, torch.tensor([[1]]), bins=10 ** 6, mode=mode, backend="triton")


@pytest.mark.parametrize("mode", ["vico", "skimage"])
def test_triton_takes_its_largest_bins(triton_backend, mode):
    maps = torch.rand(2, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = fused.otsu_mask(maps, bins=fused.triton.MAX_BINS, mode=mode, backend="triton")
    want = reference.otsu_mask(maps, fused.triton.MAX_BINS, mode)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
