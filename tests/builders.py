"""Test builders: tiny, randomly initialised SD / SD3 / FLUX / CLIP / DINO folders built from configs.

No weights can be downloaded for tests, so they (and ``benchmarks/`` at their
tiny size) use these: a 2-level UNet with cross-attention, a 2-level VAE
(32 px images -> 16x16x4 latents), a 2-layer CLIP text encoder, a word-level
tokenizer that ``from_pretrained`` loads, and SD's DDIM scheduler.
``save_tiny_pipeline`` writes an ordinary diffusers folder that
``StableDiffusionPipeline.from_pretrained`` loads like any SD checkpoint. Its
images are noise: it exercises the real code paths, it does not draw. Not part
of the installed package (it was ``vico.tiny`` before).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from vico import word_tokenizer

IMAGE_SIZE = 32
WORDS = (
    "a photo of the an in on with and at by painting style picture rendering cropped close-up bright dark "
    "cat dog teapot toy backpack bowl vase clock shoe sculpture red blue green yellow black white "
    "beach snow forest city street table grass water desert mountain kitchen"
).split()


def make_tokenizer(words=WORDS):
    """The word-level tokenizer over this module's vocabulary."""
    return word_tokenizer.make_tokenizer(words)


def make_tiny_components(seed: int = 0) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler, randomly initialised."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    ))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=IMAGE_SIZE,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder; returns the path."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        **make_tiny_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path)
    return path


def write_toy_images(folder: str | Path, n: int = 4, seed: int = 0) -> list[Path]:
    """A few synthetic "object photos" (a coloured disc on a plain background) as PNGs."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    paths = []
    for i in range(n):
        background = rng.integers(0, 256, 3)
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
        img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        img[:] = background
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (220, 40, 40)
        paths.append(folder / f"object_{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel + tokenizer + image processor folder (for metric tests)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    path = Path(path)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(path)
    return path


def save_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """A tiny random ViTModel + image processor folder standing in for DINO ViT-S/16."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    path = Path(path)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=IMAGE_SIZE, patch_size=8), add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def tiny_clip_text_encoder(tok, num_hidden_layers: int = 2, with_projection: bool = True, hidden_size: int = 8,
                           projection_dim: int = 8):
    """A small CLIP text encoder over ``tok`` (8 wide by default): with projection for SD3's encoders 1 and 2
    and SDXL's encoder 2, without for FLUX's and SDXL's encoder 1."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=projection_dim, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


SDXL_TEXT_DIMS = (8, 16)  # hidden sizes of the tiny SDXL's text encoders (real SDXL: 768 and 1280)
SDXL_TEXT_LAYERS = 5  # layers of each (real SDXL: 12 and 32): CatVersion's prefixes skip the last
SDXL_POOLED_DIM = 12  # text_encoder_2's projection (real SDXL: 1280)


def make_tiny_sdxl_components(seed: int = 0) -> dict:
    """The parts of a tiny SDXL-shaped pipeline: a UNet with text_time added conditions and a depth-2 decoder
    transformer (``transformer_layers_per_block``), two CLIP text encoders of different widths (the second
    with projection), the tiny VAE and SDXL's Euler scheduler configuration."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tok, tok_2 = make_tokenizer(), make_tokenizer()
    d1, d2 = SDXL_TEXT_DIMS
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=d1 + d2, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + SDXL_POOLED_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=IMAGE_SIZE, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tok, tokenizer_2=tok_2,
                text_encoder=tiny_clip_text_encoder(tok, SDXL_TEXT_LAYERS, with_projection=False, hidden_size=d1),
                text_encoder_2=tiny_clip_text_encoder(tok_2, SDXL_TEXT_LAYERS, hidden_size=d2,
                                                      projection_dim=SDXL_POOLED_DIM))


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    """Write the tiny SDXL pipeline with ``StableDiffusionXLPipeline.save_pretrained``; returns the path."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**make_tiny_sdxl_components(seed), add_watermarker=False,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def save_tiny_sd3_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A tiny random SD3-shaped pipeline (MMDiT, two CLIP text encoders, no T5) as a diffusers folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = make_tokenizer()

    def clip():
        return tiny_clip_text_encoder(tok)

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=16, pooled_projection_dim=16, out_channels=4),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          norm_num_groups=8, sample_size=IMAGE_SIZE, shift_factor=0.0),
        text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=make_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    # Record the absent T5 so `from_pretrained(path)` passes None for it.
    index = json.loads((path / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_tiny_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A tiny random FLUX-shaped pipeline (double + single stream blocks, CLIP + T5) as a diffusers folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = make_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          norm_num_groups=8, sample_size=IMAGE_SIZE, shift_factor=0.0),
        text_encoder=tiny_clip_text_encoder(tok, num_hidden_layers=1, with_projection=False),
        tokenizer=tok,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2)),
        tokenizer_2=make_tokenizer(),
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)),
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def t5_like_tokenizer():
    """A word-level tokenizer like T5's: another vocabulary order than CLIP's, no BOS, '</s>' appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + list(reversed(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=512)


def tiny_unet(cross_dim: int = 32, seed: int = 0):
    """A two-level SD-style UNet (one cross-attention block down and up), eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def vico(*argv) -> int:
    """``vico ARGV...`` in this process (arguments as strings); returns the exit code."""
    from vico import cli

    return cli.main([str(a) for a in argv])


def vico_train(model, images, out, *extra) -> int:
    """``vico train`` with the init word "cat", quietly; ``extra`` adds or overrides options."""
    return vico("train", "--model", model, "--images", images, "--out", out, "--init-word", "cat", "--quiet", *extra)


def train_interrupted_then_resumed(monkeypatch, method_cls, make_config, out: Path, interrupt_at: int) -> list[str]:
    """Train ``make_config(out)`` (a ``TrainConfig``; ``make_config(out, resume=True)`` resumes it) with Ctrl-C
    raised inside the ``interrupt_at``-th call of ``method_cls.training_loss``, then resume it to the end.
    Returns the checkpoint names the interrupted run left (what the resume continued from)."""
    import pytest

    from vico.training import train

    real_loss, calls = method_cls.training_loss, {"n": 0}

    def interrupting(self, batch):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return real_loss(self, batch)

    monkeypatch.setattr(method_cls, "training_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(out))
    monkeypatch.setattr(method_cls, "training_loss", real_loss)
    left = sorted(p.name for p in (Path(out) / "checkpoints").iterdir())
    train(make_config(out, resume=True))
    return left


def error_line(capsys) -> str:
    """The one ``vico: error: ...`` line a failed command wrote to stderr (asserted to be exactly one)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("vico: error")]
    assert len(err) == 1, err
    return err[0]


@contextlib.contextmanager
def signal_handlers_kept():
    """Within the block ``vico train`` may install its SIGINT/SIGTERM handlers; pytest's are put back after."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
