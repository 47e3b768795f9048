"""The toy world: 32x32 RGB images of one object on a plain background.

Attributes: shape (circle, square, triangle), colour (red, green, blue, yellow),
texture (solid, striped), size (small, large), position (random), background
(white, black, gray). Captions: "a large red striped circle on a gray background".
Some (shape, colour) pairs are held out of base training, and the texture
"checkered" never appears in it (the demo's novel concept).
Everything is deterministic from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (18, 18, 18), "gray": (128, 128, 128)}
TEXTURES = ("solid", "striped")
NOVEL_TEXTURES = ("checkered",)
SIZES = {"small": (6, 8), "large": (10, 13)}  # half-extent range in pixels
HELD_OUT = {("triangle", "yellow"), ("circle", "blue")}  # never in base training


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    size: str
    background: str
    cy: int
    cx: int
    r: int

    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.texture} {self.shape} on a {self.background} background"


def vocabulary() -> list[str]:
    words = {"a", "on", "background", "photo", "of", "the", "in", "with"}
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(TEXTURES) | set(NOVEL_TEXTURES) | set(SIZES)
    return sorted(words)


def random_scene(rng: np.random.Generator, held_out: bool = False, texture: str | None = None) -> Scene:
    """A scene from base training combinations (or, with ``held_out``, only held-out pairs)."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if ((shape, colour) in HELD_OUT) == held_out:
            break
    size = list(SIZES)[rng.integers(len(SIZES))]
    lo, hi = SIZES[size]
    r = int(rng.integers(lo, hi + 1))
    cy, cx = (int(rng.integers(r + 1, SIZE - r - 1)) for _ in range(2))
    return Scene(shape, colour, texture or TEXTURES[rng.integers(len(TEXTURES))], size,
                 list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], cy, cx, r)


def shape_mask(shape: str, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (abs(yy - cy) <= r * 0.85) & (abs(xx - cx) <= r * 0.85)
    # triangle pointing up, base at cy + r
    top, bottom = cy - r, cy + r
    half = (yy - top) / max(bottom - top, 1) * r
    return (yy >= top) & (yy <= bottom) & (abs(xx - cx) <= half)


def render(scene: Scene) -> np.ndarray:
    """uint8 [32, 32, 3]."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    mask = shape_mask(scene.shape, scene.cy, scene.cx, scene.r)
    colour = np.array(COLOURS[scene.colour], np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if scene.texture == "solid":
        fill = np.broadcast_to(colour, img.shape)
    elif scene.texture == "striped":
        dark = (yy // 2) % 2 == 1
        fill = np.where(dark[..., None], colour * 0.45, colour)
    else:  # checkered: the novel concept's pattern (3-px cells of the colour and a dark shade of it)
        check = ((yy // 3) + (xx // 3)) % 2 == 1
        fill = np.where(check[..., None], colour * 0.3, colour)
    img[mask] = fill[mask]
    return img.clip(0, 255).astype(np.uint8)


def dataset(n: int, seed: int, held_out: bool = False, texture: str | None = None) -> tuple[np.ndarray, list[Scene]]:
    """n images [n, 32, 32, 3] and their scenes, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, held_out, texture) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes
