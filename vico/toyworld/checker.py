"""Reads a toy-world image back into attributes (background, colour, shape, texture, size) and its object mask.

Robust to the noise of generated samples: the background is the median of
the border, the object is split from it by Otsu on the colour distance to the
background (fused.otsu_mask, "skimage" mode) and its holes are filled (a dark
texture cell can be close to a dark background), its extent comes from the
pixels with at least two object neighbours (stray pixels do not inflate it),
gaps of up to 4 px (dark texture bands lost in noise) are closed,
colour is the nearest palette entry to the bright quarter of the object's
interior pixels (two rings in from the edge, where no background blends in),
size its extent against the midpoints of the world's small and large extents,
and shape the taper of that extent (triangle) and whether its box or the
box's inscribed ellipse fits it better (square or circle).

Texture is read by template matching against every texture of the world
(``world.ALL_TEXTURES``, the novel ones included): each pattern, at every
phase shift, is correlated with the brightness of the object's inner pixels;
the best correlation wins if it is clear (>= ``TEXTURE_MIN_CORRELATION``) and
the lit and dark cells differ enough, else the object is solid. A texture
added to the world is read without touching this file.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world
from .world import BACKGROUNDS, COLOURS

ATTRIBUTES = ("background", "colour", "shape", "texture", "size")
TEXTURE_MIN_CORRELATION = 0.5
TEXTURE_MIN_CONTRAST = 60.0  # lit minus dark cells, in summed RGB units (a 0.35 shade of red differs by ~195)
MAX_PERIOD = 8  # phase shifts tried per pattern


def _nearest(value: np.ndarray, palette: dict[str, tuple]) -> str:
    names = list(palette)
    d = [np.linalg.norm(value - np.array(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(d))]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` plus those not 4-connected to the image border through non-mask pixels."""
    outside = np.zeros_like(mask)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~mask[0], ~mask[-1], ~mask[:, 0], ~mask[:, -1]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _shifted_any(mask: np.ndarray, radius: int, pad: bool) -> np.ndarray:
    """OR of ``mask`` over a (2r+1)^2 square, ``pad`` standing for the pixels beyond the image."""
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=pad)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _close(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Morphological closing with a square: fills gaps up to 2r px (a texture's dark bands), keeps convex shapes."""
    dilated = _shifted_any(mask, radius, False)
    return ~_shifted_any(~dilated, radius, True)  # beyond the image is background


def _neighbours(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]


def _border(img: np.ndarray) -> np.ndarray:
    """The pixels [n, 3] of the image's 2-px frame, where only background is."""
    return np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                           img[:, -2:].reshape(-1, 3)])


def object_mask(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the object's pixels as the checker sees them (all False for an empty image)."""
    img = image.astype(np.float32)
    border = _border(img)
    bg_value = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg_value, axis=-1)
    if dist.max() - dist.min() < 1e-6:
        return np.zeros(dist.shape, bool)
    import fused

    thr, _ = fused.otsu_mask(torch.from_numpy(dist.reshape(1, -1)).double(), mode="skimage", backend="torch")
    # Otsu alone may split a two-tone (textured) object, so anything 35 away from the background counts
    # as object, unless the background itself is that noisy (generated samples): then stay above it.
    border_dist = np.linalg.norm(border - bg_value, axis=-1)
    fg = dist > max(min(float(thr[0]), 35.0), 3.0 * float(np.median(border_dist)))
    # a noisy sample's floor can drop a texture's dark cells (dark green on black): close those gaps
    fg = _fill_holes(_close(fg & (_neighbours(fg) >= 1)))
    return fg & (_neighbours(fg) >= 2)  # drop isolated noise pixels


def _interior(mask: np.ndarray, depth: int = 2, min_pixels: int = 12) -> np.ndarray:
    """``mask`` less its outer ``depth`` rings (fewer when that would leave under ``min_pixels``).

    An edge pixel is a blend of object and background (a decoder's softening, a
    denoiser's halo): on a white background it is brighter than the object's lit
    colour, so reading colour or texture from it mixes the background in.
    """
    inner = mask
    for _ in range(depth):
        eroded = inner & (_neighbours(inner) == 4)
        if eroded.sum() < min_pixels:
            break
        inner = eroded
    return inner


def read_texture(image: np.ndarray, fg: np.ndarray) -> str:
    """The world texture that best explains the brightness pattern inside ``fg`` ("solid" when none does)."""
    inner = _interior(fg, depth=1)  # away from the edge, where background blends in
    brightness = image.astype(np.float32).sum(-1)[inner]
    if brightness.std() < 1e-6:
        return "solid"
    yy, xx = np.mgrid[:image.shape[0] + MAX_PERIOD, :image.shape[1] + MAX_PERIOD]
    best, best_r = "solid", TEXTURE_MIN_CORRELATION
    for name, pattern in world.ALL_TEXTURES.items():
        full = pattern(yy, xx)
        if not full.any():
            continue
        for dy in range(MAX_PERIOD):
            for dx in range(MAX_PERIOD):
                dark = full[dy:dy + image.shape[0], dx:dx + image.shape[1]][inner]
                if dark.all() or not dark.any():
                    continue
                contrast = brightness[~dark].mean() - brightness[dark].mean()
                if contrast < TEXTURE_MIN_CONTRAST:
                    continue
                r = float(np.corrcoef(brightness, ~dark)[0, 1])
                if r > best_r:
                    best, best_r = name, r
    return best


# The object's mask is compared with the two templates its bounding box allows: the box itself (IoU = fill) and
# the inscribed ellipse. A fixed fill threshold lost squares whose corners a denoiser softens by a pixel (a small
# square loses ~15% of its box); the ellipse's IoU drops with them. Sharp small circles come within +0.011 of a
# square (pixelation), hence the margin.
SQUARE_MARGIN = 0.02


def _ellipse_iou(inside: np.ndarray) -> float:
    """IoU of a bool mask cropped to its bounding box with the ellipse inscribed in that box."""
    h, w = inside.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ellipse = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1
    return float((inside & ellipse).sum() / max((inside | ellipse).sum(), 1))


def read(image: np.ndarray) -> dict[str, str | None]:
    img = image.astype(np.float32)
    background = _nearest(np.median(_border(img), axis=0), BACKGROUNDS)
    core = object_mask(image)
    if core.sum() < 8:
        return {"background": background, "colour": None, "shape": None, "texture": None, "size": None}
    ys, xs = np.nonzero(core)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    inside = core[y0:y1 + 1, x0:x1 + 1]
    fill = inside.sum() / max(inside.size, 1)
    widths = inside.sum(1).astype(np.float32)  # object width per row, top to bottom
    quarter = max(len(widths) // 4, 1)
    taper = widths[:quarter].mean() / max(widths[-quarter:].mean(), 1e-6)
    if taper < 0.6:  # narrow top, wide bottom
        shape = "triangle"
    else:
        shape = "square" if fill - _ellipse_iou(inside) > SQUARE_MARGIN else "circle"
    pixels = img[_interior(core)]
    brightness = pixels.sum(-1)
    bright = pixels[brightness >= np.percentile(brightness, 75)]  # the lit colour, not a texture's shade
    colour = _nearest(np.median(bright, axis=0), COLOURS)
    texture = read_texture(image, core)
    # extent (max - min of the core) at the midpoint between the true extents of the largest small (r = 8) and the
    # smallest large (r = 10) object: circle and triangle 16 | 20, square 12 | 16 (above 14). Thresholds set on
    # the checker's own masks (which trim a circle's one-pixel tips) sat a pixel low, and a decoder that restores
    # the tips or adds a rim read small objects as large.
    extent = max(y1 - y0, x1 - x0)
    size = "large" if extent >= {"circle": 18, "square": 15, "triangle": 18}[shape] else "small"
    return {"background": background, "colour": colour, "shape": shape, "texture": texture, "size": size}


def accuracy(images: np.ndarray, scenes) -> dict[str, float]:
    """Per attribute, the fraction of images read back as their scene says."""
    hits = {k: 0 for k in ATTRIBUTES}
    for img, scene in zip(images, scenes):
        got = read(img)
        for k in ATTRIBUTES:
            hits[k] += got[k] == getattr(scene, k)
    return {k: hits[k] / len(scenes) for k in ATTRIBUTES}


def confusion(images: np.ndarray, scenes, attribute: str) -> dict[str, dict[str, int]]:
    """For one attribute: asked value -> {value read back: count}, to see which value a model misses."""
    table: dict[str, dict[str, int]] = {}
    for img, scene in zip(images, scenes):
        row = table.setdefault(str(getattr(scene, attribute)), {})
        got = str(read(img)[attribute])
        row[got] = row.get(got, 0) + 1
    return table


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
