"""Sampling with a trained concept: ``ViCoPipeline``.

A thin wrapper over the components of a local Stable Diffusion folder and a
trained method: DDIM (DPM-Solver for AttnDreamBooth), 50 steps, and
classifier-free guidance at the method's scale by default (7.5; CatVersion 10); the method encodes the
unconditional prompt (CatVersion: without its learned prefixes) and decides how the UNet is called at each
step (ViCo runs the reference branch, recomputed at every step from the clean reference latent at the
current timestep). ``context["last_step"]`` tells the method which call is the last one (ViCo records the
generated images' own S* maps there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import list_images, load_image
from .methods import load_method
from .methods.base import Method
from .model import Components, UserError, load_components


class ViCoPipeline:
    def __init__(self, components: Components, method: Method):
        self.components = components
        self.method = method

    @classmethod
    def from_pretrained(cls, model: str | Path, concept: str | Path, device: str = "cpu",
                        dtype: torch.dtype | None = None, vae: str | Path | None = None) -> "ViCoPipeline":
        """``model`` (SD 1.x/2.x or SDXL folder) with the concept in ``concept``; ``vae``: a separate VAE folder."""
        comps = load_components(model, device, dtype, vae=vae)
        return cls(comps, load_method(comps, concept))

    def default_reference(self, images_dir: str | Path) -> torch.Tensor:
        """The first training image of a folder, at the concept's resolution."""
        return load_image(list_images(images_dir)[0], self.method.config.resolution)

    def _check_token_kept(self, prompt: str, ids: torch.Tensor) -> None:
        """A placeholder the prompt names but the text encoder's token limit cut off is one line (its images
        would not show the concept, and ``--save-maps`` would save another token's maps)."""
        token_id = getattr(self.method, "token_id", None)
        placeholder = self.method.config.placeholder
        if token_id is not None and placeholder in prompt and not bool((ids == token_id).any()):
            raise UserError(f"--prompt: {placeholder!r} comes after the text encoder's {ids.shape[1]}-token limit and "
                            "would be cut off; shorten the prompt or name the concept earlier")

    @torch.no_grad()
    def __call__(self, prompt: str, reference: torch.Tensor | None = None, num_images: int = 1,
                 num_inference_steps: int = 50, guidance_scale: float | None = None, seed: int = 0,
                 progress: bool = True) -> tuple[np.ndarray, dict]:
        """Images uint8 [n, H, W, 3] and the method's sampling context (maps of the last step).

        ``guidance_scale`` None: the method's default (``Method.guidance_scale``).
        """
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
        from tqdm.auto import tqdm

        c = self.components
        device = c.device
        sampler = DPMSolverMultistepScheduler if self.method.sampler == "dpm-solver" else DDIMScheduler
        scheduler = sampler.from_config(c.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        cond = self.method.encode([prompt]).repeat(num_images)  # encoded once, as the diffusers pipelines do
        self._check_token_kept(prompt, cond.ids)
        uncond = self.method.encode_unconditional(num_images)
        if guidance_scale is None:
            guidance_scale = self.method.guidance_scale
        size = self.method.config.resolution
        shape = (num_images, c.unet.config.in_channels, size // c.vae_scale, size // c.vae_scale)
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(shape, generator=generator).to(device, c.unet.dtype) * scheduler.init_noise_sigma
        ref_latents = None
        if reference is not None:
            ref = reference[None] if reference.dim() == 3 else reference
            # a posterior sample, as the official sampling encodes the reference (get_first_stage_encoding)
            posterior = c.vae.encode(ref.to(device, c.vae.dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            ref_latents = (posterior.mean + posterior.std * eps) * c.vae.config.scaling_factor
        context = self.method.sampling_context(ref_latents, num_images)
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress)):
            context["last_step"] = i == len(scheduler.timesteps) - 1
            model_in = scheduler.scale_model_input(latents, t)
            eps = self.method.predict_noise(model_in, t, cond, uncond, guidance_scale, context)
            latents = scheduler.step(eps, t, latents).prev_sample
        if not bool(torch.isfinite(latents).all()):  # decoding them would give black images, silently
            raise UserError(f"sampling produced NaN or inf latents (guidance {guidance_scale:g}, "
                            f"{c.unet.dtype}); try float32 or a lower --guidance")
        images = c.vae.decode((latents / c.vae.config.scaling_factor).to(c.vae.dtype)).sample
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy(), context


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile [n, H, W, 3] images into one grid image."""
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, normalise: bool = True) -> np.ndarray:
    """Blend a [h, w] map as a red-yellow heat map over an RGB image (bilinear to the image's size).

    ``normalise``: stretch the map to [0, 1] first (any range); False takes it as
    already in [0, 1] (a video frame's map, normalised over the whole clip)."""
    import torch.nn.functional as F

    H, W, _ = image.shape
    m = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    if normalise:
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)
    colour = np.stack([np.ones_like(m), m, np.zeros_like(m)], -1) * 255
    return (image * (1 - alpha * m[..., None]) + colour * alpha * m[..., None]).astype(np.uint8)
