"""Personalization benchmark on the toy world: ViCo, Textual Inversion, AttnDreamBooth and CatVersion on
several novel concepts (``demo.CONCEPTS``: textures the base model never saw).

Per (concept, method, setting): train on five renders, sample ``samples``
images per background with fixed seeds, and read them back with the checker.
Identity = the concept's shape, colour and texture read back; text alignment =
the prompt's background read back; for ViCo also the IoU of its reference-branch
Otsu object mask with the true mask. Settings (``SETTINGS``): each method's
official defaults, a longer run (``LONG_FACTOR`` times the steps), the toy
world's recipe (``demo.TOY_RECIPES``: batch, steps, learning rates and method
options, one per method; docs/methods.md §8) and ViCo ablations of that recipe
(official image lr, 10x the toy image lr, image blocks in every second decoder layer as the method
places them or in every decoder layer, embedding frozen, no regulariser; 1/4 and 4x the steps for every
method) and AttnDreamBooth's UNet stages as a LoRA (rank 4 at 1, 10 and 100x the toy rates; rank 16 at
10x). Results are appended to ``OUT/benchmark.json`` after every row, and finished rows are not recomputed
on a rerun (the command resumes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .demo import CONCEPTS, EVERY_DECODER_LAYER, TOY_RECIPES, TOY_STEPS, Concept, concept_scenes, for_model, \
    reference_mask_iou, sample_and_score, summary, write_concept_images

METHODS = ("vico", "textual-inversion", "attndreambooth", "catversion")
LONG_FACTOR = 2
FROZEN_LR = 1e-12  # "embedding frozen": AdamW steps of ~1e-12 leave it where "init_word" put it


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


def _toy(method: str, **changes) -> dict | None:
    """The toy recipe of ``method`` with ``changes`` (learning_rates merged); None when it has none."""
    if method not in TOY_RECIPES:
        return None
    recipe = dict(TOY_RECIPES[method], steps=TOY_STEPS[method])
    lrs = dict(recipe.get("learning_rates", {}), **changes.pop("learning_rates", {}))
    options = dict(recipe.get("options", {}), **changes.pop("options", {}))
    return dict(recipe, learning_rates=lrs, options=options, **changes)


def _only(name: str, make):
    return lambda method: make(method) if method == name else None


def _vico_only(make):
    return _only("vico", make)


def _unet_lora(rank: int, lr_factor: float = 1.0):
    """AttnDreamBooth's toy recipe with its UNet stages training a rank-``rank`` LoRA at ``lr_factor`` x their rates."""
    def make(method: str) -> dict:
        rates = TOY_RECIPES[method]["learning_rates"]
        return _toy(method, options={"unet_lora_rank": rank},
                    learning_rates={k: lr_factor * rates[k] for k in ("cross-attention", "unet")})
    return _only("attndreambooth", make)


# name -> (method -> TrainConfig overrides, or None where the setting does not apply to the method)
SETTINGS = {
    "default": lambda method: {},
    "long": lambda method: {"steps": method_steps(method, "long")},
    "toy": _toy,
    "toy, 4x steps": lambda m: _toy(m, steps=4 * TOY_STEPS[m]) if m in TOY_RECIPES else None,
    "toy, official image lr": _vico_only(lambda m: _toy(m, learning_rates={"image": 1e-5})),
    "toy, embedding frozen": _vico_only(lambda m: _toy(m, learning_rates={"embedding": FROZEN_LR})),
    "toy, no regulariser": _vico_only(lambda m: _toy(m, options={"reg_weight": 0.0})),
    "toy, image lr x10": _vico_only(lambda m: _toy(m, learning_rates={"image": 10 * TOY_RECIPES[m]["learning_rates"]["image"]})),
    "toy, 1/4 steps": lambda m: _toy(m, steps=TOY_STEPS[m] // 4) if m in TOY_RECIPES else None,
    # ViCo's toy recipe at the demo's budget (800 steps at a constant rate, the 2026-12-04 rows), at 1600 steps
    # (until 2026-12-07), and each of its schedule and step count alone
    "toy, 800 steps, constant lr": _vico_only(lambda m: _toy(m, steps=800, lr_scheduler="constant")),
    "toy, 1600 steps": _vico_only(lambda m: _toy(m, steps=1600)),
    "toy, constant lr": _vico_only(lambda m: _toy(m, lr_scheduler="constant")),
    "toy, 800 steps": _vico_only(lambda m: _toy(m, steps=800)),
    # the toy recipe puts ViCo's image blocks in every spatial transformer; the method's own placement (every
    # second decoder one) and the toy recipe's before 2026-12-06 (every decoder one)
    "toy, blocks in every second decoder layer": _vico_only(lambda m: _toy(m, options={"layers": None})),
    "toy, blocks in every decoder layer": _vico_only(lambda m: _toy(m, options={"layers": EVERY_DECODER_LAYER})),
    "toy, unet LoRA rank 4": _unet_lora(4),
    "toy, unet LoRA rank 4, UNet lr x10": _unet_lora(4, lr_factor=10),
    "toy, unet LoRA rank 4, UNet lr x100": _unet_lora(4, lr_factor=100),
    "toy, unet LoRA rank 16, UNet lr x10": _unet_lora(16, lr_factor=10),
}


def slug(concept: Concept) -> str:
    return concept.name.replace(" ", "-")


def run(model: Path, out: Path, concepts=CONCEPTS, methods=METHODS, settings=("default", "long"), samples: int = 8,
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
                overrides = SETTINGS[setting](method)
                if overrides is None or (concept.name, method, setting) in done:
                    continue
                overrides = for_model(overrides, model)
                run_dir = out / slug(concept) / f"{method}-{setting.replace(', ', '-').replace(' ', '-')}"
                train(TrainConfig(model=str(model), images=str(out / slug(concept) / "images"), out=str(run_dir),
                                  method=method, init_word=concept.shape, progress=not quiet,
                                  checkpoint_every=10**9, resume=True, **overrides))
                steps = overrides.get("steps")
                pipe = ViCoPipeline.from_pretrained(model, run_dir)
                reference = pipe.default_reference(out / slug(concept) / "images") if pipe.method.needs_reference \
                    else None
                scored, _ = sample_and_score(pipe, concept, reference, samples, sample_steps, guidance, not quiet)
                row = dict(concept=concept.name, method=method, setting=setting,
                           steps="default" if steps is None else steps, samples=len(scored), **summary(scored))
                if method == "vico":
                    row["reference_mask_iou"] = reference_mask_iou(pipe, images, scenes)
                rows.append(row)
                results_path.write_text(json.dumps(rows, indent=1))  # nothing lost on interruption
    return rows


def rate(row: dict, key: str) -> str:
    """``row[key]`` (a share of ``row["samples"]`` samples) with its binomial standard error, sqrt(p(1-p)/n)."""
    p, n = row[key], row["samples"]
    return f"{p:.2f} ± {math.sqrt(p * (1 - p) / n):.2f}"


def table(rows: list[dict]) -> str:
    """A markdown table of benchmark rows; every rate with its binomial standard error over the row's samples."""
    lines = ["| concept | method | setting | steps | n | identity: shape | colour | **texture** | text: background | "
             "ViCo ref. mask IoU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        iou = f"{r['reference_mask_iou']:.2f}" if "reference_mask_iou" in r else "—"
        rates = " | ".join(rate(r, k) for k in ("identity_shape", "identity_colour", "identity_texture",
                                                "text_background"))
        lines.append(f"| {r['concept']} | {r['method']} | {r['setting']} | {r['steps']} | {r['samples']} | {rates} | "
                     f"{iou} |")
    return "\n".join(lines)
