"""The toy world: 32x32 RGB images of one object on a plain background.

Attributes: shape (circle, square, triangle), colour (red, green, blue, yellow),
texture, size (small, large), position (random), background (white, black,
gray). Captions: "a large red striped circle on a gray background", and
varied forms of it (attributes left out, prompt templates around it) so that
the model follows prompts like "a photo of a S* on a gray background".

Textures are patterns of the object's colour and a dark shade of it, anchored
to image coordinates. ``TEXTURES`` are seen in base training; ``NOVEL_TEXTURES``
never are: they are the concepts personalization has to learn from a few
images. Some (shape, colour) pairs are held out of base training too.
Everything is deterministic from a seed.

``generic_image`` is a different, much broader family (any colour, stripes at
any angle and period, checkers of any cell size, dots, rings, noise,
gradients, several shapes): what the toy autoencoder learns from, so that,
like SD's VAE, it was not trained on the concepts users bring.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (18, 18, 18), "gray": (128, 128, 128)}
SIZES = {"small": (6, 8), "large": (10, 13)}  # half-extent range in pixels
HELD_OUT = {("triangle", "yellow"), ("circle", "blue")}  # never in base training
DARK_SHADE = 0.35  # a texture's dark cells are the colour times this

Pattern = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (yy, xx) -> bool "dark" mask

# Seen in base training.
TEXTURES: dict[str, Pattern] = {
    "solid": lambda yy, xx: np.zeros(yy.shape, bool),
    "striped": lambda yy, xx: (yy // 2) % 2 == 1,  # horizontal, 2-px bands
}
# Never in base training: the personalization concepts' patterns.
NOVEL_TEXTURES: dict[str, Pattern] = {
    "checkered": lambda yy, xx: ((yy // 3) + (xx // 3)) % 2 == 1,  # 3-px cells
    "dotted": lambda yy, xx: ((yy % 4) < 2) & ((xx % 4) < 2),  # 2-px dots every 4 px
    "diagonal": lambda yy, xx: ((yy + xx) // 3) % 2 == 1,  # 45-degree bands
}
ALL_TEXTURES: dict[str, Pattern] = {**TEXTURES, **NOVEL_TEXTURES}


def _templates() -> list[str]:
    from ..data import VICO_TEMPLATES, IMAGENET_TEMPLATES_SMALL

    return sorted(set(VICO_TEMPLATES) | set(IMAGENET_TEMPLATES_SMALL))


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

    def mask(self) -> np.ndarray:
        """The object's true mask, bool [32, 32]."""
        return shape_mask(self.shape, self.cy, self.cx, self.r)


def vocabulary() -> list[str]:
    words = {"a", "an", "on", "background", "photo", "of", "the", "in", "with"}
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(ALL_TEXTURES) | set(SIZES)
    for template in _templates():
        words |= set(template.replace("{}", " ").split())
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
    return Scene(shape, colour, texture or list(TEXTURES)[rng.integers(len(TEXTURES))], size,
                 list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], cy, cx, r)


def training_caption(scene: Scene, rng: np.random.Generator, name_texture: bool = True) -> tuple[Scene, str]:
    """A varied caption of ``scene`` for base training (and the scene, resized when a template names a size).

    Half the captions are the full form; the others leave out some of size,
    colour, texture and background, and may be wrapped in one of the prompt
    templates personalization trains with ("a photo of the small {}"), so the
    model knows those words and what an attribute left unsaid means. With
    ``name_texture=False`` the texture word is never said (an object whose
    pattern the vocabulary has no word for).
    """
    if rng.random() < 0.5:
        full = scene.caption()
        return scene, full if name_texture else full.replace(f" {scene.texture} ", " ", 1)
    words = [w for w, keep in ((scene.size, 0.5), (scene.colour, 0.7), (scene.texture, 0.6 * name_texture))
             if rng.random() < keep]
    template = "a {}"
    if rng.random() < 0.6:
        templates = _templates()
        template = templates[rng.integers(len(templates))]
        named = [s for s in SIZES if s in template.split()]
        if named:  # "a photo of the small {}" must show a small object, and says its size itself
            words = [w for w in words if w not in SIZES]
            if scene.size != named[0]:
                lo, hi = SIZES[named[0]]
                r = int(rng.integers(lo, hi + 1))
                cy, cx = (int(rng.integers(r + 1, SIZE - r - 1)) for _ in range(2))
                scene = replace(scene, size=named[0], r=r, cy=cy, cx=cx)
    phrase = template.format(" ".join(words + [scene.shape]))
    if rng.random() < 0.8:
        phrase += f" on a {scene.background} background"
    return scene, phrase


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


def render(scene: Scene, pattern: np.ndarray | None = None, shade: float = DARK_SHADE) -> np.ndarray:
    """uint8 [32, 32, 3]. ``pattern`` (float [32, 32] in [0, 1], 1 = dark) replaces the scene's texture:
    the object's colour blended toward ``shade`` times itself (``free_pattern``)."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    mask = scene.mask()
    colour = np.array(COLOURS[scene.colour], np.float32)
    if pattern is None:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        fill = np.where(ALL_TEXTURES[scene.texture](yy, xx)[..., None], colour * DARK_SHADE, colour)
    else:
        fill = colour * (1 - (1 - shade) * pattern[..., None])
    img[mask] = fill[mask]
    return img.clip(0, 255).astype(np.uint8)


def free_pattern(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A pattern from the broad family (``_generic_pattern``: stripes at any angle and period, checkers of
    any cell, dots, rings, noise, gradients) and a dark shade in [0.2, 0.6]: what an object looks like in
    base training when its caption names no texture. The vocabulary has words only for ``TEXTURES``, so
    the base model can draw patterns like the novel ones (as SD can draw a checker) but no word asks for
    one: a concept's exact pattern is carried by its images alone."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    return _generic_pattern(rng, yy, xx).astype(np.float32), float(rng.uniform(0.2, 0.6))


def dataset(n: int, seed: int, held_out: bool = False, texture: str | None = None) -> tuple[np.ndarray, list[Scene]]:
    """n images [n, 32, 32, 3] and their scenes, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, held_out, texture) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


# --- the autoencoder's broad family -------------------------------------------------------------------------


def _generic_pattern(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A float map in [0, 1] from a parametric family of patterns (0 = first colour, 1 = second)."""
    kind = rng.integers(8)
    theta = rng.uniform(0, np.pi)
    u = yy * np.cos(theta) + xx * np.sin(theta)
    y0, x0 = rng.uniform(0, 8, 2)
    if kind == 0:  # solid
        return np.zeros(yy.shape)
    if kind == 1:  # stripes at any angle and period
        return ((u + y0) // rng.uniform(1, 5) % 2).astype(float)
    if kind == 2:  # axis-aligned stripes, integer widths (pixel-exact)
        w = int(rng.integers(1, 5))
        return (((yy if rng.random() < 0.5 else xx) + int(y0)) // w % 2).astype(float)
    if kind == 3:  # checkers of any cell size, axis-aligned or rotated
        c = int(rng.integers(1, 7))
        if rng.random() < 0.7:
            return (((yy + int(y0)) // c + (xx + int(x0)) // c) % 2).astype(float)
        v = -yy * np.sin(theta) + xx * np.cos(theta)
        return ((np.floor(u / c) + np.floor(v / c)) % 2).astype(float)
    if kind == 4:  # dots or holes on a grid: round ones anywhere, or pixel-aligned blocks of any size and pitch
        p = int(rng.integers(3, 8))
        if rng.random() < 0.5:
            rad = rng.uniform(0.5, 2.5)
            d2 = ((yy + y0) % p - p / 2) ** 2 + ((xx + x0) % p - p / 2) ** 2
            return (d2 <= rad * rad).astype(float)
        q = p if rng.random() < 0.5 else int(rng.integers(3, 8))
        h, w = int(rng.integers(1, p)), int(rng.integers(1, q))
        return (((yy + int(y0)) % p < h) & ((xx + int(x0)) % q < w)).astype(float)
    if kind == 5:  # concentric rings
        return (np.hypot(yy - rng.uniform(0, SIZE), xx - rng.uniform(0, SIZE)) // rng.uniform(1, 4) % 2).astype(float)
    if kind == 6:  # per-pixel noise, binary or continuous
        noise = rng.random(yy.shape)
        return (noise < 0.5).astype(float) if rng.random() < 0.5 else noise
    return np.clip((u - u.min()) / max(np.ptp(u), 1e-6), 0, 1)  # linear gradient


def _generic_shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = rng.uniform(0, SIZE, 2)
    ry, rx = rng.uniform(2, 14, 2)
    kind = rng.integers(4)
    if kind == 0:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if kind == 1:
        return (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    if kind == 2:
        return shape_mask("triangle", int(cy), int(cx), int(ry))
    return shape_mask(SHAPES[rng.integers(3)], int(cy), int(cx), int(rng.integers(3, 14)))


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0, 255, 3)
    b = a * rng.uniform(0.2, 0.6) if rng.random() < 0.5 else rng.uniform(0, 255, 3)  # shade or any colour
    return a, b


def fine_pattern(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A float map in {0, 1} of one pixel-aligned fine pattern at a random phase: bands 1-3 px wide along
    either axis or either diagonal, a checker of 1-4-px cells, dots of 1 to q-1 px on a q = 3-5-px lattice,
    or two-tone noise in 1- or 2-px blocks. Finer than most of ``_generic_pattern``'s draws, and the
    diagonals on the pixel grid, which it never draws: the autoencoder's stage 3
    (``--finetune-autoencoder``) trains on these so that fine detail outside the world's own textures
    survives the 2x2 latent cells."""
    yy, xx = yy.astype(int), xx.astype(int)
    kind = rng.integers(4)
    if kind == 0:
        w = int(rng.integers(1, 4))
        d = (yy, xx, yy + xx, yy - xx + 2 * SIZE)[rng.integers(4)]
        return ((d + rng.integers(2 * w)) // w % 2).astype(float)
    if kind == 1:
        c = int(rng.integers(1, 5))
        return (((yy + rng.integers(2 * c)) // c + (xx + rng.integers(2 * c)) // c) % 2).astype(float)
    if kind == 2:
        q = int(rng.integers(3, 6))
        s = int(rng.integers(1, q))
        return ((((yy + rng.integers(q)) % q) < s) & (((xx + rng.integers(q)) % q) < s)).astype(float)
    c = int(rng.integers(1, 3))
    return np.kron(rng.random((SIZE // c + 1, SIZE // c + 1)) < 0.5, np.ones((c, c)))[:SIZE, :SIZE].astype(float)


def fine_image(rng: np.random.Generator) -> np.ndarray:
    """uint8 [32, 32, 3]: a background in one colour or wearing ``fine_pattern`` (half each) and 1-2 shapes
    wearing ``fine_pattern``, each in two colours."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    a, b = _two_colours(rng)
    t = fine_pattern(rng, yy, xx) if rng.random() < 0.5 else np.zeros((SIZE, SIZE))
    img = a * (1 - t[..., None]) + b * t[..., None]
    return _paint_shapes(rng, img, rng.integers(1, 3), fine_pattern)


def _paint_shapes(rng: np.random.Generator, img: np.ndarray, n: int, pattern) -> np.ndarray:
    """``img`` (float [32, 32, 3]) with ``n`` ``_generic_shape``s painted on, each in two colours of
    ``pattern(rng, yy, xx)``, as uint8."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    for _ in range(n):
        mask = _generic_shape(rng, yy, xx)
        a, b = _two_colours(rng)
        t = pattern(rng, yy, xx)[..., None]
        img[mask] = (a * (1 - t) + b * t)[mask]
    return img.clip(0, 255).astype(np.uint8)


def generic_image(rng: np.random.Generator) -> np.ndarray:
    """uint8 [32, 32, 3] from the broad family: a patterned background and 0-3 patterned shapes.

    A quarter of the images are toy-world renders of the seen textures, so the
    autoencoder is exact on what the UNet sees; the rest never show the novel
    textures as such, only the general families they belong to.
    """
    if rng.random() < 0.25:
        return render(random_scene(rng))
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    a, b = _two_colours(rng)
    plain = rng.random() < 0.6
    t = np.zeros((SIZE, SIZE)) if plain else _generic_pattern(rng, yy, xx)
    img = a * (1 - t[..., None]) + b * t[..., None]
    return _paint_shapes(rng, img, rng.integers(0, 4), _generic_pattern)
