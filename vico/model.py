"""Loading a local Stable Diffusion folder and the text-side helpers every method shares.

``load_components(path)`` reads any SD 1.x/2.x diffusers folder (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), and SDXL's (also
``text_encoder_2/``, ``tokenizer_2/``), with ``from_pretrained``; nothing is
downloaded. ``encode_prompts`` builds the UNet's conditioning of both families
(``Conditioning``: SDXL adds the pooled projection and time ids). ``PlaceholderEmbedding`` adds
learned token vectors to a frozen text encoder without training (or keeping
optimizer state for) the whole vocabulary matrix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn


class UserError(Exception):
    """Bad input from the user: the CLI prints the message in one line, no traceback."""


def require_at_least_one(values: dict[str, int | None], hints: dict[str, str] | None = None) -> None:
    """A count option below 1 is a one-line error naming its flag (argparse's type=int takes -1 and 0);
    ``values``: option name (``num_images``) -> value, None = not given."""
    for name, value in values.items():
        if value is not None and value < 1:
            hint = (hints or {}).get(name, "")
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}{hint}")


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, None when all are finite."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


class UnreadableFile(UserError):
    """A file that exists but cannot be read (truncated, garbage, wrong format): resume can fall back."""


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Fail early, in one line, when ``path`` cannot become an output folder (an existing file, a
    file on the way to it, or a folder this user cannot write in)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is an existing file, not a folder; choose another {option}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write in {existing} (permission denied or read-only)")
    return path


def read_model_config(model: str | Path, sub: str) -> dict:
    """``model/sub/config.json`` (a diffusers component's config), read without loading any weights."""
    import json

    path = Path(model) / sub / "config.json"
    if not path.parent.is_dir():  # the words of load_components, which would find the same
        raise UserError(f"model path {model} has no {sub}/ folder: not a diffusers Stable Diffusion pipeline")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"model path {model} has no {sub}/config.json: not a diffusers pipeline folder") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}): truncated or not a diffusers config") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a diffusers config (not a JSON object)")
    return config


def image_size_rule(model: str | Path, denoiser: str = "unet") -> tuple[int, int]:
    """(factor, minimum): an image side ``model`` generates without resizing is a multiple of ``factor`` (the
    VAE's downsampling, times a transformer's patch size) and at least ``minimum`` (one latent cell left at the
    UNet's deepest level). Read from the configs only."""
    config = read_model_config(model, denoiser)
    factor = vae_factor(model) * int(config.get("patch_size") or 1)
    return factor, factor * 2 ** (len(config.get("block_out_channels", [0])) - 1)


def vae_factor(model: str | Path) -> int:
    """Pixels per latent cell along each side of ``model``'s VAE (8 for SD's), from its config
    (``Components.vae_scale`` of a loaded one)."""
    return 2 ** (len(read_model_config(model, "vae").get("block_out_channels", [0])) - 1)


def native_size(model: str | Path) -> int:
    """The image side ``model``'s UNet was built for (``Components.native_resolution``), from its configs."""
    return int(read_model_config(model, "unet")["sample_size"]) * vae_factor(model)


def check_image_size(value: int, model: str | Path, option: str, denoiser: str = "unet") -> None:
    """One line when ``value`` (pixels) is not a size ``model`` can generate as asked (``image_size_rule``)."""
    factor, minimum = image_size_rule(model, denoiser)
    if value < minimum or value % factor:
        raise UserError(f"{option} {value}: {Path(model).name} needs a multiple of {factor} pixels, at least "
                        f"{minimum} (e.g. {max(minimum, round(value / factor) * factor)})")


def scheduler_timesteps(model: str | Path) -> int:
    """The number of training timesteps of ``model``'s scheduler (its scheduler_config.json; 1000 if unset)."""
    import json

    path = Path(model) / "scheduler" / "scheduler_config.json"
    try:
        return int(json.loads(path.read_text()).get("num_train_timesteps", 1000))
    except (OSError, ValueError, AttributeError, TypeError):
        raise UserError(f"{path} is missing or unreadable: not a diffusers pipeline folder") from None


def check_steps(steps: int, model: str | Path, option: str = "--steps") -> None:
    """Sampling steps beyond the scheduler's training timesteps are one line (diffusers raises deep inside)."""
    limit = scheduler_timesteps(model)
    if steps > limit:
        raise UserError(f"{option} {steps}: {Path(model).name}'s scheduler has {limit} timesteps; use at most {limit}")


def check_seed(seed: int, option: str = "--seed") -> None:
    """Seeds are 0..2**32-1 (what every generator in the stack accepts): anything else is one line."""
    if not 0 <= seed < 2**32:
        raise UserError(f"{option} {seed}: a seed must be a whole number in 0..{2**32 - 1}")


def check_placeholder(token: str, option: str = "--token") -> None:
    """A placeholder token is a non-empty string without spaces ("" would take over the unknown token)."""
    if not token or any(ch.isspace() for ch in token):
        raise UserError(f"{option} {token!r}: a placeholder token must be a non-empty string without spaces, "
                        "e.g. S*")


def resolve_device(device: str | None, option: str = "--device") -> str:
    """``device``, or ``fused.default_device()``; a device this machine lacks is one line."""
    if device is None:
        import fused

        return fused.default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {device!r} is not a device (cuda, cuda:1, cpu, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {device}: this torch sees no CUDA device (torch.cuda.is_available() is False); "
                        "use --device cpu")
    return device


def check_layers(layers: list[str], model: str | Path, option: str = "--layers") -> None:
    """Every name must be a spatial transformer (a module with ``transformer_blocks``) of ``model``'s UNet."""
    from .image_attention import decoder_transformers

    unet = meta_unet(model)
    modules = dict(unet.named_modules())
    for name in layers:
        if not getattr(modules.get(name), "transformer_blocks", None):
            known = ", ".join(decoder_transformers(unet)) or "none"
            raise UserError(f"{option} {name}: no spatial transformer of that name in {model}'s UNet (its decoder "
                            f"has {known})")


def meta_unet(model: str | Path) -> nn.Module:
    """``model``'s UNet built from its config on the meta device: its module names, no weights loaded."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(read_model_config(model, "unet"))


def warn(message: str) -> None:
    """One line on stderr, like the CLI's errors: ``vico: warning: ...``."""
    import sys

    print(f"vico: warning: {message}", file=sys.stderr)


SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"


def model_family(path: str | Path) -> str:
    """"sd" (SD 1.x/2.x) or "sdxl" for a diffusers folder: model_index.json's ``_class_name``, or, without one,
    whether a ``text_encoder_2/`` folder is there. Any other pipeline class is a one-line ``UserError``."""
    import json

    path = Path(path)
    try:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name is None:
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"
    if name not in (SD_PIPELINE, SDXL_PIPELINE):
        raise UserError(f"model path {path} holds a {name} (model_index.json); vico trains and samples "
                        f"{SD_PIPELINE} (SD 1.x/2.x) and {SDXL_PIPELINE} folders")
    return "sdxl" if name == SDXL_PIPELINE else "sd"


@dataclass
class Components:
    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    scheduler: object
    path: str
    # SDXL's second tokenizer and CLIPTextModelWithProjection (None on SD 1.x/2.x)
    tokenizer_2: object | None = None
    text_encoder_2: nn.Module | None = None
    # SDXL pipelines' config: the unconditional branch gets zero embeddings instead of encoding ""
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[tuple[object, nn.Module]]:
        """(tokenizer, text encoder) pairs in the pipeline's order: one on SD, two on SDXL."""
        pairs = [(self.tokenizer, self.text_encoder)]
        return pairs + ([(self.tokenizer_2, self.text_encoder_2)] if self.is_sdxl else [])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along each side (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was built for: its latent ``sample_size`` times ``vae_scale``."""
        return self.unet.config.sample_size * self.vae_scale

    def to(self, device, dtype=None) -> "Components":
        """Move every module; ``dtype`` casts them too, except an SDXL VAE whose config asks for
        ``force_upcast`` (the original SDXL VAE overflows in float16): it stays float32 under float16, as
        ``StableDiffusionXLPipeline`` upcasts it (an fp16-fixed VAE, ``--vae``, runs in float16)."""
        for module in (self.text_encoder, self.text_encoder_2, self.vae, self.unet):
            if module is None:
                continue
            cast = dtype
            if module is self.vae and self.is_sdxl and dtype == torch.float16 and self.vae.config.get("force_upcast"):
                cast = torch.float32
            module.to(device) if cast is None else module.to(device=device, dtype=cast)
        return self


SD_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_FOLDERS = SD_FOLDERS + ("text_encoder_2", "tokenizer_2")


def check_model_folder(path: str | Path) -> str:
    """The family of a pipeline folder (``model_family``) that has every component folder the family needs;
    a one-line ``UserError`` otherwise. Reads no weights."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory (expected a diffusers Stable Diffusion folder)")
    family = model_family(path)
    for sub in SDXL_FOLDERS if family == "sdxl" else SD_FOLDERS:
        if not (path / sub).is_dir():
            kind = "SDXL" if family == "sdxl" else "Stable Diffusion"
            raise UserError(f"model path {path} has no {sub}/ folder: not a diffusers {kind} pipeline")
    return family


def load_components(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    vae: str | Path | None = None) -> Components:
    """All parts of a local SD 1.x/2.x or SDXL pipeline folder (``model_family``), frozen, in eval mode.
    ``vae``: a separate VAE folder to use instead of ``path/vae`` (e.g. SDXL's fp16-fixed VAE)."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars only: loading a local folder is quick
    path = Path(path)
    sdxl = check_model_folder(path) == "sdxl"
    vae_path = check_vae(vae) if vae is not None else path / "vae"
    comps = Components(
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder"),
        vae=AutoencoderKL.from_pretrained(vae_path),
        unet=UNet2DConditionModel.from_pretrained(path / "unet"),
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
        path=os.path.abspath(path),  # what concept.json records: valid from any working directory
    )
    if sdxl:
        comps.tokenizer_2 = AutoTokenizer.from_pretrained(path / "tokenizer_2")
        comps.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2")
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        comps.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        check_added_conditions(comps)
    for module in (comps.text_encoder, comps.text_encoder_2, comps.vae, comps.unet):
        if module is not None:
            module.requires_grad_(False).eval()
    return comps.to(device, dtype)


def check_vae(vae: str | Path, option: str = "--vae") -> Path:
    """A separate VAE folder (``AutoencoderKL.save_pretrained``'s layout): one line when it is not one."""
    vae = Path(vae)
    if not (vae / "config.json").is_file():
        raise UserError(f"{option} {vae}: not a diffusers VAE folder (no config.json; e.g. "
                        "madebyollin/sdxl-vae-fp16-fix downloaded with save_pretrained)")
    return vae


def check_added_conditions(comps: Components) -> None:
    """SDXL's UNet takes 6 time ids and text_encoder_2's pooled projection as added conditions: a UNet and
    encoder that do not fit together are one line (``_get_add_time_ids`` raises the same deep inside)."""
    unet = comps.unet
    passed = unet.config.addition_time_embed_dim * len(TIME_ID_FIELDS) + comps.text_encoder_2.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise UserError(f"model path {comps.path}: the UNet expects added conditions of length {expected}, the time "
                        f"ids and text_encoder_2's projection give {passed}: not a consistent SDXL folder")


TIME_ID_FIELDS = ("original height", "original width", "crop top", "crop left", "target height", "target width")


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of B prompts (``encode_prompts``)."""

    ids: torch.Tensor  # [B, 77] int64: the first tokenizer's ids (token positions for attention maps)
    text: torch.Tensor  # [B, 77, D] encoder_hidden_states (SDXL: D = dim(text_encoder) + dim(text_encoder_2))
    pooled: torch.Tensor | None = None  # [B, P] SDXL: text_encoder_2's pooled projection ("text_embeds")
    time_ids: torch.Tensor | None = None  # [B, 6] SDXL: TIME_ID_FIELDS, in pixels

    def unet_kwargs(self) -> dict:
        """``encoder_hidden_states`` and ``added_cond_kwargs`` of a ``UNet2DConditionModel`` call."""
        added = None if self.pooled is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.text, "added_cond_kwargs": added}

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """The rows of ``parts`` one after another (every field)."""
        def rows(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(*(rows(f.name) for f in fields(Conditioning)))

    def repeat(self, copies: int) -> "Conditioning":
        """Each row ``copies`` times in a row (``num_images_per_prompt`` in the diffusers pipelines, which
        encode a prompt once: a batch of equal prompts can round differently from one)."""
        return Conditioning(*(None if v is None else v.repeat_interleave(copies, dim=0)
                              for v in (getattr(self, f.name) for f in fields(self))))

    def zeros(self) -> "Conditioning":
        """Zero text embeddings and pooled projection, the same ids and time ids: SDXL's unconditional branch
        under ``force_zeros_for_empty_prompt``."""
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return Conditioning(self.ids, torch.zeros_like(self.text), pooled, self.time_ids)

    def detach(self) -> "Conditioning":
        return Conditioning(*(None if v is None else v.detach() for v in (getattr(self, f.name) for f in fields(self))))


class PlaceholderEmbedding(nn.Module):
    """Token embedding = a frozen base embedding plus learned rows for new tokens.

    Only ``learned`` ([K, dim]) is a parameter, so optimizers keep state for K
    vectors, not the vocabulary. New ids lie past the base table; they are
    looked up as id 0 and then replaced.
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.learned = nn.Parameter(init.detach().clone().to(base.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for shapes and dtypes
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + len(self.token_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        known = input_ids < self.base.num_embeddings
        out = self.base(torch.where(known, input_ids, torch.zeros_like(input_ids)))
        for k in range(len(self.token_ids)):
            hit = (input_ids == self.token_ids[k])[..., None]
            out = torch.where(hit, self.learned[k].to(out.dtype), out)
        return out


def base_embedding(text_encoder: nn.Module) -> nn.Embedding:
    emb = text_encoder.get_input_embeddings()
    return emb.base if isinstance(emb, PlaceholderEmbedding) else emb


def add_placeholder_token(tokenizer, text_encoder: nn.Module, token: str, init_word: str | None = None,
                          init_vector: torch.Tensor | None = None) -> PlaceholderEmbedding:
    """Add ``token`` to the tokenizer with a learned embedding initialised from
    ``init_word``'s (one token) or from ``init_vector``; returns the embedding module."""
    if token in tokenizer.get_vocab():
        raise UserError(f"placeholder token {token!r} is already in the vocabulary; pick a new string such as 'S*'")
    base = base_embedding(text_encoder)
    if init_vector is None:
        if not init_word:
            raise UserError("an initializer word is required (e.g. the class word: 'cat', 'teapot')")
        ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise UserError(f"initializer word {init_word!r} must be a single token, it is {len(ids)}")
        init_vector = base.weight[ids[0]]
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    emb = PlaceholderEmbedding(base, [token_id], init_vector.reshape(1, -1))
    text_encoder.set_input_embeddings(emb)
    return emb


def encode_prompts(components: Components, prompts: list[str], size: int | None = None) -> Conditioning:
    """The UNet's conditioning for ``prompts``, as the diffusers pipelines build it: on SD 1.x/2.x the text
    encoder's last hidden states [B, 77, D]; on SDXL (``StableDiffusionXLPipeline.encode_prompt``) the
    penultimate hidden states of both encoders concatenated [B, 77, D1 + D2], text_encoder_2's pooled
    projection [B, P] and the time ids of an uncropped ``size`` x ``size`` image (``add_time_ids``).
    Every tokenizer pads to its ``model_max_length`` and truncates."""
    sdxl = components.is_sdxl
    if sdxl and size is None:
        raise ValueError("SDXL's added conditions need the image size")
    hidden, first_ids, out = [], None, None
    for tokenizer, encoder in components.text_encoders:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(next(encoder.parameters()).device)
        first_ids = ids if first_ids is None else first_ids
        out = encoder(ids, output_hidden_states=sdxl)
        hidden.append(out.hidden_states[-2] if sdxl else out[0])
    if not sdxl:
        return Conditioning(first_ids, hidden[0])
    text = torch.cat(hidden, dim=-1).to(hidden[-1].dtype)  # the pipeline casts to text_encoder_2's dtype
    return Conditioning(first_ids, text, out.text_embeds, add_time_ids(size, len(prompts), text.dtype, text.device))


def add_time_ids(size: int, rows: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """SDXL's micro-conditioning [rows, 6] (``TIME_ID_FIELDS``) of a ``size`` x ``size`` image neither resized nor
    cropped: (size, size, 0, 0, size, size), as ``StableDiffusionXLPipeline._get_add_time_ids`` builds it for
    original size = target size = the resolution and crop top-left (0, 0)."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device).repeat(rows, 1)


def token_positions(input_ids: torch.Tensor, token_id: int | None, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: position of the first ``token_id`` (-1 if absent) and of the first EOT.

    EOT is the first occurrence of ``eos_token_id`` (SD pads with it, and a new
    token's id is larger than EOT's, so "the largest id" would be wrong).
    """
    L = input_ids.shape[1]
    pos = torch.arange(L, device=input_ids.device).expand_as(input_ids)
    big = torch.full_like(pos, L)

    def first(mask):
        p = torch.where(mask, pos, big).min(dim=1).values
        return torch.where(p == L, torch.full_like(p, -1), p)

    eot = first(input_ids == eos_token_id)
    tok = first(input_ids == token_id) if token_id is not None else torch.full_like(eot, -1)
    return tok, eot


def load_pipeline(path: str | Path, device: str | torch.device = "cpu"):
    """Any local diffusers pipeline folder; components recorded as null (e.g. an SD3
    folder without T5) are passed as None, which ``from_pretrained`` needs."""
    import json

    from diffusers import DiffusionPipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(path, **absent).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
