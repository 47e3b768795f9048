"""The toy world generator and its checker."""

import numpy as np
import pytest
import torch

from vico.toyworld import checker, world


def test_generator_is_deterministic_and_holds_out_pairs():
    a, sa = world.dataset(50, seed=3)
    b, sb = world.dataset(50, seed=3)
    assert np.array_equal(a, b) and sa == sb and a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    _, scenes = world.dataset(500, seed=4)
    assert not any((s.shape, s.colour) in world.HELD_OUT for s in scenes)
    assert not any(s.texture in world.NOVEL_TEXTURES for s in scenes)
    rng = np.random.default_rng(0)
    captions = [world.training_caption(s, rng)[1] for s in scenes]
    assert not any(t in c.split() for c in captions for t in world.NOVEL_TEXTURES)
    _, held = world.dataset(20, seed=5, held_out=True)
    assert all((s.shape, s.colour) in world.HELD_OUT for s in held)
    assert scenes[0].caption().startswith(f"a {scenes[0].size} {scenes[0].colour} ")
    assert set(scenes[0].caption().split()) <= set(world.vocabulary())


@pytest.mark.parametrize("texture", list(world.ALL_TEXTURES))
def test_checker_reads_generator_images_exactly(texture):
    imgs, scenes = world.dataset(60, seed=0, texture=texture)
    acc = checker.accuracy(imgs, scenes)
    assert acc == {"background": 1.0, "colour": 1.0, "shape": 1.0, "texture": 1.0, "size": 1.0}
    asked = [s.shape for s in scenes]
    assert checker.confusion(imgs, scenes, "shape") == {k: {k: asked.count(k)} for k in set(asked)}
    held, hs = world.dataset(20, seed=2, held_out=True, texture=texture)
    assert min(checker.accuracy(held, hs).values()) == 1.0
    for img, scene in zip(imgs, scenes):  # the object mask it reads is the true one
        assert checker.iou(checker.object_mask(img), scene.mask()) >= 0.9


@pytest.mark.parametrize("texture", list(world.ALL_TEXTURES))
def test_checker_is_robust_to_sample_noise(texture):
    imgs, scenes = world.dataset(60, seed=1, texture=texture)
    noisy = np.clip(imgs.astype(float) + np.random.default_rng(0).normal(0, 15, imgs.shape), 0, 255).astype(np.uint8)
    acc = checker.accuracy(noisy, scenes)
    assert acc["background"] == 1.0 and acc["colour"] >= 0.98 and acc["texture"] >= 0.95
    assert acc["shape"] >= 0.9 and acc["size"] >= 0.95


def _soften(imgs: np.ndarray, weight: float) -> np.ndarray:
    """Each image blended ``weight`` of the way to its 3x3 box blur (edge-padded), uint8."""
    f = imgs.astype(np.float32)
    pad = np.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(pad[:, dy:dy + f.shape[1], dx:dx + f.shape[2]] for dy in range(3) for dx in range(3)) / 9
    return ((1 - weight) * f + weight * box).round().astype(np.uint8)


@pytest.mark.parametrize("texture", ["solid", "striped", "dotted"])
def test_checker_reads_soft_edged_squares_and_circles(texture):
    """A denoiser softens edges and rounds corners by a pixel: a fixed fill threshold (> 0.93 of the box) read
    7 of 17 base-model squares as circles. Blend each generator image half with its 3x3 box blur."""
    imgs, scenes = world.dataset(120, seed=4, texture=texture)
    soft = _soften(imgs, 0.5)
    for shape in ("square", "circle"):
        read = [checker.read(img)["shape"] for img, s in zip(soft, scenes) if s.shape == shape]
        assert len(read) >= 20 and read.count(shape) / len(read) >= 0.95, (shape, read)


@pytest.mark.parametrize("texture", list(world.ALL_TEXTURES))
def test_checker_reads_colour_and_size_through_blurred_edges(texture):
    """A decoder blurs edges by a pixel: on a white background the blended rim is the object's brightest part
    (the old "bright quarter of all object pixels" read red as yellow, 0.80 of the time), and the rim plus
    the restored circle tips moved the extent past thresholds set on the checker's own tip-trimmed masks
    (size 0.84). A full 3x3 box blur of each generator image (which erases textures, so only colour and size)."""
    imgs, scenes = world.dataset(120, seed=4, texture=texture)
    acc = checker.accuracy(_soften(imgs, 1.0), scenes)
    assert acc["colour"] >= 0.97 and acc["size"] >= 0.97, acc


def test_checker_reads_a_texture_added_to_the_world(monkeypatch):
    """Template matching covers any texture of the world, not a fixed list."""
    monkeypatch.setitem(world.NOVEL_TEXTURES, "columns", lambda yy, xx: (xx // 2) % 2 == 1)
    monkeypatch.setitem(world.ALL_TEXTURES, "columns", world.NOVEL_TEXTURES["columns"])
    imgs, scenes = world.dataset(30, seed=5, texture="columns")
    assert checker.accuracy(imgs, scenes)["texture"] == 1.0


def test_generic_family_is_broad():
    rng = np.random.default_rng(0)
    imgs = np.stack([world.generic_image(rng) for _ in range(64)])
    assert imgs.shape == (64, 32, 32, 3) and imgs.dtype == np.uint8
    colours = {tuple(c) for c in imgs.reshape(-1, 3)[::7]}
    assert len(colours) > 300  # any colour, not the world's palette of 7


def test_generic_family_has_block_dots_on_rectangular_grids():
    """Dots in the family are round (on a square grid) or pixel-aligned blocks of any size on a grid whose row and
    column pitches may differ: a pattern that is a row indicator times a column indicator (neither constant, so not
    stripes) with different periods."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32].astype(float)

    def period(v: np.ndarray) -> int:
        return next(p for p in range(1, 33) if np.array_equal(v[p:], v[:-p]))

    pitches = set()
    for _ in range(400):
        t = world._generic_pattern(rng, yy, xx) > 0.5
        rows, cols = t.any(1), t.any(0)
        if rows.all() or cols.all() or not t.any() or not np.array_equal(t, np.outer(rows, cols)):
            continue
        pitches.add((period(rows), period(cols)))
    assert len(pitches) >= 4 and any(p != q for p, q in pitches)


def test_fine_family_draws_2px_diagonals_at_every_phase_and_2px_block_noise():
    """``fine_pattern`` is binary, and among its draws are 2-px bands along both diagonals at each of their four
    phases on the pixel grid and noise in 2-px blocks: the fine detail the autoencoder's stage 3 trains on."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    wanted = {f"diagonal {p}": ((yy + xx + p) // 2) % 2 for p in range(4)}
    wanted |= {f"anti-diagonal {p}": ((yy - xx + 64 + p) // 2) % 2 for p in range(4)}
    found, block_noise = set(), 0
    for _ in range(3000):
        t = world.fine_pattern(rng, yy.astype(float), xx.astype(float))
        assert t.shape == (32, 32) and set(np.unique(t)) <= {0.0, 1.0}
        found |= {name for name, w in wanted.items() if np.array_equal(t, w)}
        cells = t[::2, ::2]
        is_blocks = np.array_equal(t, np.kron(cells, np.ones((2, 2))))
        block_noise += is_blocks and not any(np.array_equal(cells[p:], cells[:-p]) for p in (1, 2, 4))
    assert found == set(wanted) and block_noise > 50
    images = np.stack([world.fine_image(rng) for _ in range(16)])
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8


def test_checker_on_an_empty_image():
    blank = np.full((32, 32, 3), 128, np.uint8)
    got = checker.read(blank)
    assert got["background"] == "gray" and got["shape"] is None


def test_training_resumes_to_the_same_weights_and_exports_a_pipeline(tmp_path):
    import torch

    from vico.toyworld import evaluate, train

    full, split = tmp_path / "full", tmp_path / "split"
    kw = dict(minutes=10, vae_steps=2, batch=2, checkpoint_every=100, seed=0)
    train.train(full, resume=False, max_steps=4, **kw)
    train.train(split, resume=False, max_steps=2, **kw)
    path = train.train(split, resume=True, max_steps=4, **kw)
    a, b = train.load_checkpoint(full), train.load_checkpoint(split)
    assert a["step"] == b["step"] == 4 and a["scaling"] == b["scaling"]
    for part in ("vae", "unet", "text_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    report = evaluate.evaluate(path, n=2, cfgs=(3.0,), steps=2)
    assert set(report) == {"seen@cfg3", "held_out@cfg3"}
    assert set(report["seen@cfg3"]) == {"background", "colour", "shape", "texture", "size", "shape_read_as"}
    read_as = report["seen@cfg3"]["shape_read_as"]
    assert sum(sum(row.values()) for row in read_as.values()) == 2 and set(read_as) <= set(world.SHAPES)
    hits = sum(row.get(asked, 0) for asked, row in read_as.items())
    assert hits / 2 == report["seen@cfg3"]["shape"]  # the confusion's diagonal is the accuracy


def test_sdxl_shaped_training_keeps_the_shipped_autoencoder_resumes_exactly_and_exports_an_sdxl_pipeline(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from vico.model import encode_prompts, load_components, model_family
    from vico.toyworld import demo, train

    shipped = demo.shipped_model()
    full, split = tmp_path / "full", tmp_path / "split"
    kw = dict(minutes=10, vae_steps=2, batch=2, checkpoint_every=100, seed=0, arch="sdxl", vae_from=shipped)
    train.train(full, resume=False, max_steps=4, **kw)
    train.train(split, resume=False, max_steps=3, **kw)
    path = train.train(split, resume=True, max_steps=4, **kw)
    a, b = train.load_checkpoint(full), train.load_checkpoint(split)
    assert a["arch"] == "sdxl" and a["step"] == b["step"] == 4
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert model_family(path) == "sdxl"
    comps = load_components(path)
    want = AutoencoderKL.from_pretrained(shipped, subfolder="vae").state_dict()
    assert all(torch.equal(comps.vae.state_dict()[k], want[k]) for k in want)  # stage 1 skipped, weights kept
    assert comps.unet.config.addition_embed_type == "text_time"
    assert list(comps.unet.config.transformer_layers_per_block) == [1, 2]
    cond = encode_prompts(comps, ["a large red square on a white background"], size=comps.native_resolution)
    assert cond.text.shape == (1, 77, sum(train.SDXL_TEXT_WIDTHS)) and cond.pooled.shape == (1, train.SDXL_POOLED)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 40e6
    with pytest.raises(SystemExit, match="pass --arch sdxl"):
        train.train(split, resume=True, max_steps=5, **dict(kw, arch="sd"))


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_autoencoder_half_finetune_of_a_pipeline_moves_only_that_half(tmp_path, part):
    """Stage 3 from an exported pipeline (the shipped model has no training checkpoint): only the chosen half of
    the VAE moves (the decoder: the UNet's latents stay valid; the encoder: its samples decode as before), and the
    result loads as a pipeline."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from vico.model import load_pipeline
    from vico.toyworld import demo, train

    shipped = demo.shipped_model()
    assert train.main(["--out", str(tmp_path), f"--finetune-{part}", "2", "--batch", "2",
                       "--init-from", str(shipped)]) == 0
    before = AutoencoderKL.from_pretrained(shipped, subfolder="vae").state_dict()
    after = load_pipeline(tmp_path / "pipeline").vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(train.PART_PREFIXES[part]) for k in moved)
    assert set(load_file(tmp_path / train.PART_FILES[part])) >= moved
    assert not (tmp_path / train.PART_FILES[{"decoder": "encoder", "encoder": "decoder"}[part]]).exists()
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "pipeline" / unet).read_bytes() == (shipped / unet).read_bytes()


def test_autoencoder_finetune_of_both_halves_moves_both_and_resumes_exactly_after_ctrl_c(tmp_path, monkeypatch):
    """``--finetune-autoencoder`` trains encoder and decoder; stopped by Ctrl-C after two of four steps and run
    again, it ends on the same weights as four steps in one go (optimizer, step and generators restored)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from vico.toyworld import demo, train

    shipped = demo.shipped_model()
    args = ["--finetune-autoencoder", "4", "--batch", "8", "--init-from", str(shipped)]
    assert train.main(["--out", str(tmp_path / "whole"), *args]) == 0
    real, calls = train._stage3_loss, []

    def stopped_after_two(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train, "_stage3_loss", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", str(tmp_path / "split"), *args])
    assert train.load_checkpoint(tmp_path / "split", "autoencoder-checkpoint")["step"] == 2
    monkeypatch.setattr(train, "_stage3_loss", real)
    assert train.main(["--out", str(tmp_path / "split"), *args]) == 0
    whole, split = (load_file(tmp_path / run / train.PART_FILES["autoencoder"]) for run in ("whole", "split"))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    before = AutoencoderKL.from_pretrained(shipped, subfolder="vae").state_dict()
    moved = {k for k in whole if not torch.equal(before[k], whole[k])}
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)


def test_autoencoder_finetune_rejects_an_unknown_part(tmp_path):
    from vico.toyworld import train

    with pytest.raises(ValueError, match="part must be one of"):
        train.finetune_autoencoder(tmp_path, 1, part="unet")


def test_autoencoder_part_file_with_weights_the_autoencoder_lacks_is_refused(tmp_path):
    from safetensors.torch import save_file

    from vico.toyworld import train

    vae = train.make_models()["vae"]
    save_file({"decoder.up_blocks.0.resnets.9.conv2.weight": torch.zeros(1)}, str(tmp_path / train.DECODER_FILE))
    with pytest.raises(ValueError, match=r"decoder.safetensors holds weights this autoencoder does not have"):
        train.load_parts(vae, tmp_path)


@pytest.fixture(scope="module")
def barely_trained_model(tmp_path_factory):
    from vico.toyworld import train

    return train.train(tmp_path_factory.mktemp("toy"), minutes=10, vae_steps=1, batch=2, checkpoint_every=100,
                       resume=False, max_steps=2)


def test_toy_demo_writes_grid_and_metrics_and_reruns(barely_trained_model, tmp_path):
    import json

    from vico.model import UserError
    from vico.toyworld import demo

    out = tmp_path / "demo"
    for _ in range(2):  # the main job is re-runnable: a rerun replaces its own output
        metrics = demo.run(barely_trained_model, out, steps=1, ti_steps=1, sample_steps=1, samples=1, quiet=True)
    assert (out / "grid.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["methods"]) == {"textual-inversion", "vico"}
    for method, entry in saved["methods"].items():
        assert entry["steps"] == 1 and len(entry["samples"]) == len(demo.world.BACKGROUNDS)
        for key in ("identity_shape", "identity_colour", "identity_texture", "text_background"):
            assert 0.0 <= metrics["methods"][method][key] <= 1.0
    assert 0.0 <= saved["methods"]["vico"]["reference_mask_iou"] <= 1.0
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds notes.txt, which vico did not write there"):
        demo.run(barely_trained_model, foreign, steps=1, ti_steps=1, sample_steps=1, samples=1, quiet=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_shipped_sdxl_toy_model_is_an_sdxl_pipeline_in_the_sd_models_latent_space():
    """One world, two architectures: the SDXL-shaped model's autoencoder (the SD model's before its fine-pattern
    stage 3) encodes toy-world scenes to within 2% of the SD model's latents, at the same latent scale."""
    from diffusers import AutoencoderKL

    from vico.model import load_components, model_family
    from vico.toyworld import demo
    from vico.toyworld.train import to_tensor

    sd, sdxl = demo.shipped_model("sd"), demo.shipped_model("sdxl")
    assert model_family(sdxl) == "sdxl" and model_family(sd) == "sd"
    assert sum(f.stat().st_size for f in sdxl.rglob("*") if f.is_file()) < 40e6
    vaes = [AutoencoderKL.from_pretrained(m, subfolder="vae") for m in (sd, sdxl)]
    assert vaes[0].config.scaling_factor == vaes[1].config.scaling_factor
    rng = np.random.default_rng(0)
    x = to_tensor(np.stack([world.render(world.random_scene(rng, texture=t)) for t in world.ALL_TEXTURES
                            for _ in range(4)]))
    with torch.no_grad():
        a, b = (vae.encode(x).latent_dist.mean for vae in vaes)
    assert 0 < float((a - b).norm() / a.norm()) < 0.02
    comps = load_components(sdxl)
    assert comps.text_encoder_2 is not None and comps.unet.config.addition_embed_type == "text_time"
    assert max(comps.unet.config.transformer_layers_per_block) >= 2


def test_toy_demo_runs_on_an_sdxl_shaped_model(tmp_path):
    """The demo's two methods train, sample and score on an SDXL-shaped toy model (two encoders, added conditions)."""
    from vico.model import model_family
    from vico.toyworld import demo, train

    model = train.train(tmp_path / "toy", minutes=10, vae_steps=0, batch=2, checkpoint_every=100, resume=False,
                        max_steps=1, arch="sdxl", vae_from=demo.shipped_model())
    assert model_family(model) == "sdxl"
    metrics = demo.run(model, tmp_path / "demo", steps=1, ti_steps=1, sample_steps=1, samples=1, quiet=True)
    for entry in metrics["methods"].values():
        assert entry["steps"] == 1 and len(entry["samples"]) == len(demo.world.BACKGROUNDS)
    assert 0.0 <= metrics["methods"]["vico"]["reference_mask_iou"] <= 1.0
    assert (tmp_path / "demo" / "vico" / "learned_embeds.safetensors").is_file()


def test_upsampled_masks_and_iou():
    from vico.toyworld import demo

    m = np.zeros((16, 16), bool)
    m[4:8, 4:8] = True
    big = demo.upsample_mask(m)
    assert big.shape == (32, 32) and big.sum() == 64 and big[8:16, 8:16].all()
    assert checker.iou(big, big) == 1.0 and checker.iou(big, ~big) == 0.0


def test_personalization_benchmark_runs_every_method_and_resumes(barely_trained_model, tmp_path, monkeypatch):
    import json

    from vico.toyworld import benchmark, demo

    no_reg = benchmark.SETTINGS["toy, no regulariser"]
    one_step = {"default": lambda method: {"steps": 1},
                "toy, no regulariser": lambda method: no_reg(method) and dict(no_reg(method), steps=1)}
    monkeypatch.setattr(benchmark, "SETTINGS", one_step)
    out = tmp_path / "bench"
    rows = benchmark.run(barely_trained_model, out, concepts=demo.CONCEPTS[:1], settings=tuple(one_step), samples=1,
                         sample_steps=1)
    assert [(r["method"], r["setting"]) for r in rows] == [(m, "default") for m in benchmark.METHODS[:1]] + [
        ("vico", "toy, no regulariser")] + [(m, "default") for m in benchmark.METHODS[1:]]  # ablation: ViCo only
    assert json.loads((out / "red-checkered-square" / "vico-toy-no-regulariser" / "concept.json").read_text())[
        "config"]["options"]["reg_weight"] == 0.0
    for r in rows:
        assert 0 <= r["identity_texture"] <= 1 and 0 <= r["text_background"] <= 1 and r["samples"] == 3
    assert "reference_mask_iou" in rows[0] and "| red checkered square | vico | default | 1 | 3 |" in benchmark.table(rows)
    calls = []
    monkeypatch.setattr(benchmark, "sample_and_score", lambda *a, **k: calls.append(a) or ([], {}))
    assert benchmark.run(barely_trained_model, out, concepts=demo.CONCEPTS[:1], settings=tuple(one_step), samples=1,
                         sample_steps=1) == rows and not calls  # finished rows are kept, not recomputed
    assert json.loads((out / "benchmark.json").read_text()) == rows


def test_long_setting_doubles_each_methods_default():
    from vico.methods import get_method
    from vico.toyworld import benchmark, demo

    for method in benchmark.METHODS:
        assert benchmark.method_steps(method, "default") is None and benchmark.SETTINGS["default"](method) == {}
        assert (benchmark.SETTINGS["toy"](method) is None) == (method not in demo.TOY_RECIPES)
    assert benchmark.SETTINGS["toy, official image lr"]("vico")["learning_rates"] == dict(
        demo.TOY_RECIPES["vico"]["learning_rates"], image=1e-5)
    assert benchmark.SETTINGS["toy, embedding frozen"]("textual-inversion") is None
    assert benchmark.method_steps("vico", "long") == 2 * get_method("vico").default_steps
    assert benchmark.method_steps("attndreambooth", "long") * 3 == 2 * get_method("attndreambooth").default_steps


def test_benchmark_rates_carry_their_binomial_standard_error():
    from vico.toyworld import benchmark

    assert benchmark.rate({"identity_texture": 0.75, "samples": 24}, "identity_texture") == "0.75 ± 0.09"
    assert benchmark.rate({"text_background": 1.0, "samples": 24}, "text_background") == "1.00 ± 0.00"
    row = dict(concept="c", method="vico", setting="toy", steps=8, samples=4, identity_shape=1.0, identity_colour=0.5,
               identity_texture=0.25, text_background=0.0)
    assert "| c | vico | toy | 8 | 4 | 1.00 ± 0.00 | 0.50 ± 0.25 | 0.25 ± 0.22 | 0.00 ± 0.00 | — |" in benchmark.table([row])


def test_toy_recipes_cover_every_benchmark_method():
    from tests import builders as tiny
    from vico.methods import get_method
    from vico.methods.attndreambooth import AttnDreamBoothOptions
    from vico.methods.base import MethodConfig
    from vico.model import Components
    from vico.toyworld import benchmark, demo
    from vico.training import TrainConfig, check_learning_rates

    assert set(demo.TOY_RECIPES) == set(demo.TOY_STEPS) == set(benchmark.METHODS)
    for method in benchmark.METHODS:
        toy = benchmark.SETTINGS["toy"](method)
        assert toy["steps"] == demo.TOY_STEPS[method] and toy["batch_size"] == 4 and toy["scale_lr"] is False
        check_learning_rates(get_method(method), toy["learning_rates"])  # every rate names a group of the method
        assert TrainConfig(model="m", images="i", out="o", method=method, **toy).learning_rates == toy["learning_rates"]
    # AttnDreamBooth's three stages get the toy rates and lose the rotation; the official recipe keeps both
    adb = benchmark.SETTINGS["toy"]("attndreambooth")
    comps = Components(path="<tiny>", **tiny.make_tiny_components(0))
    method = get_method("attndreambooth")(comps, MethodConfig(init_word="cat", resolution=32, options=AttnDreamBoothOptions(**adb["options"]),
                                                              learning_rates=adb["learning_rates"]))
    assert [g["lr"] for s in range(3) for g in method.param_groups(stage=s)] == [1e-3, 1e-4, 1e-4]
    assert method.options.rotate_p == 0.0 and benchmark.SETTINGS["default"]("attndreambooth") == {}


def test_unet_lora_settings_are_attndreamboths_toy_recipe_with_a_rank():
    import pytest

    from vico.toyworld import benchmark

    for name, rank, factor in [("toy, unet LoRA rank 4", 4, 1), ("toy, unet LoRA rank 4, UNet lr x10", 4, 10),
                               ("toy, unet LoRA rank 4, UNet lr x100", 4, 100),
                               ("toy, unet LoRA rank 16, UNet lr x10", 16, 10)]:
        setting = benchmark.SETTINGS[name]("attndreambooth")
        assert setting["options"] == {"rotate_p": 0.0, "unet_lora_rank": rank} and setting["steps"] == 250
        assert setting["learning_rates"] == pytest.approx({"embedding": 1e-3, "cross-attention": factor * 1e-4,
                                                           "unet": factor * 1e-4})
        assert [benchmark.SETTINGS[name](m) for m in benchmark.METHODS if m != "attndreambooth"] == [None] * 3


def test_ablation_settings_for_lr_and_block_placement():
    from pathlib import Path

    from vico.image_attention import decoder_transformers, default_image_attention_layers, inject_image_attention
    from vico.model import meta_unet
    from vico.toyworld import benchmark, demo

    x10 = benchmark.SETTINGS["toy, image lr x10"]("vico")["learning_rates"]
    assert x10["image"] == 10 * demo.TOY_RECIPES["vico"]["learning_rates"]["image"] == 1e-2
    assert x10["embedding"] == demo.TOY_RECIPES["vico"]["learning_rates"]["embedding"]
    assert demo.TOY_RECIPES["vico"]["options"]["layers"] == demo.EVERY_TRANSFORMER  # the toy recipe: every one
    assert benchmark.SETTINGS["toy"]("vico")["options"]["layers"] == demo.EVERY_TRANSFORMER
    assert benchmark.SETTINGS["toy, blocks in every decoder layer"]("vico")["options"]["layers"] == \
        demo.EVERY_DECODER_LAYER
    second = benchmark.SETTINGS["toy, blocks in every second decoder layer"]
    assert second("textual-inversion") is None and second("vico")["options"]["layers"] is None  # the default
    assert benchmark.SETTINGS["toy"]("vico")["lr_scheduler"] == "cosine"
    before = benchmark.SETTINGS["toy, 800 steps, constant lr"]
    assert before("textual-inversion") is None and (before("vico")["steps"], before("vico")["lr_scheduler"]) == (
        800, "constant")
    assert benchmark.SETTINGS["toy, constant lr"]("vico")["steps"] == demo.TOY_STEPS["vico"] == 4 * demo.VICO_STEPS
    assert benchmark.SETTINGS["toy, 1600 steps"]("vico")["steps"] == 1600
    assert demo.DEMO_RECIPES["vico"] == dict(demo.TOY_RECIPES["vico"], lr_scheduler="constant",
                                             options={"layers": demo.EVERY_DECODER_LAYER})
    assert benchmark.SETTINGS["toy, 800 steps"]("vico")["lr_scheduler"] == "cosine"
    quarter = benchmark.SETTINGS["toy, 1/4 steps"]
    assert [quarter(m)["steps"] for m in ("vico", "textual-inversion")] == [
        demo.TOY_STEPS["vico"] // 4, demo.TI_STEPS // 4]
    model = Path(__file__).resolve().parents[2] / "vico" / "toyworld" / "model"
    names = decoder_transformers(meta_unet(model))
    assert demo.for_model({"options": {"layers": demo.EVERY_DECODER_LAYER, "reg_weight": 0}}, model) == {
        "options": {"layers": names, "reg_weight": 0}}
    assert names == [f"up_blocks.{i}.attentions.{j}" for i in range(2) for j in range(2)]
    unet = meta_unet(model)
    assert default_image_attention_layers(unet) == names[1::2]  # the default: every second one
    assert len(inject_image_attention(unet, names)) == 4  # every name is a real spatial transformer
    everywhere = demo.for_model({"options": {"layers": demo.EVERY_TRANSFORMER}}, model)["options"]["layers"]
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = meta_unet(model)  # a fresh one: the blocks injected above would change its modules
    assert sorted(everywhere) == sorted(n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel))
    assert everywhere == ["down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "mid_block.attentions.0", *names]
    assert len(inject_image_attention(unet, everywhere)) == 7


def test_trace_mask_iou_on_a_model(barely_trained_model):
    from vico.toyworld import evaluate

    got = evaluate.trace_mask_iou(barely_trained_model, n=2, steps=2)
    assert got["images"] <= 2
    if got["images"]:
        assert 0.0 <= got["class_word_trace_mask_iou"] <= 1.0


def test_vae_report_covers_every_texture_and_probe():
    from vico.toyworld import demo, evaluate
    from vico.model import load_pipeline

    report = evaluate.vae_report(load_pipeline(demo.shipped_model()).vae, n=4)
    assert set(world.ALL_TEXTURES) | {f"probe: {p}" for p in evaluate.PROBE_PATTERNS} == set(report)
    assert all(r["object_mae"] >= 0 for r in report.values())
    assert "| checkered | yes |" in evaluate.vae_table(report)


# Object-pixel error (0-255) of the shipped autoencoder on 16 held-out renders per pattern (seed 1), each a little
# above what it measures; the autoencoder before its stage-3 fine-tune on fine patterns measured 4.8 / 39.3 /
# 32.2 / 21.7 / 35.3 / 14.2 / 14.1 on the same renders.
HELD_OUT_CEILINGS = {"solid": 5.0, "diagonal stripes 2px": 32.0, "anti-diagonal stripes 2px": 19.0,
                     "dots, 4-px pitch": 12.5, "checker 2px": 17.5, "checker 4px": 10.0, "two-tone noise 2px": 9.5}


def test_shipped_autoencoder_keeps_fine_detail_it_never_saw():
    """On renders whose shapes, colours and pattern code it never trained on (``heldout_renders``), the shipped SD
    model's autoencoder stays under each pattern's ceiling."""
    from diffusers import AutoencoderKL

    from tests.toyworld.heldout_renders import FINE_PATTERNS, object_mae
    from vico.toyworld import demo

    shipped = demo.shipped_model()
    vae = AutoencoderKL.from_pretrained(shipped, subfolder="vae")
    errors = {pattern: object_mae(vae, pattern, 16, seed=1) for pattern in FINE_PATTERNS}
    assert set(errors) == set(HELD_OUT_CEILINGS)
    assert all(errors[p] <= HELD_OUT_CEILINGS[p] for p in errors), errors


def test_shipped_toy_model_draws_what_it_is_asked():
    """A small check of the shipped base model with the checker (the full table is in RESULTS.md): it draws the
    background, colour, texture and shape it is asked for in most samples (chance: 1/3, 1/4, 1/2, 1/3), and its
    class-word maps outline what it draws."""
    from vico.toyworld import demo, evaluate

    report = evaluate.evaluate(demo.shipped_model(), n=8, cfgs=(5.0,), steps=20)
    seen = report["seen@cfg5"]
    assert seen["background"] >= 0.85 and seen["colour"] >= 0.85 and seen["texture"] >= 0.85
    assert seen["shape"] >= 0.6 and seen["size"] >= 0.6
    masks = evaluate.trace_mask_iou(demo.shipped_model(), n=4, steps=20)
    assert masks["images"] >= 3 and masks["class_word_trace_mask_iou"] >= 0.6


def test_attention_targets_and_loss():
    import fused
    from vico.toyworld import train

    index, on_object = train.attention_targets(["a large red striped circle on a gray background", ""])
    assert index[0, :7].tolist() == [10, 2, 3, 4, 5, 8, 9] and (index[0, 7:] == -1).all()
    assert on_object[0, :7].tolist() == [True] * 5 + [False] * 2
    assert (index[1] == -1).all()  # an empty (guidance) caption asks nothing
    scene = world.Scene("square", "red", "solid", "large", "gray", 16, 16, 10)
    masks = torch.from_numpy(scene.mask()).float()[None, None].expand(2, 1, 32, 32)
    obj = torch.nn.functional.adaptive_avg_pool2d(masks, 16).flatten(1)[:, None]  # [2, 1, 256]
    perfect = torch.where(on_object[..., None], obj, 1 - obj) * 0.3  # any scale: maps are max-normalised
    request = fused.MapRequest(index)
    request.maps["layer"] = perfect
    rows = torch.tensor([True, True])
    assert float(train.attention_loss(request, masks, on_object, rows)) < 1e-12
    request.maps["layer"] = perfect.flip(-1)
    assert float(train.attention_loss(request, masks, on_object, rows)) > 0.01
    assert float(train.attention_loss(request, masks, on_object, torch.tensor([False, False]))) == 0.0


def test_texture_survival_reports_every_texture_and_the_shipped_model_keeps_a_seen_one():
    from vico.toyworld import demo, evaluate

    report = evaluate.texture_survival(demo.shipped_model(), strengths=(0.1,), n=2, steps=10)
    assert set(report) == set(world.ALL_TEXTURES)
    assert all(report[t]["novel"] == (t in world.NOVEL_TEXTURES) for t in report)
    assert report["striped"]["0.1"] == 1.0  # a seen texture survives a light img2img pass


def test_free_texture_scenes_wear_broad_patterns_under_captions_without_a_texture_word():
    """Stage 2's free-texture rows: the object wears a broad-family pattern in its own colour's shades, on the
    scene's plain background, and the caption never says a texture (the vocabulary cannot name the pattern)."""
    from vico.toyworld import train

    rng = np.random.default_rng(0)
    x, captions, masks, generic = train.stage2_batch(rng, 32, generic_fraction=0.25, free_texture_fraction=0.5)
    assert x.shape == (32, 3, 32, 32) and generic.tolist() == [False] * 24 + [True] * 8
    textures = set(world.ALL_TEXTURES)
    free, named = captions[:16], captions[16:24]
    assert not any(w in textures for c in free for w in c.split())
    assert sum(w in textures for c in named for w in c.split()) >= 2  # the other scenes still name theirs
    images = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().numpy()
    distinct = set()
    for img, mask in zip(images[:16], masks[:16, 0].bool().numpy()):
        obj = img[mask]

        def shade_error(colour):  # every pixel is s * colour, s in [0.2, 1]
            c = np.array(colour, float)
            s = obj @ c / (c @ c)
            return abs(obj - s[:, None] * c).max(), s

        err, ratio = min((shade_error(c) for c in world.COLOURS.values()), key=lambda e: e[0])
        assert err <= 1.0 and ratio.min() >= 0.2 - 0.01 and ratio.max() <= 1 + 0.01
        bg = img[~mask]
        assert (bg == bg[0]).all()  # plain background
        distinct.add(np.round(ratio, 2).tobytes())
    assert len(distinct) >= 12  # patterns differ from scene to scene
    # the same rows without the option are the seen textures only
    x0, c0, _, _ = train.stage2_batch(np.random.default_rng(0), 8)
    for img, cap in zip(((x0.permute(0, 2, 3, 1) + 1) * 127.5).round().numpy(), c0):
        assert not any(w in world.NOVEL_TEXTURES for w in cap.split())


def test_free_texture_fraction_is_checked_before_training(tmp_path, capsys):
    from vico.toyworld import train

    for bad in (["--free-texture-fraction", "1.1"], ["--free-texture-fraction", "0.8", "--generic-fraction", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            train.main(["--out", str(tmp_path / "x"), *bad])
        assert exc.value.code == 2
        assert "--free-texture-fraction must be in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_vico_object_masks_come_from_the_highest_resolution_layer_nearest_the_output():
    """With image blocks in the encoder too, two flagged layers run at 16x16; the reported mask is the decoder's."""
    from vico.methods.base import MethodConfig
    from vico.methods.vico import ViCo, ViCoOptions
    from vico.model import load_components
    from vico.toyworld import demo

    model = demo.shipped_model()
    layers = demo.for_model({"options": {"layers": demo.EVERY_TRANSFORMER}}, model)["options"]["layers"]
    nearest = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for listed in (layers, layers[::-1]):  # forward order, then its reverse: the UNet's order decides, not the list's
        method = ViCo(load_components(model), MethodConfig(init_word="square", resolution=32,
                                                           options=ViCoOptions(layers=listed)))
        requests = []
        make = method.map_request
        method.map_request = lambda *a, **k: requests.append(make(*a, **k)) or requests[-1]
        with torch.no_grad():
            masks = method.object_masks(latents)
        (request,) = requests
        encoder = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        assert {encoder, nearest} <= set(method.source_layers)
        assert torch.equal(masks, request.masks[nearest][2:, 0].reshape(2, 16, 16))
        assert not torch.equal(masks, request.masks[encoder][2:, 0].reshape(2, 16, 16))
    assert method.sharpest_nearest_output({"mid_block.attentions.0": 64, "up_blocks.0.attentions.1": 64,
                                           "down_blocks.0.attentions.0": 256}) == "down_blocks.0.attentions.0"
    assert method.sharpest_nearest_output({"up_blocks.0.attentions.0": 64, "mid_block.attentions.0": 64}) == \
        "up_blocks.0.attentions.0"  # the middle block runs before the decoder, though the UNet registers it after
