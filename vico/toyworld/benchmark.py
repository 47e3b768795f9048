"""Personalization benchmark on the toy world: ViCo vs Textual Inversion vs
AttnDreamBooth vs CatVersion on a novel concept (the red checkered square).

Identity: the checker reads the concept's shape and colour back from the
generations, plus the pixel L1 distance to the nearest concept image (lower is
closer). Text alignment: the checker reads the background the prompt asked for.
The papers' claim to test: ViCo keeps identity better than Textual Inversion
while following the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import checker, world
from .demo import CONCEPT, concept_images

METHODS = ("vico", "textual-inversion", "attndreambooth", "catversion")


def prompt_for(method: str, background: str) -> str:
    from ..methods.base import get_method

    # The method names the concept: "S*", AttnDreamBooth "S* <shape>", CatVersion the class word.
    return get_method(method).prompt_for(f"a large {{}} on a {background} background", "S*", CONCEPT["shape"])


def run(model: Path, out: Path, steps: int = 200, samples: int = 4, sample_steps: int = 30, guidance: float = 5.0,
        methods=METHODS, quiet: bool = True) -> list[dict]:
    from ..pipeline import ViCoPipeline
    from ..training import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    concept = np.stack(concept_images(out / "images")).astype(np.float32)
    rows = []
    for method in methods:
        train(TrainConfig(model=str(model), images=str(out / "images"), out=str(out / method), method=method,
                          init_word=CONCEPT["shape"], steps=steps, progress=not quiet, checkpoint_every=10**9))
        pipe = ViCoPipeline.from_pretrained(model, out / method)
        reference = pipe.default_reference(out / "images") if method == "vico" else None
        hits = {"shape": [], "colour": [], "background": []}
        l1 = []
        for i, bg in enumerate(world.BACKGROUNDS):
            images, _ = pipe(prompt_for(method, bg), reference=reference, num_images=samples,
                             num_inference_steps=sample_steps, guidance_scale=guidance, seed=i, progress=False)
            for img in images:
                got = checker.read(img)
                hits["shape"].append(got["shape"] == CONCEPT["shape"])
                hits["colour"].append(got["colour"] == CONCEPT["colour"])
                hits["background"].append(got["background"] == bg)
                l1.append(np.abs(img.astype(np.float32)[None] - concept).mean(axis=(1, 2, 3)).min() / 255)
        rows.append(dict(method=method, steps=steps, identity_shape=float(np.mean(hits["shape"])),
                         identity_colour=float(np.mean(hits["colour"])), pixel_l1=float(np.mean(l1)),
                         text_background=float(np.mean(hits["background"]))))
    (out / "benchmark.json").write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | steps | identity: shape | identity: colour | pixel L1 to concept (lower better) | "
             "text: background |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['identity_shape']:.2f} | {r['identity_colour']:.2f} | "
                     f"{r['pixel_l1']:.3f} | {r['text_background']:.2f} |")
    return "\n".join(lines)
