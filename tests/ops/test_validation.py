"""Bad input raises ValueError/TypeError naming the argument, on every op."""

import pytest
import torch

import fused

from ..conftest import rand


def qkv(B=2, H=2, N=8, L=5, D=4, dtype=torch.float32):
    return rand(B, H, N, D, dtype=dtype), rand(B, H, L, D, dtype=dtype, seed=1), rand(B, H, L, D, dtype=dtype, seed=2)


IDX = torch.tensor([[0], [1]])


@pytest.mark.parametrize(
    "change, exc, pattern",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D \[B, H, N, D\]"),
        (lambda q, k, v: (q, k[..., 0], v), ValueError, r"k must be 4-D"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"k must have shape \[B=2, H=2, L, D=4\]"),
        (lambda q, k, v: (q, k[:, :1], v[:, :1]), ValueError, r"k must have shape"),
        (lambda q, k, v: (q, k[..., :3], v[..., :3]), ValueError, r"D=4"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"v must have the same shape as k"),
        (lambda q, k, v: (q.int(), k, v), TypeError, r"q must be a floating tensor"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"k has dtype torch.float64 but q has torch.float32"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"k is on meta but q is on cpu"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"q is empty"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, r"k is empty"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q must be a torch.Tensor"),
    ],
)
def test_bad_qkv(cpu_backend, change, exc, pattern):
    q, k, v = change(*qkv())
    with pytest.raises(exc, match=pattern):
        fused.cross_attention_with_maps(q, k, v, IDX, backend=cpu_backend)
    with pytest.raises(exc, match=pattern):
        fused.masked_attention(q, k, v, torch.ones(2, 5, dtype=torch.bool), backend=cpu_backend)


@pytest.mark.parametrize(
    "idx, exc, pattern",
    [
        (torch.tensor([[0.0], [1.0]]), TypeError, r"token_index must be an integer tensor"),
        (torch.tensor([[True], [False]]), TypeError, r"token_index must be an integer tensor"),
        (torch.tensor([0, 1]), ValueError, r"token_index must have shape \[B=2, T\]"),
        (torch.tensor([[0], [1], [2]]), ValueError, r"token_index must have shape \[B=2, T\]"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"token_index is empty"),
        (torch.tensor([[0], [5]]), ValueError, r"token_index values must lie in \[-1, 4\]"),
        (torch.tensor([[0], [-2]]), ValueError, r"token_index values must lie in \[-1, 4\]"),
        (torch.tensor([[0], [1]], device="meta"), ValueError, r"token_index is on meta"),
    ],
)
def test_bad_token_index(cpu_backend, idx, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fused.cross_attention_with_maps(*qkv(), idx, backend=cpu_backend)


def test_int32_token_index_is_accepted(cpu_backend):
    q, k, v = qkv()
    a = fused.cross_attention_with_maps(q, k, v, IDX.int(), backend=cpu_backend)
    b = fused.cross_attention_with_maps(q, k, v, IDX, backend=cpu_backend)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(head_reduce="sum"), ValueError, r"head_reduce must be one of"),
        (dict(scale=float("nan")), ValueError, r"scale must be finite"),
        (dict(scale="0.1"), TypeError, r"scale must be a Python number"),
        (dict(backend="cuda"), ValueError, r"backend 'cuda' does not implement attention"),
        (dict(backend="nope"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_options(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fused.cross_attention_with_maps(*qkv(), IDX, **kwargs)


@pytest.mark.parametrize(
    "mask, exc, pattern",
    [
        (torch.ones(2, 5), TypeError, r"key_mask must be a bool tensor \[B=2, L=5\]"),
        (torch.ones(2, 4, dtype=torch.bool), ValueError, r"key_mask must have shape \[B=2, L=5\]"),
        (torch.ones(1, 2, 5, dtype=torch.bool), ValueError, r"key_mask must have shape"),
        (torch.ones(2, 5, dtype=torch.bool, device="meta"), ValueError, r"key_mask is on meta"),
        ([[True] * 5] * 2, TypeError, r"key_mask must be a torch.Tensor"),
    ],
)
def test_bad_key_mask(cpu_backend, mask, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fused.masked_attention(*qkv(), mask, backend=cpu_backend)


@pytest.mark.parametrize(
    "maps, kwargs, exc, pattern",
    [
        (torch.tensor([[0.1, float("nan")]]), {}, ValueError, r"maps contains NaN or Inf"),
        (torch.tensor([[0.1, float("inf")]]), {}, ValueError, r"maps contains NaN or Inf"),
        (torch.tensor([[-float("inf"), 0.1]]), {}, ValueError, r"maps contains NaN or Inf"),
        (torch.tensor([[0.1, 0.2], [float("nan"), 0.3]]).half(), {}, ValueError, r"maps contains NaN or Inf"),
        (torch.tensor([[0.1, 0.2], [0.5, float("nan")]]).bfloat16(), {}, ValueError, r"maps contains NaN or Inf"),
        (torch.ones(3, 4, dtype=torch.int64), {}, TypeError, r"maps must be a floating tensor"),
        (torch.ones(3, 0), {}, ValueError, r"maps is empty"),
        (torch.tensor(1.0), {}, ValueError, r"maps must have at least one dim"),
        (torch.rand(3, 4), dict(bins=1), ValueError, r"bins must be >= 2"),
        (torch.rand(3, 4), dict(bins=2.5), TypeError, r"bins must be an int"),
        (torch.rand(3, 4), dict(mode="otsu"), ValueError, r"mode must be one of"),
        (torch.rand(3, 4), dict(backend="cuda"), ValueError, r"backend 'cuda' does not run on cpu"),
    ],
)
def test_bad_otsu_input(otsu_backend, maps, kwargs, exc, pattern):
    kwargs.setdefault("backend", otsu_backend)
    with pytest.raises(exc, match=pattern):
        fused.otsu_mask(maps, **kwargs)


def test_validate_flag_checks_index_values(cpu_backend):
    with pytest.raises(ValueError, match="token_index values"):
        fused.cross_attention_with_maps(*qkv(), torch.tensor([[0], [7]]), backend=cpu_backend, validate=True)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(mode="otsu"), ValueError, r"mode must be one of"),
        (dict(bins=1), ValueError, r"bins must be >= 2"),
        (dict(bins="10"), TypeError, r"bins must be an int"),
    ],
)
def test_bad_mask_options(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fused.cross_attention_with_mask(*qkv(), IDX, **kwargs)
