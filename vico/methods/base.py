"""The interface every personalization method implements.

A method says what it trains in each stage (``stages`` and ``param_groups``),
what it asks the UNet for (a ``fused.MapRequest`` built per batch), its loss,
how its trained state is saved and loaded (safetensors + a JSON config), and
how it denoises at sampling time (``predict_noise``). Training
(``vico.training``) and sampling (``vico.pipeline``) are written once against
this interface. The defaults here are the plain diffusion objective and
classifier-free guidance; methods override what they change.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..model import Components, UserError, encode_prompts

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


@dataclass
class Stage:
    name: str
    steps: int
    batch_size: int


def noise_and_target(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """Noisy latents, timesteps and the regression target (epsilon or v), drawn from ``generator``."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    return noisy, t, target


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


class Method(ABC):
    name: ClassVar[str]
    default_steps: ClassVar[int] = 400
    default_batch_size: ClassVar[int] = 1
    scale_lr: ClassVar[bool] = False  # multiply lrs by batch x processes (the LDM-based codes do)
    hflip_prob: ClassVar[float] = 0.0  # training augmentation; the trainer caches flipped latents
    sampler: ClassVar[str] = "ddim"  # or "dpm-solver"

    def __init__(self, components: Components, config: MethodConfig):
        self.components = components
        self.config = config

    # --- training --------------------------------------------------------
    def stages(self, steps: int | None = None, batch_size: int | None = None) -> list[Stage]:
        """The training stages; ``steps``/``batch_size`` override every stage's."""
        return [Stage("train", steps or self.default_steps, batch_size or self.default_batch_size)]

    def begin_stage(self, index: int) -> None:
        """Set what is trainable in stage ``index`` (called before its optimizer is built)."""

    @abstractmethod
    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        """AdamW parameter groups (params and lr) of a stage."""

    @abstractmethod
    def prompt(self, generator: torch.Generator) -> str:
        """A training caption (drawn from ``generator`` when there are several)."""

    def make_batch(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, generator: torch.Generator,
                   batch_size: int) -> Batch:
        """Random training images (latents sampled from the VAE posterior) and captions.

        With ``hflip_prob > 0`` the second half of ``latent_mean`` holds the
        flipped images (the trainer encodes them once).
        """
        n = latent_mean.shape[0] // (2 if self.hflip_prob > 0 else 1)
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        if self.hflip_prob > 0:
            idx = idx + n * (torch.rand(batch_size, generator=generator) < self.hflip_prob).long()
        eps = torch.randn((batch_size, *latent_mean.shape[1:]), generator=generator).to(latent_mean)
        latents = latent_mean[idx] + latent_std[idx] * eps
        prompts = [self.prompt(generator) for _ in range(batch_size)]
        return Batch(latents=latents, prompts=prompts, reference=self.references(latent_mean[:n], idx % n, generator))

    def references(self, latent_mean: torch.Tensor, idx: torch.Tensor, generator: torch.Generator):
        """Reference latents for a batch (ViCo); None for methods without a reference branch."""
        return None

    def training_loss(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The plain diffusion objective; methods add their terms."""
        c = self.components
        _, text = encode_prompts(c.tokenizer, c.text_encoder, batch.prompts)
        noisy, t, target = noise_and_target(c.scheduler, batch.latents, generator)
        pred = c.unet(noisy, t, text).sample
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": loss.item()}

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, flat names -> tensors (what gets saved)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules to hand to ``accelerate`` (wrapped for multi-GPU training)."""
        return [self.components.unet, self.components.text_encoder]

    # --- sampling --------------------------------------------------------
    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, prompt_ids: torch.Tensor,
                      cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                      context: dict) -> torch.Tensor:
        """Guided noise prediction for ``latents`` [B, 4, h, w] at timestep ``t``."""
        out = self.components.unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample
        eps_u, eps_c = out.chunk(2)
        return guide(eps_u, eps_c, guidance_scale)

    def sampling_context(self, reference_latents: torch.Tensor | None, batch: int) -> dict:
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
    from .attndreambooth import AttnDreamBooth
    from .catversion import CatVersion
    from .textual_inversion import TextualInversion
    from .vico import ViCo

    return {m.name: m for m in (ViCo, TextualInversion, AttnDreamBooth, CatVersion)}


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
