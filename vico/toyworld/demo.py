"""The toy-world ViCo demo: learn a novel concept, use it in new contexts, score it.

The concept is a red *checkered* square — a pattern the base model never saw,
detail a word embedding alone cannot carry but image attention can copy from
the reference. ViCo trains on a few renders of it, then samples it on each
background; the checker scores identity (shape and colour of the concept) and
text alignment (the prompt's background), and a grid shows training images,
generations, the S* attention maps and their Otsu masks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from . import checker, world

CONCEPT = dict(shape="square", colour="red", texture="checkered")


def concept_images(folder: Path, n: int = 5, seed: int = 7) -> list[np.ndarray]:
    """n renders of the concept at different sizes, positions and backgrounds, saved as PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        while True:
            scene = world.random_scene(rng, texture=CONCEPT["texture"])
            if scene.shape == CONCEPT["shape"] and scene.colour == CONCEPT["colour"]:
                break
        img = world.render(scene)
        Image.fromarray(img).save(folder / f"concept_{i}.png")
        images.append(img)
    return images


def run(model: Path, out: Path, steps: int = 150, sample_steps: int = 30, guidance: float = 5.0,
        quiet: bool = False) -> dict:
    """Train, sample and score; writes out/grid.png and out/metrics.json and returns the metrics."""
    from PIL import Image

    from ..pipeline import ViCoPipeline, heatmap_overlay, image_grid
    from ..training import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    concept = concept_images(out / "images")
    t0 = time.perf_counter()
    train(TrainConfig(model=str(model), images=str(out / "images"), out=str(out / "concept"), method="vico",
                      init_word=CONCEPT["shape"], steps=steps, progress=not quiet, checkpoint_every=max(steps, 1)))
    train_s = time.perf_counter() - t0
    pipe = ViCoPipeline.from_pretrained(model, out / "concept")
    reference = pipe.default_reference(out / "images")
    rows, per_bg = [], {}
    for i, bg in enumerate(world.BACKGROUNDS):
        prompt = f"a large S* on a {bg} background"
        images, context = pipe(prompt, reference=reference, num_images=2, num_inference_steps=sample_steps,
                               guidance_scale=guidance, seed=i, progress=not quiet)
        maps = pipe.method.sampled_maps(context)
        layer = max(maps, key=lambda k: maps[k][0].shape[-1])
        heat, mask = maps[layer]
        for j, img in enumerate(images):
            got = checker.read(img)
            rows.append(dict(prompt=prompt, background=got["background"] == bg,
                             shape=got["shape"] == CONCEPT["shape"], colour=got["colour"] == CONCEPT["colour"]))
            per_bg.setdefault(bg, []).append((img, heat[j].float().cpu().numpy(), mask[j].cpu().numpy()))
    # identity also as pixel similarity: mean |generated - nearest concept image| on the object's colour range
    gen = np.stack([g for v in per_bg.values() for g, _, _ in v]).astype(np.float32)
    ref = np.stack(concept).astype(np.float32)
    pixel_l1 = float(np.mean([np.abs(g - ref).mean(axis=(1, 2, 3)).min() for g in gen]) / 255)
    metrics = {
        "identity_shape": float(np.mean([r["shape"] for r in rows])),
        "identity_colour": float(np.mean([r["colour"] for r in rows])),
        "text_background": float(np.mean([r["background"] for r in rows])),
        "pixel_l1_to_nearest_concept_image": pixel_l1,
        "train_seconds": train_s,
        "steps": steps,
        "samples": rows,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    cols = len(world.BACKGROUNDS) * 2
    tiles = list(concept) + [np.zeros_like(concept[0])] * max(cols - len(concept), 0)
    for bg, items in per_bg.items():
        tiles += [img for img, _, _ in items]
    for bg, items in per_bg.items():
        tiles += [heatmap_overlay(img, heat) for img, heat, _ in items]
    for bg, items in per_bg.items():
        side = items[0][2].shape[-1]
        tiles += [np.repeat(np.kron(m, np.ones((img.shape[0] // side,) * 2))[..., None] * 255, 3, -1).astype(np.uint8)
                  for img, _, m in items]
    grid = image_grid(np.stack(tiles), cols=cols)
    Image.fromarray(np.kron(grid, np.ones((4, 4, 1))).astype(np.uint8)).save(out / "grid.png")  # 4x: 32 px is tiny
    return metrics


def shipped_model() -> Path | None:
    """The trained toy model inside the package, when this install has one."""
    path = Path(__file__).resolve().parent / "model"
    return path if (path / "model_index.json").is_file() else None
