"""CatVersion (arXiv 2311.14631): learned key/value vectors concatenated in the
last self-attention layers of the frozen CLIP text encoder (docs/methods.md §4).

In each of the last three ``CLIPAttention`` layers one learned key and one
learned value vector (hidden size each) are prepended to the projected keys
and values, visible to every token: 6 vectors, 4,608 parameters for CLIP-L.
The attention module is swapped for ``PrefixKVAttention`` (which reuses the
original projections) and swapped back by ``remove_prefix_kv``. On
transformers 5.x the encoder's SDPA path runs with ``is_causal=True`` and no
mask, so the prefix needs an explicit [L, L+1] mask: causal over the tokens,
the prefix column visible to all. As in the official code (its ``modeling_clip.py``
concatenates ``torch.ones`` for the prefix column of the *additive* causal mask)
the prefix key gets a +1 logit for every token (``PREFIX_LOGIT_BIAS``), so
official adapters load as the same function.

Sampling as the official ``txt2img_generator.py``/``run.sh``: guidance scale 10
and the unconditional branch is the plain encoding of "" with the prefixes off.

On SDXL both text encoders get prefixes, in the last three layers whose output the UNet reads: SDXL
takes the *penultimate* hidden states, so the layers before each encoder's last one (CLIP-L layers 8-10,
OpenCLIP-bigG 28-30, counted from 0; 12,288 parameters). Encoder 2's modules are named with
``text_encoder_2.`` in ``prefix_layers`` and in the saved tensors' names (docs/methods.md §10).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Components, Conditioning, UserError
from .base import Method, MethodConfig, MethodOptions


PREFIX_LOGIT_BIAS = 1.0  # the official additive mask's torch.ones in the prefix column


class PrefixKVAttention(nn.Module):
    """A CLIP self-attention with one learned key/value prepended (after projection).

    ``enabled = False`` runs the original attention (no prefix), e.g. for the
    unconditional prompt at sampling time.
    """

    def __init__(self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.inner = attn
        self.prefix_key = nn.Parameter(key.detach().clone())
        self.prefix_value = nn.Parameter(value.detach().clone())
        self.enabled = True

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if not self.enabled:
            return self.inner(hidden_states, attention_mask, **kwargs)
        a = self.inner
        B, L, E = hidden_states.shape
        heads, head_dim = a.num_heads, a.head_dim

        def split(x):
            return x.view(B, -1, heads, head_dim).transpose(1, 2)

        q = split(a.q_proj(hidden_states))
        k = split(torch.cat([self.prefix_key.to(hidden_states).expand(B, 1, E), a.k_proj(hidden_states)], dim=1))
        v = split(torch.cat([self.prefix_value.to(hidden_states).expand(B, 1, E), a.v_proj(hidden_states)], dim=1))
        # Additive float mask [.., L, L+1]: 0 / -inf (causal, padding) over the tokens and
        # +1 on the prefix column, as the official code's concatenated torch.ones.
        if attention_mask is None:
            allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            mask = torch.zeros(L, L, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attention_mask, float("-inf"))
        else:  # additive float mask [B, 1, L, L]
            mask = attention_mask.to(q.dtype)
        mask = F.pad(mask, (1, 0), value=PREFIX_LOGIT_BIAS)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale)
        return a.out_proj(out.transpose(1, 2).reshape(B, L, E)), None


def _clip_attention_layers(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    from transformers.models.clip.modeling_clip import CLIPAttention

    # Found by type, not by attribute path: transformers 5 dropped `.text_model`.
    return [(n, m) for n, m in text_encoder.named_modules()
            if isinstance(m, CLIPAttention) or isinstance(m, PrefixKVAttention)]


def install_prefix_kv(text_encoder: nn.Module, num_layers: int = 3, generator: torch.Generator | None = None,
                      layers: list[str] | None = None, skip_last: int = 0) -> dict[str, PrefixKVAttention]:
    """Swap the last ``num_layers`` CLIP attention layers before the last ``skip_last`` ones (or ``layers``)
    for prefix-KV ones."""
    found = [(n, m) for n, m in _clip_attention_layers(text_encoder) if not isinstance(m, PrefixKVAttention)]
    end = len(found) - skip_last
    chosen = [(n, m) for n, m in found if n in layers] if layers else found[max(0, end - num_layers):end]
    if layers and len(chosen) != len(layers):
        raise UserError(f"prefix layers {sorted(set(layers) - {n for n, _ in chosen})} are not attention modules of "
                        "this text encoder")
    installed = {}
    for name, attn in chosen:
        dim = attn.embed_dim
        param = attn.q_proj.weight
        key = torch.randn(dim, generator=generator).to(param)  # random-normal init
        value = torch.randn(dim, generator=generator).to(param)
        module = PrefixKVAttention(attn, key, value)
        parent_name, _, child = name.rpartition(".")
        setattr(text_encoder.get_submodule(parent_name) if parent_name else text_encoder, child, module)
        installed[name] = module
    return installed


@contextmanager
def prefixes_off(text_encoder: nn.Module):
    """Within the block the encoder runs without its learned prefixes (the plain CLIP encoder)."""
    modules = [m for m in text_encoder.modules() if isinstance(m, PrefixKVAttention)]
    states = [m.enabled for m in modules]
    try:
        for m in modules:
            m.enabled = False
        yield
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


def remove_prefix_kv(text_encoder: nn.Module) -> None:
    """Put the original attention modules back (the encoder is untouched again)."""
    for name, module in list(text_encoder.named_modules()):
        if isinstance(module, PrefixKVAttention):
            parent_name, _, child = name.rpartition(".")
            setattr(text_encoder.get_submodule(parent_name) if parent_name else text_encoder, child, module.inner)


ENCODER_2 = "text_encoder_2."  # how prefix_layers and the saved tensors name SDXL's second encoder's modules


def _owner(name: str) -> str:
    """The qualifier of the encoder a ``prefix_layers`` name belongs to."""
    return ENCODER_2 if name.startswith(ENCODER_2) else ""


def text_encoders(components: Components) -> list[tuple[str, nn.Module]]:
    """(name qualifier, text encoder) per encoder: "" for the first, ``ENCODER_2`` for SDXL's second."""
    return list(zip(("", ENCODER_2), (encoder for _, encoder in components.text_encoders)))


@dataclass(frozen=True)
class CatVersionOptions(MethodOptions):
    prefix_layers: list[str] | None = field(default=None, metadata={
        "help": "text-encoder attention modules that get a learned prefix (default: the last three, as the "
                "official run)", "metavar": "MODULE"})

    def check(self) -> None:
        super().check()
        if self.prefix_layers is not None and not self.prefix_layers:
            raise UserError("--prefix-layers: name at least one text-encoder attention module")


class CatVersion(Method):
    name = "catversion"
    default_steps = 1000
    default_batch_size = 2
    hflip_prob = 0.5
    lr = 5e-3  # the official base_learning_rate, scaled by batch x processes (1e-2 at batch 2 on one process)
    scale_lr = True  # as the official LDM main.py
    guidance_scale = 10.0  # run.sh / txt2img_generator.py
    Options = CatVersionOptions
    families = ("sd", "sdxl")

    def __init__(self, components: Components, config: MethodConfig):
        super().__init__(components, config)
        gen = torch.Generator().manual_seed(config.seed)
        chosen = self.options.prefix_layers
        # SDXL's UNet reads the penultimate hidden states: a prefix in the last layer would reach only the pooled
        skip_last = 1 if components.is_sdxl else 0
        self.prefix = {}
        for qualifier, encoder in text_encoders(components):
            mine = None if chosen is None else [n[len(qualifier):] for n in chosen if _owner(n) == qualifier]
            if mine == []:
                continue  # --prefix-layers names none of this encoder's modules
            installed = install_prefix_kv(encoder, generator=gen, layers=mine, skip_last=skip_last)
            self.prefix.update({qualifier + name: module for name, module in installed.items()})
        config.options = replace(self.options, prefix_layers=list(self.prefix))  # what a loaded concept rebuilds

    @classmethod
    def check_options_for_model(cls, options: CatVersionOptions, model: Path) -> None:
        if not options.prefix_layers:
            return
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from ..model import model_family, read_model_config

        encoders = [("", "text_encoder", CLIPTextModel)]
        if model_family(model) == "sdxl":
            encoders.append((ENCODER_2, "text_encoder_2", CLIPTextModelWithProjection))
        names = []
        for qualifier, sub, cls in encoders:
            with torch.device("meta"):
                encoder = cls(CLIPTextConfig(**read_model_config(model, sub)))
            names += [qualifier + n for n, _ in _clip_attention_layers(encoder)]
        for name in options.prefix_layers:
            if name not in names:
                raise UserError(f"--prefix-layers {name}: no attention module of that name in the text encoder(s) of "
                                f"{model} (they have {', '.join(names)})")

    @classmethod
    def learning_rate_names(cls) -> dict[str, float]:
        return {"prefix": cls.lr}

    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        params = [p for m in self.prefix.values() for p in (m.prefix_key, m.prefix_value)]
        return [{"name": "prefix", "params": params, "lr": self.base_lr("prefix") * lr_scale}]

    def prompt(self, generator: torch.Generator) -> str:
        return self.config.init_word  # the class word alone

    @classmethod
    def concept_phrase(cls, placeholder: str, class_word: str) -> str:
        return class_word  # no placeholder token: the concept lives in the class word

    def encode_unconditional(self, batch: int) -> Conditioning:
        """The plain CLIP encoding of "" (the official fixed ``uc.pt``): prefixes off, so
        guidance pulls toward the concept."""
        with ExitStack() as stack:
            for _, encoder in text_encoders(self.components):
                stack.enter_context(prefixes_off(encoder))
            return super().encode_unconditional(batch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, m in self.prefix.items():
            state[f"{name}.prefix_key"] = m.prefix_key
            state[f"{name}.prefix_value"] = m.prefix_value
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, m in self.prefix.items():
                m.prefix_key.copy_(state[f"{name}.prefix_key"])
                m.prefix_value.copy_(state[f"{name}.prefix_value"])
