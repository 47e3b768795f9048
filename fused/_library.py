"""What every compiled backend shares: op schemas' fake implementations,
autograd, and the uniform backend functions over ``torch.ops.<namespace>``.

A compiled backend (C++ in ``fused_cpp``, Triton in ``fused_triton``) defines
the same five ops with the same schemas::

    attention_with_maps(q, k, v, token_index, float scale, bool head_mean) -> (out, maps, lse)
    attention_with_maps_backward(q, k, v, token_index, out, lse, grad_out, grad_maps?, scale, head_mean)
        -> (dq, dk, dv)
    masked_attention(q, k, v, key_mask, float scale) -> (out, lse)
    masked_attention_backward(q, k, v, key_mask, out, lse, grad_out, scale) -> (dq, dk, dv)
    otsu_mask(maps, int bins, str mode) -> (threshold, mask)

and this module gives them fake (meta) implementations for ``torch.compile``
and the backward of docs/ops.md §2.5 and §4.4 through the ``*_backward`` ops.
"""

from __future__ import annotations

import torch

from .reference import accumulation_dtype, otsu_compute_dtype


def register_otsu_fake(qualname: str) -> None:
    @torch.library.register_fake(qualname)
    def _(maps, bins, mode):
        thr = maps.new_empty(maps.shape[:-1], dtype=otsu_compute_dtype(maps))
        return thr, maps.new_empty(maps.shape, dtype=torch.bool)


def _dense(t: torch.Tensor) -> torch.Tensor:
    # Kernels return contiguous tensors whatever the input strides; the fakes
    # must say so, or a compiled graph turns a later reshape into an invalid view.
    return t.new_empty(t.shape)


def register_fakes(ns: str) -> None:
    """Fake implementations of the five ops of namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::attention_with_maps")
    def _(q, k, v, token_index, scale, head_mean):
        B, H, N, _ = q.shape
        T = token_index.shape[1]
        maps_shape = (B, T, N) if head_mean else (B, H, T, N)
        return _dense(q), q.new_empty(maps_shape), q.new_empty((B, H, N), dtype=accumulation_dtype(q.dtype))

    @torch.library.register_fake(f"{ns}::attention_with_maps_backward")
    def _(q, k, v, token_index, out, lse, grad_out, grad_maps, scale, head_mean):
        return _dense(q), _dense(k), _dense(v)

    @torch.library.register_fake(f"{ns}::masked_attention")
    def _(q, k, v, key_mask, scale):
        return _dense(q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))

    @torch.library.register_fake(f"{ns}::masked_attention_backward")
    def _(q, k, v, key_mask, out, lse, grad_out, scale):
        return _dense(q), _dense(k), _dense(v)

    register_otsu_fake(f"{ns}::otsu_mask")


BACKWARD_OPS = ("attention_with_maps_backward", "masked_attention_backward")


def _refuse_double_backward(ns: str, op: str) -> None:
    """Make a gradient *of* the first-order backward op ``ns::op`` raise.

    The hand-written backward kernels have no derivative of their own. Without
    an autograd formula a C++ op still hands out outputs with a grad_fn (torch's
    autograd-not-implemented fallback), and differentiating them gives zeros
    after a mere UserWarning: gradgradcheck and ``create_graph=True`` users got
    silent garbage. A formula that raises makes every backend say so.
    """

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fused: double backward (a second derivative, e.g. create_graph=True or gradgradcheck) is not "
            f"implemented for the compiled kernels ({ns}::{op}); use backend='torch' for higher-order gradients"
        )

    torch.library.register_autograd(f"{ns}::{op}", backward)


def register_autograd(ns: str) -> None:
    """Backward of the two attention ops of ``ns`` through its ``*_backward`` ops,
    which themselves refuse to be differentiated again."""
    ops = getattr(torch.ops, ns)
    for op in BACKWARD_OPS:
        _refuse_double_backward(ns, op)

    def maps_setup(ctx, inputs, output):
        q, k, v, token_index, scale, head_mean = inputs
        out, _, lse = output
        ctx.save_for_backward(q, k, v, token_index, out, lse)
        ctx.scale, ctx.head_mean = scale, head_mean

    def maps_backward(ctx, grad_out, grad_maps, _grad_lse):
        q, k, v, token_index, out, lse = ctx.saved_tensors
        if grad_out is None:  # only the maps were used (e.g. a regulariser)
            grad_out = torch.zeros_like(out)
        dq, dk, dv = ops.attention_with_maps_backward(
            q, k, v, token_index, out, lse, grad_out, grad_maps, ctx.scale, ctx.head_mean
        )
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(f"{ns}::attention_with_maps", maps_backward, setup_context=maps_setup)

    def masked_setup(ctx, inputs, output):
        q, k, v, key_mask, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.scale = scale

    def masked_backward(ctx, grad_out, _grad_lse):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.masked_attention_backward(q, k, v, key_mask, out, lse, grad_out, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd(f"{ns}::masked_attention", masked_backward, setup_context=masked_setup)


class OpsBackend:
    """The backend functions ``fused._dispatch`` calls, over ``torch.ops.<ns>``.

    Signatures are those of ``fused.reference``: validated inputs, resolved scale.
    """

    def __init__(self, ns: str, upcast_half_maps: bool = False):
        self.ns = ns
        self.upcast_half_maps = upcast_half_maps

    def attention_with_maps(self, q, k, v, token_index, scale: float, head_reduce: str):
        out, maps, _ = getattr(torch.ops, self.ns).attention_with_maps(q, k, v, token_index, scale, head_reduce == "mean")
        return out, maps

    def masked_attention(self, q, k, v, key_mask, scale: float):
        out, _ = getattr(torch.ops, self.ns).masked_attention(q, k, v, key_mask, scale)
        return out

    def otsu_mask(self, maps, bins: int, mode: str):
        if self.upcast_half_maps and maps.dtype in (torch.float16, torch.bfloat16):
            maps = maps.float()  # the kernel's compute dtype for half maps
        return getattr(torch.ops, self.ns).otsu_mask(maps, bins, mode)
