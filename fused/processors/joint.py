"""Map-extracting processors for joint (MMDiT) attention: SD3 and FLUX.

Image and text tokens attend in one sequence, so an image-token -> text-token
map is a block of the (N+L)² probability matrix — which today's tools
materialise. Here the same fused op as for UNets runs on the joint sequence
with the chosen text columns (shifted to their joint positions), and the map
rows of the image queries are returned: [B, T, N] (head-averaged) or
[B, H, T, N]. Outputs equal diffusers' ``JointAttnProcessor2_0`` (SD3: image
tokens first) and ``FluxAttnProcessor`` (FLUX: text tokens first, rotary
embeddings, double- and single-stream blocks).

For FLUX single-stream blocks the text is already inside ``hidden_states``;
set ``MapRequest.text_len`` (the number of text tokens) to get maps there.
diffusers is imported only when a FLUX processor is called.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import cross_attention_with_maps
from .base import FusedProcessor
from .unet import MapRequest


def _key_mask(name: str | None, mask: torch.Tensor, batch: int, total: int) -> torch.Tensor:
    """bool [B, S] from a boolean key mask ``[B, 1, 1, S]`` (e.g. padded text)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise NotImplementedError(f"{name}: maps need no attention mask or a boolean key mask [B, 1, 1, S]; "
                                  f"got {mask.dtype} {tuple(mask.shape)}")
    return mask[:, 0, 0].expand(batch, total)


def joint_attention(processor: FusedProcessor, query, key, value, scale: float, request: MapRequest | None,
                    text_start: int, text_len: int, image_rows: slice,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over the joint sequence [B, H, S, D]; records image->text maps when asked.

    The text keys are ``key[:, :, text_start:text_start + text_len]``; the maps
    keep the query rows ``image_rows``. ``attention_mask`` goes to SDPA as is
    when no maps are recorded; with maps it must be a boolean key mask
    ``[B, 1, 1, S]`` (HunyuanVideo's padded text), the op's ``key_mask``: a map
    of a hidden text token is zero, its probability.
    """
    name = processor.name
    if request is None or not processor.records_maps or not request.wants(name) or text_len <= 0:
        return processor.plain_attention(query, key, value, attn_mask=attention_mask, scale=scale)
    index = request.token_index.to(query.device)
    if index.device.type == "cpu" and bool((index >= text_len).any()):  # would point at image tokens
        raise ValueError(f"token_index has positions >= the {text_len} text tokens of {name} "
                         f"(largest: {int(index.max())})")
    joint_index = torch.where(index >= 0, index + text_start, index)
    key_mask = None if attention_mask is None else _key_mask(name, attention_mask, query.shape[0], key.shape[2])
    out, m = cross_attention_with_maps(query, key, value, joint_index, key_mask=key_mask, scale=scale,
                                       head_reduce=request.head_reduce, backend=request.backend)
    request.maps[name or "<unnamed>"] = m[..., image_rows]
    return out


class FusedJointAttnProcessor(FusedProcessor):
    """Drop-in for diffusers' SD3 ``JointAttnProcessor2_0`` (image tokens, then text)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, map_request: MapRequest | None = None,
                 *args: Any, **kwargs: Any):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def split(x):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_image = query.shape[2]
        text_len = 0
        if encoder_hidden_states is not None:
            eq = split(attn.add_q_proj(encoder_hidden_states))
            ek = split(attn.add_k_proj(encoder_hidden_states))
            ev = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            text_len = eq.shape[2]
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        hidden_states = joint_attention(self, query, key, value, attn.scale, map_request,
                                        text_start=n_image, text_len=text_len, image_rows=slice(0, n_image))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FusedFluxAttnProcessor(FusedProcessor):
    """Drop-in for diffusers' ``FluxAttnProcessor`` (text tokens first, rotary embeddings)."""


    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 map_request: MapRequest | None = None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: attention masks are not supported by FusedFluxAttnProcessor")
        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
        else:  # single-stream block: the text is the prefix of hidden_states
            text_len = getattr(map_request, "text_len", None) or 0
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
        out = joint_attention(self, q, k, v, attn.head_dim ** -0.5, map_request, text_start=0,
                              text_len=text_len, image_rows=slice(text_len, None))
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states
