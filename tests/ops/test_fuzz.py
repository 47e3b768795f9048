"""Property-based fuzzing of every public op on every CPU backend against the float64 reference.

hypothesis draws shapes (D not a power of two, L from 1, duplicated and -1
token slots, fully masked rows, tied and constant Otsu maps), values and
scales; a fixed seed and a bounded number of examples keep CI deterministic
and fast. Forward outputs and gradients (attention ops) must match the
reference within float64 rounding; Otsu thresholds and masks exactly.
"""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fused  # noqa: E402
from fused import reference  # noqa: E402

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                database=None)
TOL = dict(atol=1e-10, rtol=1e-9)


@st.composite
def attention_case(draw, masked: bool):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    N, L, D = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 8.0]))
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) * spread for n in (N, L, L))
    scale = draw(st.sampled_from([None, 0.5, 3.0]))
    if masked:
        mask = torch.rand(B, L, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
        return q, k, v, mask, scale
    T = draw(st.integers(1, 4))
    index = torch.randint(-1, L, (B, T), generator=g)
    return q, k, v, index, scale


def _grads(outs, inputs, g):
    cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cots, allow_unused=True)


@seed(20261201)
@FUZZ
@given(case=attention_case(masked=False), head_reduce=st.sampled_from(["mean", "none"]))
def test_fuzz_cross_attention_with_maps(cpu_backend, case, head_reduce):
    q, k, v, index, scale = case
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, maps = fused.cross_attention_with_maps(*inputs, index, scale=scale, head_reduce=head_reduce,
                                                backend=cpu_backend)
    scale_ = scale if scale is not None else q.shape[-1] ** -0.5
    r_out, r_maps = reference.attention_with_maps(*ref_inputs, index, scale_, head_reduce)
    torch.testing.assert_close(out, r_out, **TOL)
    torch.testing.assert_close(maps, r_maps, **TOL)
    got = _grads([out, maps], inputs, torch.Generator().manual_seed(1))
    want = _grads([r_out, r_maps], ref_inputs, torch.Generator().manual_seed(1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@seed(20261202)
@FUZZ
@given(case=attention_case(masked=True))
def test_fuzz_masked_attention(cpu_backend, case):
    q, k, v, mask, scale = case
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fused.masked_attention(*inputs, mask, scale=scale, backend=cpu_backend)
    scale_ = scale if scale is not None else q.shape[-1] ** -0.5
    r_out = reference.masked_attention(*ref_inputs, mask, scale_)
    torch.testing.assert_close(out, r_out, **TOL)
    got = _grads([out], inputs, torch.Generator().manual_seed(2))
    want = _grads([r_out], ref_inputs, torch.Generator().manual_seed(2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@st.composite
def otsu_case(draw):
    rows, N = draw(st.integers(1, 3)), draw(st.integers(1, 64))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["rand", "levels", "constant", "spiky"]))
    if kind == "rand":
        maps = torch.rand(rows, N, generator=g, dtype=torch.float64)
    elif kind == "levels":  # many exact ties and values on candidate thresholds
        maps = torch.randint(0, 11, (rows, N), generator=g).double() / 10
    elif kind == "constant":
        maps = torch.full((rows, N), 0.25, dtype=torch.float64)
    else:
        maps = torch.rand(rows, N, generator=g, dtype=torch.float64) ** 8 * 1e3
    return maps, draw(st.sampled_from(["vico", "skimage"])), draw(st.sampled_from([None, 2, 7, 32]))


@seed(20261203)
@FUZZ
@given(case=otsu_case())
def test_fuzz_otsu_mask(otsu_backend, case):
    maps, mode, bins = case
    nbins = bins if bins is not None else (10 if mode == "vico" else 256)
    thr, mask = fused.otsu_mask(maps, bins=bins, mode=mode, backend=otsu_backend)
    r_thr, r_mask = reference.otsu_mask(maps, nbins, mode)
    torch.testing.assert_close(thr, r_thr, atol=0, rtol=0)
    assert torch.equal(mask, r_mask)
