"""The ``vico`` command: ``vico train|sample|eval|maps|demo|bench|import|export`` (``vico <cmd> --help``).

Multi-GPU training goes through HF accelerate:
``accelerate launch -m vico.cli train --model ... --images ... --out ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .methods import available_methods
from .training import SCHEDULES, TRACKERS
from .model import UserError


def _finite(text: str) -> float:
    """A float option's value: ``nan`` and ``inf`` are refused (they give black images, exit 0)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _learning_rate(text: str) -> tuple[str, float]:
    """``--lr image=1e-4`` -> ("image", 1e-4)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. image=1e-4), got {text!r}")
    try:
        return name.strip(), _finite(value)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _train_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser("train", help="learn a concept from a few images",
                       description="Learn a new concept (a placeholder token, plus image attention for ViCo) "
                       "from 3-10 photos of one object, with a frozen Stable Diffusion model.")
    p.add_argument("--model", required=True, help="local diffusers Stable Diffusion folder (SD 1.x/2.x or SDXL)")
    p.add_argument("--vae", help="a separate diffusers VAE folder to use instead of the model's vae/ (e.g. SDXL's fp16-fixed VAE, madebyollin/sdxl-vae-fp16-fix saved with save_pretrained)")
    p.add_argument("--images", required=True, help="folder with the training images")
    p.add_argument("--out", required=True, help="output folder for the concept and checkpoints")
    p.add_argument("--method", default="vico", choices=list(available_methods()),
                   help="the method (default vico); `vico train --method M --help` lists M's own options")
    p.add_argument("--token", default="S*", help="placeholder token to learn (default S*)")
    p.add_argument("--init-word", default="object",
                   help="the class word: initialises the token embedding (ViCo, TI), is the [category] of "
                   "AttnDreamBooth and CatVersion's caption; must be a single token")
    p.add_argument("--steps", type=int, help="training steps (default: the method's, 400 for ViCo); for "
                   "AttnDreamBooth, steps of every stage")
    p.add_argument("--batch-size", type=int, help="batch size (default: the method's)")
    p.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply learning rates by batch size x GPUs (default: as the method's paper code does)")
    p.add_argument("--lr", action="append", type=_learning_rate, default=[], metavar="NAME=VALUE",
                   help="replace the method's base learning rate of one parameter group, repeatable: "
                   "textual-inversion embedding; vico embedding, image; catversion prefix; attndreambooth "
                   "embedding, cross-attention, unet (--scale-lr still applies where the method scales)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="write a resumable checkpoint every K steps (default 100)")
    p.add_argument("--checkpoints-total-limit", type=int, default=2, metavar="N",
                   help="keep the newest N checkpoints, delete older ones (default 2; 0 keeps all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out (`--resume` or `--resume latest`), or "
                   "from one of them (`--resume step-000200`; newer ones are moved to checkpoints/superseded/)")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume although --images, --resolution, --token, --method, --model or a method option "
                   "differ from the run's train_config.json (refused otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, help="training image size (default: the model's native size)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="GPU mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="A",
                   help="average the gradients of A batches per optimizer step (default 1): the global batch is "
                   "batch size x processes x A, and --scale-lr scales by it")
    p.add_argument("--lr-scheduler", default="constant", choices=SCHEDULES,
                   help="learning-rate schedule over each stage's steps (default constant)")
    p.add_argument("--lr-warmup-steps", type=int, default=0, metavar="N",
                   help="linear warm-up over the first N steps of each stage (not with constant)")
    val = p.add_argument_group("validation images while training (OUT/validation/step-XXXXXX/grid.png)")
    val.add_argument("--validation-prompt", action="append", dest="validation_prompts", metavar="PROMPT",
                     help="a prompt to sample, repeatable (default: three of the method's evaluation prompts)")
    val.add_argument("--validation-steps", type=int, metavar="K",
                     help="sample every K steps and at the end (default: every checkpoint when a prompt is given; "
                     "no validation without either option)")
    val.add_argument("--num-validation-images", type=int, default=4, metavar="N", help="images per prompt (default 4)")
    val.add_argument("--validation-sample-steps", type=int, default=25, metavar="S",
                     help="sampling steps of each validation image (default 25)")
    log = p.add_argument_group("experiment tracking (through accelerate)")
    log.add_argument("--report-to", default="none", choices=TRACKERS,
                     help="log losses, learning rates, step times and validation grids (default none)")
    log.add_argument("--logging-dir", metavar="DIR", help="tracker files (default OUT/logs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _method_option_flags(p, _method_in(argv))


def _method_in(argv: list[str]) -> str | None:
    """The ``--method`` named on the command line, if any (``--help`` then shows only its options)."""
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.partition("=")[2]
    return None


OPTION_DEST = "option:"  # argparse dest prefix of the flags made from ``Method.Options`` fields


def _method_option_flags(p: argparse.ArgumentParser, shown: str | None) -> None:
    """One flag per field of every method's ``Options`` (``--reg-weight`` from ``reg_weight``), in a group per
    method; with ``--method M`` on the command line only M's group is in ``--help``. A flag given is stored
    as ``option:<field>``; one that is not, not at all (``cmd_train`` checks it belongs to the method)."""
    import typing
    from dataclasses import MISSING, fields

    from .methods.base import option_flag

    for name, cls in available_methods().items():
        hints = typing.get_type_hints(cls.Options)
        specs = fields(cls.Options)
        if not specs:
            continue
        hidden = shown is not None and shown != name
        group = p.add_argument_group(f"--method {name} options")
        for f in specs:
            default = f.default if f.default is not MISSING else f.default_factory()
            said = "" if default is None else f" (default {default})"  # a None default is said in the help
            help_text = argparse.SUPPRESS if hidden else f"{f.metadata['help']}{said}"
            metavar = f.metadata.get("metavar", f.name.upper())
            kind = dict(action=argparse.BooleanOptionalAction) if hints[f.name] is bool else \
                dict(nargs="+", metavar=metavar) if typing.get_origin(hints[f.name]) is not None \
                else dict(type=_finite if hints[f.name] is float else int, metavar=metavar)
            group.add_argument(option_flag(f.name), dest=OPTION_DEST + f.name, default=argparse.SUPPRESS,
                               help=help_text, **kind)


def _given_options(args) -> dict:
    """The method options given on the command line, by field name."""
    return {key[len(OPTION_DEST):]: value for key, value in vars(args).items() if key.startswith(OPTION_DEST)}


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images with a trained concept",
                       description="Generate images with a trained concept (DDIM, classifier-free guidance).")
    p.add_argument("--concept", required=True, help="folder written by `vico train --out`")
    p.add_argument("--prompt", required=True, help='prompt using the placeholder, e.g. "a photo of S* on the beach"')
    p.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    p.add_argument("--model", help="Stable Diffusion folder (default: the one the concept was trained on)")
    p.add_argument("--vae", help="a separate diffusers VAE folder to use instead of the model's vae/ (e.g. SDXL's fp16-fixed VAE, madebyollin/sdxl-vae-fp16-fix saved with save_pretrained)")
    p.add_argument("--reference", help="ViCo reference image (default: the first training image)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=_finite, default=None,
                   help="classifier-free guidance scale (default: the method's, 7.5; CatVersion 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--save-maps", action="store_true",
                   help="ViCo: also write the S* attention map and its Otsu mask per flagged layer (last step)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="personalize the shipped toy-world model with ViCo and Textual Inversion",
                       description="Personalize the toy-world model shipped with vico (vico/toyworld/model, "
                       "trained here; nothing is downloaded) with ViCo and with Textual Inversion on five renders "
                       "of a novel concept (a red checkered square), sample both on every background, and write "
                       "OUT/grid.png (training images, samples, ViCo's S* maps and Otsu masks) and "
                       "OUT/metrics.json (identity and text alignment scored by the toy world's checker). "
                       "--arch sdxl runs the same demo on the SDXL-shaped toy model. "
                       "With --model PATH --images DIR it runs on a local Stable Diffusion folder instead: it "
                       "trains ViCo on your images and writes OUT/concept and OUT/samples (images, grid.png, S* "
                       "maps and masks). Running it again with the same --out replaces its own previous output "
                       "there (what vico recorded writing in OUT/.vico-written); a folder holding anything else "
                       "is refused.")
    p.add_argument("--out", default="vico-demo", help="output folder (default vico-demo)")
    p.add_argument("--steps", type=int, help="training steps of both methods (default on the toy model: 800 for ViCo, 300 for Textual Inversion, batch 4; 30 with --model)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--arch", choices=("sd", "sdxl"), help="which shipped toy model: sd (SD 1.5-shaped, the default) "
                   "or sdxl (SDXL-shaped: two text encoders, pooled-text and time-id conditions)")
    own = p.add_argument_group("a local Stable Diffusion folder instead of the toy world (all with --model)")
    own.add_argument("--model", help="local diffusers Stable Diffusion folder (SD 1.x/2.x or SDXL); needs --images")
    own.add_argument("--images", help="folder with your training images (3-10 photos of one object)")
    own.add_argument("--init-word", help="class word of your object (default object)")
    own.add_argument("--num-images", type=int, help="images to sample (default 4)")


def cmd_demo(args) -> int:
    import time

    from .files import output_folder
    from .model import check_output_folder
    from .sampling import sample_concept
    from .toyworld import demo as toy_demo
    from .training import TrainConfig, train

    out = Path(args.out)
    _require_positive(args, "steps", "sample_steps", "num_images")
    check_output_folder(out)
    if args.model is None and args.images is None:
        if args.init_word is not None or args.num_images is not None:
            raise UserError("--init-word and --num-images apply with --model PATH --images DIR only; the toy-world "
                            "demo fixes its concept and samples")
        arch = args.arch or "sd"
        model = toy_demo.shipped_model(arch)
        if model is None:
            raise UserError(f"this install has no {arch} toy-world model "
                            f"(vico/toyworld/{toy_demo.SHIPPED_MODELS[arch]}/model_index.json); "
                            "reinstall vico, or pass --model PATH --images DIR")
        metrics = toy_demo.run(model, out, steps=args.steps or toy_demo.VICO_STEPS,
                               ti_steps=args.steps or toy_demo.TI_STEPS, sample_steps=args.sample_steps,
                               quiet=args.quiet)
        print(f"vico demo: {metrics['concept']} (a texture the base model never saw) -> {out}/grid.png, "
              f"{out}/metrics.json")
        for method, m in metrics["methods"].items():
            iou = f", S* mask IoU {m['reference_mask_iou']:.2f}" if "reference_mask_iou" in m else ""
            print(f"  {method:18s} identity shape {m['identity_shape']:.2f} colour {m['identity_colour']:.2f} "
                  f"texture {m['identity_texture']:.2f}, text (background) {m['text_background']:.2f}{iou}")
        return 0
    if args.arch is not None:
        raise UserError("--arch picks a shipped toy model; with --model PATH the folder's own model_index.json says "
                        "whether it is SD or SDXL")
    if args.model is None or args.images is None:
        raise UserError("--model and --images go together: a local Stable Diffusion folder and your training "
                        "images (without both, the demo runs the shipped toy-world model)")
    model, images = args.model, args.images
    concept, samples = out / "concept", out / "samples"
    with output_folder(out) as folder:
        folder.replace([concept.name, samples.name])  # the concept records its own path: written in place
        t0 = time.perf_counter()
        steps = args.steps or 30
        train(TrainConfig(model=str(model), images=str(images), out=str(concept),
                          init_word=args.init_word or "object", steps=steps, progress=not args.quiet))
        print(f"vico: concept saved to {concept}")
        train_s = time.perf_counter() - t0
        sample_concept(concept, "a photo of S* on the beach", samples, num_images=args.num_images or 4,
                       steps=args.sample_steps, guidance=7.5, save_maps=True, progress=not args.quiet)
    print(f"vico: wrote {args.num_images or 4} images and grid.png to {samples}")
    print(f"vico demo: {steps} training steps in {train_s:.1f} s ({train_s / max(steps, 1):.3f} s/step "
          f"incl. loading); concept in {concept}, images and S* maps/masks in {samples}")
    return 0


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

    from .model import resolve_device

    device = torch.device(resolve_device(args.device))
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


def _check_encoder_folder(path: str | None, option: str, model_type: str, kind: str) -> None:
    """One line for a --clip / --dino that is not a saved transformers model of the right kind."""
    import json

    if path is None:
        return
    folder = Path(path)
    how = f"save one with {kind}.from_pretrained(NAME).save_pretrained(DIR) and its processor"
    if not folder.is_dir():
        raise UserError(f"{option} {folder} is not a folder ({how})")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{option} {folder} has no config.json: not a saved transformers model ({how})")
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise UserError(f"{config} is not a transformers config (invalid JSON)") from None
    if found != model_type:
        raise UserError(f"{option} {folder} holds a {found!r} model, not a {kind} ({model_type!r})")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any((folder / w).is_file() for w in weights):
        raise UserError(f"{option} {folder} has no weights (model.safetensors or pytorch_model.bin)")
    if not (folder / "preprocessor_config.json").is_file():
        raise UserError(f"{option} {folder} has no preprocessor_config.json (save the image processor there too)")
    if model_type == "clip" and not any((folder / t).is_file() for t in ("tokenizer.json", "vocab.json")):
        raise UserError(f"{option} {folder} has no tokenizer (tokenizer.json or vocab.json; save it there too)")


def cmd_eval(args) -> int:
    """Held output first (the report's folder, or the --prompts folder), then the work."""
    from .files import output_folder

    if args.prompts is None and args.out:
        report = Path(args.out)
        with output_folder(report.parent, "--out", exclusive=False) as folder:
            folder.check_replaceable(report.name)  # never overwrite a file vico did not write
            return _eval(args, folder)
    if args.prompts is not None and args.concept:
        with output_folder(args.out or "vico-eval") as folder:
            return _eval(args, folder)
    return _eval(args, None)


def _eval(args, folder) -> int:
    import json

    import numpy as np

    from . import evaluation, metrics
    from .data import list_images
    from .methods import get_method
    from .methods.base import Method, read_concept_meta
    from .model import resolve_device
    from .sampling import sample_concept

    device = resolve_device(args.device)
    meta = read_concept_meta(args.concept) if args.concept else {}  # a garbage concept.json: one line
    _check_encoder_folder(args.clip, "--clip", "clip", "CLIPModel")
    _check_encoder_folder(args.dino, "--dino", "vit", "ViTModel")
    placeholder = meta.get("config", {}).get("placeholder", "S*")
    class_word = args.class_word or meta.get("config", {}).get("init_word")
    if not class_word:
        raise UserError("pass --class-word (or --concept) so CLIP-T can replace the placeholder")
    # How the method's prompts name the concept ("S*"; AttnDreamBooth "S* cat"; CatVersion "cat").
    method_cls = get_method(meta["method"]) if meta.get("method") else Method
    real_dir = args.real
    if real_dir is None and args.concept:
        train_cfg = Path(args.concept) / "train_config.json"
        real_dir = json.loads(train_cfg.read_text())["images"] if train_cfg.is_file() else None
    if real_dir is None:
        raise UserError("pass --real DIR (or a --concept trained from an image folder)")
    real = metrics.read_image_files(list_images(real_dir))
    real_masks, real_mask_source = evaluation.real_masks(args.real_masks, meta, args.concept, real_dir, device)
    enc = metrics.load_encoders(args.clip, args.dino, device)

    def score(folder: Path) -> dict:
        gen = metrics.read_images(folder)
        if not gen:
            raise UserError(f"{folder} has no generated images (000.png, 001.png, ...)")
        prompt_file = folder / "prompt.txt"
        if not prompt_file.is_file():
            raise UserError(f"{folder} has no prompt.txt (write it, or generate with `vico sample`)")
        prompt = method_cls.plain_prompt(prompt_file.read_text().strip(), placeholder, class_word)
        gen_masks, gen_mask_source = evaluation.generated_masks(folder, len(gen))
        used = gen_masks is not None and real_masks is not None
        report = metrics.evaluate(enc, gen, real, [prompt] * len(gen),
                                  gen_masks if used else None, real_masks if used else None)
        report["prompt"] = prompt
        report["masks"] = {"generated": gen_mask_source if used else "none",
                           "real": real_mask_source if used else "none"}
        return report

    if args.prompts is None:
        if not args.generated:
            raise UserError("pass --generated DIR, or --concept with --prompts")
        text = json.dumps(score(Path(args.generated)), indent=1)
        if folder is not None:
            (folder.staging() / Path(args.out).name).write_text(text)
            folder.commit()
        print(text)
        return 0

    if not args.concept:
        raise UserError("--prompts needs --concept")
    out = folder.staging()
    rows = []
    for i, template in enumerate(metrics.load_eval_prompts(args.prompts or None)):
        prompt_dir = out / f"prompt-{i:02d}"
        prompt = method_cls.prompt_for(template, placeholder, class_word)
        sample_concept(args.concept, prompt, prompt_dir, num_images=args.num_images, steps=args.steps, seed=i,
                       device=device, save_maps=True, progress=not args.quiet)
        rows.append(score(prompt_dir))
    keys = [k for k in ("clip_i", "clip_t", "dino", "masked_clip_i") if k in rows[0]]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    (out / "report.json").write_text(json.dumps({"summary": summary, "per_prompt": rows}, indent=1))
    folder.commit()
    print("| prompt | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['prompt']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    print("| **mean** | " + " | ".join(f"{summary[k]:.4f}" for k in keys) + " |")
    return 0


def _maps_parser(sub) -> None:
    p = sub.add_parser("maps", help="per-word attention heat maps of a generation (DAAM-style)",
                       description="Generate an image and write, per word, its cross-attention heat map "
                       "summed over layers and timesteps (overlaid on the image) and its Otsu mask. For a video "
                       "pipeline (Wan, CogVideoX, HunyuanVideo) each map has one frame per latent frame: it is "
                       "written as a strip of its frames side by side (map_WORD.png), an animated GIF "
                       "(map_WORD.gif) and a mask strip; with a VAE also frames.png and video.gif. Maps come "
                       "from the fused op: no attention matrix is materialised.")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder: SD 1.x/2.x, SDXL, SD3, FLUX "
                   "(images) or Wan, CogVideoX, HunyuanVideo (text-to-video)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--words", nargs="+", required=True, help="words of the prompt to map (all their sub-tokens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", nargs="+", help="only these attention layers: exact names, module prefixes "
                   "(up_blocks, transformer_blocks.0 - not single_transformer_blocks.0) or fnmatch patterns "
                   "('transformer_blocks.*')")
    p.add_argument("--timesteps", nargs=2, type=_finite, metavar=("LOW", "HIGH"), help="aggregate only these timesteps")
    p.add_argument("--occurrence", type=int, default=None,
                   help="map only this occurrence of a repeated word (0 = first, -1 = last; default: all)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--frames", type=int, default=None, help="video pipelines: frames to generate (default: the "
                   "pipeline's, e.g. 81 for Wan)")
    p.add_argument("--fps", type=_finite, default=16.0, help="video pipelines: frame rate of the GIFs (default 16)")
    p.add_argument("--records", action="store_true",
                   help="also write OUT/records.safetensors: every layer's map per timestep and word "
                   "(keys <layer>/<timestep>/<word>; layer names and timesteps in its metadata)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=_finite, default=None,
                   help="guidance scale (default: 7.5 for image pipelines, the pipeline's own for video ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


# The denoisers `vico maps` traces (fused.maps.trace), by the class model_index.json names: image or video.
MAP_DENOISERS = {"UNet2DConditionModel": "image", "SD3Transformer2DModel": "image", "FluxTransformer2DModel": "image",
                 "WanTransformer3DModel": "video", "CogVideoXTransformer3DModel": "video",
                 "HunyuanVideoTransformer3DModel": "video"}
MAP_INPUTS = ("image", "video", "mask_image", "control_image")  # call arguments of pipelines that need more than text


def _maps_pipeline_kind(path: str) -> str:
    """"image" or "video" from the folder's model_index.json, before anything is loaded; a pipeline `vico maps`
    cannot run is a one-line error naming --model."""
    import inspect
    import json

    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"--model {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
        name = str(index.get("_class_name"))
    except (ValueError, AttributeError, OSError):
        raise UserError(f"--model {path}: model_index.json is not a diffusers pipeline index") from None
    denoiser = next((v[1] for k, v in index.items() if k in ("unet", "transformer") and isinstance(v, list)
                     and len(v) == 2 and v[1]), None)
    if denoiser not in MAP_DENOISERS:
        raise UserError(f"--model {path}: {name} ({denoiser or 'no UNet or transformer'}) is not a pipeline vico "
                        "maps supports (SD 1.x/2.x, SDXL, SD3, FLUX; Wan, CogVideoX, HunyuanVideo text-to-video)")
    try:
        import diffusers

        params = inspect.signature(getattr(diffusers, name).__call__).parameters
    except (AttributeError, ImportError, TypeError, ValueError):
        params = {}
    needs = [p for p in MAP_INPUTS if p in params]
    if needs:
        raise UserError(f"--model {path}: {name} needs an input {needs[0]}; vico maps generates from --prompt alone")
    return MAP_DENOISERS[denoiser]


def _words_in_prompt(words: list[str], prompt: str) -> None:
    """A word that cannot be in the prompt (not even as text, any case) is a one-line error before loading."""
    import html

    text = " ".join(html.unescape(prompt).lower().split())
    for word in words:
        if not word.strip() or " ".join(word.lower().split()) not in text:
            raise UserError(f"--words: word {word!r} does not occur in the prompt {prompt!r}")


def _maps_error(message: str) -> str:
    """trace's ValueError, prefixed with the argument it is about."""
    for prefix, option in (("no attention layer matches", "--layers"), ("word ", "--words")):
        if message.startswith(prefix):
            if option == "--words" and "occurrence=" in message:
                option = "--occurrence"
            return f"{option}: {message}"
    return message


def cmd_maps(args) -> int:
    from .files import output_folder
    from .model import check_output_folder

    _require_positive(args, "steps", "height", "width", "frames")
    if args.fps <= 0:
        raise UserError(f"--fps must be positive, got {args.fps:g}")
    check_output_folder(args.out)
    kind = _maps_pipeline_kind(args.model)
    if kind == "image" and args.frames is not None:
        raise UserError(f"--frames applies to video pipelines only; --model {args.model} generates images")
    _words_in_prompt(args.words, args.prompt)
    _check_maps_numbers(args, kind)
    with output_folder(args.out) as folder:  # locked before the pipeline loads
        summary = _maps_into(folder.staging(), args, kind)
        folder.commit()  # an earlier run's maps of other words go
    print(f"{summary} -> {args.out}")
    return 0


def _check_maps_numbers(args, kind: str) -> None:
    """Seed, device, steps, --timesteps and image size against the pipeline's configs, before it loads."""
    from .model import check_image_size, check_seed, check_steps, resolve_device, scheduler_timesteps

    check_seed(args.seed)
    args.device = resolve_device(args.device)
    check_steps(args.steps, args.model)
    if args.timesteps:
        low, high, limit = *args.timesteps, scheduler_timesteps(args.model)
        if low > high or high < 0 or low > limit:
            raise UserError(f"--timesteps {low:g} {high:g}: give LOW <= HIGH overlapping the schedule's "
                            f"0..{limit}")
    if kind == "image":
        if (args.height is None) != (args.width is None):  # diffusers' image pipelines ignore one alone
            raise UserError("--height and --width go together for image pipelines (given alone, one is ignored)")
        denoiser = "unet" if (Path(args.model) / "unet").is_dir() else "transformer"
        for option in ("height", "width"):
            if getattr(args, option) is not None:
                check_image_size(getattr(args, option), args.model, f"--{option}", denoiser)


def _maps_into(out: Path, args, kind: str) -> str:
    """Generate and write the maps of ``args`` into ``out``; returns the summary line's start."""
    import numpy as np
    import torch
    from PIL import Image

    import fused
    from fused import maps as fused_maps

    from .model import load_pipeline
    from .pipeline import heatmap_overlay, image_grid

    pipe = load_pipeline(args.model, args.device)
    # Classifier-free guidance (which rows are traced) is detected from the pipeline during the call.
    call = {k: v for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.frames))
            if v is not None}
    guidance = args.guidance if args.guidance is not None else 7.5 if kind == "image" else None
    if guidance is not None:
        call["guidance_scale"] = guidance
    decode = kind == "image" or getattr(pipe, "vae", None) is not None  # tiny video pipelines may have no VAE
    try:
        with fused_maps.trace(pipe, args.prompt, args.words, layers=args.layers,
                              timesteps=tuple(args.timesteps) if args.timesteps else None,
                              occurrence=args.occurrence, records=args.records) as tr:
            result = pipe(args.prompt, num_inference_steps=args.steps, **call,
                          generator=torch.Generator().manual_seed(args.seed),
                          output_type="np" if decode else "latent")
    except ValueError as exc:
        raise UserError(_maps_error(str(exc))) from exc
    if args.timesteps and tr.calls == 0:  # --timesteps between the sampled ones: nothing was aggregated
        sampled = [float(t) for t in pipe.scheduler.timesteps]
        raise UserError(f"--timesteps {args.timesteps[0]:g} {args.timesteps[1]:g}: none of the {len(sampled)} "
                        f"sampling timesteps ({sampled[0]:g} ... {sampled[-1]:g}) falls in it; nothing written")
    heatmaps = tr.heatmaps()
    if kind == "video":
        from .video_maps import write_video_maps

        video = None
        if decode:
            video = (np.clip(np.asarray(result.frames[0]), 0, 1) * 255).round().astype(np.uint8)
        else:
            print(f"vico maps: {type(pipe).__name__} has no VAE, so its latents are not decoded into frames; the "
                  "maps are drawn on black")
        write_video_maps(out, heatmaps, pipe, video, args.fps)
    else:
        image = (np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(image).save(out / "image.png")
        tiles = [image]
        for word, heat in heatmaps.items():
            overlay = heatmap_overlay(image, heat.numpy())
            _, mask = fused.otsu_mask(heat.flatten()[None].double())
            mask_img = np.asarray(Image.fromarray(mask.reshape(heat.shape).numpy().astype(np.uint8) * 255).resize(
                image.shape[1::-1], Image.Resampling.NEAREST))
            safe = "".join(ch if ch.isalnum() else "_" for ch in word)
            Image.fromarray(overlay).save(out / f"map_{safe}.png")
            Image.fromarray(mask_img).save(out / f"mask_{safe}.png")
            tiles += [overlay, np.repeat(mask_img[..., None], 3, axis=-1)]
        Image.fromarray(image_grid(np.stack(tiles), cols=len(tiles))).save(out / "grid.png")
    if args.records:
        tr.save_records(out / "records.safetensors")
    frames = f", {tr.shape[0]} map frames of {tr.shape[1]}x{tr.shape[2]} patches" if kind == "video" and heatmaps \
        else ""
    return f"vico maps: {len(heatmaps)} words over {len(tr.layers)} layers and {tr.calls} denoiser calls{frames}"


def cmd_train(args) -> int:
    from .training import TrainConfig, save_on_signals, train

    save_on_signals()
    cfg = TrainConfig(
        model=str(args.model), vae=args.vae, images=str(args.images), out=str(args.out), method=args.method,
        placeholder=args.token,
        init_word=args.init_word, steps=args.steps, batch_size=args.batch_size, scale_lr=args.scale_lr,
        checkpoint_every=args.checkpoint_every, checkpoints_total_limit=args.checkpoints_total_limit, seed=args.seed, resolution=args.resolution,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        resume=args.resume, resume_with_changes=args.resume_with_changes, progress=not args.quiet,
        learning_rates=dict(args.lr), options=_given_options(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps, validation_prompts=args.validation_prompts,
        validation_steps=args.validation_steps, num_validation_images=args.num_validation_images,
        validation_sample_steps=args.validation_sample_steps, report_to=args.report_to, logging_dir=args.logging_dir,
    )
    out = train(cfg)
    print(f"vico: concept saved to {out}")
    return 0


def cmd_sample(args) -> int:
    from .sampling import sample_concept

    out = sample_concept(args.concept, args.prompt, args.out, model=args.model, vae=args.vae, reference=args.reference,
                         num_images=args.num_images, steps=args.steps, guidance=args.guidance, seed=args.seed,
                         device=args.device, save_maps=args.save_maps, progress=not args.quiet)
    print(f"vico: wrote {args.num_images} images and grid.png to {out}")
    return 0


def _require_positive(args, *names: str) -> None:
    """A count option below 1 is a one-line error (argparse's type=int takes -1 and 0)."""
    from .model import require_at_least_one

    require_at_least_one({name: getattr(args, name, None) for name in names})


def _import_parser(sub) -> None:
    p = sub.add_parser("import", help="turn a concept trained with the official ViCo, CatVersion or AttnDreamBooth "
                       "code into a concept folder",
                       description="Import a concept trained with the official code into a concept folder that "
                       "`vico sample` and `vico eval` read. --from vico (haoosz/ViCo): --embeddings "
                       "(embeddings.pt) and --cross-attention (cross_attention-<step>.pt). --from catversion "
                       "(RoyZhao926/CatVersion): --adapter (the adapter_gs-<step> folder or its "
                       "pytorch_adapter.bin). --from attndreambooth (lyuPang/AttnDreamBooth): --embeddings "
                       "(learned_embeds_steps_<step>.bin) and --unet (full_model_step_<step>, or its unet/). "
                       ".pt/.bin files are loaded without running code (weights only).")
    p.add_argument("--from", dest="source", choices=["vico", "catversion", "attndreambooth"], default="vico",
                   help="which official code trained the concept (default vico)")
    p.add_argument("--model", required=True, help="the Stable Diffusion folder (diffusers) the concept was trained on")
    p.add_argument("--embeddings", help="vico: the official embeddings.pt (or embeddings_gs-<step>.pt); "
                   "attndreambooth: learned_embeds_steps_<step>.bin")
    p.add_argument("--cross-attention", help="vico: the official cross_attention.pt (or cross_attention-<step>.pt)")
    p.add_argument("--adapter", help="catversion: the adapter_gs-<step> folder (or its pytorch_adapter.bin)")
    p.add_argument("--unet", help="attndreambooth: the full_model_step_<step> folder (or its unet/)")
    p.add_argument("--out", required=True, help="the concept folder to write")
    p.add_argument("--token", default="S*", help="placeholder token in this project's prompts (default S*)")
    p.add_argument("--official-token", help="the token in the embeddings file to import (default: its only one)")
    p.add_argument("--init-word", default="object",
                   help="the class word: CLIP-T's prompts name the concept by it; CatVersion's prompts are the "
                        "class word itself and AttnDreamBooth's write it after the token (\"S* teapot\")")


IMPORT_FILES = {"vico": ("embeddings", "cross_attention"), "catversion": ("adapter",),
                "attndreambooth": ("embeddings", "unet")}


def cmd_import(args) -> int:
    from . import official
    from .files import output_folder

    missing = [f"--{name.replace('_', '-')}" for name in IMPORT_FILES[args.source] if not getattr(args, name)]
    if missing:
        raise UserError(f"--from {args.source} needs {' and '.join(missing)}")
    with output_folder(args.out, exclusive=False):  # locked: a concurrent import or train is refused
        if args.source == "vico":
            out = official.import_vico(args.model, args.embeddings, args.cross_attention, args.out,
                                       placeholder=args.token, init_word=args.init_word,
                                       official_token=args.official_token)
        elif args.source == "catversion":
            out = official.import_catversion(args.model, args.adapter, args.out, init_word=args.init_word)
        else:
            out = official.import_attndreambooth(args.model, args.embeddings, args.unet, args.out, placeholder=args.token,
                                                 init_word=args.init_word, official_token=args.official_token)
    print(f"vico: imported the official {args.source} concept into {out}")
    return 0


def _export_parser(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="write a concept's token embedding for AUTOMATIC1111, ComfyUI or diffusers",
                       description="Write the token embedding a concept learned (textual-inversion, vico, "
                       "attndreambooth) as a file other Stable Diffusion tools load. Only the embedding "
                       "transfers: ViCo's image attention blocks and AttnDreamBooth's fine-tuned UNet need "
                       "`vico sample`; CatVersion learns no embedding. An existing --out is replaced only when "
                       "vico export wrote it.")
    p.add_argument("--concept", required=True, help="folder written by `vico train --out` or `vico import --out`")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="a1111 (stable-diffusion-webui/embeddings/), comfyui (ComfyUI/models/embeddings/) or "
                   "diffusers (pipe.load_textual_inversion)")
    p.add_argument("--out", required=True, help="the file to write, NAME.safetensors in an existing folder; "
                   "A1111 and ComfyUI prompts name the embedding by NAME")


def cmd_export(args) -> int:
    from .export import export_concept, usage

    meta, left_behind = export_concept(args.concept, args.format, args.out)
    if left_behind:
        print(f"vico export: exported the token embedding only, not {left_behind}: only `vico sample` "
              "samples with those", file=sys.stderr)
    print(f"vico: wrote {args.out}: {usage(args.format, Path(args.out), meta)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vico", description="Attention-map-driven personalization of "
                                     "Stable Diffusion (ViCo) on fused attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    _train_parser(sub, argv)
    _sample_parser(sub)
    _demo_parser(sub)
    _bench_parser(sub)
    _eval_parser(sub)
    _maps_parser(sub)
    _import_parser(sub)
    _export_parser(sub)
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo, "bench": cmd_bench, "eval": cmd_eval,
                "maps": cmd_maps, "import": cmd_import, "export": cmd_export}
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"vico: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, read-only or forbidden folder met outside the checked writers
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise
        print(f"vico: error: {exc.strerror}: {exc.filename or 'an output file'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
