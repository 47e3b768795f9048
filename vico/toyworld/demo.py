"""The toy-world demo: learn a novel concept with Textual Inversion and with ViCo, use both in new contexts, score.

The concept is a red *checkered* square: a texture the base model never saw
(its autoencoder, trained on a broad family of patterns, can draw it), detail
a word embedding alone can hardly carry but ViCo's image attention can copy
from the reference. Both methods train on the same five renders and sample
with the same seeds on every background; the checker scores identity (shape,
colour, texture of the concept) and text alignment (the prompt's background),
and the true object masks score ViCo's Otsu object mask. ``grid.png`` shows
training images, TI samples, ViCo samples, ViCo's S* maps and masks, labelled.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..image_attention import decoder_transformers, spatial_transformers
from . import checker, world

@dataclass(frozen=True)
class Concept:
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


# The demo's concept first; the benchmark uses all. Each has a texture the base model never saw; the yellow
# triangle is also a shape/colour pair it never saw (``world.HELD_OUT``).
CONCEPTS = (Concept("square", "red", "checkered"), Concept("circle", "green", "dotted"),
            Concept("triangle", "blue", "diagonal"), Concept("triangle", "yellow", "checkered"),
            Concept("square", "green", "diagonal"))
CONCEPT = CONCEPTS[0]
DEMO_METHODS = ("textual-inversion", "vico")
VICO_STEPS = 800  # the demo's budgets (``vico demo --steps`` sets both); ViCo's image blocks need the longer run
TI_STEPS = 300
# The toy world's training recipe (docs/methods.md §8). The official rates were set for SD-sized
# models at thousands of steps; on the toy model, at the demo's budget, they leave ViCo's freshly
# initialised image blocks (1e-5) where they started and send a Textual Inversion embedding (5e-3
# x batch) to three times the norm of any word. Batch 4 without lr scaling, one rate per group, and ViCo's
# image blocks in every spatial transformer, encoder and middle block included (in every second decoder one,
# as the method places them, the red checkered square's texture read 0.00 even at 1200 steps; in every decoder
# one the diagonal and yellow checkered triangles read 0.38 and 0.33 at 1600 steps, in every one 0.58 and 0.71),
# for 3200 steps on a cosine schedule (at 1600 the red square and the diagonal triangle read 0.58, the green
# diagonal square 0.50; at 3200, 0.88 / 0.88 / 0.62; docs/methods.md §8). A recipe's options["layers"] names
# such a placement by what it is, resolved per model by ``for_model``:
EVERY_DECODER_LAYER = "every decoder layer"
EVERY_TRANSFORMER = "every spatial transformer"
# AttnDreamBooth: 250 steps in each of its three stages, both UNet stages at 1e-4, which moves the toy UNet
# (the official 2e-5 / 2e-6 moved it 1.6% / 0.5% and left the red square blue), and no rotation augmentation
# (a nearest-neighbour rotation of a 32-pixel render aliases a 2-4 pixel pattern into diagonal bands).
# CatVersion: the official rate at the toy batch (5e-3 x 4, 1000 steps); no rate, batch, schedule, step count or
# prefix initialisation tried bound the red square's colour (0.75 at best, target 0.9) without costing text alignment
# (benchmarks/history/toy-recipes-2026-12-06.md, 2026.md).
TOY_STEPS = {"textual-inversion": TI_STEPS, "vico": 3200, "attndreambooth": 250, "catversion": 1000}
TOY_RECIPES: dict[str, dict] = {
    "textual-inversion": dict(batch_size=4, scale_lr=False, learning_rates={"embedding": 1e-3}),
    "vico": dict(batch_size=4, scale_lr=False, learning_rates={"embedding": 1e-3, "image": 1e-3},
                 lr_scheduler="cosine", options={"layers": EVERY_TRANSFORMER}),
    "attndreambooth": dict(batch_size=4, scale_lr=False,
                           learning_rates={"embedding": 1e-3, "cross-attention": 1e-4, "unet": 1e-4},
                           options={"rotate_p": 0.0}),
    "catversion": dict(batch_size=4, scale_lr=False, learning_rates={"prefix": 2e-2}),
}
# The demo runs ViCo for a quarter of its toy steps, to stay within five minutes on 2 CPU cores, and so at a
# constant rate: a cosine schedule over 800 steps decays before the image blocks have learned (texture 0.17 vs
# 0.46).
# For the same budget its image blocks stay in the decoder: in every transformer its 800 steps took 236 s
# instead of ~180 s, the main job 6 min 11 s with the install (texture 0.67 instead of 0.50).
DEMO_RECIPES = {"textual-inversion": TOY_RECIPES["textual-inversion"],
                "vico": dict(TOY_RECIPES["vico"], lr_scheduler="constant",
                             options={**TOY_RECIPES["vico"]["options"], "layers": EVERY_DECODER_LAYER})}


# a recipe's symbolic options["layers"] -> the function that names them in a UNet (``for_model``)
LAYER_SETS = {EVERY_DECODER_LAYER: decoder_transformers, EVERY_TRANSFORMER: spatial_transformers}


def for_model(recipe: dict, model: Path) -> dict:
    """``recipe`` (TrainConfig overrides) with a symbolic ``options["layers"]`` resolved against ``model``'s UNet."""
    from ..model import meta_unet

    options = recipe.get("options", {})
    layers = options.get("layers")
    if isinstance(layers, str) and layers in LAYER_SETS:
        return dict(recipe, options=dict(options, layers=LAYER_SETS[layers](meta_unet(model))))
    return recipe


def concept_scenes(concept: Concept, n: int = 5, seed: int = 7) -> list[world.Scene]:
    """n scenes of the concept at different sizes, positions and backgrounds."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        scene = world.random_scene(rng, held_out=(concept.shape, concept.colour) in world.HELD_OUT,
                                   texture=concept.texture)
        if scene.shape == concept.shape and scene.colour == concept.colour:
            scenes.append(scene)
    return scenes


def write_concept_images(folder: Path, scenes: list[world.Scene]) -> np.ndarray:
    """Render the scenes as PNGs into ``folder``; returns the images [n, 32, 32, 3]."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = np.stack([world.render(s) for s in scenes])
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"concept_{i}.png")
    return images


def upsample_mask(mask: np.ndarray, size: int = world.SIZE) -> np.ndarray:
    """bool [side, side] -> bool [size, size] (nearest)."""
    k = size // mask.shape[-1]
    return np.kron(mask.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)


def reference_mask_iou(pipe, images: np.ndarray, scenes: list[world.Scene]) -> float:
    """Mean IoU of ViCo's Otsu object mask of S* from the reference branch (what its image attention is
    masked with) against the true object masks of the training images."""
    c = pipe.components
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = c.vae.encode(x.to(c.device, c.vae.dtype)).latent_dist.mean * c.vae.config.scaling_factor
    masks = pipe.method.object_masks(latents).cpu().numpy()
    return float(np.mean([checker.iou(upsample_mask(m), s.mask()) for m, s in zip(masks, scenes)]))


def prompt(method, concept: Concept, background: str) -> str:
    """The method names the concept its own way: "S*", AttnDreamBooth "S* square", CatVersion "square"."""
    return type(method).prompt_for(f"a large {{}} on a {background} background", method.config.placeholder,
                                   concept.shape)


def sample_and_score(pipe, concept: Concept, reference, samples: int, sample_steps: int, guidance: float | None,
                     progress: bool) -> tuple[list[dict], dict]:
    """Per background ``samples`` images with seeds 0, 1, ...; returns score rows and per-background images/maps."""
    rows, per_bg = [], {}
    for i, bg in enumerate(world.BACKGROUNDS):
        text = prompt(pipe.method, concept, bg)
        kwargs = {} if guidance is None else {"guidance_scale": guidance}
        images, context = pipe(text, reference=reference, num_images=samples, num_inference_steps=sample_steps,
                               seed=i, progress=progress, **kwargs)
        maps = pipe.method.sampled_maps(context) if reference is not None else {}
        heat = mask = None
        if maps:
            layer = pipe.method.sharpest_nearest_output({k: m.shape[-1] * m.shape[-2] for k, (m, _) in maps.items()})
            heat, mask = (m.float().cpu().numpy() for m in maps[layer])
        for j, img in enumerate(images):
            got = checker.read(img)
            rows.append(dict(prompt=text, background=got["background"] == bg, shape=got["shape"] == concept.shape,
                             colour=got["colour"] == concept.colour, texture=got["texture"] == concept.texture))
        per_bg[bg] = (images, heat, mask)
    return rows, per_bg


def summary(rows: list[dict]) -> dict:
    return {"identity_shape": float(np.mean([r["shape"] for r in rows])),
            "identity_colour": float(np.mean([r["colour"] for r in rows])),
            "identity_texture": float(np.mean([r["texture"] for r in rows])),
            "text_background": float(np.mean([r["background"] for r in rows]))}


def run(model: Path, out: Path, steps: int | None = VICO_STEPS, ti_steps: int | None = TI_STEPS,
        sample_steps: int = 30, guidance: float = 5.0, samples: int = 2, quiet: bool = False) -> dict:
    """Train TI and ViCo, sample, score; writes out/grid.png and out/metrics.json and returns the metrics."""
    from ..files import output_folder

    with output_folder(out) as folder:  # locked; what vico wrote there before is replaced, nothing else
        # written in place, not staged: the concepts record their training images' path
        folder.replace(["images", *DEMO_METHODS, "metrics.json", "grid.png"])
        return _run(model, out, steps, ti_steps, sample_steps, guidance, samples, quiet)


def _run(model: Path, out: Path, steps: int | None, ti_steps: int | None, sample_steps: int, guidance: float,
         samples: int, quiet: bool) -> dict:
    from ..methods import get_method
    from ..pipeline import ViCoPipeline
    from ..training import TrainConfig, train

    scenes = concept_scenes(CONCEPT)
    images = write_concept_images(out / "images", scenes)
    metrics: dict = {"concept": CONCEPT.name, "methods": {}}
    grid_rows: dict[str, dict] = {}
    for method, method_steps in (("textual-inversion", ti_steps), ("vico", steps)):
        t0 = time.perf_counter()
        train(TrainConfig(model=str(model), images=str(out / "images"), out=str(out / method), method=method,
                          init_word=CONCEPT.shape, steps=method_steps, progress=not quiet,
                          checkpoint_every=10**9, **for_model(DEMO_RECIPES[method], model)))
        train_s = time.perf_counter() - t0
        pipe = ViCoPipeline.from_pretrained(model, out / method)
        reference = pipe.default_reference(out / "images") if pipe.method.needs_reference else None
        rows, per_bg = sample_and_score(pipe, CONCEPT, reference, samples, sample_steps, guidance, not quiet)
        entry = dict(summary(rows), train_seconds=train_s, samples=rows, recipe=DEMO_RECIPES[method],
                     steps=method_steps if method_steps is not None else get_method(method).default_steps)
        if method == "vico":
            entry["reference_mask_iou"] = reference_mask_iou(pipe, images, scenes)
        metrics["methods"][method] = entry
        grid_rows[method] = per_bg
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_grid(out / "grid.png", images, grid_rows)
    return metrics


def save_grid(path: Path, concept_images: np.ndarray, grid_rows: dict[str, dict], scale: int = 4) -> None:
    """Labelled rows: training images, TI samples, ViCo samples, ViCo S* maps, ViCo masks (upscaled)."""
    from PIL import Image, ImageDraw

    from ..pipeline import heatmap_overlay

    def row_of(method: str, what: str) -> list[np.ndarray]:
        tiles = []
        for images, heat, mask in grid_rows[method].values():
            for j, img in enumerate(images):
                if what == "image":
                    tiles.append(img)
                elif what == "map":
                    tiles.append(heatmap_overlay(img, heat[j]) if heat is not None else np.zeros_like(img))
                else:
                    m = upsample_mask(mask[j]) if mask is not None else np.zeros(img.shape[:2], bool)
                    tiles.append(np.repeat(m[..., None] * 255, 3, -1).astype(np.uint8))
        return tiles

    rows = [("training images", list(concept_images)), ("Textual Inversion", row_of("textual-inversion", "image")),
            ("ViCo", row_of("vico", "image")), ("ViCo S* map", row_of("vico", "map")),
            ("ViCo Otsu mask", row_of("vico", "mask"))]
    cols = max(len(tiles) for _, tiles in rows)
    tile = world.SIZE * scale
    label_w, header = 150, 20
    canvas = Image.new("RGB", (label_w + cols * (tile + 4), header + len(rows) * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    backgrounds = list(world.BACKGROUNDS)
    per = max(len(row_of("vico", "image")) // len(backgrounds), 1)
    # the background headers belong to the sample rows, not to the training images (whose backgrounds vary)
    for i, bg in enumerate(backgrounds):
        text = f"samples: ... on a {bg} background" if per > 1 else f"... on {bg}"  # fits the columns it heads
        draw.text((label_w + i * per * (tile + 4) + 4, tile + 8), text, fill=(0, 0, 0))
    for r, (label, tiles) in enumerate(rows):
        y = r * (tile + 4) + (header if r else 0)
        draw.text((6, y + tile // 2 - 6), label, fill=(0, 0, 0))
        for c, img in enumerate(tiles):
            big = Image.fromarray(np.kron(img, np.ones((scale, scale, 1))).astype(np.uint8))
            canvas.paste(big, (label_w + c * (tile + 4), y))
    canvas.save(path)


# The toy models inside the package, by architecture: SD 1.5-shaped and SDXL-shaped (two text encoders, pooled
# and time-id conditions, depth-2 transformers; the same world, captions and autoencoder).
SHIPPED_MODELS = {"sd": "model", "sdxl": "model_sdxl"}


def shipped_model(arch: str = "sd") -> Path | None:
    """The trained toy model of ``arch`` (a key of ``SHIPPED_MODELS``) inside the package, when this install has it."""
    path = Path(__file__).resolve().parent / SHIPPED_MODELS[arch]
    return path if (path / "model_index.json").is_file() else None
