"""The compiled backends (C++ and Triton) against the PyTorch reference:
forward and backward of every op, in float64 and float32.

Shapes cross each kernel's tiling. C++: query blocks of 256 and key blocks of
256, so N > 256 and L > 256 appear, with SD's head dims 40/80/160 and L = 77.
Triton runs interpreted on CPU, so its shapes stay small (N <= 256, L <= 128
plus one long-L case, head dims 40 and 64, B*H <= 8) but still cross its
64-wide blocks."""

import os
import subprocess
import sys

import pytest
import torch

import fused
from fused import reference

from ..conftest import rand

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

ATTN_SHAPES = {  # B, H, N, L, D
    "cpp": [(2, 2, 64, 77, 40), (1, 2, 300, 77, 80), (2, 1, 16, 77, 160), (1, 2, 150, 600, 24), (2, 3, 7, 5, 3)],
    "triton": [(2, 2, 64, 77, 40), (1, 4, 100, 128, 64), (1, 2, 40, 300, 40), (2, 3, 7, 5, 3)],
}
MASKED_SHAPES = {
    "cpp": [(3, 2, 40, 77, 40), (2, 2, 300, 700, 16)],
    "triton": [(3, 2, 40, 77, 40), (2, 2, 70, 200, 64)],
}


def _cases(table):
    return [pytest.param(b, s, id=f"{b}-{'x'.join(map(str, s))}") for b in ("cpp", "triton") for s in table[b]]


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


@pytest.fixture
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
@pytest.mark.parametrize("backend, shape", _cases(ATTN_SHAPES), indirect=["backend"])
def test_attention_with_maps_forward_backward(backend, shape, head_reduce, dtype):
    B, H, N, L, D = shape
    q, k, v = _qkv(B, H, N, L, D, dtype)
    # duplicates, -1 slots, and a batch row with no map at all
    idx = torch.tensor([[0, L - 1, -1, 0], [-1, -1, -1, -1]][:B])
    scale = D ** -0.5

    def fused_fn(q, k, v):
        return fused.cross_attention_with_maps(q, k, v, idx, head_reduce=head_reduce, backend=backend)

    def ref_fn(q, k, v):
        return reference.attention_with_maps(q, k, v, idx, scale, head_reduce)

    ref_out = ref_fn(q, k, v)
    cot = [rand(*o.shape, dtype=dtype, seed=20 + i) for i, o in enumerate(ref_out)]
    got, got_g = _grads(fused_fn, (q, k, v), cot)
    want, want_g = _grads(ref_fn, (q, k, v), cot)
    assert got[1].shape == want[1].shape and got[1].dtype == dtype
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[dtype])
    if B > 1:
        assert torch.count_nonzero(got[1][1]) == 0  # -1 slots are exactly zero


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend, shape", _cases(MASKED_SHAPES), indirect=["backend"])
def test_masked_attention_forward_backward(backend, shape, dtype):
    B, H, N, L, D = shape
    q, k, v = _qkv(B, H, N, L, D, dtype)
    g = torch.Generator().manual_seed(4)
    key_mask = torch.rand(B, L, generator=g) > 0.6
    key_mask[0] = False  # fully masked row: uniform attention
    key_mask[1, : L // 2] = False  # whole key blocks hidden
    cot = [rand(B, H, N, D, dtype=dtype, seed=30)]
    got, got_g = _grads(lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend=backend), (q, k, v), cot)
    want, want_g = _grads(lambda q, k, v: reference.masked_attention(q, k, v, key_mask, D ** -0.5), (q, k, v), cot)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(got[0][0], v[0].mean(dim=1, keepdim=True).expand(H, N, D).detach(), **TOL[dtype])


def test_maps_gradient_only_from_maps(kernel_backend):
    """A loss on the maps alone (ViCo's regulariser) backpropagates correctly."""
    q, k, v = _qkv(2, 2, 20, 9, 8, torch.float64)
    idx = torch.tensor([[2, 2], [-1, 8]])
    got = torch.autograd.grad(
        fused.cross_attention_with_maps(q, k, v, idx, backend=kernel_backend)[1].square().sum(), (q, k))
    want = torch.autograd.grad(reference.attention_with_maps(q, k, v, idx, 8 ** -0.5, "mean")[1].square().sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_gradcheck_attention_with_maps(kernel_backend, head_reduce):
    q, k, v = _qkv(1, 2, 5, 4, 3, torch.float64)
    idx = torch.tensor([[1, -1, 1]])
    fn = lambda q, k, v: fused.cross_attention_with_maps(q, k, v, idx, head_reduce=head_reduce, backend=kernel_backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_gradcheck_masked_attention(kernel_backend):
    q, k, v = _qkv(2, 1, 4, 6, 3, torch.float64)
    key_mask = torch.tensor([[True, False, True, True, False, False], [False] * 6])
    fn = lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend=kernel_backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_non_contiguous_inputs(kernel_backend):
    q = rand(2, 50, 3, 16, seed=5).transpose(1, 2)  # [B, N, H, D] as a projection produces it
    k = rand(2, 30, 3, 16, seed=6).transpose(1, 2)
    v = rand(2, 30, 3, 16, seed=7).transpose(1, 2)
    assert not q.is_contiguous()
    idx = torch.tensor([[1], [29]])
    got = fused.cross_attention_with_maps(q, k, v, idx, backend=kernel_backend)
    want = reference.attention_with_maps(q, k, v, idx, 0.25, "mean")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    maps = rand(4, 40, seed=8).t()  # non-contiguous maps
    otsu = None if kernel_backend == "sdpa" else kernel_backend  # sdpa has no Otsu op
    for a, b in zip(fused.otsu_mask(maps, backend=otsu), reference.otsu_mask(maps, 10, "vico")):
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


def test_otsu_many_large_maps_in_one_call(otsu_kernel_backend):
    """A batch of N = 4096 maps (SD's 64x64 latent) in one launch, both modes."""
    g = torch.Generator().manual_seed(12)
    maps = torch.rand(4, 4096, generator=g) ** 4
    for mode in ("vico", "skimage"):
        got = fused.otsu_mask(maps, mode=mode, backend=otsu_kernel_backend)
        want = reference.otsu_mask(maps, 10 if mode == "vico" else 256, mode)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cpp_aten_gemm_route(cpp_backend):
    """csrc/attention_cpu.cpp calls BLAS (sgemm_/dgemm_) directly and takes ATen's mm
    where no BLAS symbol exists. FUSED_CPP_ATEN_GEMM=1 forces that route; the C++
    forward/backward tests above must pass through it too (a fresh process, since the
    kernel reads the variable once)."""
    env = dict(os.environ, FUSED_CPP_ATEN_GEMM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "cpp and forward_backward"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


FIRST_CALL = """
import torch, fused
torch.set_num_threads(2)
g = torch.Generator().manual_seed(1)
q, k, v = (torch.randn(2, 2, n, 40, generator=g, dtype=torch.float64).requires_grad_() for n in (64, 77, 77))
out, _ = fused.cross_attention_with_maps(q, k, v, torch.tensor([[0, 76], [-1, -1]]), backend="cpp")
with torch.no_grad():  # no BLAS, no vectorised exp: elementwise float64
    p = torch.softmax((q[:, :, :, None] * k[:, :, None]).sum(-1) * 40 ** -0.5, -1)
    exact = (p[..., None] * v[:, :, None]).sum(-2)
print((out - exact).abs().max().item())
"""


def test_cpp_first_call_in_a_process(cpp_backend):
    """The first C++ op of a process, with 2 worker threads, once gave float64 errors of
    ~1e-9 in about 1 run in 8 (a race in the lazy set-up of ATen's exp, see
    init_library_state_once in csrc/attention_cpu.cpp). Sixteen fresh processes: with
    that bug back, all pass with probability (7/8)^16 = 12%."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    errors = [float(subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True,
                                   check=True, timeout=300).stdout.strip().splitlines()[-1]) for _ in range(16)]
    assert max(errors) < 1e-13, errors


@pytest.mark.parametrize("op", ["maps", "masked"])
def test_cpp_backward_splits_few_heads_over_threads(cpp_backend, op):
    """With fewer (batch row, head) pairs than threads the C++ backward splits each
    head's query blocks into shares with their own dk/dv partials (one task per head
    left all but B·H threads idle). B·H = 1, N = 700 (3 query blocks), L = 300 (2 key
    blocks): 4 threads give 3 shares, 1 thread one; both equal the float64 reference."""
    B, H, N, L, D = 1, 1, 700, 300, 16
    q, k, v = _qkv(B, H, N, L, D, torch.float64)
    idx = torch.tensor([[0, 299, -1, 0]])
    key_mask = torch.rand(B, L, generator=torch.Generator().manual_seed(5)) > 0.4
    if op == "maps":
        def fused_fn(q, k, v):
            return fused.cross_attention_with_maps(q, k, v, idx, backend=cpp_backend)

        def ref_fn(q, k, v):
            return reference.attention_with_maps(q, k, v, idx, D ** -0.5, "mean")
    else:
        def fused_fn(q, k, v):
            return fused.masked_attention(q, k, v, key_mask, backend=cpp_backend)

        def ref_fn(q, k, v):
            return reference.masked_attention(q, k, v, key_mask, D ** -0.5)
    ref_out = ref_fn(q, k, v)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    cot = [rand(*o.shape, seed=40 + i) for i, o in enumerate(ref_out)]
    _, want = _grads(ref_fn, (q, k, v), cot)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 4):
            torch.set_num_threads(n)
            results[n] = _grads(fused_fn, (q, k, v), cot)[1]
    finally:
        torch.set_num_threads(threads)
    for n, got in results.items():
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"d{name}, {n} threads: {m}")


def test_fp32_maps_at_large_scores_come_from_the_softmax_scores(cpu_backend):
    """At scale 100 the fp32 scores are ~5000, where one rounding step is ~5e-4. A
    kernel that recomputes the chosen columns' scores by a second dot (Triton did)
    rounds them differently from the scores its log-sum-exp was built from, and a
    dominant column's probability misses by that step (3.1e-4 here). Taken from the
    same scores, every backend stays within fp32 score rounding of the float64
    reference (torch 6.5e-6, C++ and Triton 2.5e-5)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 256, 64, generator=g)
    k, v = torch.randn(2, 2, 77, 64, generator=g), torch.randn(2, 2, 77, 64, generator=g)
    idx = torch.tensor([[0, 76, 5, 0], [3, -1, 40, 9]])
    _, maps = fused.cross_attention_with_maps(q, k, v, idx, scale=100.0, backend=cpu_backend)
    _, want = reference.attention_with_maps(q.double(), k.double(), v.double(), idx, 100.0, "mean")
    assert float((maps.double() - want).abs().max()) < 1e-4


def _ran_torch_flash(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.key == "aten::_scaled_dot_product_flash_attention_for_cpu" for e in prof.key_averages())


@pytest.mark.parametrize("route", ["auto", "tiles"])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_cpp_maps_both_routes_match_the_reference(cpp_backend, monkeypatch, route, head_reduce):
    """The C++ maps op runs torch's CPU flash kernel plus a second dot over the chosen keys
    where a Cauchy-Schwarz bound on the scores keeps that dot's rounding in budget, and its
    own tiles otherwise (docs/ops.md §2.4); FUSED_CPU_MAPS_ROUTE=tiles forces the tiles.
    Either way: float64 forward and gradients within TOL of the reference, -1 slots zero;
    the profiler shows which route ran, and scale-100 float32 scores never take the flash one."""
    monkeypatch.setenv("FUSED_CPU_MAPS_ROUTE", route)
    B, H, N, L, D = 2, 3, 300, 77, 16
    q, k, v = _qkv(B, H, N, L, D, torch.float64)
    idx = torch.tensor([[0, L - 1, -1, 3], [5, -1, 5, 40]])

    def fused_fn(q, k, v):
        return fused.cross_attention_with_maps(q, k, v, idx, head_reduce=head_reduce, backend=cpp_backend)

    def ref_fn(q, k, v):
        return reference.attention_with_maps(q, k, v, idx, D ** -0.5, head_reduce)

    cot = [rand(*o.shape, dtype=torch.float64, seed=40 + i) for i, o in enumerate(ref_fn(q, k, v))]
    got, got_g = _grads(fused_fn, (q, k, v), cot)
    want, want_g = _grads(ref_fn, (q, k, v), cot)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert not got[1][0, ..., 2, :].any() if head_reduce == "none" else not got[1][0, 2].any()
    with torch.no_grad():
        assert _ran_torch_flash(lambda: fused_fn(q, k, v)) == (route == "auto")
        big = [t.float() for t in (q, k, v)]
        assert not _ran_torch_flash(lambda: fused.cross_attention_with_maps(*big, idx, scale=100.0,
                                                                            backend=cpp_backend))


@pytest.mark.parametrize("share", [0.3, 0.7, 0.9])
def test_cpp_masked_attention_on_the_visible_keys_only(cpp_backend, share):
    """The C++ op runs on each row's visible keys gathered together when every row sees
    a key and none sees more than 3/4 of them (0.3, 0.7; 0.9 runs on all keys). Same
    output and gradients as the float64 reference, with NaN in every hidden key and
    value, and exact zero gradients there."""
    B, H, N, L, D = 3, 2, 70, 300, 16
    q, k, v = _qkv(B, H, N, L, D, torch.float64)
    g = torch.Generator().manual_seed(6)
    key_mask = torch.rand(B, L, generator=g) < torch.tensor([[share], [share / 2], [share / 3]])
    k_bad = torch.where(key_mask[:, None, :, None], k.detach(), float("nan")).requires_grad_()
    v_bad = torch.where(key_mask[:, None, :, None], v.detach(), float("nan")).requires_grad_()
    cot = [rand(B, H, N, D, seed=31)]
    got, got_g = _grads(lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend=cpp_backend),
                        (q, k_bad, v_bad), cot)
    want, want_g = _grads(lambda q, k, v: reference.masked_attention(q, k, v, key_mask, D ** -0.5), (q, k, v), cot)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    hidden = ~key_mask[:, None, :, None].expand(B, H, L, D)
    assert not got_g[1][hidden].any() and not got_g[2][hidden].any()


def test_int64_offsets_only_for_tensors_that_need_them(triton_backend):
    from fused.triton._common import needs_int64_offsets

    assert not needs_int64_offsets(torch.empty(2, 8, 4096, 40, device="meta"))
    assert needs_int64_offsets(torch.empty(2, 24, 2**22, 16, device="meta"))  # 3.2e9 elements
    assert needs_int64_offsets(torch.empty(2, 8, 4096, 40, device="meta"), torch.empty(2**31, device="meta"))
    # An expanded (stride-0) input spans only its storage.
    assert not needs_int64_offsets(torch.empty(1, 1, 1, 64, device="meta").expand(4096, 64, 4096, 64))


@pytest.mark.parametrize("case", ["mean+mask", "none", "+mask"])
@pytest.mark.parametrize("grid", ["heads", "loop"])
def test_triton_int64_offset_variant_matches_the_reference(triton_backend, monkeypatch, grid, case):
    """The WIDE=True kernels (int64 batch/head bases, compiled only for > 2**31-element
    tensors) give the same numbers as the reference on both forward grids; forced on
    at a small size."""
    from fused.triton import attention_bwd, attention_fwd

    monkeypatch.setattr(attention_fwd, "needs_int64_offsets", lambda *t: True)
    monkeypatch.setattr(attention_bwd, "needs_int64_offsets", lambda *t: True)
    monkeypatch.setenv("FUSED_TRITON_FORWARD_GRID", grid)
    B, H, N, L, D = 3, 2, 40, 70, 16
    q, k, v = _qkv(B, H, N, L, D, torch.float64)
    fn, ref = _grid_case(case, B, H, N, L, D)
    want_out = ref(q, k, v)
    want_out = want_out if isinstance(want_out, tuple) else (want_out,)
    cot = [rand(*o.shape, seed=50 + i) for i, o in enumerate(want_out)]
    got, got_g = _grads(fn, (q, k, v), cot)
    want, want_g = _grads(ref, (q, k, v), cot)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def _grid_case(case, B, H, N, L, D):
    """(fused fn, reference fn) of the attention op at a small shape: ``case`` is the head
    reduction of the maps ("mean", "none", or "" for none) and "+mask" for a key mask.
    -1 slots, a repeated index, a row with no maps, a whole key block hidden (with a
    chosen column in it) and a fully masked row (uniform attention, with maps)."""
    head_reduce, _, masked = case.partition("+")
    idx = torch.tensor([[0, L - 1, -1, 0], [-1, -1, -1, -1], [5, 5, 2, -1]])[:B]
    key_mask = None
    if masked:
        key_mask = torch.rand(B, L, generator=torch.Generator().manual_seed(8)) > 0.5
        key_mask[0, : L // 2] = False
        key_mask[2] = False
    scale = D ** -0.5
    if not head_reduce:
        return (lambda q, k, v: fused.masked_attention(q, k, v, key_mask, backend="triton"),
                lambda q, k, v: reference.masked_attention(q, k, v, key_mask, scale))
    return (lambda q, k, v: fused.cross_attention_with_maps(q, k, v, idx, key_mask=key_mask, head_reduce=head_reduce,
                                                            backend="triton"),
            lambda q, k, v: reference.attention(q, k, v, idx, key_mask, scale, head_reduce))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
@pytest.mark.parametrize("case", ["mean", "mean+mask", "none+mask", "+mask"])
@pytest.mark.parametrize("grid", ["heads", "loop"])
def test_triton_both_forward_grids_match_the_reference(triton_backend, monkeypatch, grid, case, dtype):
    """The per-head grid and the head loop (forced by FUSED_TRITON_FORWARD_GRID) give
    the float64 reference's values and gradients: 70 queries and 80 keys cross the
    64-wide blocks, with -1 slots, repeated indices, a row without maps and key masks
    (with and without maps).
    float16 takes the path that recomputes the chosen columns' scores (fp32/fp64 keep
    them from the tiles), checked against the reference on the same fp16-rounded inputs."""
    monkeypatch.setenv("FUSED_TRITON_FORWARD_GRID", grid)
    B, H, N, L, D = 3, 2, 70, 80, 16
    q, k, v = _qkv(B, H, N, L, D, dtype)
    exact = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    fused_fn, ref_fn = _grid_case(case, B, H, N, L, D)
    want_out = ref_fn(*exact)
    want_out = want_out if isinstance(want_out, tuple) else (want_out,)
    cot = [rand(*o.shape, seed=60 + i) for i, o in enumerate(want_out)]
    got, got_g = _grads(fused_fn, (q, k, v), [c.to(dtype) for c in cot])
    want, want_g = _grads(ref_fn, exact, cot)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=5e-3, atol=5e-3)
    for a, b in zip(got + got_g, want + want_g):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)
    if case[0] != "+":
        assert not got[1][1].any()  # the row without maps is exactly zero


def test_triton_forward_grids_give_the_same_bits_and_a_natural_log_lse(triton_backend, monkeypatch):
    """Both grids add the heads' probabilities in the same order and divide once, so out,
    head-mean maps and lse are bit-identical between them and between runs (fp32); lse
    is the natural-log log-sum-exp of the scores (the kernels work in base 2 inside)."""
    from fused.triton.attention_fwd import attention_forward

    B, H, N, L, D = 2, 3, 70, 80, 16
    q, k, v = (t.detach().float() for t in _qkv(B, H, N, L, D, torch.float64))
    idx = torch.tensor([[0, L - 1, -1, 0], [3, 3, 70, 1]])
    results = []
    for grid in ("heads", "loop", "heads"):
        monkeypatch.setenv("FUSED_TRITON_FORWARD_GRID", grid)
        results.append(attention_forward(q, k, v, token_index=idx, scale=0.25))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    scores = torch.einsum("bhnd,bhld->bhnl", q.double(), k.double()) * 0.25
    torch.testing.assert_close(results[0][2].double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)


def test_triton_forward_grid_rule(triton_backend, monkeypatch):
    """The head loop runs only for head-mean maps whose B·cdiv(N, 64) programs reach the
    SM count (132 off a GPU); the launch follows the rule; a bad override is refused."""
    from fused.triton import attention_fwd

    rule = attention_fwd.use_head_loop
    cpu = torch.device("cpu")
    monkeypatch.delenv("FUSED_TRITON_FORWARD_GRID", raising=False)
    assert not rule(2, 8, 4096, True, cpu)  # SD 1.5 64x64 at batch 2: 128 programs < 132 SMs
    assert rule(3, 8, 4096, True, cpu)  # 192 programs
    assert not rule(3, 8, 4096, False, cpu)  # per-head maps or no maps: always per head
    monkeypatch.setenv("FUSED_TRITON_FORWARD_GRID", "loop")
    assert rule(1, 8, 64, False, cpu)
    # The launcher itself, not the op: dispatch's first-use self-check would launch kernels too.
    q, k, v = (t.detach() for t in _qkv(2, 2, 70, 20, 8, torch.float64))
    monkeypatch.setenv("FUSED_TRITON_FORWARD_GRID", "head-loop")
    with pytest.raises(ValueError, match="FUSED_TRITON_FORWARD_GRID must be auto, heads or loop"):
        attention_fwd.attention_forward(q, k, v, token_index=torch.tensor([[1], [2]]))

    monkeypatch.setenv("FUSED_TRITON_FORWARD_GRID", "auto")
    monkeypatch.setattr(attention_fwd, "_sm_count", lambda device: 4)
    launched = []
    real_launcher = attention_fwd.launcher
    monkeypatch.setattr(attention_fwd, "launcher", lambda kernel: launched.append(kernel.fn.__name__)
                        or real_launcher(kernel))
    for head_mean, n in ((True, 70), (True, 64), (False, 70)):
        attention_fwd.attention_forward(q[:, :, :n], k, v, token_index=torch.tensor([[1], [2]]), head_mean=head_mean)
    assert launched == ["_attention_fwd_kernel",  # 2·cdiv(70, 64) = 4 programs >= 4 SMs
                        "_attention_fwd_heads_kernel", "_head_mean_kernel",  # 2 < 4
                        "_attention_fwd_heads_kernel"]
