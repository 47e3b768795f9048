"""The Triton kernels as ``torch.ops.fused_triton.*``, with the schemas of ``fused._library``.

On a GPU they are ``torch.library.triton_op``s, so torch.compile sees the kernels;
under ``TRITON_INTERPRET=1`` triton_op fails inside torch.compile, so they are plain
``custom_op``s with fake implementations. Importing this module imports triton.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _library
from ._common import INTERPRET
from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .otsu import otsu_forward

NS = "fused_triton"


def _attention(q: Tensor, k: Tensor, v: Tensor, token_index: Optional[Tensor], key_mask: Optional[Tensor],
               scale: float, head_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, maps, lse = attention_forward(q, k, v, token_index=token_index, key_mask=key_mask, scale=scale,
                                       head_mean=head_mean)
    if maps is None:
        maps = q.new_empty(_library.maps_shape(q, None, head_mean))
    return out, maps, lse


def _attention_backward(q: Tensor, k: Tensor, v: Tensor, token_index: Optional[Tensor], key_mask: Optional[Tensor],
                        out: Tensor, lse: Tensor, grad_out: Tensor, grad_maps: Optional[Tensor], scale: float,
                        head_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(q, k, v, out, lse, grad_out, scale, token_index=token_index, key_mask=key_mask,
                              grad_maps=grad_maps, head_mean=head_mean)


def _otsu_mask(maps: Tensor, bins: int, mode: str) -> tuple[Tensor, Tensor]:
    return otsu_forward(maps, bins, mode)


_library.define_python_ops(NS, {"attention": _attention, "attention_backward": _attention_backward,
                                "otsu_mask": _otsu_mask}, triton=not INTERPRET)
backend = _library.OpsBackend(NS)
