"""Textual Inversion: one learned token embedding per text encoder, everything else frozen.

The base of ViCo (which adds image attention on top) and a method of its own. On SDXL the
placeholder is added to both tokenizers and learned in both encoders (``embedding`` [1, 768] and
``embedding_2`` [1, 1280] on real SDXL), each initialised from the class word's own embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fused

from ..data import IMAGENET_TEMPLATES_SMALL
from ..model import Components, PlaceholderEmbedding, add_placeholder_token
from ..files import atomic_write
from .base import Method, MethodConfig

EMBEDDING_KEYS = ("embedding", "embedding_2")  # concept.safetensors names of the text encoders' learned rows


class TextualInversion(Method):
    name = "textual-inversion"
    default_steps = 3000
    scale_lr = True
    embedding_lr = 5e-3
    templates = IMAGENET_TEMPLATES_SMALL  # Textual Inversion's 27 (ViCo: its 81)
    families = ("sd", "sdxl")

    def __init__(self, components: Components, config: MethodConfig):
        super().__init__(components, config)
        self.embeddings = add_placeholder_embeddings(components, config.placeholder, config.init_word)
        self.token_id = components.tokenizer.convert_tokens_to_ids(config.placeholder)
        fused.attach(components.unet)

    @property
    def embedding(self):
        """The first text encoder's placeholder embedding (the only one on SD 1.x/2.x)."""
        return self.embeddings[0]

    @classmethod
    def learning_rate_names(cls) -> dict[str, float]:
        return {"embedding": cls.embedding_lr}

    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        params = [emb.learned for emb in self.embeddings]
        return [{"name": "embedding", "params": params, "lr": self.base_lr("embedding") * lr_scale}]

    def prompt(self, generator: torch.Generator) -> str:
        i = int(torch.randint(0, len(self.templates), (1,), generator=generator))
        return self.prompt_for(self.templates[i], self.config.placeholder, self.config.init_word)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return embeddings_state(self.embeddings)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_embeddings_state(self.embeddings, state)

    def save_extra(self, out: Path) -> None:
        save_learned_embeds(out, self.config.placeholder, [emb.learned for emb in self.embeddings])


def add_placeholder_embeddings(components: Components, placeholder: str,
                               init_word: str) -> list[PlaceholderEmbedding]:
    """``placeholder`` added to every tokenizer, one learned row per text encoder initialised from ``init_word``'s
    own embedding, in the pipeline's order (``EMBEDDING_KEYS`` names them): one on SD, two on SDXL."""
    return [add_placeholder_token(tok, encoder, placeholder, init_word) for tok, encoder in components.text_encoders]


def embeddings_state(embeddings: list[PlaceholderEmbedding]) -> dict[str, torch.Tensor]:
    """The learned rows [n_vectors, dim] of ``add_placeholder_embeddings`` by their concept names."""
    return {key: emb.learned for key, emb in zip(EMBEDDING_KEYS, embeddings)}


def load_embeddings_state(embeddings: list[PlaceholderEmbedding], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state``'s rows (``embeddings_state``'s names) into ``embeddings``."""
    with torch.no_grad():
        for key, emb in zip(EMBEDDING_KEYS, embeddings):
            emb.learned.copy_(state[key])


def save_learned_embeds(out: Path, token: str, embeddings: list[torch.Tensor]) -> None:
    """``out/learned_embeds.safetensors`` of ``embeddings`` (one [n_vectors, dim] tensor per text encoder, in the
    pipeline's order): on SD what diffusers' ``pipe.load_textual_inversion(path)`` reads; on SDXL the
    ``clip_l``/``clip_g`` file A1111 and ComfyUI read (diffusers loads each tensor into its encoder:
    docs/methods.md, SDXL)."""
    from safetensors.torch import save_file

    from ..export import tool_tensors

    vectors = [emb.detach().cpu().contiguous() for emb in embeddings]
    fmt = "a1111" if len(vectors) > 1 else "diffusers"
    tensors = tool_tensors(fmt, token, vectors)
    atomic_write(out / "learned_embeds.safetensors", lambda p: save_file(tensors, str(p)))
