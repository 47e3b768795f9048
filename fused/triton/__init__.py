"""The Triton backend: kernels in attention_fwd.py, attention_bwd.py and otsu.py.

Registered as ``torch.ops.fused_triton.*`` with the op schemas shared by every
compiled backend (fused/_library.py). On a GPU they are ``torch.library.triton_op``s,
so torch.compile sees the kernels; under ``TRITON_INTERPRET=1`` triton_op fails
inside torch.compile, so they are plain ``custom_op``s with fake implementations.
Importing this module imports triton; ``import fused`` does not.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _library
from ._common import INTERPRET
from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .otsu import otsu_forward

_define = torch.library.custom_op if INTERPRET else torch.library.triton_op
NS = "fused_triton"


@_define(f"{NS}::attention_with_maps", mutates_args=())
def _attention_with_maps(q: Tensor, k: Tensor, v: Tensor, token_index: Tensor, scale: float,
                         head_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, maps, lse = attention_forward(q, k, v, token_index=token_index, scale=scale, head_mean=head_mean)
    return out, maps, lse


@_define(f"{NS}::attention_with_maps_backward", mutates_args=())
def _attention_with_maps_backward(q: Tensor, k: Tensor, v: Tensor, token_index: Tensor, out: Tensor, lse: Tensor,
                                  grad_out: Tensor, grad_maps: Optional[Tensor], scale: float,
                                  head_mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(q, k, v, out, lse, grad_out, scale, token_index=token_index,
                              grad_maps=grad_maps, head_mean=head_mean)


@_define(f"{NS}::masked_attention", mutates_args=())
def _masked_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, _, lse = attention_forward(q, k, v, key_mask=key_mask, scale=scale)
    return out, lse


@_define(f"{NS}::masked_attention_backward", mutates_args=())
def _masked_attention_backward(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, out: Tensor, lse: Tensor,
                               grad_out: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(q, k, v, out, lse, grad_out, scale, key_mask=key_mask)


@_define(f"{NS}::otsu_mask", mutates_args=())
def _otsu_mask(maps: Tensor, bins: int, mode: str) -> tuple[Tensor, Tensor]:
    return otsu_forward(maps, bins, mode)


if INTERPRET:  # triton_op derives its fake implementation from the kernels
    _library.register_fakes(NS)
_library.register_autograd(NS)

backend = _library.OpsBackend(NS)
