"""Where `vico eval` gets its foreground masks for masked CLIP-I (docs/methods.md §6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import list_images, load_images, open_image
from .model import UserError
from .pipeline import ViCoPipeline


def read_mask(path: Path) -> np.ndarray:
    """A mask image as bool [H, W]: foreground where its brightness is over half (any mode, ``open_image``)."""
    return np.asarray(open_image(path).convert("L")) > 127


def generated_masks(folder: Path, n: int) -> tuple[list[np.ndarray] | None, str]:
    """(masks, where they came from): per generated image, its own Otsu mask saved by
    ``vico sample --save-maps`` (ViCo: ``ViCo.sampled_maps``, the S* map of that image on the
    conditional branch at the last sampling step), of the last-named flagged layer (the
    highest-resolution one in SD); (None, "none") when a mask is missing."""
    masks, layers = [], set()
    for i in range(n):
        files = sorted(folder.glob(f"{i:03d}_mask_*.png"))
        if not files:
            return None, "none"
        masks.append(read_mask(files[-1]))
        layers.add(files[-1].stem.split("_mask_", 1)[1].replace("-", "."))
    return masks, (f"each generated image's own Otsu mask of its S* map (EOT when the prompt has no S*; "
                   f"conditional branch, last sampling step; layer {', '.join(sorted(layers))}), "
                   "saved by vico sample --save-maps")


def real_masks(mask_dir: str | None, meta: dict, concept: str | None, real_dir: str,
               device: str) -> tuple[list[np.ndarray] | None, str]:
    """(masks, where they came from): a user folder of PNGs, else for a ViCo concept the
    Otsu mask of S* from the reference branch (the real image seen as the reference)."""
    if mask_dir:
        if not Path(mask_dir).is_dir():
            raise UserError(f"--real-masks {mask_dir} is not a folder")
        files = sorted(p for p in Path(mask_dir).iterdir() if p.suffix.lower() == ".png")
        count = len(list_images(real_dir))
        if len(files) != count:  # zip() would silently drop the unmatched images
            raise UserError(f"--real-masks {mask_dir} has {len(files)} PNG masks for {count} real images in "
                            f"{real_dir}; give one mask per image, in the same order")
        return [read_mask(p) for p in files], f"user masks from {mask_dir}"
    if meta.get("method") != "vico":
        return None, "none"
    pipe = ViCoPipeline.from_pretrained(meta["base_model"], concept, device=device)
    c = pipe.components
    images = load_images(real_dir, pipe.method.config.resolution).to(device, c.vae.dtype)
    with torch.no_grad():
        latents = c.vae.encode(images).latent_dist.mean * c.vae.config.scaling_factor
        masks = pipe.method.object_masks(latents)
    return [m.cpu().numpy() for m in masks], "Otsu mask of the S* map from the reference branch (ViCo)"
