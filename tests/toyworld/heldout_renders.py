"""Renders the toy autoencoder is measured on and never trained on.

Shapes, colours and pattern code of their own (not ``world``'s): an ellipse, a
rectangle or a rotated half-plane wedge on a random plain background, the
object two-toned in two random colours by one of the fine patterns below.
Only tests and the autoencoder's benchmark import this module.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SIZE = 32

FinePattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]  # (yy, xx, rng) -> bool

FINE_PATTERNS: dict[str, FinePattern] = {
    "solid": lambda yy, xx, rng: np.zeros(yy.shape, bool),
    "diagonal stripes 2px": lambda yy, xx, rng: ((yy + xx + rng.integers(4)) // 2) % 2 == 0,
    "anti-diagonal stripes 2px": lambda yy, xx, rng: ((yy - xx + 64 + rng.integers(4)) // 2) % 2 == 0,
    "dots, 4-px pitch": lambda yy, xx, rng: ((yy + rng.integers(4)) % 4 < 2) & ((xx + rng.integers(4)) % 4 < 2),
    "checker 2px": lambda yy, xx, rng: (((yy + rng.integers(2)) // 2) + ((xx + rng.integers(2)) // 2)) % 2 == 0,
    "checker 4px": lambda yy, xx, rng: (((yy + rng.integers(4)) // 4) + ((xx + rng.integers(4)) // 4)) % 2 == 0,
    "two-tone noise 2px": lambda yy, xx, rng: np.kron(rng.random((SIZE // 2, SIZE // 2)) < 0.5,
                                                      np.ones((2, 2), bool))[:yy.shape[0], :yy.shape[1]],
}


def _object_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = rng.uniform(10, 22, 2)
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        ry, rx = rng.uniform(6, 13, 2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if kind == 1:  # axis-aligned rectangle
        hy, hx = rng.uniform(5, 12, 2)
        return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
    # a wedge: the intersection of three random half-planes through points near the centre
    mask = np.ones(yy.shape, bool)
    for angle in rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]):
        mask &= (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle) <= rng.uniform(5, 11)
    return mask


def heldout_set(pattern: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` renders wearing ``pattern``: uint8 images [n, 32, 32, 3] and bool object masks [n, 32, 32]."""
    rng = np.random.default_rng([seed, list(FINE_PATTERNS).index(pattern)])
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = [], []
    for _ in range(n):
        background, light = rng.integers(0, 256, 3), rng.integers(60, 256, 3)
        dark = (light * rng.uniform(0.2, 0.6)).astype(int)
        mask = _object_mask(rng, yy.astype(float), xx.astype(float))
        fill = np.where(FINE_PATTERNS[pattern](yy, xx, rng)[..., None], dark, light)
        img = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
        img[mask] = fill[mask]
        images.append(img.astype(np.uint8))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def object_mae(vae, pattern: str, n: int, seed: int = 0) -> float:
    """Mean |x - decode(encode(x))| over each render's object pixels, in 0-255 units, for ``vae`` (an
    ``AutoencoderKL`` on [-1, 1] images; the posterior mean is decoded, as the methods encode)."""
    from vico.toyworld.evaluate import object_error, vae_roundtrip

    images, masks = heldout_set(pattern, n, seed)
    return object_error(images, vae_roundtrip(vae, images), masks)
