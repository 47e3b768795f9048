"""Train the toy world's Stable-Diffusion-compatible model from scratch, resumably.

    python -m vico.toyworld.train --out toy-sd --minutes 140        # in the background: nohup ... &
    python -m vico.toyworld.train --out toy-sd --minutes 140 --resume

Stage 1 trains a 2-level AutoencoderKL (32x32 RGB -> 16x16x4); stage 2 trains
a small UNet2DConditionModel (attention at 8x8 only) and a 2-layer CLIPTextModel
jointly on the frozen VAE's latents, with 10% empty captions for guidance.
Data is generated on the fly from one seeded numpy generator. Every
``--checkpoint-every`` steps (and on Ctrl-C) the weights, AdamW state, RNG
state, step and elapsed time are written atomically to ``OUT/checkpoint``;
``--resume`` continues from there. The result is a diffusers folder at
``OUT/pipeline`` that ``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world


def make_models(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..tiny import make_tokenizer

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(world.vocabulary())
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=16, sample_size=world.SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(tokenizer=tokenizer, vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler)


def batch_images(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [world.random_scene(rng) for _ in range(n)]
    imgs = np.stack([world.render(s) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [s.caption() for s in scenes]


def save_checkpoint(out: Path, state: dict) -> None:
    final, tmp = out / "checkpoint", out / f".checkpoint-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def export(out: Path, models: dict, scaling: float) -> Path:
    from diffusers import StableDiffusionPipeline

    models["vae"].register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(**models, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    return out / "pipeline"


def train(out: Path, minutes: float, vae_steps: int, batch: int, checkpoint_every: int, resume: bool,
          seed: int = 0, max_steps: int | None = None) -> Path | None:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    models = make_models(seed)
    vae, unet, text_encoder, tok, sched = (models[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), lr=5e-4, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    step, elapsed, scaling = 0, 0.0, None
    if resume and (out / "checkpoint" / "state.pt").is_file():
        st = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
        for name in ("vae", "unet", "text_encoder"):
            models[name].load_state_dict(st[name])
        opt_vae.load_state_dict(st["opt_vae"])
        opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        gen.set_state(st["gen"])
        step, elapsed, scaling = st["step"], st["elapsed"], st["scaling"]
        print(f"toyworld: resumed at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)

    def state():
        return dict(vae=vae.state_dict(), unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                    opt_vae=opt_vae.state_dict(), opt=opt.state_dict(), rng=rng.bit_generator.state,
                    gen=gen.get_state(), step=step, elapsed=elapsed, scaling=scaling)

    log = open(out / "train_log.jsonl", "a")
    budget = minutes * 60
    bar = tqdm(desc="toyworld", initial=step, file=sys.stderr)
    start = time.perf_counter() - elapsed
    try:
        while elapsed < budget and (max_steps is None or step < max_steps):
            x, captions = batch_images(rng, batch)
            if step < vae_steps:  # stage 1: the autoencoder
                post = vae.encode(x).latent_dist
                z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
                recon = vae.decode(z).sample
                kl = post.kl().mean() / x[0].numel()
                loss = F.mse_loss(recon, x) + 1e-4 * kl
                opt_vae.zero_grad()
                loss.backward()
                opt_vae.step()
                stage = "vae"
            else:  # stage 2: UNet + text encoder on the frozen VAE's latents
                if scaling is None:
                    with torch.no_grad():
                        z = torch.cat([vae.encode(batch_images(rng, 64)[0]).latent_dist.mean for _ in range(4)])
                    scaling = float(1.0 / z.std())
                    vae.requires_grad_(False)
                with torch.no_grad():
                    latents = vae.encode(x).latent_dist.mean * scaling
                drop = torch.rand(batch, generator=gen) < 0.1
                captions = ["" if d else c for c, d in zip(captions, drop)]
                ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                noise = torch.randn(latents.shape, generator=gen)
                t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
                pred = unet(sched.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
                loss = F.mse_loss(pred, noise)
                opt.zero_grad()
                loss.backward()
                opt.step()
                stage = "unet"
            step += 1
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{loss.item():.4f}")
            if step % 50 == 0:
                log.write(json.dumps(dict(step=step, stage=stage, loss=loss.item(), minutes=elapsed / 60)) + "\n")
                log.flush()
            if step % checkpoint_every == 0:
                save_checkpoint(out, state())
    except KeyboardInterrupt:
        save_checkpoint(out, state())
        print(f"toyworld: interrupted at step {step}; continue with --resume", file=sys.stderr)
        raise
    save_checkpoint(out, state())
    if scaling is None:  # stopped inside the VAE stage: nothing to export yet
        print(f"toyworld: stopped at step {step}, still training the VAE; continue with --resume", file=sys.stderr)
        return None
    path = export(out, models, scaling)
    print(f"toyworld: {step} steps in {elapsed / 60:.1f} min -> {path}", file=sys.stderr)
    return path


def export_checkpoint(out: Path, to: Path | None = None) -> Path:
    """Export the latest checkpoint (e.g. of a run still going) as a pipeline folder."""
    st = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    if st["scaling"] is None:
        raise SystemExit("toyworld: the checkpoint is still in the VAE stage")
    models = make_models()
    for name in ("vae", "unet", "text_encoder"):
        models[name].load_state_dict(st[name])
    path = export(to or out, models, st["scaling"])
    print(f"toyworld: exported step {st['step']} ({st['elapsed'] / 60:.1f} min) -> {path}", file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vico.toyworld.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=140.0, help="wall-clock budget, resumed runs included")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (tests)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-only", type=Path, metavar="DIR",
                   help="write the latest checkpoint's pipeline under DIR/pipeline and exit (no training)")
    o = p.parse_args(argv)
    if o.export_only:
        export_checkpoint(o.out, o.export_only)
        return 0
    from ..training import save_on_signals

    save_on_signals()
    train(o.out, o.minutes, o.vae_steps, o.batch, o.checkpoint_every, o.resume, o.seed, o.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
