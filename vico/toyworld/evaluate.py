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
            report[f"{'held_out' if held_out else 'seen'}@cfg{cfg:g}"] = dict(
                checker.accuracy(images, scenes), shape_read_as=checker.confusion(images, scenes, "shape"))
    return report


def trace_mask_iou(model: str | Path, n: int = 12, cfg: float = 5.0, steps: int = 30, seed: int = 0) -> dict:
    """Class-word map quality on the base model's own generations.

    For ``n`` captions of seen combinations: generate with ``fused.maps.trace``
    recording the shape word's map (summed over layers and timesteps), threshold
    it with Otsu ("vico" mode) and compare with the object mask the checker reads
    from the generated image (IoU). Images without a readable object are skipped.
    """
    import fused
    from fused.maps import trace

    from ..model import load_pipeline

    pipe = load_pipeline(model)
    _, scenes = world.dataset(n, seed=seed + 77)
    ious = []
    for i, scene in enumerate(scenes):
        caption = scene.caption()
        with trace(pipe, caption, [scene.shape]) as tr:
            image = pipe(caption, num_inference_steps=steps, guidance_scale=cfg, height=world.SIZE, width=world.SIZE,
                         output_type="np", generator=torch.Generator().manual_seed(seed + i)).images[0]
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        truth = checker.object_mask(image)
        if truth.sum() < 8:
            continue
        heat = tr.heatmaps()[scene.shape]
        _, mask = fused.otsu_mask(heat.reshape(1, -1).double(), backend="torch")
        side = heat.shape[-1]
        mask = np.kron(mask.reshape(side, side).numpy().astype(np.uint8),
                       np.ones((world.SIZE // side,) * 2, np.uint8)).astype(bool)
        ious.append(checker.iou(mask, truth))
    return {"class_word_trace_mask_iou": float(np.mean(ious)) if ious else float("nan"), "images": len(ious)}


@torch.no_grad()
def texture_survival(model: str | Path, strengths=(0.1, 0.3, 0.5), n: int = 12, steps: int = 30, cfg: float = 5.0,
                     seed: int = 0) -> dict:
    """How generic the base UNet's denoiser is: img2img of renders (large objects, every texture) at each
    ``strength`` with the caption minus the texture word (the text cannot name a novel texture); the
    fraction whose texture the checker still reads back. A frozen-UNet method can only keep a texture
    that the denoiser does not erase at low noise."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from ..model import load_pipeline

    base = load_pipeline(model)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=DDIMScheduler.from_config(base.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    report = {}
    for texture in world.ALL_TEXTURES:
        scenes = []
        while len(scenes) < n:
            scene = world.random_scene(rng, texture=texture)
            if scene.size == "large":
                scenes.append(scene)
        x = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
        named = texture if texture in world.TEXTURES and texture != "solid" else ""
        prompts = [f"a large {s.colour} {named + ' ' if named else ''}{s.shape} on a {s.background} background"
                   for s in scenes]
        row = {}
        for strength in strengths:
            out = pipe(prompts, image=x, strength=strength, num_inference_steps=steps, guidance_scale=cfg,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images
            out = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
            row[f"{strength:g}"] = float(np.mean([checker.read(im)["texture"] == texture for im in out]))
        report[texture] = {"novel": texture in world.NOVEL_TEXTURES, **row}
    return report


# Patterns in no list of the world or its autoencoder's family as such: a probe of how generic the VAE is.
PROBE_PATTERNS = {
    "vertical stripes 1px": lambda yy, xx: xx % 2 == 1,
    "checker 2px": lambda yy, xx: ((yy // 2) + (xx // 2)) % 2 == 1,
    "checker 5px": lambda yy, xx: ((yy // 5) + (xx // 5)) % 2 == 1,
    "crosses": lambda yy, xx: (yy % 5 == 2) | (xx % 5 == 2),
    "anti-diagonal": lambda yy, xx: ((yy - xx) // 2) % 2 == 1,
}


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] -> ``vae``'s decoding of its posterior mean (as the methods encode), uint8 [n, H, W, 3]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


def object_error(images: np.ndarray, recon: np.ndarray, masks) -> float:
    """Mean over images of |images - recon| on each image's object pixels (bool masks [H, W]), in 0-255 units."""
    err = np.abs(images.astype(np.float32) - recon.astype(np.float32)).mean(-1)
    return float(np.mean([e[m].mean() for e, m in zip(err, masks)]))


@torch.no_grad()
def vae_report(vae, n: int = 48, seed: int = 0) -> dict:
    """Per texture: mean |x - decode(encode(x))| on object pixels (0-255 units) and, for the world's textures,
    the checker's accuracy on the reconstructions."""
    report = {}
    for texture in world.ALL_TEXTURES:
        images, scenes = world.dataset(n, seed=seed, texture=texture)
        recon = vae_roundtrip(vae, images)
        report[texture] = {"novel": texture in world.NOVEL_TEXTURES,
                           "object_mae": object_error(images, recon, [s.mask() for s in scenes]),
                           **checker.accuracy(recon, scenes)}
    yy, xx = np.mgrid[:world.SIZE, :world.SIZE]
    for name, pattern in PROBE_PATTERNS.items():
        images, scenes = world.dataset(n, seed=seed, texture="solid")
        dark = pattern(yy, xx)
        for img, s in zip(images, scenes):
            m = s.mask() & dark
            img[m] = (img[m] * world.DARK_SHADE).astype(np.uint8)
        report[f"probe: {name}"] = {"novel": True, "object_mae": object_error(images, vae_roundtrip(vae, images),
                                                                                [s.mask() for s in scenes])}
    return report


def vae_table(report: dict) -> str:
    keys = checker.ATTRIBUTES
    lines = ["| texture | novel | object MAE (0-255) | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for name, r in report.items():
        cells = [f"{r[k]:.2f}" if k in r else "—" for k in keys]
        lines.append(f"| {name} | {'yes' if r['novel'] else 'no'} | {r['object_mae']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vico.toyworld.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vae", action="store_true", help="also the autoencoder's per-texture reconstruction report")
    p.add_argument("--masks", action="store_true",
                   help="also the class word's trace-mask IoU on the model's generations (first --cfg)")
    p.add_argument("--survival", action="store_true",
                   help="also how often img2img at strength 0.1/0.3/0.5 keeps each texture (how generic the denoiser is)")
    p.add_argument("--out", type=Path, help="write everything as JSON here")
    o = p.parse_args(argv)
    report = evaluate(o.model, o.n, o.cfg, o.steps)
    keys = checker.ATTRIBUTES
    print("| set @ guidance | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, acc in report.items():
        print(f"| {name} | " + " | ".join(f"{acc[k]:.2f}" for k in keys) + " |")
    for name, acc in report.items():  # which shape a model misses
        print(f"{name} shape asked -> read: " + "; ".join(
            f"{asked} -> " + ", ".join(f"{got} {n}" for got, n in sorted(row.items())) for asked, row in
            sorted(acc["shape_read_as"].items())))
    if o.vae:
        from ..model import load_pipeline

        report["vae"] = vae_report(load_pipeline(o.model).vae, n=o.n)
        print("\n" + vae_table(report["vae"]))
    if o.masks:
        report["masks"] = trace_mask_iou(o.model, n=o.n, cfg=o.cfg[0], steps=o.steps)
        print(f"\nclass-word trace mask IoU: {report['masks']['class_word_trace_mask_iou']:.2f} "
              f"over {report['masks']['images']} generations")
    if o.survival:
        report["survival"] = texture_survival(o.model, n=o.n, steps=o.steps, cfg=o.cfg[0])
        strengths = [k for k in next(iter(report["survival"].values())) if k != "novel"]
        print("\n| texture | novel | " + " | ".join(f"kept @ strength {k}" for k in strengths) + " |\n|---|---|"
              + "---|" * len(strengths))
        for name, r in report["survival"].items():
            print(f"| {name} | {'yes' if r['novel'] else 'no'} | " + " | ".join(f"{r[k]:.2f}" for k in strengths) + " |")
    if o.out:
        o.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
