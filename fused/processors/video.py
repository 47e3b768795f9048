"""Map-extracting processors for diffusers' video transformers: Wan, CogVideoX, HunyuanVideo (docs/ops.md §7.2).

Each class is a drop-in for the model's own diffusers processor (same
projections, norms, rotary embeddings and masks, so the transformer's output
is unchanged) and, asked by a ``MapRequest``, runs the fused op of
``joint.py`` on the layer's text columns and stores the video-query rows of
the maps in ``request.maps[name]``: ``[B, T, N]`` (head mean) or
``[B, H, T, N]``, with ``N = frames x height x width`` latent patches in the
transformer's own order (frame-major, then rows, then columns).

- ``FusedWanAttnProcessor`` (``WanAttnProcessor``): self-attention ``attn1``
  (never maps) and cross-attention ``attn2`` from the video to the T5 text.
  In I2V models ``attn2`` also attends, in a separate softmax whose output is
  added, to the CLIP image context (the first ``S - 512`` keys); that part is
  computed exactly as diffusers does but not mapped: the maps are those of
  the text softmax, and token positions count from the first text token.
- ``FusedCogVideoXAttnProcessor`` (``CogVideoXAttnProcessor2_0``): joint
  attention over ``[text | video]``, rotary embedding on the video part only.
- ``FusedHunyuanVideoAttnProcessor`` (``HunyuanVideoAttnProcessor2_0``):
  dual-stream (``transformer_blocks``) and single-stream
  (``single_transformer_blocks``) blocks over ``[video | text]``, with the
  model's key mask that hides padded text; a map of a padded position is zero.

How the request reaches the layers: CogVideoX passes ``attention_kwargs`` on
to its attention layers, Wan and HunyuanVideo do not. ``attach_video(model)``
therefore installs the processors and a forward pre-hook that hands
``attention_kwargs["map_request"]`` of each call to them (and takes it back
after the call), so for all three::

    fused.processors.video.attach_video(transformer)
    request = fused.MapRequest(token_index)            # T5 / LLaMA text positions
    transformer(..., attention_kwargs={"map_request": request})
    request.maps["blocks.0.attn2"]                      # Wan: [B, T, F*h*w]

Under gradient checkpointing the backward's recomputation does not record
again (the request has been taken back by then); the maps of the forward stay.
diffusers is imported only when a processor is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .base import FusedProcessor
from .joint import joint_attention
from .unet import MapRequest

__all__ = ["FusedWanAttnProcessor", "FusedCogVideoXAttnProcessor", "FusedHunyuanVideoAttnProcessor", "VideoFamily",
           "video_family", "video_grid", "attach_video"]

WAN_TEXT_LEN = 512  # what WanAttnProcessor assumes for I2V: the text is the last 512 keys


class _VideoProcessor(FusedProcessor):
    """A fused processor that also holds the request handed over by ``attach_video``'s hook."""

    def __init__(self, name: str | None = None, records_maps: bool = True):
        super().__init__(name, records_maps)
        self.map_request: MapRequest | None = None

    def _request(self, map_request: MapRequest | None) -> MapRequest | None:
        return map_request if map_request is not None else self.map_request

    def _attend(self, q, k, v, request, text_start: int, text_len: int, video_rows: slice, mask=None):
        """``joint_attention`` on [B, H, S, D] with the default scale D ** -0.5 (what diffusers' SDPA uses)."""
        return joint_attention(self, q, k, v, q.shape[-1] ** -0.5, request, text_start=text_start,
                               text_len=text_len, image_rows=video_rows, attention_mask=mask)


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [B, S, H, D] (interleaved pairs), as in ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


class FusedWanAttnProcessor(_VideoProcessor):
    """Drop-in for diffusers' ``WanAttnProcessor`` (``attn1``: video self-attention; ``attn2``: video -> T5 text)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None,
                 map_request: MapRequest | None = None, **kwargs: Any) -> torch.Tensor:
        from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

        image_context = None
        if attn.add_k_proj is not None:  # I2V: [CLIP image context | 512 text tokens]
            n_image = encoder_hidden_states.shape[1] - WAN_TEXT_LEN
            image_context, encoder_hidden_states = encoder_hidden_states[:, :n_image], encoder_hidden_states[:, n_image:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]

        image_out = None
        if image_context is not None:  # its own softmax, added to the text attention's output; not mapped
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            value_img = value_img.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            image_out = self.plain_attention(q, key_img, value_img).transpose(1, 2).flatten(2, 3)
            image_out = image_out.type_as(query)

        cross = encoder_hidden_states is not None
        out = self._attend(q, k, v, self._request(map_request) if cross else None, text_start=0,
                           text_len=k.shape[2] if cross else 0, video_rows=slice(None), mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))


class FusedCogVideoXAttnProcessor(_VideoProcessor):
    """Drop-in for diffusers' ``CogVideoXAttnProcessor2_0`` (joint ``[text | video]``, rotary on the video)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 map_request: MapRequest | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            def rotate(t):
                return torch.cat([t[:, :, :text_len], apply_rotary_emb(t[:, :, text_len:], image_rotary_emb)], 2)

            query = rotate(query)
            if not attn.is_cross_attention:
                key = rotate(key)
        out = self._attend(query, key, value, self._request(map_request), text_start=0, text_len=text_len,
                           video_rows=slice(text_len, None), mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


class FusedHunyuanVideoAttnProcessor(_VideoProcessor):
    """Drop-in for diffusers' ``HunyuanVideoAttnProcessor2_0`` (``[video | text]``, padded text masked)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 map_request: MapRequest | None = None):
        from diffusers.models.embeddings import apply_rotary_emb

        n_video = hidden_states.shape[1]
        if attn.add_q_proj is None and encoder_hidden_states is not None:  # single-stream: one projection
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # the video tokens only
            def rotate(t):
                return torch.cat([apply_rotary_emb(t[:, :n_video], image_rotary_emb, sequence_dim=1), t[:, n_video:]],
                                 1)

            query, key = rotate(query), rotate(key)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # dual-stream: the text's own
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self._attend(q, k, v, self._request(map_request), text_start=n_video, text_len=text_len,
                           video_rows=slice(0, n_video), mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, encoder_hidden_states
        out, encoder_hidden_states = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return out, encoder_hidden_states


@dataclass(frozen=True)
class VideoFamily:
    """How one video transformer class is traced.

    Attributes:
        processor: the fused processor class.
        installs: which attention layers get it (others — HunyuanVideo's text refiner — keep theirs).
        maps: which of those record maps (Wan: the cross-attention ``attn2`` only).
        name: short family name ("wan", "cogvideox", "hunyuan_video").
    """

    name: str
    processor: type
    installs: Callable[[str], bool]
    maps: Callable[[str], bool]


_FAMILIES = {
    "WanTransformer3DModel": VideoFamily("wan", FusedWanAttnProcessor, lambda n: n.startswith("blocks."),
                                         lambda n: n.endswith(".attn2")),
    "CogVideoXTransformer3DModel": VideoFamily("cogvideox", FusedCogVideoXAttnProcessor,
                                               lambda n: n.startswith("transformer_blocks."), lambda n: True),
    "HunyuanVideoTransformer3DModel": VideoFamily(
        "hunyuan_video", FusedHunyuanVideoAttnProcessor,
        lambda n: n.startswith(("transformer_blocks.", "single_transformer_blocks.")), lambda n: True),
}


def video_family(model: torch.nn.Module) -> VideoFamily | None:
    """The family of a diffusers video transformer (by class name), None for any other model."""
    return _FAMILIES.get(type(model).__name__)


def video_grid(model: torch.nn.Module, sample: torch.Tensor) -> tuple[int, int, int]:
    """(frames, height, width) in latent patches of the transformer's input ``sample``.

    Wan and HunyuanVideo take ``[B, C, F, H, W]``, CogVideoX ``[B, F, C, H, W]``;
    each divides by its patch sizes as its patch embedding does (``F // p_t``).
    """
    config, family = model.config, video_family(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a supported video transformer")
    if family.name == "wan":
        p_t, p_h, p_w = config.patch_size
        frames, height, width = sample.shape[2:]
    else:
        p_t, p_h = getattr(config, "patch_size_t", None) or 1, config.patch_size
        p_w = p_h
        frames, height, width = (sample.shape[1], *sample.shape[3:]) if family.name == "cogvideox" else sample.shape[2:]
    return int(frames) // p_t, int(height) // p_h, int(width) // p_w


def _hand_over(module, args, kwargs):
    request = (kwargs.get("attention_kwargs") or {}).get("map_request")
    for processor in module.attn_processors.values():
        if isinstance(processor, _VideoProcessor):
            processor.map_request = request


def _take_back(module, args, kwargs, output):
    for processor in module.attn_processors.values():
        if isinstance(processor, _VideoProcessor):
            processor.map_request = None


def attach_video(model: torch.nn.Module) -> dict[str, _VideoProcessor]:
    """Install the family's fused processor on a video transformer's attention layers.

    Returns the processors by layer name. Layers outside the family's blocks
    (HunyuanVideo's text refiner) keep their processors. The first call also
    registers the hooks that hand ``attention_kwargs["map_request"]`` to the
    processors for one forward; they do nothing once other processors are set.
    """
    family = video_family(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a supported video transformer (Wan, CogVideoX, "
                         "HunyuanVideo)")
    processors, installed = {}, {}
    for key, current in model.attn_processors.items():
        name = key.removesuffix(".processor")
        if family.installs(name):
            fused_processor = family.processor(name, records_maps=family.maps(name))
            fused_processor.take_backend_of(current)
            installed[name] = current = fused_processor
        processors[key] = current
    model.set_attn_processor(processors)
    if not getattr(model, "_fused_hand_over", False):
        model.register_forward_pre_hook(_hand_over, with_kwargs=True)
        model.register_forward_hook(_take_back, with_kwargs=True)
        model._fused_hand_over = True
    return installed
