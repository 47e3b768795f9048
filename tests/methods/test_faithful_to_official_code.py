"""Faithfulness to the official code of ViCo, AttnDreamBooth and CatVersion (issue 17, docs/methods.md §2 to §4).

One test (or a few) per audited deviation; each fails on the code before the fix.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tests import builders as tiny  # noqa: E402
from vico import cli  # noqa: E402
from vico.data import IMAGENET_TEMPLATES_SMALL, VICO_TEMPLATES, attndreambooth_augment  # noqa: E402
from vico.methods.attndreambooth import AttnDreamBooth, AttnDreamBoothOptions  # noqa: E402
from vico.methods import get_method  # noqa: E402
from vico.methods.base import Method, MethodConfig  # noqa: E402
from vico.methods.catversion import CatVersion, PrefixKVAttention, install_prefix_kv, prefixes_off  # noqa: E402
from vico.methods.textual_inversion import TextualInversion  # noqa: E402
from vico.methods.vico import ViCo  # noqa: E402
from vico.model import Components, UserError, encode_prompts  # noqa: E402
from vico.pipeline import ViCoPipeline  # noqa: E402



def components(seed=0):
    c = Components(path="<tiny>", **tiny.make_tiny_components(seed))
    for m in (c.unet, c.text_encoder, c.vae):
        m.requires_grad_(False).eval()
    return c


def record_predict_noise(monkeypatch, cls):
    """Replace ``cls.predict_noise`` by one that records its arguments (and still denoises)."""
    calls = []
    real = cls.predict_noise

    def recording(self, latents, t, cond, uncond, guidance_scale, context):
        calls.append({"uncond": uncond.text.clone(), "cond": cond.text.clone(), "guidance": guidance_scale})
        return real(self, latents, t, cond, uncond, guidance_scale, context)

    monkeypatch.setattr(cls, "predict_noise", recording)
    return calls


# --- 1. CatVersion sampling: unconditional branch without prefixes, guidance 10 -------------------------

def test_catversion_unconditional_branch_is_the_plain_clip_encoding_and_guidance_is_10(monkeypatch):
    c = components()
    method = CatVersion(c, MethodConfig(init_word="cat", resolution=32))
    plain = components()  # the same random weights, no prefixes: the official fixed uc.pt
    with torch.no_grad():
        want = encode_prompts(plain, [""] * 2).text
        prefixed = encode_prompts(c, [""] * 2).text
    assert not torch.allclose(prefixed, want)  # the prefixes do change the encoding of ""
    calls = record_predict_noise(monkeypatch, CatVersion)
    ViCoPipeline(c, method)("cat", num_images=2, num_inference_steps=2, progress=False)
    assert len(calls) == 2
    for call in calls:
        torch.testing.assert_close(call["uncond"], want, rtol=0, atol=0)
        assert call["guidance"] == 10.0
    assert all(m.enabled for m in method.prefix.values())  # switched back on after the uncond encoding
    with torch.no_grad():
        torch.testing.assert_close(calls[0]["cond"], encode_prompts(c, ["cat"] * 2).text)
    # an explicit scale still wins; other methods keep 7.5
    ViCoPipeline(c, method)("cat", num_inference_steps=1, guidance_scale=3.0, progress=False)
    assert calls[-1]["guidance"] == 3.0
    assert CatVersion.guidance_scale == 10.0 and TextualInversion.guidance_scale == ViCo.guidance_scale == 7.5


def test_vico_sample_uses_the_methods_guidance_when_none_is_given(model_dir, images_dir, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    concept = tmp_path / "cv"
    assert cli.main(["train", "--model", str(model_dir), "--images", str(images_dir), "--out", str(concept),
                     "--method", "catversion", "--init-word", "cat", "--steps", "1", "--quiet"]) == 0
    calls = record_predict_noise(monkeypatch, CatVersion)
    common = ["sample", "--concept", str(concept), "--prompt", "cat", "--num-images", "1", "--steps", "1", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "a")]) == 0
    assert calls[-1]["guidance"] == 10.0
    assert cli.main(common + ["--out", str(tmp_path / "b"), "--guidance", "7.5"]) == 0
    assert calls[-1]["guidance"] == 7.5


# --- 2. one hook for how a prompt names the concept ----------------------------------------------------

def test_each_method_names_its_concept_in_prompts():
    want = {"vico": "a photo of S* on the beach", "textual-inversion": "a photo of S* on the beach",
            "attndreambooth": "a photo of S* cat on the beach", "catversion": "a photo of cat on the beach"}
    for name, prompt in want.items():
        cls = get_method(name)
        assert cls.prompt_for("a photo of {} on the beach", "S*", "cat") == prompt
        assert cls.plain_prompt(prompt, "S*", "cat") == "a photo of cat on the beach"  # CLIP-T's text
    assert Method.prompt_for("a {}", "V*", "dog") == "a V*"
    # training captions go through the same hook
    g = torch.Generator().manual_seed(0)
    assert AttnDreamBooth(components(), MethodConfig(init_word="cat")).prompt(g) == "a photo of a S* cat"


def test_toy_benchmark_prompts_come_from_the_hook():
    try:
        from vico.toyworld import demo
    except ImportError as exc:  # the toy world is being rebuilt elsewhere
        pytest.skip(f"vico.toyworld.demo does not import: {exc}")
    concept = demo.CONCEPTS[0]
    for name in ("vico", "textual-inversion", "attndreambooth", "catversion"):
        cls = get_method(name)
        method = cls.__new__(cls)  # only its class and config matter here
        method.config = MethodConfig(init_word=concept.shape)
        assert demo.prompt(method, concept, "blue") == cls.prompt_for("a large {} on a blue background", "S*",
                                                                        concept.shape)
    method = CatVersion.__new__(CatVersion)
    method.config = MethodConfig(init_word=concept.shape)
    assert demo.prompt(method, concept, "blue") == f"a large {concept.shape} on a blue background"


@pytest.mark.parametrize("name,sampled,scored", [
    ("catversion", "a photo of cat", "a photo of cat"),
    ("attndreambooth", "a photo of S* cat", "a photo of cat"),
    ("vico", "a photo of S*", "a photo of cat"),
])
def test_eval_prompts_name_the_concept_as_the_method_does(name, sampled, scored, images_dir, tmp_path,  # noqa: F811
                                                          monkeypatch):
    from PIL import Image

    concept = tmp_path / "concept"
    concept.mkdir()
    (concept / "concept.json").write_text(json.dumps(
        {"method": name, "config": {"placeholder": "S*", "init_word": "cat", "resolution": 32, "seed": 0,
                                    "options": {}}, "base_model": "unused"}))
    seen = []

    def fake_sample(concept, prompt, out, guidance=None, **kwargs):  # what eval samples; a stand-in image
        seen.append((prompt, guidance))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / "000.png")
        (out / "prompt.txt").write_text(prompt + "\n")
        return out

    monkeypatch.setattr("vico.sampling.sample_concept", fake_sample)
    monkeypatch.setattr("vico.evaluation.real_masks", lambda *a, **k: (None, "none"))
    clip = tiny.save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}\n")
    assert cli.main(["eval", "--concept", str(concept), "--real", str(images_dir), "--prompts", str(prompts),
                     "--clip", str(clip), "--out", str(tmp_path / "ev"), "--num-images", "1", "--quiet"]) == 0
    assert seen == [(sampled, None)]  # None: the method's own guidance scale
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["per_prompt"][0]["prompt"] == scored


# --- 3. masked CLIP-I: generated images get their own masks -------------------------------------------

def test_vico_sampled_maps_are_the_generated_images_own(monkeypatch):
    c = components()
    method = ViCo(c, MethodConfig(init_word="cat", resolution=32))
    with torch.no_grad():
        for p in method.blocks.parameters():  # untrained blocks are not zero; make them matter more
            p.add_(0.05 * torch.randn_like(p))
    pipe = ViCoPipeline(c, method)
    reference = torch.rand(3, 32, 32) * 2 - 1
    images, context = pipe("a photo of S* on the beach", reference=reference, num_images=2,
                           num_inference_steps=3, seed=1, progress=False)
    gen = method.sampled_maps(context)
    request = context["last_request"]
    assert set(gen) == set(method.layers)
    for layer, source in zip(method.layers, method.source_layers):
        maps, masks = gen[layer]
        side = maps.shape[-1]
        # the rows of the conditional noisy half, i.e. each generated image's own map and Otsu mask
        torch.testing.assert_close(maps.flatten(1), request.maps[source][2:4, 0], rtol=0, atol=0)
        assert torch.equal(masks.flatten(1), request.masks[source][2:4, 0])
        assert maps.shape == (2, side, side) and maps.abs().sum() > 0
        assert not torch.allclose(maps[0], maps[1])  # two different images, two different maps
        rmaps, _ = method.reference_maps(context)[layer]
        torch.testing.assert_close(rmaps[0], rmaps[1])  # the reference's map is the same for both
        assert not torch.allclose(maps[0], rmaps[0])
    # recording the generated maps does not change what is generated (the image block keeps the reference mask)
    real_request = ViCo.map_request
    monkeypatch.setattr(ViCo, "map_request", lambda self, ids, copies, generated=False: real_request(self, ids, copies))
    again, _ = pipe("a photo of S* on the beach", reference=reference, num_images=2, num_inference_steps=3, seed=1,
                    progress=False)
    assert (again == images).all()


def test_eval_report_names_the_generated_masks(tmp_path):
    from PIL import Image

    from vico import evaluation

    for i in range(2):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / f"{i:03d}_mask_up_blocks-1-attentions-1.png")
    masks, source = evaluation.generated_masks(tmp_path, 2)
    assert len(masks) == 2 and "generated image's own" in source and "up_blocks.1.attentions.1" in source
    assert evaluation.generated_masks(tmp_path, 3) == (None, "none")


# --- 4. AttnDreamBooth batch sizes -----------------------------------------------------------------------

def test_attndreambooth_batch_8_in_every_stage_4_with_fast():
    c = components()
    assert [s.batch_size for s in AttnDreamBooth(c, MethodConfig(init_word="cat")).stages()] == [8, 8, 8]
    fast = AttnDreamBooth(components(), MethodConfig(placeholder="V*", init_word="cat",
                                                     options=AttnDreamBoothOptions(fast=True)))
    assert [(s.steps, s.batch_size) for s in fast.stages()] == [(60, 4), (100, 4), (200, 4)]
    assert AttnDreamBooth.default_batch_size == 8


# --- 5. AttnDreamBooth augmentation ------------------------------------------------------------------------

def _test_image(size=32):
    img = -torch.ones(3, size, size)
    img[0, 2:12, 3:14] = 1.0  # a red block near the top left
    img[2, 20:30, 18:28] = 191 / 127.5 - 1  # values a uint8 image has (the trainer's images come from uint8)
    return img


def _reference_augment(image, angle, flip, size):
    """Rotation by ``angle`` degrees counter-clockwise about the centre onto the expanded canvas (black fill),
    nearest; bilinear resize to ``size``; optional mirror: written with torch's affine_grid/grid_sample."""
    import math

    import torch.nn.functional as F

    x = image[None].double()
    if angle is not None:
        _, _, h, w = x.shape
        a = math.radians(angle)
        W = math.ceil(abs(w * math.cos(a)) + abs(h * math.sin(a)) - 1e-6)
        H = math.ceil(abs(w * math.sin(a)) + abs(h * math.cos(a)) - 1e-6)
        # output pixel (in output-normalised coords) -> input pixel: inverse rotation, scaled by canvas sizes
        theta = torch.tensor([[math.cos(a) * W / w, -math.sin(a) * H / w, 0.0],
                              [math.sin(a) * W / h, math.cos(a) * H / h, 0.0]], dtype=torch.float64)
        grid = F.affine_grid(theta[None], (1, 3, H, W), align_corners=False)
        x = F.grid_sample(x + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    return x[0].float()


def test_attndreambooth_augment_matches_the_official_transform():
    img = _test_image()
    g = torch.Generator().manual_seed(0)
    rotated = flipped = 0
    angles = []
    for k in range(300):
        params = {}
        out = attndreambooth_augment(img, g, 32, params=params)
        assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
        rotated += params["angle"] is not None
        flipped += params["flip"]
        if params["angle"] is not None:
            angles.append(params["angle"])
        if k < 40:  # against an independent rotation / resize / flip
            want = _reference_augment(img, params["angle"], params["flip"], 32)
            assert (out - want).abs().mean() < 0.08, (k, params)
            if params["angle"] is not None and abs(params["angle"]) > 10:
                wrong = _reference_augment(img, -params["angle"], params["flip"], 32)
                assert (out - wrong).abs().mean() > (out - want).abs().mean() + 0.05  # direction matters
                assert (out[:, 0, 0] == -1).all()  # an expanded canvas: black corners
    assert abs(rotated / 300 - 0.75) < 0.08 and abs(flipped / 300 - 0.25) < 0.08
    assert min(angles) >= -45 and max(angles) <= 45 and min(angles) < -30 and max(angles) > 30
    # no rotation, forced flip: exactly the mirror image
    out = attndreambooth_augment(img, torch.Generator().manual_seed(0), 32, rotate_p=0.0, flip_p=1.0)
    torch.testing.assert_close(out, img.flip(-1), rtol=0, atol=1e-6)
    # deterministic from the generator
    a = attndreambooth_augment(img, torch.Generator().manual_seed(5), 32)
    b = attndreambooth_augment(img, torch.Generator().manual_seed(5), 32)
    assert torch.equal(a, b)


def test_attndreambooth_random_crop_of_non_square_images():
    img = torch.randint(0, 256, (3, 32, 48)) / 127.5 - 1
    params = {}
    out = attndreambooth_augment(img, torch.Generator().manual_seed(3), 32, rotate_p=0.0, flip_p=0.0, params=params)
    assert out.shape == (3, 32, 32) and params["top"] == 0 and 0 <= params["left"] <= 16
    torch.testing.assert_close(out, img[:, :, params["left"]:params["left"] + 32], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rotate_p", [None, 0.0])  # None: the official 0.75; 0.0: the toy recipe's option
def test_attndreambooth_batches_are_augmented_per_sample_and_encoded(rotate_p):
    c = components()
    options = AttnDreamBoothOptions() if rotate_p is None else AttnDreamBoothOptions(rotate_p=rotate_p)
    method = AttnDreamBooth(c, MethodConfig(init_word="cat", resolution=32, options=options))
    images = torch.stack([_test_image(), _test_image().flip(1), _test_image().roll(5, -1)])
    method.training_images = images
    mean = torch.randn(3, 4, 16, 16)
    batch = method.make_batch(mean, torch.zeros_like(mean), torch.Generator().manual_seed(4), batch_size=4)
    # rebuild it by hand from the same draws
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 3, (4,), generator=g)
    pixels = torch.stack([attndreambooth_augment(images[i], g, 32, rotate_p=0.75 if rotate_p is None else rotate_p)
                          for i in idx.tolist()])
    if rotate_p == 0.0:  # never rotated: each sample is its image or the mirror image
        assert all(torch.allclose(p, images[i], atol=1e-6) or torch.allclose(p, images[i].flip(-1), atol=1e-6)
                   for p, i in zip(pixels, idx.tolist()))
    with torch.no_grad():
        post = c.vae.encode(pixels).latent_dist
    eps = torch.randn(post.mean.shape, generator=g)
    torch.testing.assert_close(batch.latents, (post.mean + post.std * eps) * c.vae.config.scaling_factor)
    assert batch.prompts == ["a photo of a S* cat"] * 4 and batch.reference is None
    with torch.no_grad():
        plain = c.vae.encode(images[idx]).latent_dist.mean * c.vae.config.scaling_factor
    assert not torch.allclose(batch.latents, plain, atol=1e-2)  # not the un-augmented images
    # without pixels from the trainer the method decodes the latents once and still augments
    fresh = AttnDreamBooth(components(), MethodConfig(init_word="cat", resolution=32))
    b1 = fresh.make_batch(mean, torch.zeros_like(mean), torch.Generator().manual_seed(1), batch_size=2)
    b2 = fresh.make_batch(mean, torch.zeros_like(mean), torch.Generator().manual_seed(1), batch_size=2)
    assert b1.latents.shape == (2, 4, 16, 16) and torch.equal(b1.latents, b2.latents)


@pytest.mark.parametrize("bad", [1.5, -0.1, "high"])
def test_attndreambooth_rejects_a_rotation_probability_outside_0_1(bad):
    with pytest.raises(UserError, match="--rotate-p"):
        AttnDreamBooth(components(), MethodConfig(init_word="cat", resolution=32,
                                                  options=AttnDreamBoothOptions(rotate_p=bad)))


# --- 6. CatVersion prefix bias -----------------------------------------------------------------------------

def test_catversion_prefix_key_gets_the_official_plus_one_logit():
    c = components()
    enc = c.text_encoder.double()
    installed = install_prefix_kv(enc, generator=torch.Generator().manual_seed(2))
    layer = next(iter(installed.values()))
    a = layer.inner
    B, L, E = 2, 77, 32
    h = torch.randn(B, L, E, dtype=torch.float64)
    # the official CLIPAttention: q scaled, additive causal mask with torch.ones prepended for the prefix
    q = (a.q_proj(h) * a.scale).view(B, L, a.num_heads, a.head_dim).transpose(1, 2)
    k = torch.cat([layer.prefix_key.expand(B, 1, E), a.k_proj(h)], 1).view(B, L + 1, a.num_heads, a.head_dim)
    v = torch.cat([layer.prefix_value.expand(B, 1, E), a.v_proj(h)], 1).view(B, L + 1, a.num_heads, a.head_dim)
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)[None, None].expand(B, 1, L, L)
    mask = torch.cat([torch.ones(B, 1, L, 1, dtype=torch.float64), causal], dim=-1)
    weights = (q @ k.transpose(1, 2).transpose(-1, -2) + mask).softmax(-1)
    want = a.out_proj((weights @ v.transpose(1, 2)).transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(layer(h)[0], want, rtol=1e-10, atol=1e-12)
    # an explicit additive mask (padding) keeps the +1 on the prefix column
    pad = torch.zeros(B, 1, L, L, dtype=torch.float64)
    pad[1, ..., 40:] = float("-inf")
    pad = pad + causal
    weights = (q @ k.transpose(1, 2).transpose(-1, -2) + torch.cat([torch.ones(B, 1, L, 1, dtype=torch.float64),
                                                                     pad], -1)).softmax(-1)
    want = a.out_proj((weights @ v.transpose(1, 2)).transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(layer(h, pad)[0], want, rtol=1e-10, atol=1e-12)
    # and the boolean form of the same mask
    torch.testing.assert_close(layer(h, pad == 0)[0], want, rtol=1e-10, atol=1e-12)
    # with the prefixes off the encoder is the plain one
    ids = c.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    plain = components().text_encoder.double()
    with torch.no_grad(), prefixes_off(enc):
        torch.testing.assert_close(enc(ids)[0], plain(ids)[0], rtol=0, atol=0)
    assert all(isinstance(m, PrefixKVAttention) and m.enabled for m in installed.values())


# --- 7. ViCo's templates ----------------------------------------------------------------------------------

OFFICIAL_VICO_TEMPLATES = [  # haoosz/ViCo ldm/data/personalized.py, imagenet_templates_small (81)
    'a photo of a {}', 'a rendering of a {}', 'a cropped photo of the {}', 'the photo of a {}',
    'a photo of a clean {}', 'a photo of a dirty {}', 'a dark photo of the {}', 'a photo of my {}',
    'a photo of the cool {}', 'a close-up photo of a {}', 'a bright photo of the {}', 'a cropped photo of a {}',
    'a photo of the {}', 'a good photo of the {}', 'a photo of one {}', 'a close-up photo of the {}',
    'a rendition of the {}', 'a photo of the clean {}', 'a rendition of a {}', 'a photo of a nice {}',
    'a good photo of a {}', 'a photo of the nice {}', 'a photo of the small {}', 'a photo of the weird {}',
    'a photo of the large {}', 'a photo of a cool {}', 'a photo of a small {}',
    'an illustration of a {}', 'a rendering of a {}', 'a cropped photo of the {}', 'the photo of a {}',
    'an illustration of a clean {}', 'an illustration of a dirty {}', 'a dark photo of the {}',
    'an illustration of my {}', 'an illustration of the cool {}', 'a close-up photo of a {}',
    'a bright photo of the {}', 'a cropped photo of a {}', 'an illustration of the {}', 'a good photo of the {}',
    'an illustration of one {}', 'a close-up photo of the {}', 'a rendition of the {}',
    'an illustration of the clean {}', 'a rendition of a {}', 'an illustration of a nice {}',
    'a good photo of a {}', 'an illustration of the nice {}', 'an illustration of the small {}',
    'an illustration of the weird {}', 'an illustration of the large {}', 'an illustration of a cool {}',
    'an illustration of a small {}',
    'a depiction of a {}', 'a rendering of a {}', 'a cropped photo of the {}', 'the photo of a {}',
    'a depiction of a clean {}', 'a depiction of a dirty {}', 'a dark photo of the {}', 'a depiction of my {}',
    'a depiction of the cool {}', 'a close-up photo of a {}', 'a bright photo of the {}',
    'a cropped photo of a {}', 'a depiction of the {}', 'a good photo of the {}', 'a depiction of one {}',
    'a close-up photo of the {}', 'a rendition of the {}', 'a depiction of the clean {}', 'a rendition of a {}',
    'a depiction of a nice {}', 'a good photo of a {}', 'a depiction of the nice {}',
    'a depiction of the small {}', 'a depiction of the weird {}', 'a depiction of the large {}',
    'a depiction of a cool {}', 'a depiction of a small {}',
]


def test_vico_trains_with_the_official_81_templates_textual_inversion_with_27():
    assert VICO_TEMPLATES == OFFICIAL_VICO_TEMPLATES and len(VICO_TEMPLATES) == 81
    assert len(IMAGENET_TEMPLATES_SMALL) == 27 and IMAGENET_TEMPLATES_SMALL == OFFICIAL_VICO_TEMPLATES[:27]
    for cls, templates in ((ViCo, VICO_TEMPLATES), (TextualInversion, IMAGENET_TEMPLATES_SMALL)):
        method = cls(components(), MethodConfig(init_word="cat", resolution=32))
        g = torch.Generator().manual_seed(0)
        seen = {method.prompt(g) for _ in range(600)}
        assert seen == {t.format("S*") for t in templates}


# --- 8. ViCo learning rates --------------------------------------------------------------------------------

def test_vico_image_block_lr_is_not_scaled():
    method = ViCo(components(), MethodConfig(init_word="cat", resolution=32))
    emb, blocks = method.param_groups(lr_scale=8.0)
    assert emb["lr"] == pytest.approx(5e-3 * 8) and blocks["lr"] == 1e-5
    assert ViCo.scale_lr  # the embedding's is scaled by default (main.py), the blocks' never (ddpm.py)


def test_catversion_lr_is_the_official_base_rate_scaled_by_the_global_batch():
    method = CatVersion(components(), MethodConfig(init_word="cat", resolution=32))
    assert CatVersion.scale_lr and method.param_groups(lr_scale=2.0)[0]["lr"] == pytest.approx(1e-2)
    assert not AttnDreamBooth.scale_lr


def test_learning_rate_overrides_replace_the_base_rate_and_keep_the_scaling_rule():
    lrs = {"embedding": 1e-3, "image": 2e-4}
    method = ViCo(components(), MethodConfig(init_word="cat", resolution=32, learning_rates=lrs))
    emb, blocks = method.param_groups(lr_scale=4.0)
    assert emb["lr"] == pytest.approx(1e-3 * 4) and blocks["lr"] == 2e-4  # the image lr stays unscaled
    assert ViCo.learning_rate_names() == {"embedding": 5e-3, "image": 1e-5}
    cat = CatVersion(components(), MethodConfig(init_word="cat", resolution=32, learning_rates={"prefix": 1e-4}))
    assert cat.param_groups(lr_scale=2.0)[0]["lr"] == pytest.approx(2e-4)
    adb = AttnDreamBooth(components(), MethodConfig(init_word="cat", resolution=32, learning_rates={"unet": 3e-6}))
    assert [adb.param_groups(stage=s)[0]["lr"] for s in range(3)] == [1e-3, 2e-5, 3e-6]


@pytest.mark.parametrize("lrs, words", [({"imag": 1e-4}, "no parameter group 'imag'"),
                                        ({"image": 0.0}, "positive finite"),
                                        ({"image": float("nan")}, "positive finite")])
def test_bad_learning_rate_override_is_one_line_before_the_model_loads(tmp_path, lrs, words):
    from vico.model import UserError
    from vico.training import TrainConfig, train

    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(UserError, match=words):  # the model folder does not exist: the check comes first
        train(TrainConfig(model=str(tmp_path / "no-model"), images=str(images), out=str(tmp_path / "out"),
                          learning_rates=lrs))


def test_lr_help_names_every_methods_groups(capsys):
    from vico.methods import available_methods

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("--lr NAME=VALUE replace"):]
    for name, cls in available_methods().items():
        groups = text[text.index(f"{name} ") + len(name):].split(";")[0].split(" (")[0]
        assert [g.strip() for g in groups.split(",")] == list(
            cls.learning_rate_names()), name


# --- 9. ViCo's reference latent is a posterior sample ------------------------------------------------------

def test_vico_training_reference_is_a_posterior_sample_of_another_image():
    method = ViCo(components(), MethodConfig(init_word="cat", resolution=32))
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(3, 4, 16, 16, generator=g), torch.rand(3, 4, 16, 16, generator=g) + 0.1
    batch = method.make_batch(mean, std, torch.Generator().manual_seed(5), batch_size=4)
    # the same draws by hand: image, latent noise, captions, the reference's other image, then its sample
    h = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 3, (4,), generator=h)
    torch.testing.assert_close(batch.latents, mean[idx] + std[idx] * torch.randn(4, 4, 16, 16, generator=h))
    for _ in range(4):
        method.prompt(h)
    ref_idx = (idx + torch.randint(1, 3, (4,), generator=h)) % 3
    expected = mean[ref_idx] + std[ref_idx] * torch.randn(4, 4, 16, 16, generator=h)
    torch.testing.assert_close(batch.reference, expected)
    assert not torch.allclose(batch.reference, mean[ref_idx], atol=1e-2)  # not the posterior mean
    assert (ref_idx != idx).all()


def test_vico_sampling_reference_is_one_posterior_sample_from_the_seed():
    c = components()
    pipe = ViCoPipeline(c, ViCo(c, MethodConfig(init_word="cat", resolution=32)))
    reference = torch.rand(3, 32, 32) * 2 - 1
    _, context = pipe("a photo of S*", reference=reference, num_images=2, num_inference_steps=1, seed=4,
                      progress=False)
    g = torch.Generator().manual_seed(4)
    torch.randn(2, 4, 16, 16, generator=g)  # the initial latents come first
    with torch.no_grad():
        post = c.vae.encode(reference[None]).latent_dist
    sample = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * c.vae.config.scaling_factor
    torch.testing.assert_close(context["reference"], sample.expand(2, -1, -1, -1))
    assert not torch.allclose(context["reference"][0], post.mean[0] * c.vae.config.scaling_factor, atol=1e-3)
