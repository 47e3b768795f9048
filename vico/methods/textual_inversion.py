"""Textual Inversion: one learned token embedding, everything else frozen.

The base of ViCo (which adds image attention on top) and a method of its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import fused

from ..data import IMAGENET_TEMPLATES_SMALL
from ..model import Components, add_placeholder_token, encode_prompts
from .base import Batch, Method, MethodConfig, atomic_write


def noise_and_target(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """Noise, timesteps, noisy latents and the regression target (epsilon or v)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    return noisy, t, target


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


class TextualInversion(Method):
    name = "textual-inversion"
    default_steps = 3000
    embedding_lr = 5e-3

    def __init__(self, components: Components, config: MethodConfig):
        super().__init__(components, config)
        tok = components.tokenizer
        self.embedding = add_placeholder_token(tok, components.text_encoder, config.placeholder, config.init_word)
        self.token_id = tok.convert_tokens_to_ids(config.placeholder)
        fused.attach(components.unet)

    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        return [{"params": [self.embedding.learned], "lr": self.embedding_lr * lr_scale}]

    def make_batch(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, generator: torch.Generator,
                   batch_size: int) -> Batch:
        """Random training images (latents sampled from the VAE posterior) and templates."""
        n = latent_mean.shape[0]
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        eps = torch.randn((batch_size, *latent_mean.shape[1:]), generator=generator).to(latent_mean)
        latents = latent_mean[idx] + latent_std[idx] * eps
        templates = torch.randint(0, len(IMAGENET_TEMPLATES_SMALL), (batch_size,), generator=generator)
        prompts = [IMAGENET_TEMPLATES_SMALL[int(i)].format(self.config.placeholder) for i in templates]
        return Batch(latents=latents, prompts=prompts, reference=self._references(latent_mean, idx, generator))

    def _references(self, latent_mean, idx, generator):
        return None

    def training_loss(self, batch: Batch, generator: torch.Generator):
        c = self.components
        _, text = encode_prompts(c.tokenizer, c.text_encoder, batch.prompts)
        noisy, t, target = noise_and_target(c.scheduler, batch.latents, generator)
        pred = c.unet(noisy, t, text).sample
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": loss.item()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding.learned}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.learned.copy_(state["embedding"])

    def save_extra(self, out: Path) -> None:
        # diffusers' `pipe.load_textual_inversion(out / "learned_embeds.safetensors")` reads this.
        from safetensors.torch import save_file

        vec = {self.config.placeholder: self.embedding.learned[0].detach().cpu().contiguous()}
        atomic_write(out / "learned_embeds.safetensors", lambda p: save_file(vec, str(p)))

    def predict_noise(self, latents, t, prompt_ids, cond, uncond, guidance_scale, context):
        out = self.components.unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample
        eps_u, eps_c = out.chunk(2)
        return guide(eps_u, eps_c, guidance_scale)
