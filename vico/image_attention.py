"""ViCo's image cross-attention blocks (docs/methods.md §2.1, §2.2) and their placement in a diffusers UNet.

Each block is a standard transformer block (self-attention, cross-attention,
GEGLU feed-forward, three LayerNorms), appended to a flagged
``Transformer2DModel``'s ``transformer_blocks`` so it runs right after the
frozen block, inside the model's own forward (no monkey-patching). The batch
it sees is ``[noisy half; reference half]``: the noisy half attends to the
reference half (the frozen block's output for the clean reference latent),
with the reference half's keys masked by the Otsu mask of the S* text
attention map of the frozen block's ``attn2`` in the same layer. The mask
comes from the forward's ``MapRequest`` (``otsu=True``), which the frozen
``attn2`` filled just before this block runs. With no request (a plain UNet
call) the block is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ImageCrossAttention", "default_image_attention_layers", "inject_image_attention", "MASK_SLOT"]

# Slot of the MapRequest's token_index whose Otsu mask gates the image
# attention: S* (or EOT when the prompt has no S*).
MASK_SLOT = 0


class ImageCrossAttention(nn.Module):
    """One ViCo image cross-attention block after a frozen transformer block.

    Args:
        dim: channels of the spatial transformer (also the keys' dim).
        num_heads, head_dim: taken from the frozen block it follows.
        source_layer: name of the frozen text cross-attention (``...attn2``)
            whose S* map masks this block's keys.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, source_layer: str):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.source_layer = source_layer
        self.block = BasicTransformerBlock(
            dim, num_heads, head_dim, cross_attention_dim=dim, activation_fn="geglu", attention_bias=False
        )
        for attn in (self.block.attn1, self.block.attn2):
            attn.fused_no_maps = True  # keys are image tokens, not text: never a text map

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """hidden_states [2B, N, C] = [noisy; reference] -> same shape.

        Signature and argument order of ``BasicTransformerBlock.forward``, so
        ``Transformer2DModel`` (and its gradient checkpointing) calls it as it
        calls the frozen block.
        """
        request = (cross_attention_kwargs or {}).get("map_request")
        mask = None if request is None else request.masks.get(self.source_layer)
        if mask is None:
            return hidden_states  # no reference branch in this forward
        if hidden_states.shape[0] % 2:
            raise ValueError(
                f"{self.source_layer}: ViCo expects a batch of [noisy; reference] halves, got batch {hidden_states.shape[0]}"
            )
        half = hidden_states.shape[0] // 2
        noisy, reference = hidden_states[:half], hidden_states[half:]
        key_mask = mask[half:, MASK_SLOT, :]  # [B, N] from the reference half's S* map
        out = self.block(noisy, encoder_hidden_states=reference, cross_attention_kwargs={"key_mask": key_mask})
        return torch.cat([out, reference], dim=0)


def _decoder_transformers(unet: nn.Module) -> list[str]:
    names = []
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        for j, _ in enumerate(getattr(block, "attentions", None) or []):
            names.append(f"up_blocks.{i}.attentions.{j}")
    return names


def default_image_attention_layers(unet: nn.Module) -> list[str]:
    """Every second spatial transformer of the decoder, as ViCo places them.

    For SD 1.x/2.x that is ``up_blocks.1.attentions.1``, ``up_blocks.2.attentions.0``,
    ``up_blocks.2.attentions.2`` and ``up_blocks.3.attentions.1``.
    """
    return _decoder_transformers(unet)[1::2]


def inject_image_attention(unet: nn.Module, layers: list[str] | None = None) -> nn.ModuleDict:
    """Add ViCo image cross-attention blocks to ``unet`` and freeze everything else.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any device, including meta).
        layers: names of the spatial transformers (``Transformer2DModel``) that get
            a block; default ``default_image_attention_layers(unet)``.

    Returns:
        the new blocks (trainable) in a ModuleDict keyed by layer name with "."
        replaced by "-"; they are also registered inside the UNet.
    """
    from fused import FusedAttnProcessor

    layers = list(layers) if layers is not None else default_image_attention_layers(unet)
    if not layers:
        raise ValueError("inject_image_attention: this UNet has no decoder spatial transformers to place blocks in")
    unet.requires_grad_(False)
    blocks = nn.ModuleDict()
    for name in layers:
        try:
            transformer = unet.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"inject_image_attention: no module {name!r} in this UNet") from exc
        frozen_blocks = getattr(transformer, "transformer_blocks", None)
        if not frozen_blocks:
            raise ValueError(f"inject_image_attention: {name!r} is not a spatial transformer (no transformer_blocks)")
        if any(isinstance(b, ImageCrossAttention) for b in frozen_blocks):
            raise ValueError(f"inject_image_attention: {name!r} already has an image attention block")
        frozen = frozen_blocks[0]
        heads = frozen.attn1.heads
        dim = frozen.attn1.to_q.out_features
        param = next(frozen.parameters())
        with torch.device(param.device):
            block = ImageCrossAttention(dim, heads, dim // heads, source_layer=f"{name}.transformer_blocks.0.attn2")
        block.to(dtype=param.dtype)
        for attn in (block.block.attn1, block.block.attn2):
            attn.set_processor(FusedAttnProcessor(records_maps=False))
        frozen_blocks.append(block)
        blocks[name.replace(".", "-")] = block
    blocks.requires_grad_(True)
    return blocks
