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
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..files import atomic_write, describe_error
from ..model import Components, Conditioning, UnreadableFile, UserError, encode_prompts, first_nonfinite

CONFIG_FILE = "concept.json"
WEIGHTS_FILE = "concept.safetensors"


def option_flag(name: str) -> str:
    """The ``vico train`` flag of option field ``name``: ``reg_weight`` -> ``--reg-weight``."""
    return "--" + name.replace("_", "-")


def _is_value_of(value, hint) -> bool:
    """Whether a JSON value fits an option field's type: bool, int, float, str, list[...] and ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_value_of(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_value_of(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    return type(value) is hint or (hint is type(None) and value is None)


@dataclass(frozen=True)
class MethodOptions:
    """The options of one method (``Method.Options``; this base has none).

    Each field is a ``vico train`` flag (``option_flag``) whose help is the
    field's ``metadata["help"]``; a concept saves them in concept.json under
    ``config.options``. ``check`` refuses bad values in one line naming the flag.
    """

    def check(self) -> None:
        """A one-line ``UserError`` naming the flag of the first bad value (subclasses add range rules)."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _is_value_of(value, hints[f.name]):
                raise UserError(f"{option_flag(f.name)} {value!r}: expected {_type_words(hints[f.name])}")

    @classmethod
    def from_saved(cls, data: object, where: Path, method: str) -> "MethodOptions":
        """The options of ``method`` saved in a concept.json (``where``); an ``UnreadableFile`` naming the
        field otherwise."""
        if not isinstance(data, dict):
            raise UnreadableFile(f"{where}: config.options must be an object, got {data!r}"[:300])
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in hints:
                raise UnreadableFile(f"{where}: config.options.{key} is not an option of {method} (it has "
                                     f"{', '.join(hints) or 'none'})")
            if not _is_value_of(value, hints[key]):
                raise UnreadableFile(f"{where}: config.options.{key} must be {_type_words(hints[key])}, got "
                                     f"{value!r}"[:300])
        try:
            options = cls(**data)
            options.check()
        except UserError as exc:
            raise UnreadableFile(f"{where}: config.options: {exc}") from None
        return options


def method_options(method_cls: type["Method"], given: "MethodOptions | dict") -> "MethodOptions":
    """``given`` (an options object or a dict by field name, e.g. ``{"reg_weight": 0}``) as the method's
    checked ``Options``; a one-line ``UserError`` for an option the method does not have or a bad value."""
    if isinstance(given, MethodOptions):
        if type(given) is not method_cls.Options:
            raise UserError(f"{type(given).__name__} are not options of {method_cls.name} "
                            f"({method_cls.Options.__name__})")
        given.check()
        return given
    names = [f.name for f in fields(method_cls.Options)]
    unknown = [key for key in given if key not in names]
    if unknown:
        have = ", ".join(option_flag(n) for n in names) or "none"
        raise UserError(f"{option_flag(unknown[0])} is not an option of --method {method_cls.name} (its options: "
                        f"{have})")
    options = method_cls.Options(**given)
    options.check()
    return options


def _type_words(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_words(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_words(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
            type(None): "nothing"}.get(hint, str(hint))


@dataclass
class MethodConfig:
    placeholder: str = "S*"
    init_word: str = "object"
    resolution: int = 512
    seed: int = 0
    options: MethodOptions | None = None  # the method's own (``Method.Options``); None: its defaults
    # Base learning rates by parameter-group name (``Method.learning_rate_names``) that replace the
    # method's defaults; the method's scaling rule (``scale_lr``) still applies to a replaced one.
    learning_rates: dict[str, float] = field(default_factory=dict)


@dataclass
class Batch:
    """One training batch, built by ``Method.make_batch`` from the generator: every random
    draw of a training step, so that the loss itself draws nothing."""

    latents: torch.Tensor  # [B, 4, h, w] targets (sampled from the VAE posterior)
    prompts: list[str]
    noise: torch.Tensor  # [B, 4, h, w] float32, the diffusion noise
    timesteps: torch.Tensor  # [B] int64
    reference: torch.Tensor | None = None  # [B, 4, h, w] clean reference latents

    def select(self, rows: slice | None) -> "Batch":
        """The rows ``rows`` of every field (all of them for None): one process's share."""
        if rows is None:
            return self
        return Batch(latents=self.latents[rows], prompts=self.prompts[rows], noise=self.noise[rows],
                     timesteps=self.timesteps[rows], reference=None if self.reference is None else self.reference[rows])


@dataclass
class Stage:
    name: str
    steps: int
    batch_size: int


def draw_noise(scheduler, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion noise (float32, ``shape`` = [B, 4, h, w]) and timesteps [B] (int64), drawn from ``generator``."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
    return noise, t


def noise_and_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Noisy latents, timesteps and the regression target (epsilon or v) of ``latents`` [B, 4, h, w]
    under ``noise`` (same shape) at timesteps ``t`` [B] (``draw_noise``), on the latents' device and dtype."""
    noise = noise.to(latents.device, latents.dtype)
    t = t.to(latents.device)
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
    guidance_scale: ClassVar[float] = 7.5  # classifier-free guidance when the user gives none
    needs_reference: ClassVar[bool] = False  # sampling reads a reference image (ViCo); default: a training image
    image_layers: ClassVar[bool] = False  # places blocks in the UNet's spatial transformers (--layers; ViCo)
    families: ClassVar[tuple[str, ...]] = ("sd",)  # the model families it trains on (``model_family``)
    Options: ClassVar[type[MethodOptions]] = MethodOptions  # its own options (flags of `vico train`)
    # Pixel images [n, 3, H, W] in [-1, 1] of the training set, for methods that augment in image
    # space (AttnDreamBooth); the trainer may set it, else such a method decodes the latents once.
    training_images: torch.Tensor | None = None

    def __init__(self, components: Components, config: MethodConfig):
        if config.options is None:
            config.options = self.Options()
        if type(config.options) is not self.Options:
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(config.options).__name__}")
        config.options.check()
        self.check_family("sdxl" if components.is_sdxl else "sd", components.path)
        self.components = components
        self.config = config

    @property
    def options(self) -> MethodOptions:
        return self.config.options

    # --- prompts -----------------------------------------------------------
    @classmethod
    def concept_phrase(cls, placeholder: str, class_word: str) -> str:
        """How a prompt names the concept: the placeholder ("S*") by default."""
        return placeholder

    @classmethod
    def prompt_for(cls, template: str, placeholder: str = "S*", class_word: str = "object") -> str:
        """``template`` ("a photo of {}") with the concept named as this method's prompts name it."""
        return template.format(cls.concept_phrase(placeholder, class_word))

    @classmethod
    def plain_prompt(cls, prompt: str, placeholder: str, class_word: str) -> str:
        """The prompt with the concept named by its class word alone (what CLIP-T scores against)."""
        return prompt.replace(cls.concept_phrase(placeholder, class_word), class_word).replace(placeholder, class_word)

    @classmethod
    def check_family(cls, family: str, model: str | Path) -> None:
        """One line when this method does not train on ``model``'s family ("sd" or "sdxl", ``model_family``)."""
        if family not in cls.families:
            names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
            raise UserError(f"--method {cls.name} does not support {names[family]} pipelines yet ({model}); it "
                            f"trains on {' and '.join(names[f] for f in cls.families)}")

    @classmethod
    def check_options_for_model(cls, options: MethodOptions, model: Path) -> None:
        """One line for an option that names what ``model`` (a diffusers folder) does not have, read from its
        configs before any weights load (ViCo's ``--layers``, CatVersion's ``--prefix-layers``)."""

    # --- training --------------------------------------------------------
    def stages(self, steps: int | None = None, batch_size: int | None = None) -> list[Stage]:
        """The training stages; ``steps``/``batch_size`` override every stage's."""
        return [Stage("train", steps or self.default_steps, batch_size or self.default_batch_size)]

    def begin_stage(self, index: int) -> None:
        """Set what is trainable in stage ``index`` (called before its optimizer is built)."""

    @abstractmethod
    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        """AdamW parameter groups of a stage: params, lr and the group's name (``learning_rate_names``), which
        the trackers log the learning rate under."""

    @classmethod
    def learning_rate_names(cls) -> dict[str, float]:
        """Name -> default base learning rate of each parameter group (what ``--lr NAME=VALUE`` sets)."""
        return {}

    def base_lr(self, name: str, default: float | None = None) -> float:
        """The base learning rate of group ``name``: the config's override, else ``default`` (a preset's),
        else the method's default."""
        fallback = self.learning_rate_names()[name] if default is None else default
        return float(self.config.learning_rates.get(name, fallback))

    @abstractmethod
    def prompt(self, generator: torch.Generator) -> str:
        """A training caption (drawn from ``generator`` when there are several)."""

    def make_batch(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, generator: torch.Generator,
                   batch_size: int, rows: slice | None = None) -> Batch:
        """Random training images (latents sampled from the VAE posterior), captions, noise and timesteps.

        With ``hflip_prob > 0`` the second half of ``latent_mean`` holds the
        flipped images (the trainer encodes them once). ``rows``: the rows this
        process trains on; the draws are made for all ``batch_size`` rows (the
        global batch), so every process's share comes from one random stream and
        N processes x batch B train on the same samples as one process x N*B.
        """
        n = latent_mean.shape[0] // (2 if self.hflip_prob > 0 else 1)
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        if self.hflip_prob > 0:
            idx = idx + n * (torch.rand(batch_size, generator=generator) < self.hflip_prob).long()
        eps = torch.randn((batch_size, *latent_mean.shape[1:]), generator=generator).to(latent_mean)
        latents = latent_mean[idx] + latent_std[idx] * eps
        prompts = [self.prompt(generator) for _ in range(batch_size)]
        reference = self.references(latent_mean[:n], latent_std[:n], idx % n, generator)
        noise, t = draw_noise(self.components.scheduler, latents.shape, generator)
        return Batch(latents=latents, prompts=prompts, noise=noise, timesteps=t, reference=reference).select(rows)

    def references(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, idx: torch.Tensor,
                   generator: torch.Generator):
        """Reference latents for a batch (ViCo); None for methods without a reference branch.
        ``latent_mean``/``latent_std`` [n, 4, h, w]: the VAE posterior of each training image."""
        return None

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The plain diffusion objective (a mean over the batch's rows); methods add their terms.

        Every term must stay a mean over rows: several processes average their
        gradients, which then equals one process's gradient on the whole batch."""
        c = self.components
        cond = self.encode(batch.prompts)
        noisy, t, target = noise_and_target(c.scheduler, batch.latents, batch.noise, batch.timesteps)
        pred = c.unet(noisy, t, **cond.unet_kwargs()).sample
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": loss.item()}

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, flat names -> tensors (what gets saved)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    # --- sampling --------------------------------------------------------
    def encode(self, prompts: list[str]) -> Conditioning:
        """The UNet's conditioning of ``prompts`` at the concept's resolution (``encode_prompts``)."""
        return encode_prompts(self.components, prompts, self.config.resolution)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                      guidance_scale: float, context: dict) -> torch.Tensor:
        """Guided noise prediction for ``latents`` [B, 4, h, w] at timestep ``t``; ``cond``/``uncond``: B rows
        each (``encode``, ``encode_unconditional``)."""
        both = Conditioning.cat([uncond, cond])
        out = self.components.unet(torch.cat([latents, latents]), t, **both.unet_kwargs()).sample
        eps_u, eps_c = out.chunk(2)
        return guide(eps_u, eps_c, guidance_scale)

    def encode_unconditional(self, batch: int) -> Conditioning:
        """The conditioning of ``batch`` unconditional (empty) prompts; zeros on an SDXL pipeline configured
        with ``force_zeros_for_empty_prompt`` (as ``StableDiffusionXLPipeline.encode_prompt``)."""
        cond = self.encode([""]).repeat(batch)
        return cond.zeros() if self.components.force_zeros_for_empty_prompt else cond

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


def read_concept_meta(concept_dir: str | Path) -> dict:
    """A concept's ``concept.json``, checked: a missing, truncated or foreign file is a one-line error."""
    concept_dir = Path(concept_dir)
    cfg = concept_dir / CONFIG_FILE
    if not cfg.is_file():
        raise UserError(f"{concept_dir} is not a trained concept (no {CONFIG_FILE}); train one with `vico train`")
    try:
        meta = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableFile(f"{cfg} is not valid JSON ({exc}): truncated or overwritten") from None
    except OSError as exc:
        raise UnreadableFile(f"cannot read {cfg}: {describe_error(exc)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str) \
            or not isinstance(meta.get("config"), dict):
        raise UnreadableFile(f"{cfg} is not a vico concept file (it needs a \"method\" name and a \"config\" object)")
    unknown = set(meta["config"]) - {f.name for f in fields(MethodConfig)}
    if unknown:
        raise UnreadableFile(f"{cfg} has unknown config keys {sorted(unknown)}: not a concept of this vico version")
    check_concept_fields(meta, cfg)
    return meta


MAX_RESOLUTION = 8192  # pixels per side; a larger recorded size is a corrupt field, not a concept to sample
REQUIRED_CONCEPT_FIELDS = ("placeholder", "init_word", "resolution")  # no default may stand in for these


def check_concept_fields(meta: dict, cfg: Path) -> None:
    """Every field of a concept.json, checked by type and range: a one-line ``UnreadableFile`` naming ``cfg``
    and the field (a missing ``resolution`` must not sample at some default size)."""
    from .registry import METHODS

    def bad(key: str, why: str) -> UnreadableFile:
        return UnreadableFile(f"{cfg}: {key} {why}; the file is damaged or not from this vico version")

    if meta["method"] not in METHODS:
        raise bad("method", f"is {meta['method']!r}, not one of {', '.join(METHODS)}")
    if "base_model" in meta and not (meta["base_model"] is None or isinstance(meta["base_model"], str)):
        raise bad("base_model", "is not a folder path")
    config = meta["config"]
    missing = [key for key in REQUIRED_CONCEPT_FIELDS if key not in config]
    if missing:
        raise bad(f"config.{missing[0]}", "is missing")
    checks = {
        "placeholder": (lambda v: isinstance(v, str) and v.strip() == v and v != "", "must be a non-empty token"),
        "init_word": (lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty word"),
        "resolution": (lambda v: type(v) is int and 8 <= v <= MAX_RESOLUTION,
                       f"must be a whole number of pixels in 8..{MAX_RESOLUTION}"),
        "seed": (lambda v: type(v) is int and 0 <= v < 2**32, "must be a whole number in 0..2**32-1"),
        "learning_rates": (lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and type(x) in (int, float) and math.isfinite(x) and x > 0 for k, x in v.items()),
            "must map group names to positive finite numbers"),
    }
    for key, (ok, why) in checks.items():
        if key in config and not ok(config[key]):
            raise bad(f"config.{key}", f"{why}, got {config[key]!r}"[:300])
    METHODS[meta["method"]].Options.from_saved(config.get("options", {}), cfg, meta["method"])


def load_weights(method: "Method", tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``method.load_state_dict(tensors)`` after checking every tensor's name, shape and kind against the
    method built on this model: a concept of another model is one line naming ``path``, not a torch error."""
    expected = method.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    where = "it was trained on another model or with other --layers"
    if missing or extra:
        name, what = (missing[0], "is missing") if missing else (extra[0], "is not part of this model's concept")
        raise UserError(f"{path}: tensor {name!r} {what} ({len(missing)} missing, {len(extra)} unexpected): {where}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape) or got.is_floating_point() != want.is_floating_point():
            raise UserError(f"{path}: tensor {name!r} is {got.dtype} {list(got.shape)}, the model needs "
                            f"{want.dtype} {list(want.shape)}: {where}")
    method.load_state_dict(tensors)


def check_concept(concept_dir: str | Path) -> dict:
    """Check a concept folder without loading its weights (the safetensors header and size only):
    a missing, truncated or garbage file is a one-line ``UserError`` naming it. Returns concept.json."""
    from safetensors import safe_open

    concept_dir = Path(concept_dir)
    cfg, weights = concept_dir / CONFIG_FILE, concept_dir / WEIGHTS_FILE
    if not cfg.is_file() or not weights.is_file():
        raise UserError(f"{concept_dir} is not a trained concept (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_concept_meta(concept_dir)
    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError (truncated, garbage header) or OSError
        raise UnreadableFile(f"{weights} is unreadable ({describe_error(exc)}): truncated or not a safetensors "
                             "file") from None
    return meta


def read_concept(concept_dir: str | Path, names: tuple[str, ...] | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """concept.json and the weights, checked (finite values too). ``names``: read only these tensors (an
    AttnDreamBooth concept holds a whole UNet beside its embedding); one missing is a one-line error."""
    from safetensors import safe_open

    meta = check_concept(concept_dir)
    weights = Path(concept_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(weights), "pt") as handle:
            present = set(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in (names or present) if name in present}
    except Exception as exc:  # SafetensorError (truncated, garbage header) or OSError
        raise UnreadableFile(f"{weights} is unreadable ({describe_error(exc)}): truncated or not a safetensors "
                             "file") from None
    missing = [name for name in names or () if name not in tensors]
    if missing:
        raise UnreadableFile(f"{weights} has no tensor {missing[0]!r}: damaged or not from this vico version")
    bad = first_nonfinite(tensors)
    if bad is not None:  # a diverged run: it would sample black images
        raise UnreadableFile(f"{weights}: tensor {bad!r} holds NaN or inf values (training diverged); retrain "
                             "with a lower learning rate")
    return meta, tensors
