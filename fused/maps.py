"""DAAM-style token heat maps of a generation, without materialising attention.

    with fused.maps.trace(pipe, prompt, ["cat", "hat"]) as tr:
        image = pipe(prompt).images[0]
    heat = tr.heatmaps()            # {"cat": [h, w], "hat": [h, w]}, normalised to [0, 1]

``trace`` installs the fused processors on the pipeline's denoiser (a UNet:
``FusedAttnProcessor``; an SD3 or FLUX transformer: the joint-attention
processors, image->text block only) and a forward pre-hook (removed on exit)
that passes a ``MapRequest`` into every call;
each call's per-layer maps of the prompt's tokens (all sub-tokens of each
word) are upsampled to the largest map size and summed over layers and
timesteps. Under classifier-free guidance only the conditional half asks for
maps (the other rows cost nothing). ``layers`` and ``timesteps`` filter what
is aggregated.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .joint_processor import FusedFluxAttnProcessor, FusedJointAttnProcessor
from .processor import FusedAttnProcessor, MapRequest, attach, cross_attention_layers


def word_token_positions(tokenizer, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """Positions of every sub-token of each word in the tokenised prompt (with specials)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    positions = {}
    for word in words:
        sub = tokenizer(word, add_special_tokens=False).input_ids
        found = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]
        if not found:
            raise ValueError(f"word {word!r} does not occur in the prompt {prompt!r}")
        positions[word] = [found[0] + j for j in range(len(sub))]
    return positions


@dataclass
class MapTrace:
    positions: dict[str, list[int]]
    layers: list[str]
    timesteps: tuple[float, float] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0

    def heatmaps(self) -> dict[str, torch.Tensor]:
        """Per word, the summed map [side, side] normalised to [0, 1] (first prompt of the batch)."""
        out = {}
        for word, total in self.sums.items():
            m = total[0]
            out[word] = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
        return out

    def _slots(self) -> list[int]:
        return [p for word in self.positions for p in self.positions[word]]

    def request(self, batch: int, cond_rows: slice, text_len: int | None = None) -> MapRequest:
        slots = torch.tensor(self._slots())
        index = torch.full((batch, len(slots)), -1, dtype=torch.long)
        index[cond_rows] = slots
        return MapRequest(index, layers=self.layers, text_len=text_len)

    def add(self, request: MapRequest, cond_rows: slice) -> None:
        side = max(int(round(m.shape[-1] ** 0.5)) for m in request.maps.values())
        per_slot = 0
        for maps in request.maps.values():
            m = maps[cond_rows].detach().float()  # [b, T, N]
            s = int(round(m.shape[-1] ** 0.5))
            m = F.interpolate(m.reshape(m.shape[0], m.shape[1], s, s), size=(side, side), mode="bilinear",
                              align_corners=False)
            per_slot = per_slot + m
        start = 0
        for word, pos in self.positions.items():
            word_map = per_slot[:, start:start + len(pos)].sum(1)  # all sub-tokens
            start += len(pos)
            self.sums[word] = self.sums.get(word, 0) + word_map.cpu()
        self.calls += 1


@contextmanager
def trace(pipe, prompt: str, words: list[str], layers: list[str] | None = None,
          timesteps: tuple[float, float] | None = None, guided: bool = True):
    """Record aggregated maps of ``words`` while ``pipe`` (SD 1.x/2.x, SDXL, SD3 or FLUX) generates ``prompt``.

    ``layers``: substrings selecting cross-attention layers (default all);
    ``timesteps``: (low, high) range of the scheduler's timesteps to aggregate;
    ``guided``: the pipeline runs classifier-free guidance, so each UNet batch is
    [uncond; cond] and only the second half is traced.
    """
    if getattr(pipe, "unet", None) is not None:
        model, processor, kwarg, tokenizer = pipe.unet, FusedAttnProcessor, "cross_attention_kwargs", pipe.tokenizer
        names = cross_attention_layers(model)
    elif getattr(pipe, "transformer", None) is not None:
        model = pipe.transformer
        flux = "Flux" in type(model).__name__
        processor = FusedFluxAttnProcessor if flux else FusedJointAttnProcessor
        kwarg = "joint_attention_kwargs"
        tokenizer = pipe.tokenizer_2 if flux else pipe.tokenizer  # FLUX's text stream is T5; SD3's starts with CLIP
        names = [n.removesuffix(".processor") for n in model.attn_processors]
    else:
        raise ValueError(f"{type(pipe).__name__}: no UNet or transformer to trace")
    if layers:
        names = [n for n in names if any(sel in n for sel in layers)]
        if not names:
            raise ValueError(f"no attention layer matches {layers}")
    tr = MapTrace(word_token_positions(tokenizer, prompt, words), names, timesteps)
    previous = model.attn_processors
    attach(model, processor)

    pending: list = []

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t_value = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if tr.timesteps and not (tr.timesteps[0] <= t_value <= tr.timesteps[1]):
            return None
        batch = sample.shape[0]
        cond = slice(batch // 2, batch) if guided else slice(0, batch)
        text = kwargs.get("encoder_hidden_states")
        request = tr.request(batch, cond, text_len=None if text is None else text.shape[1])
        kwargs[kwarg] = dict(kwargs.get(kwarg) or {}, map_request=request)
        pending.append((request, cond))
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        while pending:
            tr.add(*pending.pop())

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True),
               model.register_forward_hook(post_hook, with_kwargs=True)]
    try:
        yield tr
    finally:
        for h in handles:
            h.remove()
        model.set_attn_processor(previous)
