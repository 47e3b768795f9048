"""Personalization benchmark on the toy world: ViCo, Textual Inversion, AttnDreamBooth and CatVersion on
several novel concepts (``demo.CONCEPTS``: textures the base model never saw).

Per (concept, method, setting): train on five renders, sample ``samples``
images per background with fixed seeds, and read them back with the checker.
Identity = the concept's shape, colour and texture read back; text alignment =
the prompt's background read back; for ViCo also the IoU of its reference-branch
Otsu object mask with the true mask. Settings: each method's default steps, and
a longer one (``LONG_FACTOR`` times). Results are appended to
``OUT/benchmark.json`` after every row, and finished rows are not recomputed on
a rerun (the command resumes).
"""

from __future__ import annotations

import json
from pathlib import Path

from .demo import CONCEPTS, Concept, concept_scenes, reference_mask_iou, sample_and_score, summary, \
    write_concept_images

METHODS = ("vico", "textual-inversion", "attndreambooth", "catversion")
SETTINGS = ("default", "long")
LONG_FACTOR = 2


def method_steps(method: str, setting: str) -> int | None:
    """None = the method's defaults; "long" = LONG_FACTOR x its default total, spread evenly over its stages
    (``--steps`` sets every stage of a multi-stage method)."""
    if setting == "default":
        return None
    from ..methods import get_method

    cls = get_method(method)
    stages = getattr(__import__(cls.__module__, fromlist=["STAGES"]), "STAGES", None) if method == "attndreambooth" \
        else None
    n_stages = len(stages) if stages else 1
    return LONG_FACTOR * cls.default_steps // n_stages


def slug(concept: Concept) -> str:
    return concept.name.replace(" ", "-")


def run(model: Path, out: Path, concepts=CONCEPTS, methods=METHODS, settings=SETTINGS, samples: int = 8,
        sample_steps: int = 30, guidance: float | None = 5.0, quiet: bool = True) -> list[dict]:
    from ..pipeline import ViCoPipeline
    from ..training import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "benchmark.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["concept"], r["method"], r["setting"]) for r in rows}
    for concept in concepts:
        scenes = concept_scenes(concept)
        images = write_concept_images(out / slug(concept) / "images", scenes)
        for method in methods:
            for setting in settings:
                if (concept.name, method, setting) in done:
                    continue
                steps = method_steps(method, setting)
                run_dir = out / slug(concept) / f"{method}-{setting}"
                train(TrainConfig(model=str(model), images=str(out / slug(concept) / "images"), out=str(run_dir),
                                  method=method, init_word=concept.shape, steps=steps, progress=not quiet,
                                  checkpoint_every=10**9, resume=True))
                pipe = ViCoPipeline.from_pretrained(model, run_dir)
                reference = pipe.default_reference(out / slug(concept) / "images") if method == "vico" else None
                scored, _ = sample_and_score(pipe, concept, reference, samples, sample_steps, guidance, not quiet)
                row = dict(concept=concept.name, method=method, setting=setting,
                           steps="default" if steps is None else steps, samples=len(scored), **summary(scored))
                if method == "vico":
                    row["reference_mask_iou"] = reference_mask_iou(pipe, images, scenes)
                rows.append(row)
                results_path.write_text(json.dumps(rows, indent=1))  # nothing lost on interruption
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| concept | method | steps | identity: shape | colour | **texture** | text: background | "
             "ViCo ref. mask IoU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        iou = f"{r['reference_mask_iou']:.2f}" if "reference_mask_iou" in r else "—"
        lines.append(f"| {r['concept']} | {r['method']} | {r['steps']} | {r['identity_shape']:.2f} | "
                     f"{r['identity_colour']:.2f} | {r['identity_texture']:.2f} | {r['text_background']:.2f} | {iou} |")
    return "\n".join(lines)
