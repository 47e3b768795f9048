"""Evaluation metrics of personalization (docs/methods.md §6), from locally stored models.

- CLIP-I: mean cosine similarity of CLIP image embeddings over all
  (generated, real) pairs.
- CLIP-T: mean cosine similarity of each generated image with its prompt,
  the placeholder replaced by the class word.
- DINO: as CLIP-I with DINO ViT CLS embeddings.
- masked CLIP-I: CLIP-I on foreground-only images (background set to black by
  a mask per image).

Models load with ``from_pretrained(path)`` (CLIP: a ``CLIPModel`` folder with
its tokenizer and image processor; DINO: a ``ViTModel`` folder with its image
processor, e.g. facebook/dino-vits16 saved locally). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import UserError


@dataclass
class Encoders:
    clip_model: object
    clip_tokenizer: object
    clip_processor: object
    dino_model: object | None = None
    dino_processor: object | None = None


def load_encoders(clip: str | Path, dino: str | Path | None = None, device: str = "cpu") -> Encoders:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name, path in (("--clip", clip), ("--dino", dino)):
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{name} {path} is not a local model folder")
    enc = Encoders(
        clip_model=CLIPModel.from_pretrained(clip).to(device).eval(),
        clip_tokenizer=AutoTokenizer.from_pretrained(clip),
        clip_processor=AutoImageProcessor.from_pretrained(clip),
    )
    if dino is not None:
        enc.dino_model = ViTModel.from_pretrained(dino, add_pooling_layer=False).to(device).eval()
        enc.dino_processor = AutoImageProcessor.from_pretrained(dino)
    return enc


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_image_embeddings(enc: Encoders, images: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    """Unit-norm CLIP image embeddings [n, d] of uint8 RGB images [H, W, 3]."""
    model = enc.clip_model
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = enc.clip_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        out.append(_unit(_features(model.get_image_features(pixel_values=pixels.to(device)))))
    return torch.cat(out)


@torch.no_grad()
def clip_text_embeddings(enc: Encoders, prompts: list[str]) -> torch.Tensor:
    model = enc.clip_model
    device = next(model.parameters()).device
    tokens = enc.clip_tokenizer(prompts, padding="max_length", truncation=True,
                                max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    feats = model.get_text_features(input_ids=tokens["input_ids"].to(device))
    return _unit(_features(feats))


def _features(out) -> torch.Tensor:
    # transformers 5 may return a model output instead of a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def dino_embeddings(enc: Encoders, images: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    """Unit-norm DINO CLS embeddings [n, d]."""
    if enc.dino_model is None:
        raise UserError("DINO needs --dino PATH (a local ViTModel folder)")
    device = next(enc.dino_model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = enc.dino_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        out.append(_unit(enc.dino_model(pixel_values=pixels.to(device)).last_hidden_state[:, 0]))
    return torch.cat(out)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of a_i · b_j over all pairs (inputs unit-norm)."""
    return float((a @ b.T).mean())


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Foreground only: pixels where ``mask`` (any size, resized nearest) is False become black."""
    from PIL import Image

    h, w = image.shape[:2]
    m = np.asarray(Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    return image * m[..., None].astype(image.dtype)


def evaluate(enc: Encoders, generated: list[np.ndarray], real: list[np.ndarray], prompts: list[str],
             generated_masks: list[np.ndarray] | None = None, real_masks: list[np.ndarray] | None = None) -> dict:
    """All metrics for one set of generated images against the real ones.

    ``prompts`` has one text per generated image (placeholder already replaced).
    Masked CLIP-I is computed when both mask lists are given.
    """
    if not generated or not real:
        raise UserError("evaluation needs at least one generated and one real image")
    if len(prompts) != len(generated):
        raise ValueError(f"{len(prompts)} prompts for {len(generated)} generated images")
    gen_clip, real_clip = clip_image_embeddings(enc, generated), clip_image_embeddings(enc, real)
    report = {
        "clip_i": mean_pairwise_cosine(gen_clip, real_clip),
        "clip_t": float((gen_clip * clip_text_embeddings(enc, prompts)).sum(-1).mean()),
        "n_generated": len(generated),
        "n_real": len(real),
    }
    if enc.dino_model is not None:
        report["dino"] = mean_pairwise_cosine(dino_embeddings(enc, generated), dino_embeddings(enc, real))
    if generated_masks is not None and real_masks is not None:
        gm = [apply_mask(i, m) for i, m in zip(generated, generated_masks)]
        rm = [apply_mask(i, m) for i, m in zip(real, real_masks)]
        report["masked_clip_i"] = mean_pairwise_cosine(clip_image_embeddings(enc, gm), clip_image_embeddings(enc, rm))
    return report


def read_image_files(paths) -> list[np.ndarray]:
    """uint8 RGB arrays [H, W, 3] of image files, read by the one loader (``vico.data.open_image``)."""
    from .data import open_image

    return [np.asarray(open_image(p)) for p in paths]


def read_images(folder: str | Path) -> list[np.ndarray]:
    """The generated images of a `vico sample` folder (000.png, 001.png, ...)."""
    return read_image_files(sorted(Path(folder).glob("[0-9][0-9][0-9].png")))


def load_eval_prompts(path: str | Path | None = None) -> list[str]:
    """The shipped evaluation prompt set (``{}`` = the subject), or a user file, one per line."""
    from importlib import resources

    text = Path(path).read_text() if path else resources.files("vico").joinpath("prompts/eval_prompts.txt").read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts or any("{}" not in p for p in prompts):
        raise UserError("every evaluation prompt must contain {} where the subject goes")
    return prompts
