"""A drop-in diffusers attention processor on the fused ops, and map requests.

``FusedAttnProcessor`` replaces diffusers' ``AttnProcessor2_0`` for self- and
cross-attention. With no maps requested it runs the same projections and
``scaled_dot_product_attention``, so a UNet's output is unchanged. Maps are
asked for explicitly, per forward::

    request = fused.MapRequest(token_index)             # int64 [B, T], -1 = no map
    unet(x, t, text, cross_attention_kwargs={"map_request": request})
    request.maps["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]   # [B, T, N]

The layers it names run ``fused.cross_attention_with_maps`` instead (one pass,
no attention matrix) and record their maps, with autograd, as soon as they
have run — a later module of the same forward (ViCo's image attention, a
regulariser) can read them. Under gradient checkpointing the recomputation
records again and overwrites.

Nothing here imports diffusers: the processor only uses the ``attn`` module
it is called with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection

import torch

from ..ops import cross_attention_with_mask, cross_attention_with_maps, masked_attention, otsu_mask
from .base import FusedProcessor

__all__ = ["MapRequest", "FusedAttnProcessor", "attach", "cross_attention_layers"]


@dataclass
class MapRequest:
    """Which layers record token attention maps, for which token positions.

    Attributes:
        token_index: int64 [B, T] key positions per batch row of the batch the
            model sees (-1 = no map for that slot: no work, zeros).
        layers: layer names (processor names without ``.processor``, e.g.
            ``"mid_block.attentions.0.transformer_blocks.0.attn2"``) or None for
            every cross-attention layer.
        head_reduce: "mean" -> maps [B, T, N]; "none" -> [B, H, T, N].
        otsu: also threshold each recorded map with Otsu ("vico" mode, head
            mean only) in the same call; masks land in ``masks``.
        backend: the ``fused`` backend the layers run on (None = automatic).
        text_len: number of text tokens at the start of a joint sequence (FLUX
            single-stream blocks, where the processor cannot see it).
        maps, masks: filled as the layers run, keyed by layer name.
    """

    token_index: torch.Tensor
    layers: Collection[str] | None = None
    head_reduce: str = "mean"
    otsu: bool = False
    backend: str | None = None
    text_len: int | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.otsu and self.head_reduce != "mean":
            raise ValueError("MapRequest: otsu=True needs head_reduce='mean' (masks are of head-averaged maps)")
        if self.layers is not None:
            self.layers = frozenset(self.layers)

    def wants(self, layer: str | None) -> bool:
        if self.layers is None:
            return True
        return layer is not None and layer in self.layers


def cross_attention_layers(model: torch.nn.Module) -> list[str]:
    """Names of the text cross-attention layers (``...attn2``) of a diffusers model."""
    return [
        name
        for name, module in model.named_modules()
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
        and not getattr(module, "fused_no_maps", False)
    ]


class FusedAttnProcessor(FusedProcessor):
    """Drop-in replacement for ``AttnProcessor2_0`` that can also return maps.

    Besides ``map_request`` it accepts ``key_mask`` (bool [B, L]) for
    cross-attention: keys with False are hidden (``fused.masked_attention``;
    a row with no visible key attends uniformly) — ViCo's image attention.

    Args:
        name: the layer's name, used to match ``MapRequest.layers`` and as the
            key of recorded maps; ``attach`` sets it. An unnamed processor
            records under the name ``"<unnamed>"`` when the request is for all layers.
        records_maps: False for cross-attention layers whose keys are not text
            tokens (an owner marks such modules with ``fused_no_maps = True``).
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        map_request: MapRequest | None = None,
        key_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attention(attn, query, key, value, attention_mask, is_cross, map_request, key_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attention(self, attn, query, key, value, attention_mask, is_cross: bool, map_request: MapRequest | None,
                  key_mask: torch.Tensor | None) -> torch.Tensor:
        """The attention core on [B, H, N, D] projections (what baselines override)."""
        wants_maps = self.wants_maps(is_cross, map_request)
        if (wants_maps or (key_mask is not None and is_cross)) and attention_mask is not None:
            raise NotImplementedError(f"{self.name}: an attention_mask cannot be combined with maps or key_mask")
        if wants_maps:
            return self._attention_with_maps(attn, query, key, value, map_request, key_mask if is_cross else None)
        if key_mask is not None and is_cross:
            return masked_attention(query, key, value, key_mask, scale=attn.scale)
        return self.plain_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

    def wants_maps(self, is_cross: bool, map_request: MapRequest | None) -> bool:
        return map_request is not None and is_cross and self.records_maps and map_request.wants(self.name)

    def _attention_with_maps(self, attn, query, key, value, request: MapRequest,
                             key_mask: torch.Tensor | None) -> torch.Tensor:
        name = self.name or "<unnamed>"
        index = request.token_index
        if index.device != query.device:
            index = index.to(query.device)
        if request.otsu and key_mask is None:
            out, maps, mask = cross_attention_with_mask(
                query, key, value, index, scale=attn.scale, backend=request.backend
            )
            request.masks[name] = mask
        else:
            out, maps = cross_attention_with_maps(
                query, key, value, index, key_mask=key_mask, scale=attn.scale,
                head_reduce="mean" if request.otsu else request.head_reduce, backend=request.backend
            )
            if request.otsu:
                request.masks[name] = otsu_mask(maps.detach(), backend=request.backend)[1]
        request.maps[name] = maps
        return out


def attach(model: torch.nn.Module, processor_class: type = FusedAttnProcessor) -> dict[str, FusedAttnProcessor]:
    """Install a named ``FusedAttnProcessor`` on every attention layer of a diffusers model.

    ``processor_class`` may be a subclass (the benchmarks' baselines override
    ``attention``). Returns the processors by layer name (the keys
    ``MapRequest.layers`` uses).
    """
    processors = {}
    for key in model.attn_processors:
        name = key.removesuffix(".processor")
        module = model.get_submodule(name)
        processors[key] = processor_class(name, records_maps=not getattr(module, "fused_no_maps", False))
        processors[key].take_backend_of(module.processor)
    model.set_attn_processor(processors)
    return {p.name: p for p in processors.values()}
