"""Textual Inversion: one learned token embedding, everything else frozen.

The base of ViCo (which adds image attention on top) and a method of its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fused

from ..data import IMAGENET_TEMPLATES_SMALL
from ..model import Components, add_placeholder_token
from ..files import atomic_write
from .base import Method, MethodConfig


class TextualInversion(Method):
    name = "textual-inversion"
    default_steps = 3000
    scale_lr = True
    embedding_lr = 5e-3
    templates = IMAGENET_TEMPLATES_SMALL  # Textual Inversion's 27 (ViCo: its 81)

    def __init__(self, components: Components, config: MethodConfig):
        super().__init__(components, config)
        tok = components.tokenizer
        self.embedding = add_placeholder_token(tok, components.text_encoder, config.placeholder, config.init_word)
        self.token_id = tok.convert_tokens_to_ids(config.placeholder)
        fused.attach(components.unet)

    @classmethod
    def learning_rate_names(cls) -> dict[str, float]:
        return {"embedding": cls.embedding_lr}

    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        return [{"name": "embedding", "params": [self.embedding.learned], "lr": self.base_lr("embedding") * lr_scale}]

    def prompt(self, generator: torch.Generator) -> str:
        i = int(torch.randint(0, len(self.templates), (1,), generator=generator))
        return self.prompt_for(self.templates[i], self.config.placeholder, self.config.init_word)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding.learned}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.learned.copy_(state["embedding"])

    def save_extra(self, out: Path) -> None:
        # diffusers' `pipe.load_textual_inversion(out / "learned_embeds.safetensors")` reads this.
        from safetensors.torch import save_file

        from ..export import tool_tensors

        vec = tool_tensors("diffusers", self.config.placeholder, [self.embedding.learned.detach().cpu().contiguous()])
        atomic_write(out / "learned_embeds.safetensors", lambda p: save_file(vec, str(p)))
