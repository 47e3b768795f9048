"""The PyTorch reference against an independent float64 computation.

The independent versions loop explicitly (exp, sum, divide) over the chosen
columns, so a mistake in the batched gather/indexing of the reference shows up.
"""

import pytest
import torch

from fused import reference

from ..conftest import rand


def explicit_attention(q, k, v, scale, visible=None):
    s = torch.einsum("bhnd,bhld->bhnl", q, k) * scale
    if visible is not None:
        # The paper's code: a large finite negative, so an all-hidden row is uniform.
        s = torch.where(visible[:, None, None, :], s, torch.full_like(s, -torch.finfo(s.dtype).max))
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    p = e / e.sum(dim=-1, keepdim=True)
    return torch.einsum("bhnl,bhld->bhnd", p, v), p


def explicit_maps(p, token_index, mean):
    B, H, N, _ = p.shape
    T = token_index.shape[1]
    maps = torch.zeros(B, H, T, N, dtype=p.dtype)
    for b in range(B):
        for t in range(T):
            j = int(token_index[b, t])
            if j >= 0:
                maps[b, :, t, :] = p[b, :, :, j]
    return maps.mean(1) if mean else maps


@pytest.mark.parametrize("D", [40, 80, 160])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_attention_with_maps_matches_explicit(D, head_reduce):
    B, H, N, L = 2, 3, 24, 77
    q, k, v = rand(B, H, N, D, seed=1), rand(B, H, L, D, seed=2), rand(B, H, L, D, seed=3)
    idx = torch.tensor([[5, -1, 5, 76], [0, 12, -1, -1]])  # duplicates and empty slots
    scale = D ** -0.5
    out, maps = reference.attention_with_maps(q, k, v, idx, scale, head_reduce)
    want_out, p = explicit_attention(q, k, v, scale)
    want_maps = explicit_maps(p, idx, head_reduce == "mean")
    assert maps.shape == ((B, 4, N) if head_reduce == "mean" else (B, H, 4, N))
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(maps, want_maps, rtol=1e-12, atol=1e-12)
    # -1 slots are exactly zero
    assert torch.all(maps[1, ..., 2, :] == 0) if head_reduce == "mean" else torch.all(maps[1, :, 2] == 0)


def test_masked_attention_matches_explicit_including_fully_masked_row():
    B, H, N, L, D = 3, 2, 10, 33, 16
    q, k, v = rand(B, H, N, D, seed=4), rand(B, H, L, D, seed=5), rand(B, H, L, D, seed=6)
    visible = torch.rand(B, L, generator=torch.Generator().manual_seed(0)) > 0.5
    visible[1] = False  # uniform attention
    visible[2] = True
    out = reference.masked_attention(q, k, v, visible, 0.25)
    want, _ = explicit_attention(q, k, v, 0.25, visible)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], v[1].mean(dim=1, keepdim=True).expand(H, N, D), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_spec_backward_formula_equals_autograd(head_reduce):
    """The written-out backward of docs/ops.md §2.5 (what the kernels implement) equals autograd
    through the reference, including duplicate and -1 indices."""
    B, H, N, L, D = 2, 2, 12, 9, 8
    q = rand(B, H, N, D, seed=7).requires_grad_()
    k = rand(B, H, L, D, seed=8).requires_grad_()
    v = rand(B, H, L, D, seed=9).requires_grad_()
    idx = torch.tensor([[3, 3, -1], [8, 0, 2]])
    scale = 0.37
    out, maps = reference.attention_with_maps(q, k, v, idx, scale, head_reduce)
    d_out, d_maps = rand(*out.shape, seed=10), rand(*maps.shape, seed=11)
    dq, dk, dv = torch.autograd.grad((out * d_out).sum() + (maps * d_maps).sum(), (q, k, v))

    with torch.no_grad():
        p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        c = 1.0 / H if head_reduce == "mean" else 1.0
        dm = d_maps[:, None].expand(B, H, -1, N) if head_reduce == "mean" else d_maps  # [B,H,T,N]
        dp = d_out @ v.transpose(-1, -2)
        drow = (d_out * out).sum(-1)
        for b in range(B):
            for t in range(idx.shape[1]):
                j = int(idx[b, t])
                if j < 0:
                    continue
                dp[b, :, :, j] += c * dm[b, :, t, :]
                drow[b] += c * dm[b, :, t, :] * p[b, :, :, j]
        ds = p * (dp - drow[..., None])
        torch.testing.assert_close(dq, scale * ds @ k, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dk, scale * ds.transpose(-1, -2) @ q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dv, p.transpose(-1, -2) @ d_out, rtol=1e-10, atol=1e-12)


def test_minus_one_slots_get_no_gradient():
    q = rand(1, 2, 6, 4, seed=1).requires_grad_()
    k = rand(1, 2, 5, 4, seed=2).requires_grad_()
    v = rand(1, 2, 5, 4, seed=3)
    _, maps = reference.attention_with_maps(q, k, v, torch.tensor([[-1, -1]]), 0.5, "mean")
    dq, dk = torch.autograd.grad(maps.sum(), (q, k), allow_unused=True)
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
