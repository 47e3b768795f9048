"""What every fused processor shares: its layer name, whether it records maps, and the
attention backend the user chose in diffusers for the layers that take no maps."""

from __future__ import annotations

from typing import Any

import torch


class FusedProcessor:
    """Base of the fused processors (small callables, as diffusers' own).

    ``_attention_backend`` and ``_parallel_config`` are the attributes diffusers'
    ``ModelMixin.set_attention_backend`` sets on a processor; ``attach`` carries
    them over from the processor it replaces. Layers without maps or a key mask
    run through diffusers' ``dispatch_attention_fn`` with them, so attaching
    changes nothing where no map is taken (flash, sage, xformers, ... stay).
    """

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, name: str | None = None, records_maps: bool = True):
        self.name = name
        self.records_maps = records_maps

    def plain_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Attention without maps on [B, H, N, D] projections, through diffusers' dispatcher."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=attn_mask, scale=scale, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return out.transpose(1, 2)

    def take_backend_of(self, previous: Any) -> None:
        """Keep the diffusers attention backend of the processor this one replaces."""
        self._attention_backend = getattr(previous, "_attention_backend", None)
        self._parallel_config = getattr(previous, "_parallel_config", None)
