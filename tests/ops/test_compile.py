"""torch.compile(fullgraph=True) sees no graph break through any op or backend."""

import pytest
import torch

import fused

from ..conftest import rand


def all_ops(q, k, v, idx, key_mask, maps, backend):
    out, m = fused.cross_attention_with_maps(q, k, v, idx, backend=backend)
    out2 = fused.masked_attention(q, k, v, key_mask, backend=backend)
    thr, mask = fused.otsu_mask(maps, backend=None if backend == "sdpa" else backend)  # sdpa has no Otsu
    out3, m3, mask3 = fused.cross_attention_with_mask(q, k, v, idx, backend=backend)
    out4, m4 = fused.cross_attention_with_maps(q, k, v, idx, key_mask=key_mask, backend=backend)
    return out, m, out2, thr, mask, out3, m3, mask3, out4, m4


def test_compile_fullgraph_matches_eager(cpu_backend):
    q = rand(2, 2, 16, 8).requires_grad_()
    k = rand(2, 2, 6, 8, seed=1).requires_grad_()
    v = rand(2, 2, 6, 8, seed=2).requires_grad_()
    idx = torch.tensor([[0, 3], [-1, 5]])
    key_mask = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    maps = torch.rand(3, 50, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(all_ops, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, idx, key_mask, maps, cpu_backend)
    want = all_ops(q, k, v, idx, key_mask, maps, cpu_backend)
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12) if a.is_floating_point() else torch.equal(a, b)
    g_got = torch.autograd.grad(got[0].sum() + got[1].sum() + got[2].sum() + got[9].square().sum(), (q, k, v))
    g_want = torch.autograd.grad(want[0].sum() + want[1].sum() + want[2].sum() + want[9].square().sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compile_catches_bad_index_inside_graph(cpp_backend):
    """Value checks become async asserts inside a compiled graph, not graph breaks."""
    q, k = rand(1, 1, 4, 2), rand(1, 1, 3, 2, seed=1)
    f = torch.compile(lambda q, k, idx: fused.cross_attention_with_maps(q, k, k, idx)[1], fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    assert f(q, k, torch.tensor([[2]])).shape == (1, 1, 4)
    with pytest.raises(RuntimeError, match="token_index values must lie in"):
        f(q, k, torch.tensor([[3]]))
