"""The interface every personalization method implements.

A method says what it trains (``param_groups``), what it asks the UNet for
(a ``fused.MapRequest`` built per batch), its loss, how its trained state is
saved and loaded (safetensors + a JSON config), and how it denoises at
sampling time (``predict_noise``). Training (``vico.training``) and sampling
(``vico.pipeline``) are written once against this interface.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..model import Components, UserError

CONFIG_FILE = "concept.json"
WEIGHTS_FILE = "concept.safetensors"


@dataclass
class MethodConfig:
    placeholder: str = "S*"
    init_word: str = "object"
    resolution: int = 512
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Batch:
    """One training batch, built by ``Method.make_batch`` from the generator."""

    latents: torch.Tensor  # [B, 4, h, w] targets (sampled from the VAE posterior)
    prompts: list[str]
    reference: torch.Tensor | None = None  # [B, 4, h, w] clean reference latents


class Method(ABC):
    name: ClassVar[str]
    default_steps: ClassVar[int] = 400
    default_batch_size: ClassVar[int] = 1

    def __init__(self, components: Components, config: MethodConfig):
        self.components = components
        self.config = config

    # --- training --------------------------------------------------------
    @abstractmethod
    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        """AdamW parameter groups (params and lr)."""

    @abstractmethod
    def training_loss(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one batch (noise and timesteps drawn from ``generator``) and logs."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, flat names -> tensors (what gets saved)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules to hand to ``accelerate`` (wrapped for multi-GPU training)."""
        return [self.components.unet, self.components.text_encoder]

    # --- sampling --------------------------------------------------------
    @abstractmethod
    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, prompt_ids: torch.Tensor,
                      cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                      context: dict) -> torch.Tensor:
        """Guided noise prediction for ``latents`` [B, 4, h, w] at timestep ``t``."""

    def sampling_context(self, reference_images: torch.Tensor | None, batch: int) -> dict:
        """Per-run state for ``predict_noise`` (e.g. encoded reference latents)."""
        return {}

    # --- save / load -----------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write the concept (weights + config) atomically into ``out_dir``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
        meta = dict(method=self.name, config=asdict(self.config), base_model=self.components.path)
        atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))
        self.save_extra(out)
        return out

    def save_extra(self, out: Path) -> None:
        """Optional extra files (e.g. diffusers' textual inversion format)."""


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def read_concept(concept_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    concept_dir = Path(concept_dir)
    cfg, weights = concept_dir / CONFIG_FILE, concept_dir / WEIGHTS_FILE
    if not cfg.is_file() or not weights.is_file():
        raise UserError(f"{concept_dir} is not a trained concept (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return json.loads(cfg.read_text()), load_file(str(weights))


def available_methods() -> dict[str, type[Method]]:
    from .textual_inversion import TextualInversion
    from .vico import ViCo

    return {m.name: m for m in (ViCo, TextualInversion)}


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


def load_method(components: Components, concept_dir: str | Path) -> Method:
    """Rebuild a trained method on ``components`` from a saved concept folder."""
    meta, weights = read_concept(concept_dir)
    cls = get_method(meta["method"])
    method = cls(components, MethodConfig(**meta["config"]))
    method.load_state_dict(weights)
    return method
