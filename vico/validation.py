"""Images from validation prompts while a concept trains (``vico train --validation-prompt``).

At every ``--validation-steps`` optimizer steps the main process samples each
prompt with the concept as it stands, from one fixed seed (so steps compare),
and writes ``OUT/validation/step-XXXXXX/grid.png``: one labelled row per
prompt; for methods with attention maps (ViCo) each image is followed by its
S* map and Otsu mask. Sampling draws from its own generator, never from the
training stream, so a run with validation trains exactly what one without
it trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_folder
from .methods.base import Method
from .model import Components

VALIDATION = "validation"
DEFAULT_PROMPT_COUNT = 3  # the first evaluation prompts stand in when the user names none
LABEL_HEIGHT = 14  # pixels of the caption strip above each row


def default_prompts(method: Method) -> list[str]:
    """The first ``DEFAULT_PROMPT_COUNT`` evaluation prompts, naming the concept as the method's prompts do."""
    from .metrics import load_eval_prompts

    cfg = method.config
    return [method.prompt_for(t, cfg.placeholder, cfg.init_word) for t in load_eval_prompts()[:DEFAULT_PROMPT_COUNT]]


def validation_rows(method: Method, components: Components, prompts: list[str], num_images: int, steps: int,
                    seed: int, reference: torch.Tensor | None) -> list[tuple[str, list[np.ndarray]]]:
    """Per prompt, its caption and tiles (uint8 [H, W, 3]): each image, then its S* map and mask for methods
    that record maps. ``components`` must hold the plain (not DDP-wrapped) modules."""
    from .pipeline import ViCoPipeline, heatmap_overlay

    pipe = ViCoPipeline(components, method)
    rows = []
    for prompt in prompts:
        images, context = pipe(prompt, reference=reference, num_images=num_images, num_inference_steps=steps,
                               seed=seed, progress=False)
        tiles: list[np.ndarray] = []
        maps = method.sampled_maps(context) if hasattr(method, "sampled_maps") and "last_request" in context \
            else {}
        last = list(maps.values())[-1] if maps else None  # the deepest flagged layer's map
        for i, image in enumerate(images):
            tiles.append(image)
            if last is not None:
                heat, mask = (t[i].float().cpu().numpy() for t in last)
                tiles.append(heatmap_overlay(image, heat))
                big = np.kron(mask, np.ones((image.shape[0] // mask.shape[0],) * 2))
                tiles.append(np.repeat((big * 255).astype(np.uint8)[..., None], 3, axis=-1))
        rows.append((prompt, tiles))
    return rows


def labelled_grid(rows: list[tuple[str, list[np.ndarray]]]) -> np.ndarray:
    """One uint8 [H, W, 3] image: per row a white caption strip, then its tiles side by side."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1][0].shape[:2]
    cols = max(len(tiles) for _, tiles in rows)
    canvas = Image.new("RGB", (cols * w, len(rows) * (h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caption, tiles) in enumerate(rows):
        top = r * (h + LABEL_HEIGHT)
        draw.text((2, top + 1), caption, fill="black")
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (c * w, top + LABEL_HEIGHT))
    return np.asarray(canvas)


def write_validation(out: Path, step: int, method: Method, components: Components, prompts: list[str],
                     num_images: int, steps: int, seed: int, reference: torch.Tensor | None) -> tuple[Path, np.ndarray]:
    """Sample and write ``out/validation/step-XXXXXX/`` (grid.png, prompts.txt) atomically; returns the folder
    and the grid (uint8 [H, W, 3]) for the trackers."""
    from PIL import Image

    grid = labelled_grid(validation_rows(method, components, prompts, num_images, steps, seed, reference))

    def fill(tmp: Path) -> None:
        Image.fromarray(grid).save(tmp / "grid.png")
        (tmp / "prompts.txt").write_text("".join(p + "\n" for p in prompts))

    return atomic_folder(out / VALIDATION / f"step-{step:06d}", fill), grid
