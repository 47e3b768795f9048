"""fused.maps.trace against a peer tool: attention-map-diffusers 1.0.0 (PyPI) as a test oracle (issue 19).

The peer (``attention_map_diffusers.AttentionCapture``) swaps every attention
processor of the denoiser for a capturing copy of diffusers' own, keeps Q/K
(``mode="fast"``) and recomputes softmax probabilities afterwards
(``compute()``): per layer and per denoiser call, ``[batch, 1, queries, keys]``
(``heads="mean"``), every text key, every row of the batch. Both tools replace
the same processors, so they cannot run in one generation: each runs its own
generation of the same pipeline from the same seed (the trajectories agree to
float rounding: both compute the attention of diffusers' processors).

What is matched (the two tools' defaults differ; the peer is configured, the
tracer is read at its per-layer, per-timestep records, ``trace(..., records=True)``):

- timesteps: the peer keeps only the last denoising step by default
  (``timesteps="last"``); here ``timesteps="all"``. Its ``timestep`` is the
  denoiser's argument, the tracer's ``pipe._current_timestep`` (FLUX: the
  peer's is the tracer's / 1000); steps are paired in call order.
- rows: the peer keeps both halves of a classifier-free-guidance batch
  ``[uncond; cond]``; the tracer only the conditional half (its ``guided``
  detection). Its images ``0..k-1`` are compared with the peer's rows
  ``k..2k-1``; with ``guided=False`` the tracer keeps every row and all of
  them are compared (SD 1.x).
- tokens: the peer keeps every text key; a word's map here is the sum of the
  peer's columns at the word's positions, found in this file from the
  pipeline's tokenizers (SD: CLIP; SD3: the CLIP block, then the T5 block at the
  offset the peer's own ``text_components`` metadata gives; FLUX: T5,
  ``tokenizer_2``) and checked against ``tr.positions``.
- grid: the peer's record carries the layer's ``(height, width)`` token grid
  (``q_shape``); its map is reshaped to it (non-square generations here).
- heads: both average the heads (the peer's default ``heads="mean"``).
- aggregate: the peer stores no DAAM aggregate; its records are summed here
  the tracer's documented way (bilinear, ``align_corners=False``, to the
  largest layer's grid, summed over layers and steps, min-max normalised)
  and compared with ``tr.heatmaps()``.

Precision: the peer's softmax is always float32 (``compute_attention_probs``
casts Q/K with ``.float()``); the pipelines here run in float32, their native
dtype. Every record of every layer, step, image and word is concatenated and
Pearson's r (>= 0.99999) and the largest |difference| (``RAW_BOUND``; the
normalised aggregate: ``AGG_BOUND``) are asserted per pipeline; each test
prints its values (``pytest -s``).

What cannot be matched directly, and how it is handled:

- FLUX single-stream blocks (``single_transformer_blocks.*``): NOT compared.
  diffusers calls their attention without ``encoder_hidden_states`` (the text
  is already concatenated into ``hidden_states``), and the peer's
  ``CaptureFluxAttnProcessor2_0`` calls its capture only when
  ``encoder_hidden_states`` is given: it records nothing for these layers, in
  any relation (``image->image`` included; asserted below). The tracer records
  them (``MapRequest.text_len``); here it is restricted to the double-stream
  blocks (``layers=["transformer_blocks"]``). Its single-stream maps are checked
  against materialised probabilities in tests/processors/test_trace_options.py instead.
- SD3 without T5 (the tiny builder's pipeline): the joint text is CLIP's 77
  tokens followed by ``max_sequence_length`` zero vectors; the tracer maps the
  CLIP segment only, which is what is compared.
- Video pipelines: Wan only (a tiny T2V model), once the tracer supports
  video pipelines (``fused/processors/video.py``, added separately: until it
  is in the tree ``test_wan_matches_peer`` skips, saying so). The peer's
  relation there is ``video->text`` (not its default ``image->text``), its
  grid ``(frames, height, width)``. CogVideoX and HunyuanVideo, which the peer
  also supports, are not compared here.

Skipped, with the reason printed, where attention-map-diffusers is not
installed (CI installs it: ``pip install --no-deps attention-map-diffusers==1.0.0``;
its hooks need only torch and diffusers).
"""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
amd = pytest.importorskip(
    "attention_map_diffusers",
    reason="attention-map-diffusers (the peer oracle) is not installed: "
           "pip install --no-deps attention-map-diffusers==1.0.0")

from fused import maps as fused_maps  # noqa: E402
from tests import builders as tiny  # noqa: E402
from vico.model import load_pipeline  # noqa: E402

R_MIN = 0.99999
RAW_BOUND = 1e-6  # per-layer, per-step maps (measured <= 4e-8: float32 rounding)
AGG_BOUND = 2e-5  # the [0, 1]-normalised DAAM aggregate (measured <= 1.6e-6)


# ---------------------------------------------------------------- the two tools


def generate(pipe, prompt, run):
    pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **run)


def peer_capture(pipe, prompt, run, relations=("image->text",)):
    """The peer's records of one generation: every layer, every step (its default keeps only the last)."""
    with amd.AttentionCapture(pipe, relations=list(relations), timesteps="all") as cap:
        generate(pipe, prompt, run)
    assert not cap.coverage["unsupported"], cap.coverage
    return cap.compute().records


def traced(pipe, prompt, words, run, **kw):
    with fused_maps.trace(pipe, prompt, words, records=True, **kw) as tr:
        generate(pipe, prompt, run)
    return tr


def token_positions(tokenizer, prompt, word, offset=0):
    """Every position of ``word`` (one token here) in the tokenised prompt, specials included."""
    ids = tokenizer(prompt).input_ids
    (wid,) = tokenizer(word, add_special_tokens=False).input_ids
    return [offset + i for i, t in enumerate(ids) if t == wid]


def peer_word_maps(records, prefix, rows, positions, call=None):
    """{(step, layer): {key: [b, h, w]}} from the peer's ``image->text`` / ``video->text`` records (columns:
    text positions; video: ``[b, F, h, w]``), and the peer's timesteps in call order. ``call``: keep only
    that denoiser call of each step (the peer's ``denoiser_call_index``: guidance run as separate calls)."""
    out, steps = {}, {}
    for r in records:
        assert r.relation in ("image->text", "video->text"), r.relation
        if call is not None and r.metadata["denoiser_call_index"] != call:
            continue
        layer = r.layer_id.removeprefix(prefix)
        data = r.data[:, 0].float()  # head mean: [B, N, L]
        grid = (r.q_shape.height, r.q_shape.width)
        if r.q_shape.frames is not None:
            grid = (r.q_shape.frames, *grid)
        step = steps.setdefault(r.timestep, len(steps))
        entry = out.setdefault((step, layer), {})
        for key, cols in positions.items():
            m = data[rows][..., cols].sum(-1)
            entry[key] = m.reshape(m.shape[0], *grid)
    return out, list(steps)


def daam(per_call_layer, word, image):
    """The DAAM aggregate of maps {(step, layer): {word: [b, h, w]}}: the tracer's documented rule
    (video maps ``[b, F, h, w]``: every layer has the whole patch grid, summed as they are)."""
    maps = [e[word][image].double() for e in per_call_layer.values()]
    if maps[0].ndim == 3:
        assert len({m.shape for m in maps}) == 1
        total = sum(maps)
    else:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        total = sum(F.interpolate(m[None, None], size=tuple(size), mode="bilinear", align_corners=False)
                    for m in maps)[0, 0]
    return (total - total.min()) / (total.max() - total.min())


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def heat(tr, key, image):
    """The tracer's heat map of record key ``"word"`` or ``"word/segment"`` for one image."""
    word, _, segment = key.partition("/")
    return tr.heatmaps(index=image, segment=segment or None)[word]


def compare(tr, peer, keys, steps_scale=1.0):
    """Pair the tracer's records with the peer's; (r, max |diff|, records compared, aggregate r)."""
    peer_maps, peer_ts = peer
    assert len(tr.steps) == len(peer_ts), (len(tr.steps), peer_ts)
    for (t, _), pt in zip(tr.steps, peer_ts):
        assert math.isclose(t, pt * steps_scale, rel_tol=1e-5, abs_tol=1e-3), (t, pt)
    ours, theirs = [], []
    for i, (_, step) in enumerate(tr.steps):
        assert set(step) == {layer for (s, layer) in peer_maps if s == i}, (set(step), i)
        for layer, entry in step.items():
            for key in keys:
                a, b = entry[key], peer_maps[(i, layer)][key]
                assert a.shape == b.shape, (layer, key, a.shape, b.shape)
                ours.append(a.flatten())
                theirs.append(b.flatten())
    n = len(ours)
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    r, diff = pearson(ours, theirs), float((ours.double() - theirs.double()).abs().max())
    # the aggregate, rebuilt from the peer's records, against heatmaps()
    images = next(iter(peer_maps.values()))[keys[0]].shape[0]
    agg_r, agg_diff = 1.0, 0.0
    for key in keys:
        for image in range(images):
            want, got = daam(peer_maps, key, image), heat(tr, key, image)
            assert got.shape == want.shape, (key, got.shape, want.shape)
            agg_r = min(agg_r, pearson(got, want))
            agg_diff = max(agg_diff, float((got.double() - want).abs().max()))
    return r, diff, n, agg_r, agg_diff


def report(name, r, diff, n, agg_r, agg_diff, bound):
    print(f"\n[peer oracle] {name}: {n} layer-step-word records, r={r:.12f} (1-r={1 - r:.1e}), max|diff|={diff:.3e} "
          f"(bound {bound:.0e}); normalised aggregate: min r={agg_r:.12f}, max|diff|={agg_diff:.3e}")
    assert r >= R_MIN, (name, r)
    assert diff < bound, (name, diff)
    assert agg_r >= R_MIN, (name, agg_r)
    assert agg_diff < AGG_BOUND, (name, agg_diff)


# ---------------------------------------------------------------- pipelines (tiny, built here)


@pytest.fixture(scope="module")
def sd(model_dir):  # noqa: F811
    return load_pipeline(model_dir)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return tiny.save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return load_pipeline(tiny.save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux")))


# ---------------------------------------------------------------- the comparisons


PROMPT = "a photo of a red cat on the beach"


@pytest.mark.parametrize("guided", [None, False])
def test_sd_matches_peer(sd, guided):
    """SD 1.x UNet, every cross-attention layer (the peer also captures attn1: no image->text there),
    32x48 (non-square), 3 DDIM steps, CFG 7.5, two images per prompt (batch [u0, u1, c0, c1])."""
    words = ["cat", "red", "a"]  # "a" occurs twice: both positions, the tracer's default
    run = dict(num_inference_steps=3, height=32, width=48, num_images_per_prompt=2)
    positions = {w: token_positions(sd.tokenizer, PROMPT, w) for w in words}
    tr = traced(sd, PROMPT, words, run, guided=guided)
    assert {w: tr.positions[w]["clip"] for w in words} == positions and positions["a"] == [1, 4]
    rows = slice(2, 4) if guided is None else slice(0, 4)
    peer = peer_word_maps(peer_capture(sd, PROMPT, run), "unet.", rows, positions)
    report(f"SD 1.x (guided={guided})", *compare(tr, peer, words), bound=RAW_BOUND)


@pytest.mark.parametrize("with_t5", [False, True])
def test_sd3_matches_peer(sd3_dir, with_t5):
    """SD3 MMDiT (image tokens first, one softmax over image + text keys in both tools), 2 joint blocks,
    32x48, 2 flow-matching steps, CFG 7. With a T5 encoder each text segment is compared on its own
    (the tracer's ``word/clip``, ``word/t5`` records; the peer's columns at CLIP and at T5 + offset)."""
    from transformers import T5Config, T5EncoderModel

    pipe = load_pipeline(sd3_dir)  # the builder's folder has no T5: text_encoder_3 = tokenizer_3 = None
    if with_t5:
        torch.manual_seed(0)
        tok3 = tiny.t5_like_tokenizer()
        pipe.tokenizer_3, pipe.text_encoder_3 = tok3, T5EncoderModel(T5Config(
            vocab_size=len(tok3), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    prompt, words = "a photo of a red cat", ["cat", "red"]
    run = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=8)
    tr = traced(pipe, prompt, words, run)
    records = peer_capture(pipe, prompt, run)
    components = {c["name"]: c["indices_by_batch"][0] for c in records[0].metadata["text_components"]}
    assert components["clip-l+clip-g-fused"][0] == 0 and len(components["clip-l+clip-g-fused"]) == 77
    t5_offset = components["t5"][0]
    assert t5_offset == 77 and len(components["t5"]) == 8
    clip = {w: token_positions(pipe.tokenizer, prompt, w) for w in words}
    t5 = {w: token_positions(tok3, prompt, w, offset=t5_offset) for w in words} if with_t5 else {}
    assert tr.positions == {w: {"clip": clip[w], **({"t5": t5[w]} if with_t5 else {})} for w in words}
    if with_t5:  # the tracer's records: "cat" (the sum over segments), "cat/clip", "cat/t5"
        positions = {**{w: clip[w] + t5[w] for w in words}, **{f"{w}/clip": clip[w] for w in words},
                     **{f"{w}/t5": t5[w] for w in words}}
    else:
        positions = clip
    peer = peer_word_maps(records, "transformer.", slice(1, 2), positions)
    report(f"SD3 ({'CLIP + T5 segments and their sum' if with_t5 else 'CLIP only, no T5 encoder'})",
           *compare(tr, peer, list(positions)), bound=RAW_BOUND)


def test_flux_matches_peer(flux):
    """FLUX (text tokens first, rotary embeddings), the double-stream block only (the peer records no
    single-stream block: see the module docstring). 32x48, 2 steps, no CFG (every row is the image)."""
    prompt, words = "a photo of a red cat", ["cat", "red"]
    run = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=16)
    tr = traced(flux, prompt, words, run, layers=["transformer_blocks"])
    assert tr.layers == ["transformer_blocks.0.attn"]
    positions = {w: token_positions(flux.tokenizer_2, prompt, w) for w in words}
    assert {w: tr.positions[w]["t5"] for w in words} == positions
    records = peer_capture(flux, prompt, run, relations=("image->text", "image->image"))
    assert {r.layer_id for r in records} == {"transformer.transformer_blocks.0.attn"}  # no single-stream record
    records = [r for r in records if r.relation == "image->text"]
    peer = peer_word_maps(records, "transformer.", slice(0, 1), positions)
    # the peer's timestep is FLUX's transformer argument, t / 1000
    report("FLUX (double-stream block)", *compare(tr, peer, words, steps_scale=1000.0), bound=RAW_BOUND)


def test_wan_matches_peer():
    """Wan 2.1-shaped T2V (a tiny random WanTransformer3DModel, 2 blocks; patches 1x2x2): every ``attn2``
    (video -> T5 text; ``attn1`` is self-attention), 9 frames at 32x48 -> a 3x2x3 patch grid, 2 steps,
    guidance 5 (Wan runs the unconditional branch as a second denoiser call: the tracer traces the first,
    the conditional one; the peer records both, its ``denoiser_call_index`` 0 is compared)."""
    if importlib.util.find_spec("fused.processors.video") is None:
        pytest.skip("fused.maps.trace has no video support in this tree (fused/processors/video.py)")
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = tiny.t5_like_tokenizer()
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2)).eval(),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                          num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=32).eval())
    pipe.set_progress_bar_config(disable=True)
    prompt, words = "a photo of a red cat", ["cat", "red"]
    run = dict(num_inference_steps=2, height=32, width=48, num_frames=9, max_sequence_length=16, guidance_scale=5.0)
    tr = traced(pipe, prompt, words, run)
    assert tr.layers == ["blocks.0.attn2", "blocks.1.attn2"] and tr.shape == (3, 2, 3)
    positions = {w: token_positions(tok, prompt, w) for w in words}
    assert {w: tr.positions[w]["t5"] for w in words} == positions
    records = peer_capture(pipe, prompt, run, relations=("video->text",))
    assert {r.metadata["denoiser_call_index"] for r in records} == {0, 1}  # cond, then uncond, per step
    peer = peer_word_maps(records, "transformer.", slice(0, 1), positions, call=0)
    report("Wan (attn2, conditional call)", *compare(tr, peer, words), bound=RAW_BOUND)
