"""The composed backend ``"sdpa"``: torch's own fused attention for ``out`` and the
log-sum-exp, the chosen columns' probabilities from them (docs/dispatch.md §3).

Forward: ``out, lse`` from torch's private fused kernels (CPU flash; on CUDA flash
for fp16/bf16 without a mask, memory-efficient otherwise), then for the T chosen
keys ``p = exp(scale · q·k_t − lse)``, an [N, T] product. Backward: ``out``'s
gradient from torch's fused backward; the maps' gradient is exact too:
with g = dmaps ⊙ p and c = Σ_t g (per query row),

    dq += scale · (g k_T − c · Σ_l p_l k_l)        Σ_l p_l k_l: attention with V = K
    dk += scale · (scatter_T(gᵀ q) − Pᵀ (c ⊙ q))   Pᵀ y: the dV of a fused backward

so nothing of size B·H·N·L is allocated, forward or backward.

The recomputed score rounds differently from the ones the kernel summed into
lse; where Cauchy–Schwarz cannot bound that difference within the maps'
rounding budget, ``SdpaBackend.attention`` hands the call to the next exact
backend with a warning (once), as the C++ route does (docs/ops.md §2.4).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library
from ._registry import FLOATS, Refusal, register_backend
from .reference import accumulation_dtype

NS = "fused_sdpa"

# |p_recomputed - p_kernel| <= ~2 eps * bound; the maps may move this much (float32: the
# C++ route's budget, csrc/attention_cpu.cpp). Half inputs are scored in float32 and returned
# in half, so their budget is half an ulp of the result.
ROUNDING_BUDGET = {torch.float64: 3e-5, torch.float32: 3e-5, torch.float16: 2.0 ** -12, torch.bfloat16: 2.0 ** -9}


def _visible(k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """k and v with hidden rows zeroed (a NaN there must not reach anything), and
    ``attended`` bool [B, L]: the keys each batch row attends (all of them in a row
    that hides every key, docs/ops.md §4.3). ``attended`` is None without a mask."""
    if key_mask is None:
        return k, v, None
    attended = key_mask | ~key_mask.any(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(key_mask[:, None, :, None], k, zero), torch.where(attended[:, None, :, None], v, zero), attended


def _additive_mask(attended: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """[B, 1, 1, L]: 0 where attended, -inf elsewhere (what the fused kernels take)."""
    if attended is None:
        return None
    zeros = torch.zeros(attended.shape, dtype=dtype, device=attended.device)
    return zeros.masked_fill(~attended, float("-inf"))[:, None, None, :]


def _pad_head_dim(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Zero-pad the last dim to a multiple of 8, where torch's CUDA kernels need it (scores unchanged)."""
    D = tensors[0].shape[-1]
    pad = -D % 8
    return tensors if pad == 0 else tuple(F.pad(t, (0, pad)) for t in tensors)


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, attended: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    B, H, N, D = q.shape
    qp, kp, vp = _pad_head_dim(q, k, v)
    if attended is None and q.dtype in (torch.float16, torch.bfloat16):
        res = torch.ops.aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, False, False, scale=scale)
    else:
        bias = None
        if attended is not None:  # the efficient kernel wants the bias's rows 16-element aligned
            L = k.shape[2]
            storage = torch.zeros((B, 1, 1, L + (-L % 16)), dtype=q.dtype, device=q.device)
            storage[..., :L].masked_fill_(~attended[:, None, None, :], float("-inf"))
            bias = storage[..., :L].expand(B, H, N, L)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(qp, kp, vp, bias, True, 0.0, False, scale=scale)
    return res[0][..., :D].contiguous(), res[1][..., :N].contiguous()


def fused_forward(q: Tensor, k: Tensor, v: Tensor, attended: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """out [B, H, N, D] and lse [B, H, N] (float32, float64 for float64) from torch's fused kernels."""
    if q.device.type == "cuda":
        return _cuda_forward(q, k, v, attended, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=_additive_mask(attended, q.dtype), scale=scale)
    return out, lse.contiguous()


def fused_backward(q: Tensor, k: Tensor, v: Tensor, attended: Optional[Tensor], out: Tensor, lse: Tensor,
                   grad_out: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``fused_forward``'s out, from torch's fused backward."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=_additive_mask(attended, q.dtype), scale=scale)
    return recomputed_backward(q, k, v, attended, grad_out, scale)


def recomputed_backward(q: Tensor, k: Tensor, v: Tensor, attended: Optional[Tensor], grad_out: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The same gradients through autograd over ``F.scaled_dot_product_attention`` (one more
    forward; torch picks a fused kernel, never the materialising one, for these inputs)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in _pad_head_dim(q, k, v)]
        mask = None if attended is None else attended[:, None, None, :]
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
        grads = torch.autograd.grad(out, leaves, _pad_head_dim(grad_out)[0])
    D = q.shape[-1]
    return tuple(g[..., :D] for g in grads)


def _chosen_columns(k: Tensor, token_index: Tensor, attended: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """k_T [B, H, T, D] (the chosen keys) and keep bool [B, T] (slot named and its key attended)."""
    B, H = k.shape[:2]
    cols = token_index.clamp(min=0)
    batch = torch.arange(B, device=k.device)[:, None, None]
    heads = torch.arange(H, device=k.device)[None, :, None]
    k_t = k[batch, heads, cols[:, None, :]]
    keep = token_index >= 0
    if attended is not None:
        keep = keep & attended.gather(1, cols)
    return k_t, keep


def chosen_probabilities(q: Tensor, k_t: Tensor, keep: Tensor, lse: Tensor, scale: float) -> Tensor:
    """p [B, H, T, N] = exp(scale · k_t·q − lse) in the accumulation dtype; 0 where not ``keep``.

    One [T, D] x [D, N] product per head, shifted by lse in the same call: its rows are the maps' rows."""
    acc = accumulation_dtype(q.dtype)
    B, H, N, D = q.shape
    T = k_t.shape[2]
    shift = lse.to(acc).reshape(B * H, 1, N).expand(B * H, T, N)
    p = torch.baddbmm(shift, k_t.to(acc).reshape(B * H, T, D), q.to(acc).reshape(B * H, N, D).transpose(1, 2),
                      beta=-1, alpha=scale).exp_().view(B, H, T, N)
    return p.masked_fill_(~keep[:, None, :, None], 0.0)


def _attention(q: Tensor, k: Tensor, v: Tensor, token_index: Optional[Tensor], key_mask: Optional[Tensor],
               scale: float, head_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    kv, vv, attended = _visible(k, v, key_mask)
    out, lse = fused_forward(q, kv, vv, attended, scale)
    if token_index is None:
        return out, q.new_zeros(_library.maps_shape(q, None, head_mean)), lse
    k_t, keep = _chosen_columns(kv, token_index, attended)
    p = chosen_probabilities(q, k_t, keep, lse, scale)  # [B, H, T, N]
    maps = p.mean(dim=1) if head_mean else p
    return out, maps.to(q.dtype), lse


def _attention_backward(q: Tensor, k: Tensor, v: Tensor, token_index: Optional[Tensor], key_mask: Optional[Tensor],
                        out: Tensor, lse: Tensor, grad_out: Tensor, grad_maps: Optional[Tensor], scale: float,
                        head_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    kv, vv, attended = _visible(k, v, key_mask)
    dq, dk, dv = fused_backward(q, kv, vv, attended, out, lse, grad_out, scale)
    if token_index is not None and grad_maps is not None:
        dq_maps, dk_maps = _maps_backward(q, kv, vv, token_index, attended, out, lse, grad_maps, scale, head_mean)
        dq, dk = dq + dq_maps, dk + dk_maps
    if key_mask is not None:  # hidden rows entered as zeros: exact zero gradients
        zero = torch.zeros((), dtype=dk.dtype, device=dk.device)
        dk = torch.where(key_mask[:, None, :, None], dk, zero)
        dv = torch.where(attended[:, None, :, None], dv, zero)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _maps_backward(q: Tensor, k: Tensor, v: Tensor, token_index: Tensor, attended: Optional[Tensor], out: Tensor,
                   lse: Tensor, grad_maps: Tensor, scale: float, head_mean: bool) -> tuple[Tensor, Tensor]:
    """The maps' share of dq and dk (module docstring), in q's dtype."""
    B, H, N, D = q.shape
    acc = accumulation_dtype(q.dtype)
    k_t, keep = _chosen_columns(k, token_index, attended)
    p = chosen_probabilities(q, k_t, keep, lse, scale)  # [B, H, T, N]
    dm = grad_maps.to(acc)
    dm = (dm[:, None] / H).expand(B, H, *dm.shape[1:]) if head_mean else dm  # [B, H, T, N]
    g = dm * p  # [B, H, T, N]
    c = g.sum(dim=2).unsqueeze(-1)  # [B, H, N, 1]
    weighted_keys, _ = fused_forward(q, k, k, attended, scale)  # Σ_l p_l k_l
    dq = scale * (g.transpose(-1, -2) @ k_t.to(acc) - c * weighted_keys.to(acc))
    y = (c * q.to(acc)).to(q.dtype)
    _, _, pt_y = fused_backward(q, k, v, attended, out, lse, y, scale)  # Pᵀ (c ⊙ q)
    cols = token_index.clamp(min=0)[:, None, :, None].expand(B, H, token_index.shape[1], D)
    dk = (-scale * pt_y.to(acc)).scatter_add(2, cols, scale * (g @ q.to(acc)))
    return dq.to(q.dtype), dk.to(q.dtype)


@torch.no_grad()
def _scores_bound(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float) -> float:
    """scale · max|q_n| · max|k_l| over visible keys: bounds every score (Cauchy–Schwarz)."""
    k_norms = torch.linalg.vector_norm(k.to(accumulation_dtype(k.dtype)), dim=-1)  # [B, H, L]
    if key_mask is not None:
        k_norms = torch.where(key_mask[:, None, :], k_norms, torch.zeros((), dtype=k_norms.dtype, device=k.device))
    q_norm = torch.linalg.vector_norm(q.to(accumulation_dtype(q.dtype)), dim=-1).amax()
    return abs(scale) * float(q_norm * k_norms.amax())


def within_rounding_budget(bound: float, dtype: torch.dtype) -> bool:
    """True when scores bounded by ``bound`` recompute within ``ROUNDING_BUDGET`` of the kernel's."""
    eps = torch.finfo(accumulation_dtype(dtype)).eps
    return math.isfinite(bound) and 2 * eps * bound <= ROUNDING_BUDGET[dtype]


class SdpaBackend:
    """The backend functions (signatures of ``fused.reference``)."""

    @staticmethod
    def attention(q, k, v, token_index, key_mask, scale: float, head_reduce: str):
        # The bound is one host sync on CUDA; a graph being traced takes the fast route.
        bound = 0.0 if token_index is None or torch.compiler.is_compiling() else _scores_bound(q, k, key_mask, scale)
        if not within_rounding_budget(bound, q.dtype):
            from . import _dispatch

            name = _dispatch.resolve("attention", q.device.type, q.dtype, None, exclude=("sdpa",))
            _warn_once(f"fused: scores up to {bound:.3g} are too large for the sdpa "
                       f"backend's maps to keep their rounding budget; the {name} backend computes this call")
            return _dispatch.implementation(name).attention(q, k, v, token_index, key_mask, scale, head_reduce)
        needs_graph = torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        # The registered op carries autograd and the fake for torch.compile; plain calls skip its dispatch (~0.5 ms)
        op = torch.ops.fused_sdpa.attention if needs_graph else _attention
        out, maps, _ = op(q, k, v, token_index, key_mask, scale, head_reduce == "mean")
        return out, (maps if token_index is not None else None)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=5)


@register_backend(
    "sdpa", devices={"cpu", "cuda"}, dtypes={"attention": FLOATS},
    refusals=(Refusal("attention", torch.float64, "cuda", "torch's fused CUDA attention has no float64 kernel"),),
    self_checked=True, note="torch's fused attention + the chosen columns from its log-sum-exp",
)
def sdpa_backend() -> SdpaBackend:
    _library.define_python_ops(NS, {"attention": _attention, "attention_backward": _attention_backward})
    return SdpaBackend()
