"""SDXL pipelines: the conditioning equals StableDiffusionXLPipeline's, Textual Inversion, ViCo and CatVersion
train and sample through the CLI (AttnDreamBooth: test_attndreambooth_sdxl.py), the saved embedding loads into diffusers' two encoders, ViCo's reference
branch sees the noisy half's added conditions, CatVersion's prefixes sit in both encoders, resume is exact,
--vae replaces the VAE, bad folders and options are one line. All on one tiny SDXL pipeline (session fixture)."""

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from tests import builders as tiny  # noqa: E402
from tests.builders import vico as run, vico_train as train  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.registry import load_method  # noqa: E402
from vico.methods.textual_inversion import TextualInversion  # noqa: E402
from vico.methods.vico import ViCo  # noqa: E402
from vico.model import encode_prompts, load_components  # noqa: E402

SIZE = tiny.IMAGE_SIZE
PROMPTS = ["a photo of a cat", "a red dog on the beach"]


def diffusers_pipe(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_unet_calls(unet) -> list[dict]:
    """Every forward's encoder_hidden_states and added_cond_kwargs (cloned), through a pre-hook."""
    calls = []

    def hook(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        added = kwargs["added_cond_kwargs"]
        calls.append({"text": text.clone(), "pooled": added["text_embeds"].clone(),
                      "time_ids": added["time_ids"].clone(), "rows": args[0].shape[0]})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vico: error: "), err
    return err[0]


# --- conditioning ------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_conditioning_equals_the_diffusers_pipelines(sdxl_model_dir):
    comps, pipe = load_components(sdxl_model_dir), diffusers_pipe(sdxl_model_dir)
    assert comps.is_sdxl and comps.force_zeros_for_empty_prompt and comps.native_resolution == SIZE
    ours = encode_prompts(comps, PROMPTS, SIZE)
    text, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
    d1, d2 = tiny.SDXL_TEXT_DIMS
    assert ours.text.shape == (2, 77, d1 + d2) and ours.pooled.shape == (2, tiny.SDXL_POOLED_DIM)
    assert torch.equal(ours.text, text) and torch.equal(ours.pooled, pooled)
    time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=text.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert ours.time_ids.dtype == time_ids.dtype and torch.equal(ours.time_ids, time_ids.repeat(2, 1))
    # the unconditional branch: zeros under force_zeros_for_empty_prompt, else the encoded ""
    method = TextualInversion(comps, MethodConfig(init_word="cat", resolution=SIZE))
    uncond = method.encode_unconditional(2)
    assert torch.equal(uncond.text, negative) and torch.equal(uncond.pooled, negative_pooled)
    assert not uncond.text.any() and torch.equal(uncond.time_ids, ours.time_ids)
    comps.force_zeros_for_empty_prompt = False
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    # one prompt, two images: "" encoded once and repeated, as sampling does
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[0], device="cpu", num_images_per_prompt=2,
                                                         do_classifier_free_guidance=True)
    uncond = method.encode_unconditional(2)
    assert negative.abs().sum() > 0
    assert torch.equal(uncond.text, negative) and torch.equal(uncond.pooled, negative_pooled)
    # the placeholder (added to both tokenizers) leaves every other prompt's encoding as it was
    assert torch.equal(method.encode(PROMPTS).text, text)


@torch.no_grad()
def test_sampling_feeds_the_unet_what_the_diffusers_pipeline_feeds_it(sdxl_model_dir):
    """One guided step each: the same text, pooled projection and time ids in the same row order."""
    from vico.pipeline import ViCoPipeline

    pipe = diffusers_pipe(sdxl_model_dir)
    want = record_unet_calls(pipe.unet)
    pipe(PROMPTS[1], num_inference_steps=1, height=SIZE, width=SIZE, num_images_per_prompt=2, output_type="latent")
    comps = load_components(sdxl_model_dir)
    got = record_unet_calls(comps.unet)
    method = TextualInversion(comps, MethodConfig(init_word="cat", resolution=SIZE))
    ViCoPipeline(comps, method)(PROMPTS[1], num_images=2, num_inference_steps=1, progress=False)
    assert len(want) == len(got) == 1
    for key in ("text", "pooled", "time_ids"):
        assert torch.equal(got[0][key], want[0][key]), key


# --- training and sampling through the CLI ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_concepts(sdxl_model_dir, images_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sdxl-concepts")
    assert train(sdxl_model_dir, images_dir, root / "textual-inversion", "--method", "textual-inversion",
                 "--steps", 2) == 0
    # ViCo with a validation grid at its last step (sampling inside training, with the maps)
    assert train(sdxl_model_dir, images_dir, root / "vico", "--steps", 2, "--validation-prompt", "a photo of S*",
                 "--validation-steps", 2, "--num-validation-images", 1, "--validation-sample-steps", 1) == 0
    return {m: root / m for m in ("textual-inversion", "vico")}


@pytest.mark.parametrize("method", ["textual-inversion", "vico"])
def test_train_learns_one_row_per_text_encoder_and_samples(sdxl_concepts, sdxl_model_dir, method, tmp_path):
    concept = sdxl_concepts[method]
    weights = load_file(concept / "concept.safetensors")
    d1, d2 = tiny.SDXL_TEXT_DIMS
    assert weights["embedding"].shape == (1, d1) and weights["embedding_2"].shape == (1, d2)
    assert (method == "vico") == any(k.startswith("image_attention.") for k in weights)
    comps = load_components(sdxl_model_dir)
    for key, (tok, encoder) in zip(("embedding", "embedding_2"), comps.text_encoders):
        cat = encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids("cat")]
        assert not torch.equal(weights[key][0], cat), f"{key}: two steps moved it from its init word"
    assert json.loads((concept / "concept.json").read_text())["config"]["resolution"] == SIZE  # the native size
    out = tmp_path / "samples"
    extra = ["--save-maps"] if method == "vico" else []
    assert run("sample", "--concept", concept, "--prompt", "a photo of S* on the beach", "--out", out,
               "--num-images", 2, "--steps", 2, "--quiet", *extra) == 0
    names = {p.name for p in out.iterdir()}
    assert {"000.png", "001.png", "grid.png"} <= names
    assert (method == "vico") == any("_mask_" in n for n in names)
    assert (method == "vico") == (concept / "validation" / "step-000002" / "grid.png").is_file()


@torch.no_grad()
def test_the_embedding_file_loads_into_both_diffusers_encoders_and_encodes_as_ours(sdxl_concepts, sdxl_model_dir):
    concept = sdxl_concepts["textual-inversion"]
    state = load_file(concept / "learned_embeds.safetensors")  # the clip_l / clip_g layout of A1111 and ComfyUI
    weights = load_file(concept / "concept.safetensors")
    assert torch.equal(state["clip_l"], weights["embedding"]) and torch.equal(state["clip_g"], weights["embedding_2"])
    pipe = diffusers_pipe(sdxl_model_dir)
    pipe.load_textual_inversion(state["clip_l"], token="S*", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="S*", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompts = ["a photo of S* on the beach", "S* in the snow"]
    text, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
    method = load_method(load_components(sdxl_model_dir), concept)
    ours = method.encode(prompts)
    assert torch.equal(ours.text, text) and torch.equal(ours.pooled, pooled)
    plain = method.encode([p.replace("S*", "cat") for p in prompts])
    assert not torch.allclose(plain.text, ours.text)  # the learned rows are in use


def test_export_writes_the_sdxl_layout_and_diffusers_is_refused_in_one_line(sdxl_concepts, tmp_path, capsys):
    concept = sdxl_concepts["vico"]
    weights = load_file(concept / "concept.safetensors")
    for fmt in ("a1111", "comfyui"):
        out = tmp_path / f"{fmt}.safetensors"
        assert run("export", "--concept", concept, "--format", fmt, "--out", out) == 0
        data = load_file(out)
        assert data.keys() == {"clip_l", "clip_g"}
        assert torch.equal(data["clip_l"], weights["embedding"]) and torch.equal(data["clip_g"], weights["embedding_2"])
    capsys.readouterr()
    out = tmp_path / "diffusers.safetensors"
    assert run("export", "--concept", concept, "--format", "diffusers", "--out", out) == 2
    line = error_line(capsys)
    assert "--format diffusers" in line and "SDXL" in line and "text_encoder_2" in line and not out.exists()


# --- ViCo's reference branch --------------------------------------------------------------------------------------

def vico_method(path, dtype=None):
    comps = load_components(path, dtype=dtype)
    torch.manual_seed(0)
    method = ViCo(comps, MethodConfig(init_word="cat", resolution=SIZE))
    method.blocks.to(dtype or torch.float32)
    return method


def test_vico_reference_half_gets_the_noisy_halfs_added_conditions(sdxl_model_dir):
    method = vico_method(sdxl_model_dir)
    c = method.components
    # an image block after every frozen block of the depth-2 decoder transformer (one repeat)
    blocks = [type(b).__name__ for b in c.unet.get_submodule(method.layers[0]).transformer_blocks]
    assert blocks == ["BasicTransformerBlock", "ImageBlockRepeat", "BasicTransformerBlock", "ImageCrossAttention"]
    assert len(method.mask_layers) == 2
    calls = record_unet_calls(c.unet)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, SIZE // 2, SIZE // 2, generator=g)
    batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=2)
    loss, logs = method.training_loss(batch)
    cond = method.encode(batch.prompts)
    (call,) = calls
    assert call["rows"] == 4
    for key, want in (("text", cond.text), ("pooled", cond.pooled), ("time_ids", cond.time_ids)):
        assert torch.equal(call[key][:2], want) and torch.equal(call[key][2:], want), key
    assert logs["reg"] > 0 and torch.isfinite(loss)
    # sampling: rows [noisy_u, noisy_c, ref_u, ref_c], each reference row conditioned as its noisy row
    with torch.no_grad():
        uncond = method.encode_unconditional(2)
        context = method.sampling_context(mean[:1], 2)
        method.predict_noise(mean[:2], torch.tensor(500), cond, uncond, 7.5, context)
    call = calls[-1]
    for key in ("text", "pooled", "time_ids"):
        want = torch.cat([getattr(uncond, key), getattr(cond, key)])
        assert torch.equal(call[key][:4], want) and torch.equal(call[key][4:], want), key
    # vico eval's object masks of real images run the same branch: [real; real] with one conditioning
    masks = method.object_masks(mean)
    call = calls[-1]
    assert masks.shape == (3, 8, 8) and call["rows"] == 6 and torch.equal(call["pooled"][:3], call["pooled"][3:])


def test_vico_reference_early_stop_leaves_the_sdxl_loss_and_gradients_unchanged(sdxl_model_dir):
    method = vico_method(sdxl_model_dir, torch.float64)
    assert method.reference_stop.installed
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, SIZE // 2, SIZE // 2, generator=g, dtype=torch.float64)
    batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=2)
    params = [e.learned for e in method.embeddings] + list(method.blocks.parameters())
    results = []
    for enabled in (False, True):
        method.reference_stop.enabled = enabled
        loss, _ = method.training_loss(batch)
        results.append((loss, torch.autograd.grad(loss, params)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- CatVersion ---------------------------------------------------------------------------------------------------

def test_catversion_prefixes_the_three_layers_before_each_encoders_last(sdxl_model_dir):
    from vico.methods.catversion import CatVersion

    comps, plain = load_components(sdxl_model_dir), load_components(sdxl_model_dir)
    method = CatVersion(comps, MethodConfig(init_word="cat", resolution=SIZE))
    last = tiny.SDXL_TEXT_LAYERS - 1
    layers = range(last - 3, last)  # CLIPTextModelWithProjection keeps its text_model.
    assert list(method.prefix) == ([f"encoder.layers.{i}.self_attn" for i in layers]
                                   + [f"text_encoder_2.text_model.encoder.layers.{i}.self_attn" for i in layers])
    assert method.options.prefix_layers == list(method.prefix)  # what the concept rebuilds
    d1, d2 = tiny.SDXL_TEXT_DIMS
    assert [m.prefix_key.shape[0] for m in method.prefix.values()] == [d1] * 3 + [d2] * 3
    with torch.no_grad():
        want, got = encode_prompts(plain, ["a photo of cat"], SIZE), method.encode(["a photo of cat"])
        for part in (got.text[..., :d1] - want.text[..., :d1], got.text[..., d1:] - want.text[..., d1:],
                     got.pooled - want.pooled):
            assert part.abs().amax() > 1e-3  # both encoders' halves and the pooled projection change
        comps.force_zeros_for_empty_prompt = False
        uncond, plain_uncond = method.encode_unconditional(1), encode_prompts(plain, [""], SIZE)
        assert torch.equal(uncond.text, plain_uncond.text) and torch.equal(uncond.pooled, plain_uncond.pooled)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
    loss, _ = method.training_loss(method.make_batch(torch.cat([mean, mean.flip(-1)]), torch.zeros(4, 4, 16, 16), g, 2))
    loss.backward()
    assert all(m.prefix_key.grad.abs().sum() > 0 and m.prefix_value.grad.abs().sum() > 0
               for m in method.prefix.values())


def test_catversion_trains_and_samples_on_sdxl(sdxl_model_dir, images_dir, tmp_path):
    concept = tmp_path / "cv"
    assert train(sdxl_model_dir, images_dir, concept, "--method", "catversion", "--steps", 2) == 0
    assert "text_encoder_2.text_model.encoder.layers.3.self_attn.prefix_key" in load_file(concept / "concept.safetensors")
    assert run("sample", "--concept", concept, "--prompt", "a photo of cat", "--out", tmp_path / "s", "--num-images", 1,
               "--steps", 2, "--quiet") == 0
    prefix = "text_encoder_2.text_model.encoder.layers.4.self_attn"
    assert train(sdxl_model_dir, images_dir, tmp_path / "one", "--method", "catversion", "--steps", 1,
                 "--prefix-layers", prefix) == 0
    assert set(load_file(tmp_path / "one" / "concept.safetensors")) == {f"{prefix}.prefix_key", f"{prefix}.prefix_value"}


def test_a_prefix_layer_neither_encoder_has_is_one_line(sdxl_model_dir, images_dir, tmp_path, capsys):
    bad = "text_encoder_2.text_model.encoder.layers.9.self_attn"
    assert train(sdxl_model_dir, images_dir, tmp_path / "x", "--method", "catversion", "--prefix-layers", bad) == 2
    line = error_line(capsys)
    assert f"--prefix-layers {bad}: no attention module of that name" in line
    assert "text_encoder_2.text_model.encoder.layers.4.self_attn" in line  # it lists what there is


# --- resume -------------------------------------------------------------------------------------------------------

def test_resume_on_sdxl_equals_an_uninterrupted_run(sdxl_model_dir, images_dir, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train(sdxl_model_dir, images_dir, full, "--steps", 4, "--checkpoint-every", 2) == 0
    assert train(sdxl_model_dir, images_dir, split, "--steps", 2, "--checkpoint-every", 2) == 0
    assert train(sdxl_model_dir, images_dir, split, "--steps", 4, "--checkpoint-every", 2, "--resume") == 0
    a, b = load_file(full / "concept.safetensors"), load_file(split / "concept.safetensors")
    assert a.keys() == b.keys() and {"embedding", "embedding_2"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    two = load_file(split / "checkpoints" / "step-000002" / "concept.safetensors")
    assert not torch.equal(two["embedding_2"], a["embedding_2"])  # the second encoder's row trains too


# --- bad input ----------------------------------------------------------------------------------------------------

def test_an_sdxl_folder_without_text_encoder_2_is_one_line(sdxl_model_dir, images_dir, tmp_path, capsys):
    broken = tmp_path / "sdxl"
    shutil.copytree(sdxl_model_dir, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    assert train(broken, images_dir, tmp_path / "out", "--steps", 1) == 2
    assert f"model path {broken} has no text_encoder_2/ folder: not a diffusers SDXL pipeline" in error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_another_pipeline_class_is_one_line(sdxl_model_dir, images_dir, tmp_path, capsys):
    other = tmp_path / "flux"
    shutil.copytree(sdxl_model_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    assert train(other, images_dir, tmp_path / "out", "--steps", 1) == 2
    line = error_line(capsys)
    assert "holds a FluxPipeline" in line and "StableDiffusionXLPipeline" in line


def test_a_method_without_sdxl_support_is_refused_before_loading(sdxl_model_dir, images_dir, tmp_path, capsys,
                                                                 monkeypatch):
    from vico.methods.attndreambooth import AttnDreamBooth

    monkeypatch.setattr(AttnDreamBooth, "families", ("sd",))  # every method trains on SDXL now: pretend one does not
    assert train(sdxl_model_dir, images_dir, tmp_path / "out", "--method", "attndreambooth", "--steps", 1) == 2
    assert "--method attndreambooth does not support SDXL pipelines yet" in error_line(capsys)
    assert not (tmp_path / "out").exists()


# --- the VAE ------------------------------------------------------------------------------------------------------

def test_vae_option_replaces_the_models_vae_in_training_and_sampling(sdxl_model_dir, images_dir, tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl_model_dir / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2)
    vae.register_to_config(force_upcast=False)  # as the fp16-fixed SDXL VAE
    vae.save_pretrained(tmp_path / "fixed-vae")
    comps = load_components(sdxl_model_dir, vae=tmp_path / "fixed-vae")
    assert torch.equal(comps.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    plain, fixed = tmp_path / "plain", tmp_path / "fixed"
    assert train(sdxl_model_dir, images_dir, plain, "--method", "textual-inversion", "--steps", 1) == 0
    assert train(sdxl_model_dir, images_dir, fixed, "--method", "textual-inversion", "--steps", 1,
                 "--vae", tmp_path / "fixed-vae") == 0
    assert json.loads((fixed / "train_config.json").read_text())["vae"] == str(tmp_path / "fixed-vae")
    assert not torch.equal(load_file(plain / "latents.safetensors")["mean"], load_file(fixed / "latents.safetensors")["mean"])
    assert run("sample", "--concept", fixed, "--prompt", "S*", "--out", tmp_path / "s", "--num-images", 1,
               "--steps", 1, "--vae", tmp_path / "fixed-vae", "--quiet") == 0
    capsys.readouterr()
    assert train(sdxl_model_dir, images_dir, tmp_path / "bad", "--vae", tmp_path / "nothing", "--steps", 1) == 2
    assert f"--vae {tmp_path / 'nothing'}: not a diffusers VAE folder" in error_line(capsys)


def test_float16_keeps_an_upcast_sdxl_vae_in_float32(sdxl_model_dir, tmp_path):
    comps = load_components(sdxl_model_dir, dtype=torch.float16)
    assert comps.vae.config.force_upcast and comps.vae.dtype == torch.float32
    assert comps.unet.dtype == comps.text_encoder_2.dtype == torch.float16
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl_model_dir / "vae")
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "fixed-vae")
    assert load_components(sdxl_model_dir, dtype=torch.float16, vae=tmp_path / "fixed-vae").vae.dtype == torch.float16


def test_importing_an_official_concept_onto_sdxl_is_one_line(sdxl_model_dir, tmp_path, capsys):
    for source, files in (("vico", ["--embeddings", "e.pt", "--cross-attention", "c.pt"]),
                          ("catversion", ["--adapter", "a.bin"]),
                          ("attndreambooth", ["--embeddings", "e.bin", "--unet", "u"])):
        assert run("import", "--from", source, "--model", sdxl_model_dir, *files, "--out", tmp_path / source) == 2
        assert f"--model {sdxl_model_dir} is an SDXL pipeline" in error_line(capsys)
