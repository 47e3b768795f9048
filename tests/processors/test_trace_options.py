"""fused.maps.trace, issue 19: non-square maps, guidance detection, the layer filter,
repeated words, SD3's text segments / FLUX's T5 positions, per-layer per-timestep records.

Every trace is compared with maps from materialised attention probabilities
(diffusers' own processors, subclassed to record them) on tiny pipelines built here.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0  # noqa: E402

from fused import maps as fused_maps  # noqa: E402
from tests import builders as tiny  # noqa: E402
from vico import cli  # noqa: E402


TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- references


def reference(calls, cols, rows, grid):
    """DAAM aggregate from materialised probabilities.

    calls: per layer call, head-mean probabilities of image rows to text columns [B, N, L];
    grid: the generation's (H, W) token grid. -> [b, h, w], each image normalised to [0, 1].
    """
    H, W = grid
    maps = []
    for p in calls:
        m = p[rows][..., cols].sum(-1).double()  # [b, N]
        f = math.isqrt(H * W // m.shape[-1])
        assert (H // f) * (W // f) == m.shape[-1]
        maps.append(m.reshape(m.shape[0], 1, H // f, W // f))
    size = tuple(max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1]))
    total = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)[:, 0]
    lo, hi = total.amin((-2, -1), keepdim=True), total.amax((-2, -1), keepdim=True)
    return (total - lo) / (hi - lo)


class UNetRecorder(AttnProcessor):
    def __init__(self, calls):
        self.calls = calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, key, None)
            B = hidden_states.shape[0]
            self.calls.append(probs.view(B, attn.heads, *probs.shape[1:]).mean(1))  # [B, N, L]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class SD3Recorder(JointAttnProcessor2_0):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *a, **k):
        B, n = hidden_states.shape[:2]
        split = lambda y: y.view(B, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q = torch.cat([split(attn.to_q(hidden_states)), split(attn.add_q_proj(encoder_hidden_states))], 2)
        key = torch.cat([split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))], 2)
        p = torch.softmax(q @ key.transpose(-1, -2) * attn.scale, -1).mean(1)  # [B, S, S]
        self.calls.append(p[:, :n, n:])
        return super().__call__(attn, hidden_states, encoder_hidden_states, *a, **k)


def flux_recorder(calls, text_len):
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    class FluxRecorder(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            q, k, _, eq, ek, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
            if encoder_hidden_states is not None:
                q = torch.cat([attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim))), q], 1)
                k = torch.cat([attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim))), k], 1)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).transpose(1, 2)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim ** -0.5, -1).mean(1)  # [B, S, S]
            calls.append(p[:, text_len:, :text_len])
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return FluxRecorder()


def materialised(pipe, prompt, **kw):
    """Run ``pipe`` with recording processors; the per-call probabilities [B, N, L]."""
    calls = []
    if getattr(pipe, "unet", None) is not None:
        pipe.unet.set_attn_processor(UNetRecorder(calls))
        restore = (pipe.unet, AttnProcessor2_0())
    elif "Flux" in type(pipe.transformer).__name__:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        pipe.transformer.set_attn_processor(flux_recorder(calls, kw["max_sequence_length"]))
        restore = (pipe.transformer, FluxAttnProcessor())
    else:
        pipe.transformer.set_attn_processor(SD3Recorder(calls))
        restore = (pipe.transformer, JointAttnProcessor2_0())
    try:
        pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    finally:
        restore[0].set_attn_processor(restore[1])
    return calls


def traced(pipe, prompt, words, run=None, **trace_kw):
    run = run or {}
    with fused_maps.trace(pipe, prompt, words, **trace_kw) as tr:
        pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **run)
    return tr


# ---------------------------------------------------------------- pipelines


def _ready(pipe):
    """Built in memory, the modules are in training mode (T5's dropout): evaluation mode, like from_pretrained."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, shift_factor=0.0)


@pytest.fixture(scope="module")
def sd(model_dir):  # noqa: F811
    pipe = StableDiffusionPipeline.from_pretrained(model_dir).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_t5():
    """SD3 with both CLIPs and a T5 encoder: joint text = [CLIP 77 | T5 max_sequence_length]."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, t5_tok = tiny.make_tokenizer(), tiny.t5_like_tokenizer()

    def clip():
        return tiny.tiny_clip_text_encoder(tok, num_hidden_layers=1)

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=16, pooled_projection_dim=16, out_channels=4),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tiny.make_tokenizer(),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2)),
        tokenizer_3=t5_tok)
    return _ready(pipe)


@pytest.fixture(scope="module")
def flux_t5():
    """FLUX whose T5 tokenizer (tokenizer_2) tokenises differently from its CLIP tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, t5_tok = tiny.make_tokenizer(), tiny.t5_like_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=tiny.tiny_clip_text_encoder(tok, num_hidden_layers=1, with_projection=False),
        tokenizer=tok,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2)),
        tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)))
    return _ready(pipe)


# ---------------------------------------------------------------- 1. non-square generations


@pytest.mark.parametrize("height,width", [(32, 48), (32, 128)])
def test_nonsquare_unet_maps_equal_materialised(sd, height, width):
    prompt, run = "a photo of a red cat on the beach", dict(num_inference_steps=2, height=height, width=width)
    tr = traced(sd, prompt, ["cat"], run)
    got = tr.heatmaps()["cat"]
    assert got.shape == (height // 2, width // 2) == tr.shape  # the tiny VAE halves: latent = largest map
    calls = materialised(sd, prompt, **run)
    want = reference(calls, tr.positions["cat"]["clip"], slice(1, 2), (height // 2, width // 2))  # CFG: cond row
    torch.testing.assert_close(got.double(), want[0], **TOL)


def test_nonsquare_sd3_maps_equal_materialised(sd3_t5):
    prompt, run = "a photo of a red cat", dict(num_inference_steps=2, height=32, width=48, max_sequence_length=8)
    tr = traced(sd3_t5, prompt, ["cat"], run)
    got = tr.heatmaps()["cat"]
    assert got.shape == (8, 12)  # 16x24 latent, 2x2 patches
    calls = materialised(sd3_t5, prompt, **run)
    cols = [p for seg in tr.positions["cat"].values() for p in seg]
    torch.testing.assert_close(got.double(), reference(calls, cols, slice(1, 2), (8, 12))[0], **TOL)


def test_nonsquare_flux_maps_from_t5_positions_equal_materialised(flux_t5):
    prompt, run = "a photo of a red cat", dict(num_inference_steps=2, height=32, width=48, max_sequence_length=8)
    tr = traced(flux_t5, prompt, ["cat", "red"], run)
    # FLUX's text stream is T5: positions come from tokenizer_2 (no BOS: cat at 5), not CLIP's (cat at 6)
    assert tr.positions == {"cat": {"t5": [5]}, "red": {"t5": [4]}}
    assert fused_maps.word_token_positions(flux_t5.tokenizer, prompt, ["cat"]) == {"cat": [6]}
    got = tr.heatmaps()
    assert got["cat"].shape == (8, 12)  # 16x24 latent packed 2x2
    calls = materialised(flux_t5, prompt, **run)
    assert len(calls) == 2 * len(tr.layers) == 4  # double- and single-stream block, 2 steps
    for word in ("cat", "red"):
        want = reference(calls, tr.positions[word]["t5"], slice(0, 1), (8, 12))[0]
        torch.testing.assert_close(got[word].double(), want, **TOL)


def test_layer_grid_follows_the_latent_aspect_ratio():
    assert fused_maps._layer_grid(16 * 24, (16, 24)) == (16, 24)
    assert fused_maps._layer_grid(8 * 12, (16, 24)) == (8, 12)
    assert fused_maps._layer_grid(8 * 32, (16, 64)) == (8, 32)  # not 16x16
    assert fused_maps._layer_grid(7 * 7, (13, 14)) == (7, 7)  # odd sizes: ceil at each downsampling
    assert fused_maps._layer_grid(64, None) == (8, 8)
    with pytest.raises(ValueError, match="fits no downsampling"):
        fused_maps._layer_grid(50, (16, 24))


# ---------------------------------------------------------------- 2. guidance detection, every image


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_every_image_is_traced_and_guidance_is_detected(sd, guidance):
    prompt = "a photo of a red cat on the beach"
    run = dict(num_inference_steps=2, guidance_scale=guidance, num_images_per_prompt=2)
    tr = traced(sd, prompt, ["cat"], run)
    calls = materialised(sd, prompt, **run)
    rows = slice(0, 2) if guidance == 1.0 else slice(2, 4)  # no CFG: both rows; CFG: [u0, u1, c0, c1]
    want = reference(calls, tr.positions["cat"]["clip"], rows, (16, 16))
    everything = tr.heatmaps(index=None)["cat"]
    assert everything.shape == (2, 16, 16)
    for i in range(2):
        torch.testing.assert_close(tr.heatmaps(index=i)["cat"].double(), want[i], **TOL)
        torch.testing.assert_close(everything[i].double(), want[i], **TOL)
    torch.testing.assert_close(tr.heatmaps()["cat"], tr.heatmaps(index=0)["cat"])  # default: the first image
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # two different images


def test_guided_override_and_odd_batch(sd):
    with fused_maps.trace(sd, "a photo of a cat", ["cat"], guided=True) as tr:
        with pytest.raises(ValueError, match="no \\[uncond; cond\\] halves"):
            sd("a photo of a cat", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert tr.calls == 0


def test_flux_true_cfg_traces_only_the_conditional_call(flux_t5):
    prompt, run = "a photo of a red cat", dict(num_inference_steps=1, height=32, width=32, max_sequence_length=8)
    plain = traced(flux_t5, prompt, ["cat"], run)
    cfg = traced(flux_t5, prompt, ["cat"], dict(run, true_cfg_scale=2.0, negative_prompt="a dog"))
    assert plain.calls == cfg.calls == 1  # the negative-prompt call of the same step is not traced
    torch.testing.assert_close(cfg.heatmaps()["cat"], plain.heatmaps()["cat"])


# ---------------------------------------------------------------- 3. layer filter


def test_layer_filter_matches_names_prefixes_and_patterns_not_substrings(flux_t5, sd):
    names = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    with fused_maps.trace(flux_t5, "a red cat", ["cat"]) as tr:
        assert tr.layers == names
    for sel in (["transformer_blocks.0"], ["transformer_blocks.0.attn"], ["transformer_blocks.*"],
                ["transformer_blocks"]):
        with fused_maps.trace(flux_t5, "a red cat", ["cat"], layers=sel) as tr:
            assert tr.layers == ["transformer_blocks.0.attn"], sel
    assert fused_maps.select_layers(names, ["single_transformer_blocks"]) == names[1:]
    assert fused_maps.select_layers(names, ["*.attn"]) == names
    with pytest.raises(ValueError, match="no attention layer matches \\['blocks.0'\\]"):
        fused_maps.select_layers(names, ["transformer_blocks.0", "blocks.0"])  # a substring is no selector
    with pytest.raises(ValueError, match="no attention layer matches"):
        with fused_maps.trace(flux_t5, "a red cat", ["cat"], layers=["attn"]):
            pass
    unet = fused_maps.select_layers(fused_maps.cross_attention_layers(sd.unet), ["up_blocks"])
    assert unet and all(n.startswith("up_blocks.") for n in unet)

    # double-stream-only maps of a FLUX generation
    prompt, run = "a photo of a red cat", dict(num_inference_steps=1, height=32, width=32, max_sequence_length=8)
    tr = traced(flux_t5, prompt, ["cat"], run, layers=["transformer_blocks.0"], records=True)
    assert set(tr.steps[0][1]) == {"transformer_blocks.0.attn"}
    calls = materialised(flux_t5, prompt, **run)  # [double, single]
    want = reference(calls[:1], tr.positions["cat"]["t5"], slice(0, 1), (8, 8))[0]
    torch.testing.assert_close(tr.heatmaps()["cat"].double(), want, **TOL)


# ---------------------------------------------------------------- 4. repeated words


def test_repeated_word_maps_every_occurrence_by_default(sd):
    prompt = "a red cat and a blue cat"  # <bos> a red cat and a blue cat <eos>
    tok = sd.tokenizer
    assert fused_maps.word_token_positions(tok, prompt, ["cat", "red"]) == {"cat": [3, 7], "red": [2]}
    assert fused_maps.word_token_positions(tok, prompt, ["cat"], occurrence=0) == {"cat": [3]}
    assert fused_maps.word_token_positions(tok, prompt, ["cat"], occurrence=-1) == {"cat": [7]}
    with pytest.raises(ValueError, match="occurs 2 time\\(s\\).*occurrence=2"):
        fused_maps.word_token_positions(tok, prompt, ["cat"], occurrence=2)
    with fused_maps.trace(sd, prompt, ["cat"], occurrence=1) as tr:
        assert tr.positions == {"cat": {"clip": [7]}}

    run = dict(num_inference_steps=2)
    tr = traced(sd, prompt, ["cat"], run)
    calls = materialised(sd, prompt, **run)
    both = reference(calls, [3, 7], slice(1, 2), (16, 16))[0]
    torch.testing.assert_close(tr.heatmaps()["cat"].double(), both, **TOL)
    assert not torch.allclose(both, reference(calls, [3], slice(1, 2), (16, 16))[0], atol=1e-3)


# ---------------------------------------------------------------- 5. SD3 text segments


def test_sd3_maps_each_text_segment_and_their_sum(sd3_t5):
    prompt, run = "a photo of a red cat", dict(num_inference_steps=2, max_sequence_length=8)
    tr = traced(sd3_t5, prompt, ["cat", "red"], run)
    # CLIP: <bos> a photo of a red cat -> cat at 6; T5 (after CLIP's 77): a photo of a red cat </s> -> 77 + 5
    assert tr.positions == {"cat": {"clip": [6], "t5": [82]}, "red": {"clip": [5], "t5": [81]}}
    assert tr.segments == ["clip", "t5"]
    calls = materialised(sd3_t5, prompt, **run)
    for word in ("cat", "red"):
        clip, t5 = tr.positions[word]["clip"], tr.positions[word]["t5"]
        for segment, cols in (("clip", clip), ("t5", t5), (None, clip + t5)):
            want = reference(calls, cols, slice(1, 2), (8, 8))[0]
            torch.testing.assert_close(tr.heatmaps(segment=segment)[word].double(), want, **TOL)
    assert not torch.allclose(tr.heatmaps(segment="clip")["cat"], tr.heatmaps(segment="t5")["cat"], atol=1e-3)


def test_sd3_t5_positions_past_max_sequence_length_are_dropped(sd3_t5):
    with fused_maps.trace(sd3_t5, "a photo of a red cat", ["cat", "photo"]) as tr:
        slots = tr._slots()
        index = tr.request(2, slice(1, 2), text_len=77 + 4).token_index[1].tolist()  # T5 truncated to 4 tokens
    kept = {(w, s): i for (w, s, _), i in zip(slots, index)}
    # T5 keeps "a photo of </s>": photo (1) survives, cat (5) is cut off
    assert kept == {("cat", "clip"): 6, ("cat", "t5"): -1, ("photo", "clip"): 2, ("photo", "t5"): 78}
    with fused_maps.trace(sd3_t5, "a photo of a red cat", ["cat"]) as tr:
        assert tr.request(1, slice(0, 1), text_len=77 + 5).token_index[0].tolist() == [6, -1]  # slot 4 is </s>
        assert tr.request(1, slice(0, 1), text_len=77 + 7).token_index[0].tolist() == [6, 82]


# ---------------------------------------------------------------- records


def test_records_round_trip(sd, tmp_path):
    prompt, run = "a photo of a red cat on the beach", dict(num_inference_steps=2)
    tr = traced(sd, prompt, ["cat", "beach"], run, records=True)
    path = tmp_path / "records.safetensors"
    tr.save_records(path)
    maps, meta = fused_maps.load_records(path)
    timesteps = [float(t) for t in sd.scheduler.timesteps]
    assert meta["timesteps"] == timesteps and meta["layers"] == tr.layers and len(tr.layers) == 4
    assert meta["words"] == ["cat", "beach"] and meta["images"] == 1 and meta["shape"] == [16, 16]
    keys = {f"{layer}/{k}/{w}" for layer in tr.layers for k in meta["timestep_keys"] for w in ("cat", "beach")}
    assert set(maps) == keys and meta["timestep_keys"] == [f"{t:.10g}" for t in timesteps]
    for t, step in tr.steps:
        for layer, entry in step.items():
            for word, m in entry.items():
                torch.testing.assert_close(maps[f"{layer}/{t:.10g}/{word}"], m)
    # the records re-aggregate to the heat maps
    for word in ("cat", "beach"):
        total = sum(F.interpolate(m[None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
                    for key, m in maps.items() if key.endswith(f"/{word}"))
        want = (total - total.min()) / (total.max() - total.min())
        torch.testing.assert_close(tr.heatmaps()[word], want, **TOL)
    with pytest.raises(ValueError, match="records=True"):
        traced(sd, prompt, ["cat"], dict(num_inference_steps=1)).save_records(tmp_path / "no.safetensors")


def test_vico_maps_writes_records_and_nonsquare_masks(model_dir, tmp_path):  # noqa: F811
    from PIL import Image

    out = tmp_path / "maps"
    assert cli.main(["maps", "--model", str(model_dir), "--prompt", "a red cat and a blue cat", "--words", "cat",
                     "--out", str(out), "--steps", "2", "--height", "32", "--width", "48", "--records",
                     "--layers", "up_blocks"]) == 0
    assert Image.open(out / "mask_cat.png").size == (48, 32)
    maps, meta = fused_maps.load_records(out / "records.safetensors")
    assert meta["layers"] and all(n.startswith("up_blocks.") for n in meta["layers"])
    assert len(meta["timesteps"]) == 2 and meta["positions"] == {"cat": {"clip": [3, 7]}}
    assert {m.shape[-2:] for m in maps.values()} <= {(16, 24), (8, 12)}
    with open(out / "records.safetensors", "rb") as f:  # plain safetensors: JSON header with the metadata
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "fused.maps" in header["__metadata__"]
