"""AttnDreamBooth (arXiv 2406.05000) on the fused map infrastructure (docs/methods.md §3).

Prompt "a photo of a [V] [category]" (every prompt names the concept "[V]
[category]", ``concept_phrase``). Three stages, batch 8 each as the official
``train_attndreambooth.sh``: (1) the [V] embedding alone, lr 1e-3, 60 steps;
(2) all text cross-attention (attn2) parameters, lr 2e-5, 100 steps; (3) the
whole UNet, lr 2e-6, 500 steps ("fast" preset: lr 1e-5, 200 steps, and batch 4
in every stage). Training images are augmented per sample as the official
dataset does (``vico.data.attndreambooth_augment``: rotation up to 45 degrees
with an expanded canvas, p 0.75, option ``rotate_p``; resize; horizontal flip p 0.25; random crop),
drawn from the training generator, then encoded by the VAE (a posterior sample)
at every step. The regulariser
uses per-head maps of [V] and [category] from every attn2 layer, extracted by
the fused op with ``head_reduce="none"`` (no attention matrix): per layer and
batch row, the mean and unbiased variance over heads and positions;
L = mean over layers of Σ_b λμ(μ_V − μ_C)² + λσ(σ²_V − σ²_C)², with
(λμ, λσ) = (0.1, 0) in stage 1 and (2, 5) after. Sampling: DPM-Solver.
On SDXL (docs/methods.md §10) [V] is added to both tokenizers and learned in both text encoders
(``embedding``, ``embedding_2``, as Textual Inversion), the UNet stages train SDXL's UNet the same way, every
UNet call gets the added conditions (pooled projection, time ids), and the maps' token positions come from
the first tokenizer's ids (both tokenizers must put [V] and [category] at the same positions: checked).
The saved concept holds the embedding(s) and the full fine-tuned UNet weights; with
``unet_lora_rank`` R > 0 the UNet stages train one PEFT LoRA adapter of rank R
instead (stage 2 its attn2 part, stage 3 all of it; ``LORA_TARGETS``) and the
concept holds the embedding and the adapter, also written for plain diffusers
(``LORA_FILE`` + ``learned_embeds.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fused

from ..data import attndreambooth_augment
from ..files import atomic_write
from ..model import Components, UserError, token_positions
from .base import Batch, Method, MethodConfig, MethodOptions, Stage, draw_noise, noise_and_target
from .textual_inversion import (add_placeholder_embeddings, embeddings_state, load_embeddings_state,
                                save_learned_embeds)

STAGES = {  # name: (lr, steps, batch size, (lambda_mu, lambda_sigma))
    "embedding": (1e-3, 60, 8, (0.1, 0.0)),
    "cross-attention": (2e-5, 100, 8, (2.0, 5.0)),
    "unet": (2e-6, 500, 8, (2.0, 5.0)),
}
FAST_UNET = (1e-5, 200, 4, (2.0, 5.0))
FAST_BATCH = 4  # the fast preset's batch size, every stage
ROTATE_P = 0.75  # the official dataset's RandomApply([RandomRotation(45, expand=True)], p=0.75)
# The LoRA variant adapts the attention projections of every transformer block, as diffusers'
# examples/dreambooth/train_dreambooth_lora.py does (attn1 and attn2; stage 2 trains the attn2 ones).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: `pipe.load_lora_weights(folder)` finds it


@dataclass(frozen=True)
class AttnDreamBoothOptions(MethodOptions):
    fast: bool = field(default=False, metadata={"help": "the official fast preset: batch 4 in every stage, stage 3 "
                                                      "at lr 1e-5 for 200 steps"})
    rotate_p: float = field(default=ROTATE_P, metadata={
        "help": "probability of the official random rotation (up to 45 degrees) of a training image"})
    unet_lora_rank: int = field(default=0, metadata={
        "help": "rank of a LoRA adapter that stages 2 and 3 train instead of the UNet's weights (attn2 "
                "projections, then every attention projection); the concept is then a few MB. 0: the "
                "official full fine-tuning"})

    def check(self) -> None:
        super().check()
        if not 0 <= self.rotate_p <= 1:
            raise UserError(f"--rotate-p {self.rotate_p}: a probability must be in [0, 1]")
        if self.unet_lora_rank < 0:
            raise UserError(f"--unet-lora-rank {self.unet_lora_rank}: a rank must be 0 (full fine-tuning) or more")


def mean_variance_regulariser(maps: dict[str, torch.Tensor], lam_mu: float, lam_sigma: float) -> torch.Tensor:
    """maps: layer -> per-head maps [B, H, 2, N] of ([V], [category]); see the module docstring."""
    terms = []
    for m in maps.values():
        flat_v = m[:, :, 0].flatten(1)  # [B, H*N]
        flat_c = m[:, :, 1].flatten(1)
        mu = (flat_v.mean(1) - flat_c.mean(1)) ** 2
        var = (flat_v.var(1, unbiased=True) - flat_c.var(1, unbiased=True)) ** 2
        terms.append((lam_mu * mu + lam_sigma * var).sum())
    return torch.stack(terms).mean()


class AttnDreamBooth(Method):
    name = "attndreambooth"
    default_steps = sum(s[1] for s in STAGES.values())
    default_batch_size = 8
    sampler = "dpm-solver"
    families = ("sd", "sdxl")
    Options = AttnDreamBoothOptions

    def __init__(self, components: Components, config: MethodConfig):
        super().__init__(components, config)
        tok = components.tokenizer
        # one token in every tokenizer, or one line (add_placeholder_token checks the category word)
        self.embeddings = add_placeholder_embeddings(components, config.placeholder, config.init_word)
        self.token_id = tok.convert_tokens_to_ids(config.placeholder)
        self.category_id = tok(config.init_word, add_special_tokens=False).input_ids[0]
        self._check_concept_positions()
        fused.attach(components.unet)
        self.layers = fused.cross_attention_layers(components.unet)
        if self.options.unet_lora_rank:
            add_unet_lora(components.unet, self.options.unet_lora_rank)
        self.stage = 0
        self._decoded = None  # (key, images) when the training images were decoded from latents

    @property
    def embedding(self):
        """The first text encoder's [V] embedding (the only one on SD 1.x/2.x)."""
        return self.embeddings[0]

    def _check_concept_positions(self) -> None:
        """The maps read [V] and [category] at their positions in the first tokenizer's ids; SDXL's UNet keys
        concatenate both encoders' states position by position, so every tokenizer must put them there too
        (SDXL's two share CLIP's BPE vocabulary: they do)."""
        prompt, words = self.prompt(None), (self.config.placeholder, self.config.init_word)
        positions = {}
        for i, (tok, _) in enumerate(self.components.text_encoders):
            ids = tok(prompt).input_ids
            positions[i] = [ids.index(tok(w, add_special_tokens=False).input_ids[0]) for w in words]
        if len(set(map(tuple, positions.values()))) > 1:
            raise UserError(f"--init-word {self.config.init_word}: the tokenizers put {words} at different "
                            f"positions of {prompt!r} ({positions}); the attention maps need one position each")

    def _stage_table(self):
        table = list(STAGES.values())
        if self.options.fast:
            table = [(lr, steps, FAST_BATCH, lam) for lr, steps, _, lam in table[:2]] + [FAST_UNET]
        return table

    def stages(self, steps: int | None = None, batch_size: int | None = None) -> list[Stage]:
        return [Stage(name, steps or spec[1], batch_size or spec[2])
                for name, spec in zip(STAGES, self._stage_table())]

    def begin_stage(self, index: int) -> None:
        self.stage = index
        self.components.unet.requires_grad_(False)
        for emb in self.embeddings:
            emb.learned.requires_grad_(index == 0)
        for p in self._unet_params(index):
            p.requires_grad_(True)

    def _unet_params(self, stage: int) -> list[torch.nn.Parameter]:
        """What a UNet stage trains: every attn2 parameter (stage 1) or the whole UNet (stage 2), or
        with LoRA those parameters' adapter weights; nothing in stage 0."""
        if stage == 0:
            return []
        prefixes = tuple(f"{name}." for name in self.layers) if stage == 1 else ("",)
        lora = bool(self.options.unet_lora_rank)
        return [p for n, p in self.components.unet.named_parameters()
                if n.startswith(prefixes) and (not lora or ".lora_" in n)]

    @classmethod
    def learning_rate_names(cls) -> dict[str, float]:
        return {name: spec[0] for name, spec in STAGES.items()}  # one per stage (the fast preset's unet: 1e-5)

    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        lr = self.base_lr(list(STAGES)[stage], default=self._stage_table()[stage][0]) * lr_scale
        if stage == 0:
            return [{"name": "embedding", "params": [emb.learned for emb in self.embeddings], "lr": lr}]
        return [{"name": list(STAGES)[stage], "params": self._unet_params(stage), "lr": lr}]

    def prompt(self, generator: torch.Generator | None) -> str:
        return f"a photo of a {self.concept_phrase(self.config.placeholder, self.config.init_word)}"

    @classmethod
    def concept_phrase(cls, placeholder: str, class_word: str) -> str:
        return f"{placeholder} {class_word}"  # the official inference writes "[V] category"

    def _source_images(self, latent_mean: torch.Tensor) -> torch.Tensor:
        """The training images in pixels: ``training_images`` when the trainer set them, else
        the VAE decoding of ``latent_mean`` (computed once)."""
        if self.training_images is not None:
            return self.training_images
        key = (latent_mean.data_ptr(), tuple(latent_mean.shape))
        if self._decoded is None or self._decoded[0] != key:
            vae = self.components.vae
            with torch.no_grad():
                images = vae.decode(latent_mean.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)
            self._decoded = (key, images.float().cpu())
        return self._decoded[1]

    def make_batch(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, generator: torch.Generator,
                   batch_size: int, rows: slice | None = None) -> Batch:
        """Per sample: an image drawn from the generator, augmented (``attndreambooth_augment``),
        encoded by the VAE and sampled from its posterior. With ``rows`` every draw is
        still made for the whole batch (``Method.make_batch``), but only those rows are
        encoded: the VAE work of a process is its own share."""
        vae = self.components.vae
        images = self._source_images(latent_mean)
        size = latent_mean.shape[-1] * self.components.vae_scale
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        pixels = torch.stack([attndreambooth_augment(images[i], generator, size, rotate_p=self.options.rotate_p)
                              for i in idx.tolist()])
        mine = slice(None) if rows is None else rows
        with torch.no_grad():
            posterior = vae.encode(pixels[mine].to(next(vae.parameters()).device, vae.dtype)).latent_dist
        eps = torch.randn((batch_size, *posterior.mean.shape[1:]), generator=generator)[mine].to(posterior.mean)
        latents = ((posterior.mean + posterior.std * eps) * vae.config.scaling_factor).to(latent_mean.device,
                                                                                       latent_mean.dtype)
        prompts = [self.prompt(generator) for _ in range(batch_size)]
        noise, t = draw_noise(self.components.scheduler, (batch_size, *latents.shape[1:]), generator)
        return Batch(latents=latents, prompts=prompts[mine], noise=noise[mine], timesteps=t[mine])

    def map_request(self, prompt_ids: torch.Tensor) -> fused.MapRequest:
        v_pos, _ = token_positions(prompt_ids, self.token_id, self.components.tokenizer.eos_token_id)
        c_pos, _ = token_positions(prompt_ids, self.category_id, self.components.tokenizer.eos_token_id)
        return fused.MapRequest(torch.stack([v_pos, c_pos], dim=1), layers=self.layers, head_reduce="none")

    def training_loss(self, batch: Batch):
        c = self.components
        cond = self.encode(batch.prompts)
        noisy, t, target = noise_and_target(c.scheduler, batch.latents, batch.noise, batch.timesteps)
        request = self.map_request(cond.ids)
        pred = c.unet(noisy, t, **cond.unet_kwargs(), cross_attention_kwargs={"map_request": request}).sample
        mse = F.mse_loss(pred.float(), target.float())
        lam_mu, lam_sigma = self._stage_table()[self.stage][3]
        reg = mean_variance_regulariser(request.maps, lam_mu, lam_sigma)
        loss = mse + reg
        return loss, {"loss": loss.item(), "mse": mse.item(), "reg": float(reg.detach())}

    def _unet_state(self) -> dict[str, torch.Tensor]:
        """The UNet tensors a concept holds: all of them, or with LoRA the adapter's alone."""
        unet = self.components.unet
        if self.options.unet_lora_rank:
            return {n: p for n, p in unet.named_parameters() if ".lora_" in n}
        return unet.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return embeddings_state(self.embeddings) | {f"unet.{k}": v for k, v in self._unet_state().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_embeddings_state(self.embeddings, state)
        with torch.no_grad():
            for name, tensor in self._unet_state().items():
                tensor.copy_(state[f"unet.{name}"])

    def save_extra(self, out: Path) -> None:
        """With LoRA, the concept as plain diffusers loads it: ``pipe.load_lora_weights(out)`` and
        ``pipe.load_textual_inversion(out / "learned_embeds.safetensors")`` (SDXL: its ``clip_l`` and ``clip_g``
        tensors, one call per encoder, docs/methods.md §10)."""
        if not self.options.unet_lora_rank:
            return  # the full UNet: `vico export` writes the embedding, the UNet needs this project's loader
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = self.components.unet
        pipeline = StableDiffusionXLPipeline if self.components.is_sdxl else StableDiffusionPipeline
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
        metadata = unet.peft_config["default"].to_dict()  # rank and alpha, read back by load_lora_weights
        atomic_write(out / LORA_FILE, lambda p: pipeline.save_lora_weights(
            p.parent, unet_lora_layers=layers, weight_name=p.name, unet_lora_adapter_metadata=metadata))
        save_learned_embeds(out, self.config.placeholder, [emb.learned for emb in self.embeddings])


def add_unet_lora(unet: torch.nn.Module, rank: int) -> None:
    """Add the LoRA adapter ("default", rank ``rank``, alpha = rank as diffusers' examples) to ``LORA_TARGETS``
    of every attention layer of ``unet``; its B matrices start at zero, so the UNet's outputs do not change.
    Its A matrices draw from torch's global generator (the trainer seeds it)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
