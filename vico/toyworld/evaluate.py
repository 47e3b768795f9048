"""Prompt-following accuracy of a toy-world model, read by the procedural checker.

    python -m vico.toyworld.evaluate --model toy-sd/pipeline --n 24 --cfg 3 5 7.5

For each guidance scale it samples ``n`` captions of seen attribute
combinations and ``n`` of held-out (shape, colour) pairs, reads every image
back with ``checker.read`` and reports, per attribute, the fraction matching
the caption.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import checker, world


def evaluate(model: str | Path, n: int = 24, cfgs=(5.0,), steps: int = 30, seed: int = 0) -> dict:
    from ..model import load_pipeline

    pipe = load_pipeline(model)
    report = {}
    for held_out in (False, True):
        _, scenes = world.dataset(n, seed=seed + 1000 * held_out, held_out=held_out)
        for cfg in cfgs:
            images = pipe([s.caption() for s in scenes], num_inference_steps=steps, guidance_scale=cfg,
                          height=world.SIZE, width=world.SIZE, output_type="np",
                          generator=torch.Generator().manual_seed(seed)).images
            images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            report[f"{'held_out' if held_out else 'seen'}@cfg{cfg:g}"] = checker.accuracy(images, scenes)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vico.toyworld.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path)
    o = p.parse_args(argv)
    report = evaluate(o.model, o.n, o.cfg, o.steps)
    keys = ("background", "colour", "shape", "texture", "size")
    print("| set @ guidance | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, acc in report.items():
        print(f"| {name} | " + " | ".join(f"{acc[k]:.2f}" for k in keys) + " |")
    if o.out:
        o.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
