"""Video transformers (issue 19): Wan, CogVideoX and HunyuanVideo fused processors and fused.maps.trace.

Every model is a tiny random float64 config built here (no downloads), every
tokenizer and text encoder a tiny local one. Each fused processor is checked
against diffusers' own processor: the transformer's output, and the maps
against softmax probabilities materialised by hand from q and k (recorders
below subclass diffusers' processors); trace's ``[F, h, w]`` maps of tiny
pipelines against the same materialised probabilities aggregated by hand.
"""

import re

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed  # noqa: E402
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import fused  # noqa: E402
from fused import maps as fused_maps  # noqa: E402
from fused.processors.video import attach_video, video_family, video_grid  # noqa: E402
from tests import builders as tiny  # noqa: E402

EXACT = dict(rtol=1e-10, atol=1e-12)
TRACE_TOL = dict(rtol=1e-5, atol=1e-6)  # trace aggregates in float32
F_, H_, W_ = 3, 4, 6  # latent frames, height, width of the direct tests -> a 3 x 2 x 3 patch grid
TEXT = 7
KINDS = ["wan", "wan_i2v", "cogvideox", "hunyuan_video"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def head_mean_probs(q, k, mask=None):
    """mean over heads of softmax(q kᵀ / sqrt(D)) [B, H, S, D] -> [B, S_q, S_k], hidden keys (mask False) at 0."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1).mean(1)


# ---------------------------------------------------------------- recorders: materialised probabilities


class WanRecorder(WanAttnProcessor):
    """diffusers' Wan processor; cross-attention layers record video -> text probabilities [B, N, L]."""

    def __init__(self, name, calls):
        super().__init__()
        self.name, self.calls = name, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            text = encoder_hidden_states[:, -512:] if attn.add_k_proj is not None else encoder_hidden_states
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            self.calls.append((self.name, head_mean_probs(q, k)))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class CogRecorder(CogVideoXAttnProcessor2_0):
    def __init__(self, name, calls):
        super().__init__()
        self.name, self.calls = name, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        n_text, x = encoder_hidden_states.shape[1], torch.cat([encoder_hidden_states, hidden_states], 1)

        def split(t):
            return t.view(x.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k = attn.norm_q(split(attn.to_q(x))), attn.norm_k(split(attn.to_k(x)))
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :n_text], apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)], 2)
            k = torch.cat([k[:, :, :n_text], apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)], 2)
        self.calls.append((self.name, head_mean_probs(q, k)[:, n_text:, :n_text]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class HunyuanRecorder(HunyuanVideoAttnProcessor2_0):
    def __init__(self, name, calls):
        super().__init__()
        self.name, self.calls = name, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n = hidden_states.shape[1]

        def heads(t):
            return t.unflatten(2, (attn.heads, -1))

        if attn.add_q_proj is None:  # single-stream: [video | text] through one projection, rotary on the video
            x = torch.cat([hidden_states, encoder_hidden_states], 1)
            q, k = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x)))
            q = torch.cat([apply_rotary_emb(q[:, :n], image_rotary_emb, sequence_dim=1), q[:, n:]], 1)
            k = torch.cat([apply_rotary_emb(k[:, :n], image_rotary_emb, sequence_dim=1), k[:, n:]], 1)
        else:
            q = apply_rotary_emb(attn.norm_q(heads(attn.to_q(hidden_states))), image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(attn.norm_k(heads(attn.to_k(hidden_states))), image_rotary_emb, sequence_dim=1)
            q = torch.cat([q, attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))], 1)
            k = torch.cat([k, attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))], 1)
        p = head_mean_probs(q.transpose(1, 2), k.transpose(1, 2), attention_mask)
        self.calls.append((self.name, p[:, :n, n:]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


RECORDERS = {"wan": WanRecorder, "cogvideox": CogRecorder, "hunyuan_video": HunyuanRecorder}


def record(model, calls):
    """Install the recorders on the layers the fused processors would get; returns the previous processors."""
    family, previous = video_family(model), model.attn_processors
    model.set_attn_processor({key: RECORDERS[family.name](key.removesuffix(".processor"), calls)
                              if family.installs(key.removesuffix(".processor")) else proc
                              for key, proc in previous.items()})
    return previous


def expected_maps(p, index):
    """Materialised probabilities [B, N, L] at the columns of token_index [B, T] (-1: zeros) -> [B, T, N]."""
    cols = p.gather(2, index.clamp(min=0)[:, None, :].expand(-1, p.shape[1], -1)).transpose(1, 2)
    return torch.where(index[:, :, None] >= 0, cols, torch.zeros_like(cols))


# ---------------------------------------------------------------- tiny transformers and their inputs


def tiny_wan(image=False):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32, image_dim=8 if image else None,
                                 added_kv_proj_dim=24 if image else None).double().eval()


def tiny_cogvideox(patch_size_t=None):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=W_,
                                       sample_height=H_, sample_frames=9, patch_size=2, patch_size_t=patch_size_t,
                                       max_text_seq_length=16, use_rotary_positional_embeddings=True
                                       ).double().eval()


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                          patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 2, 4)).double().eval()


def model_and_inputs(kind):
    """A tiny transformer and a batch of 2 for it; HunyuanVideo's second row has 4 of 7 text tokens (padding)."""
    t = torch.tensor([10.0, 500.0], dtype=torch.float64)
    if kind in ("wan", "wan_i2v"):
        image = kind == "wan_i2v"
        text = rand(2, 512 if image else TEXT, 16, seed=2)  # I2V: the processor takes the last 512 keys as text
        extra = dict(encoder_hidden_states_image=rand(2, 4, 8, seed=3)) if image else {}
        return tiny_wan(image), dict(hidden_states=rand(2, 4, F_, H_, W_, seed=1), timestep=t,
                                     encoder_hidden_states=text, **extra)
    if kind == "cogvideox":
        cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (H_ // 2, W_ // 2)), (H_ // 2, W_ // 2), F_)
        return tiny_cogvideox(), dict(hidden_states=rand(2, F_, 4, H_, W_, seed=1), timestep=t,
                                      encoder_hidden_states=rand(2, TEXT, 16, seed=2),
                                      image_rotary_emb=(cos.double(), sin.double()))
    mask = torch.tensor([[1] * TEXT, [1] * 4 + [0] * (TEXT - 4)])
    return tiny_hunyuan(), dict(hidden_states=rand(2, 4, F_, H_, W_, seed=1), timestep=t,
                                encoder_hidden_states=rand(2, TEXT, 16, seed=2), encoder_attention_mask=mask,
                                pooled_projections=rand(2, 8, seed=3),
                                guidance=torch.tensor([3000.0, 3000.0], dtype=torch.float64))


MAP_LAYERS = {
    "wan": {"blocks.0.attn2", "blocks.1.attn2"}, "wan_i2v": {"blocks.0.attn2", "blocks.1.attn2"},
    "wan22": {"blocks.0.attn2", "blocks.1.attn2"},
    "cogvideox": {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"},
    "hunyuan_video": {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"},
}


# ---------------------------------------------------------------- (a) outputs and (b) maps, transformer called directly


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_equal_diffusers_and_maps_equal_materialised(kind, cpu_backend):
    model, inputs = model_and_inputs(kind)
    calls = []
    record(model, calls)
    with torch.no_grad():
        want = model(**inputs).sample
    processors = attach_video(model)
    assert {type(p).__name__ for p in processors.values()} == {video_family(model).processor.__name__}
    index = torch.tensor([[0, 5, 2], [6, -1, 1]])  # HunyuanVideo row 1: 5 and 6 are padded text (maps 0)
    request = fused.MapRequest(index, backend=cpu_backend)
    with torch.no_grad():
        got = model(**inputs, attention_kwargs={"map_request": request}).sample
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert set(request.maps) == MAP_LAYERS[kind] == {name for name, _ in calls}
    n_video = (F_ // 1) * (H_ // 2) * (W_ // 2)
    for name, p in calls:
        maps = request.maps[name]
        assert maps.shape == (2, 3, n_video)
        torch.testing.assert_close(maps, expected_maps(p, index), **EXACT)
        assert torch.count_nonzero(maps[1, 1]) == 0
    if kind == "hunyuan_video":  # the mask hides the padded text: its maps are the (zero) probabilities
        assert torch.count_nonzero(request.maps["transformer_blocks.0.attn"][1, 0]) == 0
    # the request is handed back after the call: a plain forward records nothing and still matches
    plain = fused.MapRequest(index)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, want, rtol=1e-10, atol=1e-10)
    assert not plain.maps and all(p.map_request is None for p in processors.values())


def test_maps_have_gradients():
    model, inputs = model_and_inputs("hunyuan_video")
    attach_video(model)
    text = inputs["encoder_hidden_states"].requires_grad_()
    request = fused.MapRequest(torch.tensor([[1], [2]]))
    model(**inputs, attention_kwargs={"map_request": request})
    (grad,) = torch.autograd.grad(request.maps["single_transformer_blocks.0.attn"].sum(), text)
    assert grad.abs().sum() > 0


def test_video_grid_is_in_latent_patches():
    assert video_grid(tiny_wan(), torch.zeros(1, 4, 3, 4, 6)) == (3, 2, 3)
    assert video_grid(tiny_hunyuan(), torch.zeros(1, 4, 3, 4, 6)) == (3, 2, 3)
    assert video_grid(tiny_cogvideox(), torch.zeros(1, 3, 4, 4, 6)) == (3, 2, 3)  # CogVideoX: [B, F, C, H, W]
    assert video_grid(tiny_cogvideox(patch_size_t=2), torch.zeros(1, 4, 4, 4, 6)) == (2, 2, 3)


# ---------------------------------------------------------------- (d) bad inputs


@pytest.mark.parametrize("kind,layer", [("wan", "blocks.0.attn2"), ("cogvideox", "transformer_blocks.0.attn1"),
                                        ("hunyuan_video", "transformer_blocks.0.attn")])
def test_token_index_past_the_text_is_a_one_line_error(kind, layer):
    model, inputs = model_and_inputs(kind)
    attach_video(model)
    request = fused.MapRequest(torch.tensor([[TEXT], [0]]))  # TEXT tokens: 0..TEXT-1
    with pytest.raises(ValueError) as err:
        model(**inputs, attention_kwargs={"map_request": request})
    message = str(err.value)
    assert "\n" not in message
    assert f"positions >= the {TEXT} text tokens of {layer} (largest: {TEXT})" in message


def test_unsupported_masks_models_and_templates():
    model, inputs = model_and_inputs("hunyuan_video")
    attach_video(model)
    attn = model.transformer_blocks[0].attn
    hidden, text = rand(1, 5, 16, seed=4), rand(1, 3, 16, seed=5)
    holes = torch.tensor([True] * 5 + [True, False, True]).view(1, 1, 1, 8)  # hides a middle text token
    request = fused.MapRequest(torch.tensor([[0, 1]]))  # text token 1 is hidden
    with_maps = attn.processor(attn, hidden, text, holes, None, map_request=request)
    plain = attn.processor(attn, hidden, text, holes, None)  # without maps the mask goes to SDPA, as in diffusers
    torch.testing.assert_close(with_maps, plain, rtol=1e-10, atol=1e-12)
    (maps,) = request.maps.values()
    assert maps.shape == (1, 2, 5) and bool((maps[:, 0] > 0).all()) and bool((maps[:, 1] == 0).all())
    with pytest.raises(NotImplementedError, match="a boolean key mask"):
        attn.processor(attn, hidden, text, holes.float(), None, map_request=request)
    with pytest.raises(ValueError, match="not a supported video transformer"):
        attach_video(torch.nn.Linear(2, 2))

    class HunyuanVideoImageToVideoPipeline:  # the LLaVA template holds image tokens
        transformer, __module__ = model, "diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video"

    with pytest.raises(NotImplementedError, match="image tokens"):
        with fused_maps.trace(HunyuanVideoImageToVideoPipeline(), "a cat", ["cat"]):
            pass

    class MochiTransformer3DModel(torch.nn.Module):  # another video transformer: refused, not taken for SD3
        pass

    class MochiPipeline:
        transformer = MochiTransformer3DModel()

    with pytest.raises(ValueError, match="Wan, CogVideoX and HunyuanVideo only"):
        with fused_maps.trace(MochiPipeline(), "a cat", ["cat"]):
            pass


# ---------------------------------------------------------------- tiny pipelines for trace


HUNYUAN_TEMPLATE = {  # HunyuanVideo's template shape, with a short system prompt; crop_start by the pipeline's rule
    "template": ("<|start_header_id|>system<|end_header_id|>\n\nDescribe the video: the objects, their colour and "
                 "the background.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"),
    "crop_start": None,
}


def llama_like_tokenizer():
    """A byte-level BPE tokenizer like LLaMA 3's (BOS, header and <|eot_id|> specials), trained here on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([HUNYUAN_TEMPLATE["template"], " ".join(tiny.WORDS)] + ["{}"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<pad>", padding_side="right")


def tiny_t5(tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))


def tiny_pipeline(kind):
    """The family's diffusers pipeline with the tiny transformer, tiny text encoders and no VAE (latent output)."""
    from diffusers import (CogVideoXDDIMScheduler, CogVideoXPipeline, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideoPipeline, WanPipeline)

    torch.manual_seed(0)
    if kind in ("wan", "wan22"):  # Wan 2.2: a low-noise transformer_2 below the boundary timestep (500 of 1000)
        tok = tiny.t5_like_tokenizer()
        two = dict(transformer_2=tiny_wan(), boundary_ratio=0.6) if kind == "wan22" else {}
        if two:
            torch.nn.init.normal_(two["transformer_2"].blocks[0].attn2.to_k.weight)  # not a copy of transformer
        pipe = WanPipeline(tokenizer=tok, text_encoder=tiny_t5(tok), vae=None, transformer=tiny_wan(),
                           scheduler=FlowMatchEulerDiscreteScheduler(), **two)
    elif kind == "cogvideox":
        tok = tiny.t5_like_tokenizer()
        pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=tiny_t5(tok), vae=None, transformer=tiny_cogvideox(),
                                 scheduler=CogVideoXDDIMScheduler())
    else:
        from transformers import LlamaConfig, LlamaModel

        tok = llama_like_tokenizer()
        llama = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                       pad_token_id=tok.pad_token_id))
        clip_tok = tiny.make_tokenizer()
        pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=tiny_hunyuan(), vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer_2=clip_tok,
                                    text_encoder_2=tiny.tiny_clip_text_encoder(clip_tok, num_hidden_layers=1,
                                                                               with_projection=False))
    pipe.to(torch.float64)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, prompt, kind):
    """Two steps of a 9-frame 32 x 48 clip: latents 3 x 4 x 6, patches 3 x 2 x 3; the text encoder's input ids.
    HunyuanVideo runs true guidance (a negative prompt: a second call per step)."""
    ids = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: ids.append((a[0] if a else kw["input_ids"])[0].tolist()), with_kwargs=True)
    extra = dict(prompt_template=HUNYUAN_TEMPLATE, true_cfg_scale=2.0, negative_prompt="a dog") \
        if kind == "hunyuan_video" else {}
    try:
        pipe(prompt, num_inference_steps=2, height=32, width=48, num_frames=9, max_sequence_length=16,
             output_type="latent", generator=torch.Generator().manual_seed(0), **extra)
    finally:
        handle.remove()
    return ids[0]  # the prompt's (the negative prompt, where encoded, comes second)


def reference(pipe, prompt, kind, positions):
    """DAAM aggregate from materialised probabilities of the traced calls: [F, h, w] of the first video, in [0, 1]."""
    calls = []
    models = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    previous = [record(model, calls) for model in models]
    try:
        run_pipe(pipe, prompt, kind)
    finally:
        for model, procs in zip(models, previous):
            model.set_attn_processor(procs)
    layers = len(MAP_LAYERS[kind])
    per_call = [calls[i:i + layers] for i in range(0, len(calls), layers)]
    if kind != "cogvideox":  # guidance: a conditional, then an unconditional call per step; only the first is traced
        per_call = per_call[::2]
    row = 1 if kind == "cogvideox" else 0  # CogVideoX batches [uncond; cond]
    assert len(per_call) == 2  # two steps
    total = sum(p[row][:, positions].sum(-1) for call in per_call for _, p in call).reshape(3, 2, 3)
    return (total - total.min()) / (total.max() - total.min())


@pytest.mark.parametrize("kind", ["wan", "wan22", "cogvideox", "hunyuan_video"])
def test_trace_gives_frame_maps_equal_to_materialised(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    prompt = "a&nbsp;photo of a red cat on the beach, a cat" if kind == "wan" else "a photo of a red cat on the beach"
    extra = dict(prompt_template=HUNYUAN_TEMPLATE) if kind == "hunyuan_video" else {}
    with fused_maps.trace(pipe, prompt, ["cat", "red"], records=True, **extra) as tr:
        ids = run_pipe(pipe, prompt, kind)
    segment = "llama" if kind == "hunyuan_video" else "t5"
    assert set(tr.layers) == MAP_LAYERS[kind] and tr.calls == 2  # unconditional calls (Wan, Hunyuan) are not
    heat = tr.heatmaps()
    assert tr.shape == (3, 2, 3) and heat["cat"].shape == (3, 2, 3)
    assert heat["cat"].min() == 0 and heat["cat"].max() == 1  # normalised over the whole clip
    # the positions hold the word's tokens in what the transformer gets (HunyuanVideo: after the crop)
    crop = len(pipe.tokenizer(HUNYUAN_TEMPLATE["template"]).input_ids) - 2 if kind == "hunyuan_video" else 0
    for word in ("cat", "red"):
        tokens = pipe.tokenizer.decode([ids[crop + p] for p in tr.positions[word][segment]])
        assert tokens.replace(" ", "") == word * len(re.findall(rf"\b{word}\b", prompt))  # every occurrence
    if kind == "wan":  # the cleaned prompt "a photo ..." has one token more than the raw "a&nbsp;photo ..."
        assert tr.positions["cat"]["t5"] == [5, 10]
    for word in ("cat", "red"):
        torch.testing.assert_close(heat[word].double(), reference(pipe, prompt, kind, tr.positions[word][segment]),
                                   **TRACE_TOL)
    assert tr.heatmaps(index=None)["cat"].shape == (1, 3, 2, 3)
    # records: every layer's [images, F, h, w] per traced call, summing to the aggregate
    assert len(tr.steps) == 2 and all(e["cat"].shape == (1, 3, 2, 3) for _, step in tr.steps for e in step.values())
    torch.testing.assert_close(sum(e["cat"] for _, step in tr.steps for e in step.values()), tr.sums["cat"][segment])
    tr.save_records(tmp_path / "records.safetensors")
    maps, meta = fused_maps.load_records(tmp_path / "records.safetensors")
    assert meta["shape"] == [3, 2, 3] and len(maps) == 2 * len(tr.layers) * 2


@pytest.mark.parametrize("shift", [0, 3])
def test_hunyuan_positions_count_from_the_pipelines_crop(shift):
    """Position rule: index in the tokenised ``template.format(prompt)`` less ``crop_start``; checked against the
    pipeline's own crop (its attention mask counts the prompt tokens it keeps) with the computed and a given crop."""
    pipe = tiny_pipeline("hunyuan_video")
    computed = fused_maps.hunyuan_crop_start(pipe.tokenizer, HUNYUAN_TEMPLATE)
    template = dict(HUNYUAN_TEMPLATE, crop_start=computed - shift) if shift else HUNYUAN_TEMPLATE
    prompt = "a red cat, a cat"
    found, kept = fused_maps.template_token_positions(pipe.tokenizer, template, prompt, "cat")
    _, _, mask = pipe.encode_prompt(prompt, prompt_template=template, max_sequence_length=32)
    assert int(mask.sum()) == kept  # the same tokens are kept after the crop
    ids = pipe.tokenizer(template["template"].format(prompt)).input_ids
    assert len(found) == 2
    for occurrence in found:
        assert pipe.tokenizer.decode([ids[computed - shift + p] for p in occurrence]).strip() == "cat"
    unshifted, _ = fused_maps.template_token_positions(pipe.tokenizer, HUNYUAN_TEMPLATE, prompt, "cat")
    assert [[p - shift for p in occ] for occ in found] == unshifted
