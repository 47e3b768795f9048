"""The ``vico`` command: ``vico train|sample|eval|maps|demo|bench`` (``vico <cmd> --help``).

Multi-GPU training goes through HF accelerate:
``accelerate launch -m vico.cli train --model ... --images ... --out ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model import UserError


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="learn a concept from a few images",
                       description="Learn a new concept (a placeholder token, plus image attention for ViCo) "
                       "from 3-10 photos of one object, with a frozen Stable Diffusion model.")
    p.add_argument("--model", required=True, help="local diffusers Stable Diffusion folder (SD 1.x/2.x)")
    p.add_argument("--images", required=True, help="folder with the training images")
    p.add_argument("--out", required=True, help="output folder for the concept and checkpoints")
    p.add_argument("--method", default="vico",
                   help="vico (default), textual-inversion, attndreambooth or catversion")
    p.add_argument("--token", default="S*", help="placeholder token to learn (default S*)")
    p.add_argument("--init-word", default="object",
                   help="the class word: initialises the token embedding (ViCo, TI), is the [category] of "
                   "AttnDreamBooth and CatVersion's caption; must be a single token")
    p.add_argument("--steps", type=int, help="training steps (default: the method's, 400 for ViCo); for "
                   "AttnDreamBooth, steps of every stage")
    p.add_argument("--batch-size", type=int, help="batch size (default: the method's)")
    p.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply learning rates by batch size x GPUs (default: as the method's paper code does)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="write a resumable checkpoint every K steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, help="training image size (default: the model's native size)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="GPU mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--layers", nargs="+", help="ViCo: spatial transformers that get image attention "
                   "(default: every second decoder transformer)")
    p.add_argument("--fast", action="store_true",
                   help="AttnDreamBooth's fast preset (stage 3: lr 1e-5, 200 steps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images with a trained concept",
                       description="Generate images with a trained concept (DDIM, classifier-free guidance).")
    p.add_argument("--concept", required=True, help="folder written by `vico train --out`")
    p.add_argument("--prompt", required=True, help='prompt using the placeholder, e.g. "a photo of S* on the beach"')
    p.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    p.add_argument("--model", help="Stable Diffusion folder (default: the one the concept was trained on)")
    p.add_argument("--reference", help="ViCo reference image (default: the first training image)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--save-maps", action="store_true",
                   help="ViCo: also write the S* attention map and its Otsu mask per flagged layer (last step)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train and sample a ViCo concept end to end on a small model",
                       description="Train ViCo on a few images and sample with it, in one go. Without --model "
                       "it builds a tiny random Stable-Diffusion-shaped model and toy images (no download; the "
                       "pictures are noise, the code path is the real one).")
    p.add_argument("--out", default="vico-demo", help="output folder (default vico-demo)")
    p.add_argument("--model", help="a local Stable Diffusion folder instead of the tiny random model")
    p.add_argument("--images", help="training images (default: generated toy images)")
    p.add_argument("--init-word", default="cat", help="class word (default cat)")
    p.add_argument("--steps", type=int, help="training steps (default 150 on the toy model, 30 on the random one)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_demo(args) -> int:
    import shutil
    import time

    from . import tiny
    from .toyworld import demo as toy_demo

    out = Path(args.out)
    model = args.model
    if model is None and args.images is None and toy_demo.shipped_model() is not None:
        metrics = toy_demo.run(toy_demo.shipped_model(), out, steps=args.steps or 150,
                               sample_steps=args.sample_steps, quiet=args.quiet)
        print(f"vico demo: toy-world concept (a red checkered square) -> {out}/grid.png, {out}/metrics.json: "
              f"identity shape {metrics['identity_shape']:.2f}, colour {metrics['identity_colour']:.2f}, "
              f"text (background) {metrics['text_background']:.2f}")
        return 0
    if model is None:
        model = out / "tiny-sd"
        if not (model / "unet").is_dir():
            tiny.save_tiny_pipeline(model)
        print(f"vico demo: no --model given; using a tiny random model in {model} (its pictures are noise)")
    images = args.images
    if images is None:
        images = out / "images"
        tiny.write_toy_images(images, n=4)
    concept = out / "concept"
    shutil.rmtree(concept, ignore_errors=True)  # a demo starts fresh
    t0 = time.perf_counter()
    steps = args.steps or 30
    cmd_train(_train_parser_defaults(model=model, images=images, out=concept, init_word=args.init_word,
                                     steps=steps, quiet=args.quiet))
    train_s = time.perf_counter() - t0
    samples = out / "samples"
    cmd_sample(argparse.Namespace(concept=concept, prompt="a photo of S* on the beach", out=samples, model=None,
                                  reference=None, num_images=args.num_images, steps=args.sample_steps,
                                  guidance=7.5, seed=0, device=None, save_maps=True, quiet=args.quiet))
    print(f"vico demo: {steps} training steps in {train_s:.1f} s ({train_s / max(steps, 1):.3f} s/step "
          f"incl. loading); concept in {concept}, images and S* maps/masks in {samples}")
    return 0


def _train_parser_defaults(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--model", "m", "--images", "i", "--out", "o"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the fused ops against the paper's way and SDPA on this device",
                       description="Quick op benchmark on whatever device is present: fused cross-attention "
                       "with maps, masked attention and Otsu vs the `paper` baseline (materialise + index; "
                       "per-sample Otsu loop; SDPA with a boolean mask) and SDPA without maps.")
    p.add_argument("--size", choices=["tiny", "cpu", "gpu"], help="shape set (default: gpu on CUDA, else cpu)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", help="force a fused backend (torch, cpp, triton)")
    p.add_argument("--repeat", type=int, default=5, help="best of N (default 5)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


def cmd_bench(args) -> int:
    import json

    import torch

    from fused.benchmark import DTYPES, format_table, run

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    rows = run(size, device, dtype, repeat=args.repeat, progress=True, backend=args.backend)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"vico bench: {device} {str(dtype)[6:]}, torch {torch.__version__}, best of {args.repeat}; "
              "vs paper/torch = baseline time / fused time; / sdpa = fused time / SDPA time (no maps)")
        print(format_table(rows))
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="CLIP-I, CLIP-T, DINO and masked CLIP-I of generated images",
                       description="Score generated images against the real training images with locally "
                       "stored CLIP and DINO models. Either score one folder written by `vico sample` "
                       "(--generated), or sample and score a prompt set for a trained concept (--prompts).")
    p.add_argument("--clip", required=True, help="local CLIPModel folder (e.g. openai/clip-vit-base-patch32 saved)")
    p.add_argument("--dino", help="local DINO ViTModel folder (e.g. facebook/dino-vits16 saved)")
    p.add_argument("--generated", help="folder written by `vico sample` (images + prompt.txt)")
    p.add_argument("--concept", help="trained concept: its training images are the real set; needed for --prompts")
    p.add_argument("--real", help="real images folder (default: the concept's training images)")
    p.add_argument("--real-masks", help="foreground masks of the real images (PNGs, same order)")
    p.add_argument("--class-word", help="replaces the placeholder in prompts for CLIP-T (default: the concept's)")
    p.add_argument("--prompts", nargs="?", const="", default=None,
                   help="sample and score a prompt set: the shipped one, or a file with {} for the subject")
    p.add_argument("--num-images", type=int, default=4, help="--prompts: images per prompt")
    p.add_argument("--steps", type=int, default=50, help="--prompts: sampling steps")
    p.add_argument("--out", help="JSON report path (--generated) or output folder (--prompts)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def cmd_eval(args) -> int:
    import json

    import numpy as np
    import torch

    from . import evaluation, metrics
    from .data import list_images
    from .methods.base import CONFIG_FILE

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = {}
    if args.concept:
        if not (Path(args.concept) / CONFIG_FILE).is_file():
            raise UserError(f"{args.concept} is not a trained concept (no {CONFIG_FILE})")
        meta = json.loads((Path(args.concept) / CONFIG_FILE).read_text())
    placeholder = meta.get("config", {}).get("placeholder", "S*")
    class_word = args.class_word or meta.get("config", {}).get("init_word")
    if not class_word:
        raise UserError("pass --class-word (or --concept) so CLIP-T can replace the placeholder")
    real_dir = args.real
    if real_dir is None and args.concept:
        train_cfg = Path(args.concept) / "train_config.json"
        real_dir = json.loads(train_cfg.read_text())["images"] if train_cfg.is_file() else None
    if real_dir is None:
        raise UserError("pass --real DIR (or a --concept trained from an image folder)")
    real = metrics.read_image_files(list_images(real_dir))
    enc = metrics.load_encoders(args.clip, args.dino, device)
    real_masks, real_mask_source = evaluation.real_masks(args.real_masks, meta, args.concept, real_dir, device)

    def score(folder: Path) -> dict:
        gen = metrics.read_images(folder)
        if not gen:
            raise UserError(f"{folder} has no generated images (000.png, 001.png, ...)")
        prompt_file = folder / "prompt.txt"
        if not prompt_file.is_file():
            raise UserError(f"{folder} has no prompt.txt (write it, or generate with `vico sample`)")
        prompt = prompt_file.read_text().strip().replace(placeholder, class_word)
        gen_masks = evaluation.generated_masks(folder, len(gen))
        report = metrics.evaluate(enc, gen, real, [prompt] * len(gen),
                                  gen_masks if real_masks is not None else None, real_masks)
        report["prompt"] = prompt
        report["masks"] = {"generated": "ViCo Otsu masks saved by --save-maps" if gen_masks else "none",
                           "real": real_mask_source if gen_masks else "none"}
        return report

    if args.prompts is None:
        if not args.generated:
            raise UserError("pass --generated DIR, or --concept with --prompts")
        report = score(Path(args.generated))
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return 0

    if not args.concept:
        raise UserError("--prompts needs --concept")
    out = Path(args.out or "vico-eval")
    rows = []
    for i, template in enumerate(metrics.load_eval_prompts(args.prompts or None)):
        folder = out / f"prompt-{i:02d}"
        cmd_sample(argparse.Namespace(concept=args.concept, prompt=template.format(placeholder), out=folder,
                                      model=None, reference=None, num_images=args.num_images, steps=args.steps,
                                      guidance=7.5, seed=i, device=device, save_maps=True, quiet=args.quiet))
        rows.append(score(folder))
    keys = [k for k in ("clip_i", "clip_t", "dino", "masked_clip_i") if k in rows[0]]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    (out / "report.json").write_text(json.dumps({"summary": summary, "per_prompt": rows}, indent=1))
    print("| prompt | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['prompt']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    print("| **mean** | " + " | ".join(f"{summary[k]:.4f}" for k in keys) + " |")
    return 0


def _maps_parser(sub) -> None:
    p = sub.add_parser("maps", help="per-word attention heat maps of a generation (DAAM-style)",
                       description="Generate an image and write, per word, its cross-attention heat map "
                       "summed over layers and timesteps (overlaid on the image) and its Otsu mask. Maps come "
                       "from the fused op: no attention matrix is materialised.")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, FLUX)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--words", nargs="+", required=True, help="words of the prompt to map (all their sub-tokens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", nargs="+", help="only layers whose name contains one of these (e.g. up_blocks)")
    p.add_argument("--timesteps", nargs=2, type=float, metavar=("LOW", "HIGH"), help="aggregate only these timesteps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def cmd_maps(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    import fused
    from fused import maps as fused_maps

    from .pipeline import heatmap_overlay, image_grid

    from .model import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device)
    # FLUX runs guidance through an embedding: one conditional batch, no [uncond; cond] halves.
    guided = args.guidance > 1 and "Flux" not in type(pipe).__name__
    try:
        with fused_maps.trace(pipe, args.prompt, args.words, layers=args.layers,
                              timesteps=tuple(args.timesteps) if args.timesteps else None, guided=guided) as tr:
            image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         generator=torch.Generator().manual_seed(args.seed), output_type="np").images[0]
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out / "image.png")
    tiles = [image]
    for word, heat in tr.heatmaps().items():
        overlay = heatmap_overlay(image, heat.numpy())
        _, mask = fused.otsu_mask(heat.flatten()[None].double())
        side = heat.shape[-1]
        mask_img = np.asarray(Image.fromarray(mask.reshape(side, side).numpy().astype(np.uint8) * 255).resize(
            image.shape[1::-1], Image.Resampling.NEAREST))
        safe = "".join(ch if ch.isalnum() else "_" for ch in word)
        Image.fromarray(overlay).save(out / f"map_{safe}.png")
        Image.fromarray(mask_img).save(out / f"mask_{safe}.png")
        tiles += [overlay, np.repeat(mask_img[..., None], 3, axis=-1)]
    Image.fromarray(image_grid(np.stack(tiles), cols=len(tiles))).save(out / "grid.png")
    print(f"vico maps: {len(tr.heatmaps())} words over {len(tr.layers)} layers and {tr.calls} UNet calls -> {out}")
    return 0


def cmd_train(args) -> int:
    from .training import TrainConfig, save_on_signals, train

    save_on_signals()
    cfg = TrainConfig(
        model=str(args.model), images=str(args.images), out=str(args.out), method=args.method, placeholder=args.token,
        init_word=args.init_word, steps=args.steps, batch_size=args.batch_size, scale_lr=args.scale_lr,
        checkpoint_every=args.checkpoint_every, seed=args.seed, resolution=args.resolution,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        resume=args.resume, layers=args.layers, progress=not args.quiet,
        extra={"fast": True} if getattr(args, "fast", False) else {},
    )
    out = train(cfg)
    print(f"vico: concept saved to {out}")
    return 0


def cmd_sample(args) -> int:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from .methods.base import CONFIG_FILE
    from .pipeline import ViCoPipeline, heatmap_overlay, image_grid

    concept = Path(args.concept)
    if not (concept / CONFIG_FILE).is_file():
        raise UserError(f"{concept} is not a trained concept (no {CONFIG_FILE}); train one with `vico train`")
    meta = json.loads((concept / CONFIG_FILE).read_text())
    model = args.model or meta.get("base_model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = ViCoPipeline.from_pretrained(model, concept, device=device)
    reference = None
    if args.reference:
        from .data import load_image
        reference = load_image(args.reference, pipe.method.config.resolution)
    elif meta["method"] == "vico":
        train_cfg = concept / "train_config.json"
        if not train_cfg.is_file():
            raise UserError("ViCo needs a reference image: pass --reference (no training config to find one)")
        reference = pipe.default_reference(json.loads(train_cfg.read_text())["images"])
    images, context = pipe(args.prompt, reference=reference, num_images=args.num_images,
                           num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                           progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:03d}.png")
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    (out / "prompt.txt").write_text(args.prompt + "\n")  # what `vico eval` scores CLIP-T against
    if args.save_maps and hasattr(pipe.method, "sampled_maps") and "last_request" in context:
        for layer, (maps, masks) in pipe.method.sampled_maps(context).items():
            side = maps.shape[-1]
            tag = layer.replace(".", "-")
            for i in range(len(images)):
                Image.fromarray(heatmap_overlay(images[i], maps[i].float().cpu().numpy())).save(
                    out / f"{i:03d}_map_{tag}.png")
                big = np.kron(masks[i].cpu().numpy(), np.ones((images.shape[1] // side,) * 2))
                Image.fromarray((big * 255).astype(np.uint8)).save(out / f"{i:03d}_mask_{tag}.png")
    print(f"vico: wrote {len(images)} images and grid.png to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vico", description="Attention-map-driven personalization of "
                                     "Stable Diffusion (ViCo) on fused attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    _demo_parser(sub)
    _bench_parser(sub)
    _eval_parser(sub)
    _maps_parser(sub)
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo, "bench": cmd_bench, "eval": cmd_eval,
                "maps": cmd_maps}
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"vico: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
