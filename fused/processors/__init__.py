"""Diffusers attention processors on the fused ops (apart from the op core in ``fused/ops.py``).

- ``unet``: ``FusedAttnProcessor`` for UNets (SD 1.x/2.x, SDXL), ``MapRequest``,
  ``attach`` and ``cross_attention_layers``.
- ``joint``: ``FusedJointAttnProcessor`` (SD3) and ``FusedFluxAttnProcessor``
  (FLUX) for joint image+text attention.
- ``video``: ``FusedWanAttnProcessor``, ``FusedCogVideoXAttnProcessor`` and
  ``FusedHunyuanVideoAttnProcessor`` for video transformers, ``attach_video``.

``fused.maps`` builds on them: ``trace(pipe, prompt, words)``, token heat maps of a
whole generation.

Nothing here imports diffusers at import time.
"""

from .joint import FusedFluxAttnProcessor, FusedJointAttnProcessor
from .unet import FusedAttnProcessor, MapRequest, attach, cross_attention_layers
from .video import FusedCogVideoXAttnProcessor, FusedHunyuanVideoAttnProcessor, FusedWanAttnProcessor, attach_video

__all__ = ["FusedAttnProcessor", "FusedCogVideoXAttnProcessor", "FusedFluxAttnProcessor",
           "FusedHunyuanVideoAttnProcessor", "FusedJointAttnProcessor", "FusedWanAttnProcessor", "MapRequest", "attach",
           "attach_video", "cross_attention_layers"]
