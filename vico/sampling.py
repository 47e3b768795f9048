"""Sample a trained concept into a folder: what ``vico sample`` (and ``vico demo``/``vico eval``) run.

``sample_concept`` checks everything it can before the model loads (the
concept folder, the output folder, the reference image, the recorded base
model and training images), samples, and writes ``000.png ...``,
``grid.png``, ``prompt.txt`` (what ``vico eval`` scores CLIP-T against) and,
with ``save_maps``, each generated image's S* map and Otsu mask.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .model import UserError

__all__ = ["sample_concept"]


def _training_images(concept: Path) -> str:
    """The training-images folder a concept's train_config.json records (a method's default reference)."""
    train_cfg = concept / "train_config.json"
    try:
        images_dir = json.loads(train_cfg.read_text())["images"] if train_cfg.is_file() else None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{train_cfg} is not a vico training config (truncated or overwritten); pass "
                        "--reference IMAGE") from None
    if images_dir is None:
        raise UserError("this method needs a reference image: pass --reference (no training config to find one)")
    if not Path(images_dir).is_dir():
        raise UserError(f"the concept's training images {images_dir} (recorded in {train_cfg}) do not exist; "
                        "pass --reference IMAGE")
    return images_dir


def sample_concept(concept: str | Path, prompt: str, out: str | Path, *, model: str | Path | None = None,
                   vae: str | Path | None = None,
                   reference: str | Path | None = None, num_images: int = 4, steps: int = 50,
                   guidance: float | None = None, seed: int = 0, device: str | None = None, save_maps: bool = False,
                   progress: bool = True) -> Path:
    """Sample ``num_images`` images of ``prompt`` with the concept in ``concept`` into ``out``; returns ``out``.

    model: the Stable Diffusion folder (default: the one the concept records). vae: a separate VAE folder.
    reference: for methods that need one (``Method.needs_reference``, ViCo), an image file; default
        the concept's first training image. guidance: None = the method's default scale.
    """
    from .files import output_folder
    from .methods import get_method
    from .methods.base import CONFIG_FILE, check_concept
    from .model import (check_image_size, check_output_folder, check_seed, check_steps, check_vae,
                        require_at_least_one, resolve_device, warn)
    from .pipeline import ViCoPipeline

    require_at_least_one({"num_images": num_images, "steps": steps})
    if guidance is not None and not math.isfinite(guidance):
        raise UserError(f"--guidance must be a finite number, got {guidance}")
    check_seed(seed)
    device = resolve_device(device)
    check_output_folder(out)  # before any sampling
    concept = Path(concept)
    meta = check_concept(concept)  # a missing, truncated or garbage concept.json / concept.safetensors: one line
    if model is None:
        model = meta.get("base_model")
        if not model:
            raise UserError(f"{concept / CONFIG_FILE} records no base model; pass --model PATH")
        if not Path(model).is_dir():
            raise UserError(f"the concept's base model {model} (recorded in {concept / CONFIG_FILE}) does not "
                            "exist; pass --model PATH")
    check_image_size(meta["config"]["resolution"], model, f"{concept / CONFIG_FILE}: config.resolution")
    if vae is not None:
        check_vae(vae)
    check_steps(steps, model)
    placeholder = meta["config"]["placeholder"]
    method_cls = get_method(meta["method"])
    phrase = method_cls.concept_phrase(placeholder, meta["config"]["init_word"])
    # "S* cat" (AttnDreamBooth) is named by its S* too; CatVersion's concept is its class word alone
    if phrase not in prompt and not (placeholder in phrase and placeholder in prompt):
        warn(f"the prompt does not contain the concept's token {phrase!r}: the images will not show the "
             f"concept (e.g. \"a photo of {phrase} on the beach\")")
    if save_maps and not hasattr(method_cls, "sampled_maps"):
        warn(f"--save-maps: {meta['method']} has no attention maps to save (only vico does); writing the images only")
    if reference is not None and not Path(reference).is_file():
        raise UserError(f"--reference {reference} does not exist")
    images_dir = _training_images(concept) if reference is None and method_cls.needs_reference else None
    with output_folder(out) as folder:  # locked before the model loads; only vico's own earlier output replaced
        pipe = ViCoPipeline.from_pretrained(model, concept, device=device, vae=vae)
        ref = None
        if reference is not None:
            from .data import load_image

            ref = load_image(reference, pipe.method.config.resolution)
        elif images_dir is not None:
            ref = pipe.default_reference(images_dir)
        images, context = pipe(prompt, reference=ref, num_images=num_images, num_inference_steps=steps,
                               guidance_scale=guidance, seed=seed, progress=progress)
        _write_samples(folder.staging(), prompt, images, pipe.method, context, save_maps)
        folder.commit()  # the previous run's images and maps go: `vico eval` must not score them
    return Path(out)


def _write_samples(out: Path, prompt: str, images, method, context: dict, save_maps: bool) -> None:
    """``000.png ...``, ``grid.png``, ``prompt.txt`` and, with ``save_maps``, each image's S* map and mask."""
    import numpy as np
    from PIL import Image

    from .model import warn
    from .pipeline import heatmap_overlay, image_grid

    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:03d}.png")
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    (out / "prompt.txt").write_text(prompt + "\n")
    if not (save_maps and hasattr(method, "sampled_maps")):
        return
    if "last_request" not in context:
        warn("--save-maps: no attention maps were recorded in this run; writing the images only")
        return
    for layer, (maps, masks) in method.sampled_maps(context).items():
        side = maps.shape[-1]
        tag = layer.replace(".", "-")
        for i in range(len(images)):
            Image.fromarray(heatmap_overlay(images[i], maps[i].float().cpu().numpy())).save(
                out / f"{i:03d}_map_{tag}.png")
            big = np.kron(masks[i].cpu().numpy(), np.ones((images.shape[1] // side,) * 2))
            Image.fromarray((big * 255).astype(np.uint8)).save(out / f"{i:03d}_mask_{tag}.png")
