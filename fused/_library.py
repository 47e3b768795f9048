"""The compiled ops, declared once: schemas, fake implementations and autograd.

Every compiled backend is a namespace of ``torch.ops`` (``fused_cpp``,
``fused_cuda``, ``fused_triton``, ``fused_sdpa``) holding some of these ops,
with exactly these schemas::

    attention(q, k, v, token_index?, key_mask?, scale, head_mean) -> (out, maps, lse)
    attention_backward(q, k, v, token_index?, key_mask?, out, lse, grad_out, grad_maps?, scale, head_mean)
        -> (dq, dk, dv)
    otsu_mask(maps, bins, mode) -> (threshold, mask)

``attention`` is softmax attention over the visible keys (``key_mask``, bool
[B, L]; docs/ops.md §4) that also returns the probabilities of the key columns
named by ``token_index`` (int64 [B, T], -1 = no map; docs/ops.md §2): maps
[B, T, N] (``head_mean``) or [B, H, T, N]; without ``token_index`` T is 0.
lse [B, H, N] is the log-sum-exp of the scaled scores in the accumulation dtype.

A C++ library defines no schema of its own: ``define_schemas`` declares them
before it is loaded and its ``TORCH_LIBRARY_IMPL`` fills them in. A Python
backend passes its functions to ``define_python_ops``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import accumulation_dtype, otsu_compute_dtype

SCHEMAS = {
    "attention": "(Tensor q, Tensor k, Tensor v, Tensor? token_index, Tensor? key_mask, float scale, bool head_mean)"
                 " -> (Tensor out, Tensor maps, Tensor lse)",
    "attention_backward": "(Tensor q, Tensor k, Tensor v, Tensor? token_index, Tensor? key_mask, Tensor out,"
                          " Tensor lse, Tensor grad_out, Tensor? grad_maps, float scale, bool head_mean)"
                          " -> (Tensor dq, Tensor dk, Tensor dv)",
    "otsu_mask": "(Tensor maps, int bins, str mode) -> (Tensor threshold, Tensor mask)",
}
OPS = tuple(op for op in SCHEMAS if not op.endswith("_backward"))  # what backends declare and dispatch picks for

_LIBRARIES: dict[str, torch.library.Library] = {}  # a Library deregisters its ops when collected


def define_schemas(ns: str, ops: tuple[str, ...]) -> None:
    """Declare ``ops`` in namespace ``ns`` for a C++ library to implement (once per process)."""
    if ns in _LIBRARIES:
        return
    lib = torch.library.Library(ns, "DEF")
    for op in ops:
        lib.define(op + SCHEMAS[op])
    _LIBRARIES[ns] = lib
    register_fakes(ns, ops)
    if "attention" in ops:
        register_autograd(ns)


def define_python_ops(ns: str, impls: dict[str, Callable], *, triton: bool = False) -> None:
    """Declare and implement ``ns::op`` for each Python function in ``impls``.

    ``triton=True`` registers them as ``torch.library.triton_op``s, whose fake
    implementations torch derives from the kernels; otherwise as ``custom_op``s
    with the fakes below.
    """
    define = torch.library.triton_op if triton else torch.library.custom_op
    for op, fn in impls.items():
        define(f"{ns}::{op}", fn, mutates_args=(), schema=SCHEMAS[op])
    if not triton:
        register_fakes(ns, tuple(impls))
    if "attention" in impls:
        register_autograd(ns)


def _dense(t: torch.Tensor) -> torch.Tensor:
    # Kernels return contiguous tensors whatever the input strides; the fakes
    # must say so, or a compiled graph turns a later reshape into an invalid view.
    return t.new_empty(t.shape)


def maps_shape(q: torch.Tensor, token_index: torch.Tensor | None, head_mean: bool) -> tuple[int, ...]:
    """[B, T, N] or [B, H, T, N]; T = 0 without ``token_index``."""
    B, H, N, _ = q.shape
    T = 0 if token_index is None else token_index.shape[1]
    return (B, T, N) if head_mean else (B, H, T, N)


def _fake_attention(q, k, v, token_index, key_mask, scale, head_mean):
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return _dense(q), q.new_empty(maps_shape(q, token_index, head_mean)), lse


def _fake_attention_backward(q, k, v, token_index, key_mask, out, lse, grad_out, grad_maps, scale, head_mean):
    return _dense(q), _dense(k), _dense(v)


def _fake_otsu_mask(maps, bins, mode):
    thr = maps.new_empty(maps.shape[:-1], dtype=otsu_compute_dtype(maps))
    return thr, maps.new_empty(maps.shape, dtype=torch.bool)


_FAKES = {"attention": _fake_attention, "attention_backward": _fake_attention_backward, "otsu_mask": _fake_otsu_mask}


def register_fakes(ns: str, ops: tuple[str, ...]) -> None:
    for op in ops:
        torch.library.register_fake(f"{ns}::{op}", _FAKES[op])


def _refuse_double_backward(ns: str) -> None:
    """Make a gradient *of* ``ns::attention_backward`` raise.

    The hand-written backward kernels have no derivative of their own. Without
    an autograd formula a C++ op still hands out outputs with a grad_fn (torch's
    autograd-not-implemented fallback), and differentiating them gives zeros
    after a mere UserWarning: gradgradcheck and ``create_graph=True`` users got
    silent garbage. A formula that raises makes every backend say so.
    """

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fused: double backward (a second derivative, e.g. create_graph=True or gradgradcheck) is not "
            f"implemented for the compiled kernels ({ns}::attention_backward); use backend='torch' for "
            "higher-order gradients"
        )

    torch.library.register_autograd(f"{ns}::attention_backward", backward)


def register_autograd(ns: str) -> None:
    """Backward of ``ns::attention`` through ``ns::attention_backward`` (docs/ops.md §2.5, §4.4)."""
    _refuse_double_backward(ns)

    def setup(ctx, inputs, output):
        q, k, v, token_index, key_mask, scale, head_mean = inputs
        out, _, lse = output
        ctx.save_for_backward(q, k, v, token_index, key_mask, out, lse)
        ctx.scale, ctx.head_mean = scale, head_mean

    def backward(ctx, grad_out, grad_maps, _grad_lse):
        q, k, v, token_index, key_mask, out, lse = ctx.saved_tensors
        if grad_out is None:  # only the maps were used (e.g. a regulariser)
            grad_out = torch.zeros_like(out)
        if token_index is None:
            grad_maps = None
        dq, dk, dv = getattr(torch.ops, ns).attention_backward(
            q, k, v, token_index, key_mask, out, lse, grad_out, grad_maps, ctx.scale, ctx.head_mean
        )
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd(f"{ns}::attention", backward, setup_context=setup)


class OpsBackend:
    """A backend's functions over ``torch.ops.<ns>``, with the signatures of ``fused.reference``.

    Inputs are validated and the scale resolved (``fused.ops``).
    """

    def __init__(self, ns: str, upcast_half_maps: bool = False):
        self.ns = ns
        self.upcast_half_maps = upcast_half_maps

    def attention(self, q, k, v, token_index, key_mask, scale: float, head_reduce: str):
        out, maps, _ = getattr(torch.ops, self.ns).attention(q, k, v, token_index, key_mask, scale,
                                                               head_reduce == "mean")
        return out, (maps if token_index is not None else None)

    def otsu_mask(self, maps, bins: int, mode: str):
        if self.upcast_half_maps and maps.dtype in (torch.float16, torch.bfloat16):
            maps = maps.float()  # the kernel's compute dtype for half maps
        return getattr(torch.ops, self.ns).otsu_mask(maps, bins, mode)
