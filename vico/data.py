"""Training images and prompt templates."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .files import describe_error
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


def attndreambooth_augment(image: torch.Tensor, generator: torch.Generator, size: int,
                           rotate_p: float = 0.75, degrees: float = 45.0, flip_p: float = 0.25,
                           params: dict | None = None) -> torch.Tensor:
    """AttnDreamBooth's training transform on one image [3, H, W] in [-1, 1] -> [3, size, size].

    The official ``train_attndreambooth.py`` composes torchvision's
    ``RandomApply([RandomRotation(45, expand=True)], p=0.75)``, ``Resize(size)``
    (bilinear, shorter side), ``RandomHorizontalFlip(0.25)`` and ``RandomCrop(size)``
    on a PIL image. This does the same operations with PIL (what torchvision calls on
    PIL images: nearest-neighbour rotation about the centre onto an expanded canvas
    filled black, then a bilinear resize) and draws the same random numbers in the
    same order, from ``generator`` instead of the global RNG. ``params`` (a dict) is
    filled with what was drawn.
    """
    import numpy as np
    from PIL import Image

    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    im = Image.fromarray(arr.permute(1, 2, 0).numpy())
    angle = None
    if not rotate_p < float(torch.rand(1, generator=generator)):  # RandomApply: skip when p < rand
        angle = float(torch.empty(1).uniform_(-degrees, degrees, generator=generator))
        im = im.rotate(angle, resample=Image.Resampling.NEAREST, expand=True, fillcolor=(0, 0, 0))
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    im = im.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BILINEAR)
    flipped = bool(float(torch.rand(1, generator=generator)) < flip_p)
    if flipped:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = im.size
    top = left = 0
    if (w, h) != (size, size):  # RandomCrop draws nothing when the image already has the size
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    im = im.crop((left, top, left + size, top + size))
    if params is not None:
        params.update(angle=angle, flip=flipped, top=top, left=left)
    out = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return out.to(image.device, image.dtype)


def list_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder``, sorted by name. Entries with an image suffix that are not regular files
    (a FIFO or device named ``*.png`` would block the reader forever) are skipped with a warning."""
    from .model import warn

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist or is not a directory")
    paths = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not p.is_file():  # follows symlinks: a link to a regular file is fine
            warn(f"skipping {p}: not a regular file")
            continue
        paths.append(p)
    if not paths:
        raise UserError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


MAX_ASPECT = 1.5  # wider or taller than 3:2 loses a third of the picture to the centre crop: warn
MAX_PIXELS = 178_956_970  # PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), checked on the header


def _to_8bit(values, mode: str):
    """Grayscale values of a 16-bit ("I;16"), 32-bit ("I": 16-bit data when over 255) or float ("F": [0, 1]
    when nothing is over 1, else [0, 255]) image as uint8, scaled by value."""
    import numpy as np

    top = values.max(initial=0)
    if mode == "F":
        full = 1.0 if top <= 1.0 else 255.0
    else:
        full = 65535.0 if mode.startswith("I;16") or top > 255 else 255.0
    return np.clip(np.round(values / full * 255.0), 0, 255).astype(np.uint8)


def _too_big(path: Path, pixels: int | None) -> UserError:
    size = f" ({pixels / 1e6:.0f} megapixels by its header)" if pixels else ""
    return UserError(f"image {path} is over the {MAX_PIXELS / 1e6:.0f}-megapixel limit{size}; scale it down")


def open_image(path: str | Path):
    """Any image file as an 8-bit RGB ``PIL.Image``: what every command reads (training images, references,
    generated and real images for eval, masks).

    Rotated by its EXIF orientation (phone photos); 16-bit and 32-bit modes scaled by value (a 16-bit
    grayscale PNG is not clipped to white); transparent pixels composited on white. A file that is not a
    regular file, unreadable, or over ``MAX_PIXELS`` by its header is a one-line ``UserError`` naming it.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot read image {path}: not a regular file")
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:  # formats PIL does not check on open
                raise _too_big(path, im.size[0] * im.size[1])
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # convert("RGB") would clip these to 255
                im = Image.fromarray(_to_8bit(np.asarray(im, dtype=np.float64), im.mode), "L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("P", "RGB", "L") and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im.alpha_composite(rgba)
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:  # PIL checks the header of most formats on open
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_big(path, int(found.group(1)) if found else None) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {describe_error(exc)}") from None


def load_image(path: str | Path, size: int, warn_about: bool = True) -> torch.Tensor:
    """RGB image (``open_image``), centre-cropped and resized to size x size, as [3, size, size] in [-1, 1].

    Images far from square (they lose their sides to the crop) or smaller than ``size`` (upscaled, blurry)
    get a one-line warning.
    """
    import numpy as np
    from PIL import Image

    from .model import warn

    im = open_image(path)
    w, h = im.size
    if warn_about and max(w, h) > MAX_ASPECT * min(w, h):
        warn(f"{path} is {w}x{h}, far from square: the centre crop keeps only its middle "
             f"{min(w, h)}x{min(w, h)}; crop it yourself to keep the object whole")
    if warn_about and min(w, h) < size:
        warn(f"{path} is {w}x{h}, smaller than the model's {size}x{size}: it is upscaled and will look "
             "blurry to the model")
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    arr = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def load_images(folder: str | Path, size: int) -> torch.Tensor:
    """All images of a folder as [n, 3, size, size] in [-1, 1]."""
    return torch.stack([load_image(p, size) for p in list_images(folder)])
