"""Train the toy world's Stable-Diffusion-compatible model from scratch, resumably.

    python -m vico.toyworld.train --out toy-sd --minutes 140        # in the background: nohup ... &
    python -m vico.toyworld.train --out toy-sd --minutes 140 --resume

Stage 1 trains a 2-level AutoencoderKL (32x32 RGB -> 16x16x4) on the broad
``world.generic_image`` family (stripes, checkers, dots, rings, noise,
gradients in any colour), not on the concepts. Stage 2 trains a small
UNet2DConditionModel, with text cross-attention at 16x16 and 8x8 in encoder,
middle and decoder, and a 2-layer CLIPTextModel jointly on the frozen VAE's
latents of toy-world scenes with varied captions and 10% empty ones (for
guidance). The noise-prediction loss has one addition: an attention
localisation term (``ATTN_WEIGHT``) that asks the head-averaged map of each
object word (shape, colour, texture, size) and of the end-of-text token to
match the object's true mask, and that of the background words its
complement. A web-scale model learns this from its data; a model trained for
an hour on a few thousand toy batches does not, and attention-map methods
(ViCo's mask and regulariser, AttnDreamBooth, map tracing) depend on it.
Both learning rates decay on a cosine over their stage. Data is generated on
the fly from one seeded numpy generator. Every
``--checkpoint-every`` steps (and on Ctrl-C) the weights, AdamW state, RNG
state, step and elapsed time are written atomically to ``OUT/checkpoint``;
``--resume`` continues from there. The result is a diffusers folder at
``OUT/pipeline`` that ``StableDiffusionPipeline.from_pretrained`` loads.
Stage 3 (``--finetune-decoder``, ``--finetune-encoder``) fine-tunes one half
of the autoencoder with the other frozen, of a checkpoint or of a pipeline;
``--finetune-autoencoder`` both halves on fine patterns, the latents of
toy-world scenes held where they were.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_folder, atomic_write, load_tensors_only
from . import world


ARCHS = ("sd", "sdxl")
# The SDXL-shaped model: two text encoders whose penultimate states are concatenated (32 + 64 = 96 wide), the
# second with a pooled projection (32), SDXL's added-condition embedding of that projection and the six time ids
# (8 sinusoidal dims each), and depth-2 transformers in the low-resolution level of encoder and decoder.
SDXL_TEXT_WIDTHS = (32, 64)
SDXL_POOLED = 32
SDXL_TIME_EMBED = 8


def make_models(seed: int = 0, arch: str = "sd") -> dict:
    """Seeded, untrained models of the toy world's pipeline: ``sd`` (StableDiffusionPipeline) or ``sdxl``
    (StableDiffusionXLPipeline: + tokenizer_2 / text_encoder_2, added conditions, depth-2 transformers);
    both share the autoencoder's architecture."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..word_tokenizer import make_tokenizer

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(world.vocabulary())

    def clip(cls, width: int, layers: int, **extra):
        return cls(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra))

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(48, 96),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=16, sample_size=world.SIZE)
    unet_shape = dict(sample_size=world.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
                      up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=4, norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if arch == "sd":
        return dict(tokenizer=tokenizer, vae=vae, text_encoder=clip(CLIPTextModel, 64, 2),
                    unet=UNet2DConditionModel(cross_attention_dim=64, **unet_shape), scheduler=scheduler)
    # SDXL reads the penultimate hidden states: three layers leave two that shape them
    text_encoder = clip(CLIPTextModel, SDXL_TEXT_WIDTHS[0], 3)
    text_encoder_2 = clip(CLIPTextModelWithProjection, SDXL_TEXT_WIDTHS[1], 3, projection_dim=SDXL_POOLED)
    unet = UNet2DConditionModel(
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS), transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME_EMBED, **unet_shape)
    return dict(tokenizer=tokenizer, tokenizer_2=tokenizer, vae=vae, text_encoder=text_encoder,
                text_encoder_2=text_encoder_2, unet=unet, scheduler=scheduler)


def trained_parts(models: dict) -> tuple[str, ...]:
    """The names of the modules a base-training run trains and checkpoints (the VAE in stage 1)."""
    return tuple(name for name in ("vae", "unet", "text_encoder", "text_encoder_2") if name in models)


def components_of(models: dict):
    """``make_models``'s dict as ``vico.model.Components`` (what ``encode_prompts`` reads)."""
    from ..model import Components

    return Components(tokenizer=models["tokenizer"], text_encoder=models["text_encoder"], vae=models["vae"],
                      unet=models["unet"], scheduler=models["scheduler"], path="<toy world>",
                      tokenizer_2=models.get("tokenizer_2"), text_encoder_2=models.get("text_encoder_2"))


ATTN_WEIGHT = 0.05  # weight of the attention localisation term against the noise MSE
ATTN_MAX_T = 700  # no localisation asked of nearly pure noise, where the object has no place yet
TEXT_SLOTS = 8  # supervised token positions per caption
# Share of each stage-2 batch drawn from the broad family (``world.generic_image``) with the empty
# caption, never captioned (so text still cannot name a texture outside ``world.TEXTURES``). Meant to
# make the denoiser generic, as SD's is: the shipped UNet turns any unseen texture into a seen one
# at t ~ 100 (``evaluate --survival``). 0 for the shipped model; a 900-step fine-tune at 0.25 (lr 2e-4)
# did not change that (benchmarks/RESULTS.md), so it is an option, not the default.
GENERIC_FRACTION = 0.0
# Share of each stage-2 batch whose object wears a broad-family pattern (``world.free_pattern``) under a
# caption without a texture word: the denoiser then knows objects can carry any pattern (SD's UNet has
# seen checkered things) while text still names only ``world.TEXTURES``.
FREE_TEXTURE_FRACTION = 0.0


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, 32, 32, 3] -> float [n, 3, 32, 32] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def generic_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    return to_tensor(np.stack([world.generic_image(rng) for _ in range(n)]))


def scene_batch(rng: np.random.Generator, n: int, free_textures: int = 0
                ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images, varied captions and true object masks (float [n, 1, 32, 32]) of n base-training scenes;
    the first ``free_textures`` carry a broad-family pattern (``world.free_pattern``) and a caption
    without a texture word."""
    images, captions, masks = [], [], []
    for i in range(n):
        free = i < free_textures
        scene, caption = world.training_caption(world.random_scene(rng), rng, name_texture=not free)
        images.append(world.render(scene, *world.free_pattern(rng)) if free else world.render(scene))
        captions.append(caption)
        masks.append(scene.mask())
    return to_tensor(np.stack(images)), captions, torch.from_numpy(np.stack(masks)).float()[:, None]


def attention_targets(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions to supervise and what each map should cover.

    Returns ``index`` int64 [B, TEXT_SLOTS] (-1 = none) and ``on_object`` bool
    [B, TEXT_SLOTS]: True for object words and the first end-of-text token
    (the map should be the object mask), False for the background words (its
    complement). Positions follow the word-level tokenizer: BOS, one token per
    word, EOT.
    """
    object_words = set(world.SHAPES) | set(world.COLOURS) | set(world.ALL_TEXTURES) | set(world.SIZES)
    index = torch.full((len(captions), TEXT_SLOTS), -1, dtype=torch.long)
    on_object = torch.zeros((len(captions), TEXT_SLOTS), dtype=torch.bool)
    for b, caption in enumerate(captions):
        words = caption.split()
        if not words:
            continue
        slots = [(len(words) + 1, True)]  # EOT
        for i, w in enumerate(words):
            if w in object_words:
                slots.append((i + 1, True))
            elif w == "background" or (w in world.BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background"):
                slots.append((i + 1, False))
        for j, (pos, obj) in enumerate(slots[:TEXT_SLOTS]):
            index[b, j], on_object[b, j] = pos, obj
    return index, on_object


def attention_loss(request, masks: torch.Tensor, on_object: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over layers of MSE(map / max map, target) over the supervised (row, slot) pairs."""
    valid = (request.token_index >= 0) & rows[:, None]
    if not valid.any():
        return torch.zeros(())
    total = 0.0
    for maps in request.maps.values():  # [B, T, N]
        side = int(round(maps.shape[-1] ** 0.5))
        obj = F.adaptive_avg_pool2d(masks, side).flatten(1)[:, None]  # [B, 1, N]
        target = torch.where(on_object[..., None], obj, 1 - obj)
        norm = maps / maps.amax(-1, keepdim=True).clamp_min(1e-8)
        err = (norm - target).pow(2).mean(-1)  # [B, T]
        total = total + err[valid].mean()
    return total / len(request.maps)


def cosine_lr(base: float, progress: float) -> float:
    return float(base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(max(progress, 0.0), 1.0)))))


def save_checkpoint(out: Path, state: dict, name: str = "checkpoint") -> None:
    """OUT/``name``, atomically (``atomic_folder``): tensors and plain data only, loadable with weights_only."""
    state = dict(state)
    rng_state = state.pop("rng_state", None)  # numpy's 128-bit integers: JSON

    def fill(tmp: Path) -> None:
        torch.save(state, tmp / "state.pt")
        (tmp / "rng.json").write_text(json.dumps(rng_state))

    atomic_folder(out / name, fill)


def load_checkpoint(out: Path, name: str = "checkpoint") -> dict:
    """OUT/``name``'s state; never unpickles code (``load_tensors_only``)."""
    from ..model import UnreadableFile, UserError

    try:
        return load_tensors_only(out / name / "state.pt", "checkpoint")
    except (UnreadableFile, UserError) as exc:  # a crafted or truncated file: refuse, one line
        raise SystemExit(f"toyworld: {exc}") from None


def export(out: Path, models: dict, scaling: float) -> Path:
    """OUT/pipeline: a StableDiffusionPipeline, or a StableDiffusionXLPipeline for the SDXL-shaped models (its
    unconditional branch encodes "" as training did: ``force_zeros_for_empty_prompt`` off)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    models["vae"].register_to_config(scaling_factor=scaling)
    models["unet"].set_attn_processor(AttnProcessor2_0())  # the saved model carries no processor of this project
    if "text_encoder_2" in models:
        pipe = StableDiffusionXLPipeline(**models, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(**models, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    return out / "pipeline"


def stage2_batch(rng: np.random.Generator, n: int, generic_fraction: float = GENERIC_FRACTION,
                 free_texture_fraction: float = FREE_TEXTURE_FRACTION
                 ) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Scenes with captions (``round(n * free_texture_fraction)`` of them with a free pattern and no
    texture word), then ``round(n * generic_fraction)`` broad-family images with the empty caption.
    Returns images, captions, object masks (zeros for generic rows) and bool [n] "generic"."""
    g = int(round(n * generic_fraction))
    x, captions, masks = scene_batch(rng, n - g, int(round(n * free_texture_fraction)))
    if g:
        x = torch.cat([x, generic_batch(rng, g)])
        captions = captions + [""] * g
        masks = torch.cat([masks, torch.zeros((g, *masks.shape[1:]))])
    return x, captions, masks, torch.arange(n) >= n - g


def train(out: Path, minutes: float, vae_steps: int, batch: int, checkpoint_every: int, resume: bool,
          seed: int = 0, max_steps: int | None = None, init_from: Path | None = None,
          generic_fraction: float = GENERIC_FRACTION, unet_lr: float = 5e-4,
          free_texture_fraction: float = FREE_TEXTURE_FRACTION, arch: str = "sd",
          vae_from: Path | None = None) -> Path | None:
    """Stage 1 for ``vae_steps`` steps, then stage 2 until ``minutes`` of wall clock (both stages) or ``max_steps``.
    ``arch``: "sd" or "sdxl" (``make_models``); ``vae_from``: a pipeline whose autoencoder (and latent scale) is
    used as it is, so stage 1 is skipped (the SDXL-shaped model re-uses the shipped SD model's)."""
    out.mkdir(parents=True, exist_ok=True)
    run = _new_run(seed, unet_lr, arch)
    _restore(run, out, resume, init_from, vae_steps, vae_from)
    schedule = _Schedule(vae_steps, batch, checkpoint_every, minutes * 60, max_steps, unet_lr, generic_fraction,
                         free_texture_fraction)
    _train_steps(run, schedule, out)
    return _export_run(run, out)


@dataclass
class _ToyRun:
    """The models, optimizers, random streams and counters of a base-training run: what its checkpoint holds."""
    models: dict  # ``make_models``'s
    opt_vae: torch.optim.Optimizer  # stage 1: the autoencoder
    opt: torch.optim.Optimizer  # stage 2: UNet + text encoder
    rng: np.random.Generator  # the data
    gen: torch.Generator  # noise, timesteps, caption drop
    step: int = 0
    elapsed: float = 0.0  # seconds of wall clock, resumed runs included
    scaling: float | None = None  # the latent scale, set when stage 2 begins
    unet_start: float | None = None  # ``elapsed`` when stage 2 began

    def state(self) -> dict:
        """The checkpoint's contents (``save_checkpoint``)."""
        weights = {name: self.models[name].state_dict() for name in trained_parts(self.models)}
        return dict(weights, arch="sdxl" if "text_encoder_2" in self.models else "sd",
                    opt_vae=self.opt_vae.state_dict(), opt=self.opt.state_dict(), rng_state=self.rng.bit_generator.state,
                    gen=self.gen.get_state(), step=self.step, elapsed=self.elapsed, scaling=self.scaling,
                    unet_start=self.unet_start)


@dataclass(frozen=True)
class _Schedule:
    """The options of a base-training run (``train``'s arguments)."""
    vae_steps: int
    batch: int
    checkpoint_every: int
    budget: float  # seconds of wall clock, both stages
    max_steps: int | None
    unet_lr: float
    generic_fraction: float
    free_texture_fraction: float


def _new_run(seed: int, unet_lr: float, arch: str = "sd") -> _ToyRun:
    """Fresh seeded models (the UNet with this project's attention attached), optimizers and random streams."""
    import fused

    models = make_models(seed, arch)
    fused.attach(models["unet"])
    opt_vae = torch.optim.AdamW(models["vae"].parameters(), lr=1e-3)
    stage2 = [p for name in trained_parts(models) if name != "vae" for p in models[name].parameters()]
    opt = torch.optim.AdamW(stage2, lr=unet_lr, weight_decay=1e-2)
    return _ToyRun(models, opt_vae, opt, np.random.default_rng(seed), torch.Generator().manual_seed(seed))


def _restore(run: _ToyRun, out: Path, resume: bool, init_from: Path | None, vae_steps: int,
             vae_from: Path | None = None) -> None:
    """Continue from OUT's checkpoint (``resume``), or warm-start stage 2 from the pipeline ``init_from`` (every
    model) or ``vae_from`` (its autoencoder only)."""
    if resume and (out / "checkpoint" / "state.pt").is_file():
        _load_run(run, out)
    elif resume:
        print(f"toyworld: nothing to resume in {out}; starting fresh", file=sys.stderr)
    if run.step == 0 and (init_from is not None or vae_from is not None):
        _warm_start(run, init_from or vae_from, vae_steps, ("vae",) if init_from is None else trained_parts(run.models))


def _load_run(run: _ToyRun, out: Path) -> None:
    """Load OUT's checkpoint into ``run``: weights, optimizers, random streams and counters."""
    st = load_checkpoint(out)
    if st.get("arch", "sd") != run_arch(run.models):
        raise SystemExit(f"toyworld: {out} holds a run of the {st.get('arch', 'sd')} architecture; pass --arch "
                         f"{st.get('arch', 'sd')} to resume it")
    for name in trained_parts(run.models):
        run.models[name].load_state_dict(st[name])
    run.opt_vae.load_state_dict(st["opt_vae"])
    run.opt.load_state_dict(st["opt"])
    run.rng.bit_generator.state = json.loads((out / "checkpoint" / "rng.json").read_text())
    run.gen.set_state(st["gen"])
    run.step, run.elapsed, run.scaling, run.unet_start = st["step"], st["elapsed"], st["scaling"], st.get("unet_start")
    print(f"toyworld: resumed at step {run.step} ({run.elapsed / 60:.1f} min)", file=sys.stderr)


def run_arch(models: dict) -> str:
    return "sdxl" if "text_encoder_2" in models else "sd"


def _warm_start(run: _ToyRun, init_from: Path, vae_steps: int, parts: tuple[str, ...]) -> None:
    """A pipeline's weights of ``parts`` and its latent scale, a fresh optimizer, straight to stage 2."""
    from ..model import load_pipeline

    pipe = load_pipeline(init_from)
    for name in parts:
        run.models[name].load_state_dict(getattr(pipe, name).state_dict())
    run.step, run.scaling, run.unet_start = vae_steps, float(pipe.vae.config.scaling_factor), 0.0
    print(f"toyworld: warm start of {', '.join(parts)} from {init_from} (stage 2)", file=sys.stderr)


def _train_steps(run: _ToyRun, schedule: _Schedule, out: Path) -> None:
    """Step until the time or step budget is spent: a log line every 50 steps, a checkpoint every
    ``checkpoint_every`` steps, at the end and on Ctrl-C."""
    from tqdm.auto import tqdm

    with open(out / "train_log.jsonl", "a") as log:
        bar = tqdm(desc="toyworld", initial=run.step, file=sys.stderr)
        start = time.perf_counter() - run.elapsed
        try:
            while run.elapsed < schedule.budget and (schedule.max_steps is None or run.step < schedule.max_steps):
                if run.step < schedule.vae_steps:
                    stage, (loss, extra) = "vae", _vae_step(run, schedule)
                else:
                    stage, (loss, extra) = "unet", _unet_step(run, schedule)
                run.step += 1
                run.elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{loss.item():.4f}")
                if run.step % 50 == 0:
                    log.write(json.dumps(dict(step=run.step, stage=stage, loss=loss.item(), minutes=run.elapsed / 60,
                                              **extra)) + "\n")
                    log.flush()
                if run.step % schedule.checkpoint_every == 0:
                    save_checkpoint(out, run.state())
        except KeyboardInterrupt:
            save_checkpoint(out, run.state())
            print(f"toyworld: interrupted at step {run.step}; continue with --resume", file=sys.stderr)
            raise
    save_checkpoint(out, run.state())


def _vae_step(run: _ToyRun, schedule: _Schedule) -> tuple[torch.Tensor, dict]:
    """One stage-1 step: the autoencoder on the broad family; returns the loss and no extra logs."""
    vae = run.models["vae"]
    x = generic_batch(run.rng, schedule.batch)
    for group in run.opt_vae.param_groups:
        group["lr"] = cosine_lr(1e-3, run.step / max(schedule.vae_steps, 1))
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=run.gen)
    recon = vae.decode(z).sample
    kl = post.kl().mean() / x[0].numel()
    loss = F.mse_loss(recon, x) + 1e-4 * kl
    run.opt_vae.zero_grad()
    loss.backward()
    run.opt_vae.step()
    return loss, {}


def _unet_step(run: _ToyRun, schedule: _Schedule) -> tuple[torch.Tensor, dict]:
    """One stage-2 step: UNet + text encoder on the frozen VAE's latents; returns the loss and its two terms."""
    if run.scaling is None:
        _begin_unet_stage(run)
    run.models["vae"].requires_grad_(False)
    lr = cosine_lr(schedule.unet_lr, _unet_progress(run, schedule))
    for group in run.opt.param_groups:
        group["lr"] = lr
    x, captions, masks, generic = stage2_batch(run.rng, schedule.batch, schedule.generic_fraction,
                                               schedule.free_texture_fraction)
    loss, mse, attn = _unet_loss(run, x, captions, masks, generic)
    run.opt.zero_grad()
    loss.backward()
    run.opt.step()
    return loss, {"mse": mse.item(), "attn": float(attn.detach())}


def _unet_loss(run: _ToyRun, x: torch.Tensor, captions: list[str], masks: torch.Tensor, generic: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise MSE + ``ATTN_WEIGHT`` x attention localisation on a ``stage2_batch`` (10% of captions dropped);
    returns the loss, the MSE and the attention term."""
    import fused

    from ..model import encode_prompts

    vae, unet, sched = (run.models[k] for k in ("vae", "unet", "scheduler"))
    batch = len(captions)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * run.scaling
    drop = (torch.rand(batch, generator=run.gen) < 0.1) | generic
    captions = ["" if d else c for c, d in zip(captions, drop)]
    cond = encode_prompts(components_of(run.models), captions, size=world.SIZE)  # SDXL: + pooled text, time ids
    noise = torch.randn(latents.shape, generator=run.gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=run.gen)
    index, on_object = attention_targets(captions)
    request = fused.MapRequest(index)
    pred = unet(sched.add_noise(latents, noise, t), t, **cond.unet_kwargs(),
                cross_attention_kwargs={"map_request": request}).sample
    mse = F.mse_loss(pred, noise)
    attn = attention_loss(request, masks, on_object, (~drop) & (t < ATTN_MAX_T))
    return mse + ATTN_WEIGHT * attn, mse, attn


def _begin_unet_stage(run: _ToyRun) -> None:
    """Fix the latent scale (1 / std of the frozen VAE's latents of 256 scenes) and when stage 2 began."""
    with torch.no_grad():
        z = torch.cat([run.models["vae"].encode(scene_batch(run.rng, 64)[0]).latent_dist.mean for _ in range(4)])
    run.scaling = float(1.0 / z.std())
    run.unet_start = run.elapsed


def _unet_progress(run: _ToyRun, schedule: _Schedule) -> float:
    """How far stage 2 is, for its cosine learning rate (0 at its start, 1 at the budget's end)."""
    if schedule.max_steps is not None:  # a step budget: a schedule by steps, exactly reproducible on resume
        return (run.step - schedule.vae_steps) / max(schedule.max_steps - schedule.vae_steps, 1)
    # a time budget: by wall clock (not bit-reproducible across machines)
    return (run.elapsed - run.unet_start) / max(schedule.budget - run.unet_start, 1.0)


def _export_run(run: _ToyRun, out: Path) -> Path | None:
    """Export the trained models (with stage 3's autoencoder halves) as OUT/pipeline; None while still in stage 1."""
    if run.scaling is None:  # stopped inside the VAE stage: nothing to export yet
        print(f"toyworld: stopped at step {run.step}, still training the VAE; continue with --resume", file=sys.stderr)
        return None
    load_parts(run.models["vae"], out)  # stage 3 ran beside this one
    path = export(out, run.models, run.scaling)
    print(f"toyworld: {run.step} steps in {run.elapsed / 60:.1f} min -> {path}", file=sys.stderr)
    return path


# Stage 3: the autoencoder fine-tuned after stage 1 (``finetune_autoencoder``): one half with the other frozen, or
# both halves with the encoder anchored. Its weights, in OUT/<part>.safetensors, are used by every later export;
# its optimizer, step and generators in OUT/<part>-checkpoint, so a stopped run resumes exactly.
PART_PREFIXES = {"decoder": ("decoder.", "post_quant_conv."), "encoder": ("encoder.", "quant_conv.")}
PART_PREFIXES["autoencoder"] = PART_PREFIXES["encoder"] + PART_PREFIXES["decoder"]
PART_FILES = {part: f"{part}.safetensors" for part in PART_PREFIXES}
DECODER_FILE, ENCODER_FILE = PART_FILES["decoder"], PART_FILES["encoder"]


def load_parts(vae, out: Path, parts: tuple[str, ...] = tuple(PART_FILES)) -> None:
    """Load OUT's fine-tuned autoencoder weights (stage 3) of ``parts`` into ``vae``, where there are any."""
    from safetensors.torch import load_file

    for part in parts:
        path = out / PART_FILES[part]
        if path.is_file():
            unexpected = vae.load_state_dict(load_file(path), strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"{path} holds weights this autoencoder does not have, e.g. {unexpected[0]}")


PART_LR = {"decoder": 3e-4, "encoder": 5e-4, "autoencoder": 5e-4}  # peak, cosine decay
# ``autoencoder``: the share of each batch's broad-family images replaced by ``world.fine_image``, how many
# toy-world scenes each batch holds, and the weight of the MSE that holds the encoder's latents of those
# scenes where they were (what the UNet was trained on) while the rest of the batch moves it.
FINE_SHARE = 0.75
ANCHOR_SCENES = 8
ANCHOR_WEIGHT = 1.0


def _start_vae(out: Path, pipeline: Path | None):
    """Stage 3's starting autoencoder: the pipeline folder's or OUT's checkpoint's."""
    vae = make_models()["vae"]
    if pipeline is not None:
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(pipeline, subfolder="vae").state_dict())
    else:
        vae.load_state_dict(load_checkpoint(out)["vae"])
    return vae


def _anchor_scenes(rng: np.random.Generator, n: int) -> torch.Tensor:
    """n toy-world renders in every texture, a fifth of them held-out pairs (what the methods encode)."""
    names = list(world.ALL_TEXTURES)
    return to_tensor(np.stack([world.render(world.random_scene(rng, held_out=rng.random() < 0.2,
                                                               texture=names[rng.integers(len(names))]))
                               for _ in range(n)]))


def _stage3_loss(vae, part: str, rng: np.random.Generator, gen: torch.Generator, batch: int, anchor) -> torch.Tensor:
    """One stage-3 batch's loss (``finetune_autoencoder`` says which objective each part has); ``anchor`` is the
    starting autoencoder (``autoencoder`` only), whose latents of the batch's toy-world scenes are held."""
    if part == "decoder":
        x = generic_batch(rng, batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x)
    scenes = torch.zeros(0, 3, world.SIZE, world.SIZE)
    if part == "autoencoder":
        n_scenes = min(ANCHOR_SCENES, batch // 4)
        n_fine = round(FINE_SHARE * (batch - n_scenes))
        scenes = _anchor_scenes(rng, n_scenes)
        images = [world.generic_image(rng) for _ in range(batch - n_scenes - n_fine)]
        images += [world.fine_image(rng) for _ in range(n_fine)]
        x = torch.cat([to_tensor(np.stack(images)), scenes])
    else:
        x = generic_batch(rng, batch)
    post = vae.encode(x).latent_dist
    recon = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
    loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * post.kl().mean() / x[0].numel()
    if len(scenes):
        with torch.no_grad():
            held = anchor.encode(scenes).latent_dist.mean
        loss = loss + ANCHOR_WEIGHT * F.mse_loss(post.mean[-len(scenes):], held)
    return loss


def finetune_autoencoder(out: Path, steps: int, part: str = "decoder", batch: int = 32, seed: int = 1,
                         lr: float | None = None, pipeline: Path | None = None) -> Path:
    """Stage 3, any time after stage 1: fine-tune the VAE's ``part`` for ``steps`` steps in all.

    ``decoder`` (encoder frozen): the latents the UNet learns from come from
    the frozen encoder, so this can run beside stage 2 (or after it) without
    invalidating it, as SD's released decoder fine-tunes did; L1 + MSE on the
    posterior mean's decoding, on the broad family. ``encoder`` (decoder
    frozen): the frozen decoder fixes what every latent means (so the UNet's
    samples decode as before); the encoder learns to invert it more closely,
    with stage 1's objective (a posterior sample decoded, the same small KL
    term, so the posterior's spread stays what the methods' reference latents
    were drawn with) plus L1. ``autoencoder`` (both halves): stage 1's
    objective on batches whose broad-family images are ``FINE_SHARE``
    ``world.fine_image`` (1-3-px bands on both axes and both diagonals, 1-4-px
    checkers, small dots, 1-2-px noise) and which hold ``ANCHOR_SCENES`` toy-world scenes, whose
    latents an MSE (``ANCHOR_WEIGHT``) holds at the starting encoder's: the
    decoder learns fine detail the 2x2 latent cells must carry, and the
    latents the UNet was trained on stay where they were.

    Weights go to ``OUT/<part>.safetensors``, the optimizer, step and
    generators to ``OUT/<part>-checkpoint``, atomically every 50 steps and on
    Ctrl-C; a second call with the same OUT continues from there (``steps``
    is the total). With ``pipeline`` (an exported pipeline folder, e.g. the
    shipped model) the VAE starts from that folder's instead of OUT's
    checkpoint, and OUT/pipeline is written at the end: a copy of it with the
    fine-tuned weights.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if part not in PART_PREFIXES:
        raise ValueError(f"part must be one of {sorted(PART_PREFIXES)}, got {part!r}")
    lr = PART_LR[part] if lr is None else lr
    vae = _start_vae(out, pipeline)
    out.mkdir(parents=True, exist_ok=True)
    load_parts(vae, out, tuple(p for p in PART_FILES if p != part))  # the other halves' fine-tunes, if any
    anchor = copy.deepcopy(vae).requires_grad_(False) if part == "autoencoder" else None  # the latents to hold
    load_parts(vae, out, (part,))  # this part's weights, for a resume
    trained = [p for n, p in vae.named_parameters() if n.startswith(PART_PREFIXES[part])]
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=lr)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    state_dir = out / f"{part}-checkpoint"
    start = 0
    if (state_dir / "state.pt").is_file():
        st = load_checkpoint(out, state_dir.name)
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        rng.bit_generator.state = json.loads((state_dir / "rng.json").read_text())
        start = st["step"]

    def save(step: int) -> None:
        weights = {n: p.detach().contiguous() for n, p in vae.named_parameters() if p.requires_grad}
        atomic_write(out / PART_FILES[part], lambda p: save_file(weights, str(p)))
        save_checkpoint(out, dict(step=step, optimizer=opt.state_dict(), generator=gen.get_state(),
                                  rng_state=rng.bit_generator.state), state_dir.name)

    step = start
    try:
        for step in tqdm(range(start, steps), desc=part, file=sys.stderr, initial=start, total=steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step / max(steps, 1))
            loss = _stage3_loss(vae, part, rng, gen, batch, anchor)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0:
                save(step + 1)
        step = max(steps, start)
    except KeyboardInterrupt:
        save(step)
        raise
    save(step)
    if pipeline is not None:
        return export_with_parts(pipeline, out, out / "pipeline")
    return out / PART_FILES[part]


def export_with_parts(pipeline: Path, out: Path, to: Path) -> Path:
    """A copy of the pipeline folder ``pipeline`` at ``to`` with OUT's fine-tuned autoencoder halves (stage 3)."""
    import shutil

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    load_parts(vae, out)
    tmp = to.with_name(to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pipeline, tmp)
    vae.save_pretrained(tmp / "vae")
    shutil.rmtree(to, ignore_errors=True)
    tmp.rename(to)
    print(f"toyworld: {pipeline} with the fine-tuned autoencoder parts of {out} -> {to}", file=sys.stderr)
    return to


def load_models(out: Path, st: dict) -> dict:
    """The models of a checkpoint, with the fine-tuned decoder when there is one."""
    models = make_models(arch=st.get("arch", "sd"))
    for name in trained_parts(models):
        models[name].load_state_dict(st[name])
    load_parts(models["vae"], out)
    return models


def export_checkpoint(out: Path, to: Path | None = None) -> Path:
    """Export the latest checkpoint (e.g. of a run still going) as a pipeline folder."""
    st = load_checkpoint(out)
    if st["scaling"] is None:
        raise SystemExit("toyworld: the checkpoint is still in the VAE stage")
    path = export(to or out, load_models(out, st), st["scaling"])
    print(f"toyworld: exported step {st['step']} ({st['elapsed'] / 60:.1f} min) -> {path}", file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vico.toyworld.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=140.0, help="wall-clock budget, resumed runs included")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (tests)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generic-fraction", type=float, default=GENERIC_FRACTION,
                   help=f"share of each UNet batch from the broad pattern family, uncaptioned (default {GENERIC_FRACTION})")
    p.add_argument("--free-texture-fraction", type=float, default=FREE_TEXTURE_FRACTION,
                   help="share of each UNet batch whose object has a broad-family pattern and a caption without "
                        f"a texture word (default {FREE_TEXTURE_FRACTION})")
    p.add_argument("--unet-lr", type=float, default=5e-4, help="peak UNet/text-encoder lr, cosine decay (default 5e-4)")
    p.add_argument("--init-from", type=Path, metavar="PIPELINE",
                   help="warm start stage 2 from a pipeline folder's weights (e.g. vico/toyworld/model) with a fresh "
                        "optimizer, instead of training from scratch")
    p.add_argument("--finetune-decoder", type=int, metavar="STEPS",
                   help="stage 3: fine-tune the VAE decoder of OUT's checkpoint (or, with --init-from, of that "
                        "pipeline folder, then written as OUT/pipeline) for STEPS steps, encoder frozen (beside or "
                        "after stage 2; later exports use it) and exit")
    p.add_argument("--finetune-encoder", type=int, metavar="STEPS",
                   help="stage 3: the same for the VAE encoder, decoder frozen (so samples decode as before; "
                        "encoded images move slightly: run it after stage 2); with --finetune-decoder too, the "
                        "encoder goes first")
    p.add_argument("--finetune-autoencoder", type=int, metavar="STEPS",
                   help="stage 3: both halves, on batches three quarters fine pixel-aligned patterns (1-3-px bands "
                        "on both axes and diagonals, 1-4-px checkers, small dots, 1-2-px noise) with the encoder's latents of toy-world "
                        "scenes held where they were (so the UNet stays valid); resumable: run it again to continue")
    p.add_argument("--arch", choices=ARCHS, default="sd",
                   help="sd: the shipped StableDiffusionPipeline's shape; sdxl: a StableDiffusionXLPipeline (two "
                        "text encoders, added conditions, depth-2 transformers) (default sd)")
    p.add_argument("--vae-from", type=Path, metavar="PIPELINE",
                   help="use this pipeline's autoencoder and latent scale as they are and skip stage 1 (e.g. "
                        "--arch sdxl --vae-from vico/toyworld/model)")
    p.add_argument("--export-only", type=Path, metavar="DIR",
                   help="write the latest checkpoint's pipeline under DIR/pipeline and exit (no training)")
    o = p.parse_args(argv)
    if o.finetune_encoder or o.finetune_decoder or o.finetune_autoencoder:
        from ..training import save_on_signals

        save_on_signals()
        for part, steps in (("encoder", o.finetune_encoder), ("decoder", o.finetune_decoder),
                            ("autoencoder", o.finetune_autoencoder)):
            if steps:
                finetune_autoencoder(o.out, steps, part, batch=o.batch, pipeline=o.init_from)
        return 0
    if o.export_only:
        export_checkpoint(o.out, o.export_only)
        return 0
    from ..training import save_on_signals

    save_on_signals()
    if not 0 <= o.generic_fraction < 1:
        p.error(f"--generic-fraction must be in [0, 1), got {o.generic_fraction}")
    if not 0 <= o.free_texture_fraction <= 1 - o.generic_fraction:
        p.error(f"--free-texture-fraction must be in [0, 1 - --generic-fraction], got {o.free_texture_fraction}")
    train(o.out, o.minutes, o.vae_steps, o.batch, o.checkpoint_every, o.resume, o.seed, o.max_steps, o.init_from,
          o.generic_fraction, o.unet_lr, o.free_texture_fraction, o.arch, o.vae_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
