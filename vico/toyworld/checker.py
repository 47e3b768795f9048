"""Reads a toy-world image back into attributes (background, colour, shape, texture, size).

Robust to the noise of generated samples: the background is the median of
the border, the object is split from it by Otsu on the colour distance to the
background (fused.otsu_mask, "skimage" mode), its extent comes from coordinate
percentiles (stray pixels do not inflate it), colour is the nearest palette
entry to the bright half of the object's pixels, and shape the fill ratio of
that extent.
"""

from __future__ import annotations

import numpy as np
import torch

from .world import BACKGROUNDS, COLOURS


def _nearest(value: np.ndarray, palette: dict[str, tuple]) -> str:
    names = list(palette)
    d = [np.linalg.norm(value - np.array(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(d))]


def read(image: np.ndarray) -> dict[str, str | None]:
    import fused

    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg_value = np.median(border, axis=0)
    background = _nearest(bg_value, BACKGROUNDS)
    dist = np.linalg.norm(img - bg_value, axis=-1)
    if dist.max() - dist.min() < 1e-6:
        return {"background": background, "colour": None, "shape": None, "texture": None, "size": None}
    thr, _ = fused.otsu_mask(torch.from_numpy(dist.reshape(1, -1)).double(), mode="skimage", backend="torch")
    # Otsu alone may split a two-tone (striped) object, so anything 45 away from the background counts
    # as object — unless the background itself is that noisy (generated samples): then stay above it.
    border_dist = np.linalg.norm(border - bg_value, axis=-1)
    fg = dist > max(min(float(thr[0]), 45.0), 3.0 * float(np.median(border_dist)))
    if fg.sum() < 8:
        return {"background": background, "colour": None, "shape": None, "texture": None, "size": None}
    # drop isolated pixels (noise) before taking the extent: keep those with >= 2 of 4 neighbours
    padded = np.pad(fg, 1)
    neighbours = padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    core = fg & (neighbours >= 2)
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
        shape = "square" if fill > 0.93 else "circle"  # circles fill 0.66-0.87 of their (trimmed) box
    pixels = img[fg]
    brightness = pixels.sum(-1)
    bright = pixels[brightness >= np.percentile(brightness, 75)]  # the lit colour, not a stripe's shade
    colour = _nearest(np.median(bright, axis=0), COLOURS)
    # stripes: the object's rows alternate between its colour and a dark shade
    row_means = np.array([img[y][fg[y]].sum(-1).mean() for y in range(img.shape[0]) if fg[y].sum() >= 2])
    texture = "striped" if len(row_means) >= 4 and np.abs(np.diff(row_means)).mean() > 60 else "solid"
    # extent (max - min of the core) between the largest small (r = 8) and smallest large (r = 10) object
    extent = max(y1 - y0, x1 - x0)
    size = "large" if extent >= {"circle": 16, "square": 14, "triangle": 17}[shape] else "small"
    return {"background": background, "colour": colour, "shape": shape, "texture": texture, "size": size}


def accuracy(images: np.ndarray, scenes) -> dict[str, float]:
    """Per attribute, the fraction of images read back as their scene says."""
    keys = ("background", "colour", "shape", "texture", "size")
    hits = {k: 0 for k in keys}
    for img, scene in zip(images, scenes):
        got = read(img)
        for k in keys:
            hits[k] += got[k] == getattr(scene, k)
    return {k: hits[k] / len(scenes) for k in keys}
