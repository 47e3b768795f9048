"""Training images and prompt templates."""

from __future__ import annotations

from pathlib import Path

import torch

from .model import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

# Textual Inversion's small template list (27 prompts).
IMAGENET_TEMPLATES_SMALL = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]

# ViCo's list (its ldm/data/personalized.py, 81 prompts): Textual Inversion's 27, then the same 27 with
# "a photo of" made "an illustration of", then "a depiction of" (prompts not starting so repeat as they are).
VICO_TEMPLATES = [
    t if i == 0 or not t.startswith("a photo of ") else t.replace("a photo of", ("", "an illustration of",
                                                                              "a depiction of")[i], 1)
    for i in range(3) for t in IMAGENET_TEMPLATES_SMALL
]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist or is not a directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """RGB image, centre-cropped and resized to size x size, as [3, size, size] in [-1, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def load_images(folder: str | Path, size: int) -> torch.Tensor:
    """All images of a folder as [n, 3, size, size] in [-1, 1]."""
    return torch.stack([load_image(p, size) for p in list_images(folder)])
