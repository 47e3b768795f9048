"""fused: attention with fused attention-map extraction, Otsu masks and key-masked attention.

Public API (contracts: docs/ops.md §1)::

    out, maps = fused.cross_attention_with_maps(q, k, v, token_index)
    threshold, mask = fused.otsu_mask(maps)
    out, maps, mask = fused.cross_attention_with_mask(q, k, v, token_index)
    out = fused.masked_attention(q, k, v, key_mask)
    fused.available_backends()   # e.g. ['torch', 'cpp']
    fused.attach(unet); unet(..., cross_attention_kwargs={"map_request": fused.MapRequest(idx)})

Importing this package imports neither diffusers nor triton.
"""

from ._dispatch import available_backends, default_device
from .ops import cross_attention_with_mask, cross_attention_with_maps, masked_attention, otsu_mask
from .processors import FusedAttnProcessor, FusedCogVideoXAttnProcessor, FusedFluxAttnProcessor, \
    FusedHunyuanVideoAttnProcessor, FusedJointAttnProcessor, FusedWanAttnProcessor, MapRequest, attach, attach_video, \
    cross_attention_layers

__version__ = "0.1.0"

__all__ = [
    "FusedAttnProcessor",
    "FusedCogVideoXAttnProcessor",
    "FusedFluxAttnProcessor",
    "FusedHunyuanVideoAttnProcessor",
    "FusedJointAttnProcessor",
    "FusedWanAttnProcessor",
    "MapRequest",
    "attach",
    "attach_video",
    "available_backends",
    "default_device",
    "cross_attention_layers",
    "cross_attention_with_maps",
    "cross_attention_with_mask",
    "masked_attention",
    "otsu_mask",
]
