"""ViCo's image cross-attention blocks (docs/methods.md §2.1, §2.2) and their placement in a diffusers UNet.

Each block is a standard transformer block (self-attention, cross-attention,
GEGLU feed-forward, three LayerNorms), placed in a flagged
``Transformer2DModel``'s ``transformer_blocks`` so it runs right after the
frozen block, inside the model's own forward (no monkey-patching). A spatial
transformer with several frozen blocks (SDXL) runs its one image block after
each of them, as the official ``SpatialTransformer`` loop does: the same
weights, each time masked by the S* map of the frozen block just before it
(``ImageBlockRepeat`` after every frozen block but the last). The batch
it sees is ``[noisy half; reference half]``: the noisy half attends to the
reference half (the frozen block's output for the clean reference latent),
with the reference half's keys masked by the Otsu mask of the S* text
attention map of the frozen block's ``attn2`` in the same layer. The mask
comes from the forward's ``MapRequest`` (``otsu=True``), which the frozen
``attn2`` filled just before this block runs. With no request (a plain UNet
call) the block is the identity.

After the last flagged transformer nothing reads the reference half (only its
maps and the frozen blocks' outputs feed the noisy half, through the image
blocks), so ``ReferenceEarlyStop`` — forward hooks, no patched forward — drops
the reference rows there: later resnets, attention, upsamplers and ``conv_out``
run on the noisy half only, and such a forward returns the noisy half.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["ImageBlockRepeat", "ImageCrossAttention", "default_image_attention_layers", "image_block_sources",
           "inject_image_attention", "MASK_SLOT", "ReferenceEarlyStop"]

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
        return self.attend(hidden_states, cross_attention_kwargs, self.source_layer)

    def attend(self, hidden_states: torch.Tensor, cross_attention_kwargs: dict | None,
               source_layer: str) -> torch.Tensor:
        """The block on [noisy; reference] with the reference keys masked by ``source_layer``'s Otsu mask."""
        request = (cross_attention_kwargs or {}).get("map_request")
        mask = None if request is None else request.masks.get(source_layer)
        if mask is None:
            return hidden_states  # no reference branch in this forward
        if hidden_states.shape[0] % 2:
            raise ValueError(
                f"{source_layer}: ViCo expects a batch of [noisy; reference] halves, got batch {hidden_states.shape[0]}"
            )
        half = hidden_states.shape[0] // 2
        noisy, reference = hidden_states[:half], hidden_states[half:]
        key_mask = mask[half:, MASK_SLOT, :]  # [B, N] from the reference half's S* map
        out = self.block(noisy, encoder_hidden_states=reference, cross_attention_kwargs={"key_mask": key_mask})
        return torch.cat([out, reference], dim=0)


class ImageBlockRepeat(nn.Module):
    """The flagged transformer's image block once more, after an earlier frozen block.

    Holds no parameters: it calls ``image_block`` (kept out of the module tree, so
    the UNet's parameters and state dict list the block once) with the Otsu mask
    of ``source_layer``, the frozen block right before it.
    """

    def __init__(self, image_block: ImageCrossAttention, source_layer: str):
        super().__init__()
        self.__dict__["image_block"] = image_block  # not a submodule: the weights are the block's own
        self.source_layer = source_layer

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        return self.image_block.attend(hidden_states, cross_attention_kwargs, self.source_layer)


def image_block_sources(unet: nn.Module, layers: list[str]) -> list[str]:
    """Every ``attn2`` whose Otsu mask an image block (or a repeat) of ``layers`` reads, in forward order."""
    return [b.source_layer for name in layers for b in unet.get_submodule(name).transformer_blocks
            if isinstance(b, (ImageCrossAttention, ImageBlockRepeat))]


def decoder_transformers(unet: nn.Module) -> list[str]:
    """Names of every spatial transformer of the decoder (``up_blocks.i.attentions.j``), in forward order."""
    names = []
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        for j, _ in enumerate(getattr(block, "attentions", None) or []):
            names.append(f"up_blocks.{i}.attentions.{j}")
    return names


def spatial_transformers(unet: nn.Module) -> list[str]:
    """Names of every spatial transformer of the UNet: encoder, middle block and decoder, in forward order."""
    names = []
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        names += [f"down_blocks.{i}.attentions.{j}" for j, _ in enumerate(getattr(block, "attentions", None) or [])]
    mid = getattr(getattr(unet, "mid_block", None), "attentions", None) or []
    return names + [f"mid_block.attentions.{j}" for j, _ in enumerate(mid)] + decoder_transformers(unet)


def default_image_attention_layers(unet: nn.Module) -> list[str]:
    """Every second spatial transformer of the decoder, as ViCo places them.

    For SD 1.x/2.x that is ``up_blocks.1.attentions.1``, ``up_blocks.2.attentions.0``,
    ``up_blocks.2.attentions.2`` and ``up_blocks.3.attentions.1``.
    """
    return decoder_transformers(unet)[1::2]


def inject_image_attention(unet: nn.Module, layers: list[str] | None = None) -> nn.ModuleDict:
    """Add ViCo image cross-attention blocks to ``unet`` and freeze everything else.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any device, including meta).
        layers: names of the spatial transformers (``Transformer2DModel``) that get
            a block; default ``default_image_attention_layers(unet)``.

    Returns:
        the new blocks (trainable) in a ModuleDict keyed by layer name with "."
        replaced by "-"; they are also registered inside the UNet. In a transformer
        with k > 1 frozen blocks the list becomes [frozen, repeat, ..., frozen, block]:
        frozen block i moves to ``transformer_blocks.{2i}`` (load base weights before
        injecting), and the block's ``source_layer`` is the last frozen block's ``attn2``.
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
        if any(isinstance(b, (ImageCrossAttention, ImageBlockRepeat)) for b in frozen_blocks):
            raise ValueError(f"inject_image_attention: {name!r} already has an image attention block")
        frozen = frozen_blocks[0]
        depth = len(frozen_blocks)
        heads = frozen.attn1.heads
        dim = frozen.attn1.to_q.out_features
        param = next(frozen.parameters())
        with torch.device(param.device):
            block = ImageCrossAttention(dim, heads, dim // heads,
                                        source_layer=f"{name}.transformer_blocks.{2 * (depth - 1)}.attn2")
        block.to(dtype=param.dtype)
        for attn in (block.block.attn1, block.block.attn2):
            attn.set_processor(FusedAttnProcessor(records_maps=False))
        placed = []
        for i, frozen_block in enumerate(list(frozen_blocks)):
            placed.append(frozen_block)
            placed.append(block if i == depth - 1 else
                          ImageBlockRepeat(block, source_layer=f"{name}.transformer_blocks.{2 * i}.attn2"))
        transformer.transformer_blocks = nn.ModuleList(placed)
        blocks[name.replace(".", "-")] = block
    blocks.requires_grad_(True)
    return blocks


def _first_half(value, batch: int):
    """``value``'s first ``batch`` rows if it is a tensor (or a tuple/list of them) of 2x``batch`` rows."""
    if isinstance(value, torch.Tensor):
        return value[:batch] if value.dim() > 0 and value.shape[0] == 2 * batch else value
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_first_half(v, batch) for v in value)
    return value


def _follow_noisy_half(module, args, kwargs, keep=("hidden_states",)):
    """Pre-hook of the modules after the stop: the hidden states already hold the noisy
    half only; cut every other batch-carrying input (encoder_hidden_states, the skip
    tensors, masks; not those named in ``keep``) that still holds both halves to the
    same rows. Decided by the inputs alone, so a gradient-checkpointing recomputation
    cuts the same way; a no-op when the hidden states and the other inputs agree
    (every forward without the stop)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        return None
    b = hidden.shape[0]
    args = (args[0],) + tuple(_first_half(a, b) for a in args[1:]) if args else args
    kwargs = {k: (v if k in keep else _first_half(v, b)) for k, v in kwargs.items()}
    return args, kwargs


def _follow_noisy_half_but_temb(module, args, kwargs):
    # Up blocks after the stop: their resnets cut the time embedding themselves (ReferenceEarlyStop._resnet_pre).
    return _follow_noisy_half(module, args, kwargs, keep=("hidden_states", "temb"))


class ReferenceEarlyStop:
    """Stops ViCo's reference half after the last flagged spatial transformer.

    ViCo's UNet batch is ``[noisy; reference]``. The reference half's output after
    the last flagged layer is never used, so this cuts it there, with forward
    hooks on the UNet's own modules (``UNet2DConditionModel.forward`` is not
    patched; ``remove()`` takes the hooks off):

    1. a pre-hook on the up block holding the last flagged transformer
       ``up_blocks.i.attentions.j`` cuts to their noisy half the skip tensors that
       only its resnets after position ``j`` consume (diffusers' up blocks pop
       ``res_hidden_states_tuple`` from the end, one per resnet);
    2. a forward hook on that transformer keeps the noisy half of its output;
    3. pre-hooks on everything after it — the block's later transformers and
       every later up block — cut ``encoder_hidden_states``, masks and skip
       tensors to the hidden states' rows (``_follow_noisy_half``); each later
       resnet projects the time embedding of every row, as without the stop
       (a 1-row matrix product would round differently from a 2-row one), and
       keeps the noisy rows of the projection; the upsamplers,
       ``conv_norm_out`` and ``conv_out`` see the noisy half only.

    Such a forward returns the **noisy half only** (``[B, ...]`` for a
    ``[2B, ...]`` input). It applies when ``enabled`` and the forward's
    ``map_request`` asks for the Otsu mask of the last flagged layer's
    ``attn2`` (the condition under which its image block runs) and for no
    map of any layer after it (a request for every layer keeps both halves);
    any other forward is unchanged. The noisy half, the loss and the gradients
    equal the uncut forward's up to the rounding of kernels whose blocking
    depends on the batch size (within 1e-12 in float64 and 1e-6 in float32:
    tests/methods/test_reference_early_stop.py). In float32 on CPU the SD 1.5 UNet's
    noisy half, loss and gradients come out bit-for-bit; the tiny test UNets'
    32->4 ``conv_out`` rounds differently for 1 row than for 2 (up to 9e-7). Do not flip ``enabled`` between a
    forward and its backward when gradient checkpointing is on (the
    recomputation must cut as the forward did).

    When the last flagged transformer is not in ``up_blocks`` (a custom
    placement in the encoder or mid block) no hooks are installed
    (``installed`` is False) and forwards are unchanged.
    """

    def __init__(self, unet: nn.Module, layers: list[str]):
        self.enabled = True
        self.handles = []
        self.installed = False
        pattern = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)")
        placed = [tuple(map(int, m.groups())) for m in map(pattern.fullmatch, layers) if m is not None]
        others = [name for name in layers if pattern.fullmatch(name) is None]
        if not placed or any(name.startswith("up_blocks.") for name in others):
            return  # the encoder and mid block run before every up block; anything else: left alone
        i, j = max(placed)
        block = unet.up_blocks[i]
        resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
        if len(resnets) != len(attentions):
            return  # not a diffusers CrossAttnUpBlock2D layout: leave the forward alone
        transformer = attentions[j]
        image_blocks = [b for b in transformer.transformer_blocks if isinstance(b, ImageCrossAttention)]
        if not image_blocks:
            raise ValueError(f"ReferenceEarlyStop: up_blocks.{i}.attentions.{j} has no image attention block")
        self.last_layer = f"up_blocks.{i}.attentions.{j}"
        self.source_layer = image_blocks[0].source_layer
        self.late_skips = len(resnets) - 1 - j  # skip tensors consumed after the stop: the first ones of the tuple
        later = [f"up_blocks.{i}.attentions.{k}." for k in range(j + 1, len(attentions))]
        later += [f"up_blocks.{k}." for k in range(i + 1, len(unet.up_blocks))]
        self.later_layers = frozenset(  # attention layers after the stop, by processor name
            key.removesuffix(".processor") for key in unet.attn_processors if key.startswith(tuple(later)))
        self._temb_rows = {}  # time_emb_proj -> rows to keep of its output, set by its resnet's pre-hook
        hook = self.handles.append
        hook(block.register_forward_pre_hook(self._cut_skips, with_kwargs=True))
        hook(transformer.register_forward_hook(self._cut_output, with_kwargs=True))
        for mod in attentions[j + 1:]:
            hook(mod.register_forward_pre_hook(_follow_noisy_half, with_kwargs=True))
        for mod in unet.up_blocks[i + 1:]:
            hook(mod.register_forward_pre_hook(_follow_noisy_half_but_temb, with_kwargs=True))
        later_resnets = resnets[j + 1:] + [m for b in unet.up_blocks[i + 1:] for m in b.modules()
                                            if hasattr(m, "time_emb_proj")]
        for mod in later_resnets:
            hook(mod.register_forward_pre_hook(self._resnet_pre, with_kwargs=True))
            if getattr(mod, "time_emb_proj", None) is not None:
                hook(mod.time_emb_proj.register_forward_hook(self._cut_temb_projection))
        self.installed = True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.installed = False

    def applies(self, cross_attention_kwargs: dict | None, batch: int) -> bool:
        """Whether a forward with these ``cross_attention_kwargs`` and this batch is cut."""
        request = (cross_attention_kwargs or {}).get("map_request")
        return (self.enabled and batch % 2 == 0 and request is not None and request.otsu
                and request.wants(self.source_layer) and not any(request.wants(n) for n in self.later_layers))

    def _cut_skips(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self.late_skips or not self.applies(kwargs.get("cross_attention_kwargs"), hidden.shape[0]):
            return None
        half = hidden.shape[0] // 2
        key = "res_hidden_states_tuple"
        skips = kwargs[key] if key in kwargs else args[1]
        skips = tuple(s[:half] for s in skips[: self.late_skips]) + tuple(skips[self.late_skips:])
        if key in kwargs:
            kwargs = {**kwargs, key: skips}
        else:
            args = (args[0], skips) + tuple(args[2:])
        return args, kwargs

    def _resnet_pre(self, module, args, kwargs):
        proj = getattr(module, "time_emb_proj", None)
        self._temb_rows.pop(proj, None)  # nothing stale from a forward that raised
        hidden = args[0] if args else kwargs.get("input_tensor")
        temb = args[1] if len(args) > 1 else kwargs.get("temb")
        if not isinstance(hidden, torch.Tensor) or not isinstance(temb, torch.Tensor) \
                or temb.shape[0] != 2 * hidden.shape[0]:
            return None
        if proj is None:
            return _follow_noisy_half(module, args, kwargs, keep=("input_tensor",))
        self._temb_rows[proj] = hidden.shape[0]  # project every row, keep the noisy ones
        return None

    def _cut_temb_projection(self, module, args, output):
        rows = self._temb_rows.pop(module, None)
        return None if rows is None else output[:rows]

    def _cut_output(self, module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if not self.applies(kwargs.get("cross_attention_kwargs"), sample.shape[0]):
            return None
        noisy = sample[: sample.shape[0] // 2]
        if isinstance(output, tuple):
            return (noisy,) + tuple(output[1:])
        return type(output)(sample=noisy)

