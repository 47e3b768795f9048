"""`vico maps` on video pipelines (issue 19): frame strips, GIFs and mask strips of the [F, h, w] maps.

The pipelines are tiny local Wan folders (the transformer and tokenizer of
tests/processors/test_video_processors.py, float32): one without a VAE (latent output,
maps on black) and one with a tiny Wan VAE (decoded frames under the maps);
CogVideoX's tiny pipeline once.
Two steps of a 9-frame 32 x 48 clip: latents 3 x 4 x 6, patches 3 x 2 x 3, so
F = 3 map frames of 32 x 48 pixels (2 x 3 patches of 16 px).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from fused import maps as fused_maps  # noqa: E402
from tests.builders import error_line  # noqa: E402
from vico import cli  # noqa: E402

FRAMES, H, W = 3, 32, 48
PROMPT = "a photo of a red cat on the beach"
ARGS = ["--prompt", PROMPT, "--steps", "2", "--height", str(H), "--width", str(W), "--frames", "9"]


def save_tiny_wan(path, vae: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    from tests.builders import t5_like_tokenizer
    from tests.processors.test_video_processors import tiny_t5, tiny_wan

    torch.manual_seed(0)
    tok = t5_like_tokenizer()
    kw = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
              latents_std=[1.0] * 4)
    WanPipeline(tokenizer=tok, text_encoder=tiny_t5(tok), vae=AutoencoderKLWan(**kw) if vae else None,
                transformer=tiny_wan().float(), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan"), vae=False)


@pytest.fixture(scope="module")
def wan_vae_dir(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan-vae"), vae=True)


def maps(model, out, *extra):
    return cli.main(["maps", "--model", str(model), "--out", str(out), *ARGS, *[str(a) for a in extra]])


def heat_from_records(path, word):
    """The word's clip map from the records: summed over layers and calls, normalised over the clip -> [F, h, w]."""
    records, _ = fused_maps.load_records(path)
    total = sum(m for key, m in records.items() if key.endswith(f"/{word}"))[0]
    return (total - total.min()) / (total.max() - total.min())


def tiles(strip, n):
    """[H, n * W, 3] -> [n, H, W, 3]."""
    return np.stack(np.split(strip, n, axis=1))


def test_video_maps_are_frame_strips_and_gifs_of_the_heatmaps(wan_dir, tmp_path, capsys):
    out = tmp_path / "maps"
    assert maps(wan_dir, out, "--words", "cat", "red", "--records") == 0
    said = capsys.readouterr().out
    assert "has no VAE" in said and "3 map frames of 2x3 patches" in said
    names = {p.name for p in out.iterdir()}
    assert {"map_cat.png", "map_cat.gif", "mask_cat.png", "map_red.png", "map_red.gif", "mask_red.png", "grid.png",
            "records.safetensors"} <= names
    assert not names & {"image.png", "frames.png", "video.gif"}  # latent output: no frames to save
    for word in ("cat", "red"):
        heat = heat_from_records(out / "records.safetensors", word)
        assert heat.shape == (FRAMES, 2, 3)
        strip = np.asarray(Image.open(out / f"map_{word}.png").convert("RGB"))
        assert strip.shape == (H, FRAMES * W, 3)
        # on black the red channel is 255 x the map, bilinear per frame, not renormalised per frame
        want = F.interpolate(heat[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        got = tiles(strip, FRAMES)[..., 0].astype(np.float64) / 255
        np.testing.assert_allclose(got, want.numpy(), atol=1.5 / 255)
        brightest = int(heat.flatten(1).mean(1).argmax())
        assert int(got.reshape(FRAMES, -1).mean(1).argmax()) == brightest
        assert int(heat.flatten(1).max(1).values.argmax()) == int(got.reshape(FRAMES, -1).max(1).argmax())
        gif = Image.open(out / f"map_{word}.gif")
        assert gif.n_frames == FRAMES and gif.size == (W, H)
        assert gif.info["duration"] == 250  # one map frame covers 4 video frames at 16 fps
        reds = []
        for i in range(FRAMES):
            gif.seek(i)
            reds.append(np.asarray(gif.convert("RGB"))[..., 0].astype(np.float64).mean())
        assert int(np.argmax(reds)) == brightest
        np.testing.assert_allclose(np.array(reds) / 255, want.flatten(1).mean(1).numpy(), atol=0.02)
        mask = np.asarray(Image.open(out / f"mask_{word}.png").convert("L"))
        assert mask.shape == (H, FRAMES * W) and set(np.unique(mask)) <= {0, 255}
    grid = Image.open(out / "grid.png")
    assert grid.size == (FRAMES * W, 4 * H)  # map and mask strip per word


def test_video_maps_with_a_vae_save_the_frames_under_the_maps(wan_vae_dir, tmp_path, capsys):
    out = tmp_path / "maps"
    assert maps(wan_vae_dir, out, "--words", "cat", "--fps", "8") == 0
    assert "has no VAE" not in capsys.readouterr().out
    video = Image.open(out / "video.gif")
    assert video.n_frames == 9 and video.size == (W, H) and video.info["duration"] == 120  # 1000 / 8, in 10 ms
    frames = np.asarray(Image.open(out / "frames.png").convert("RGB"))
    assert frames.shape == (H, FRAMES * W, 3)
    video.seek(4)  # the middle of the second map frame's stretch (frames 3-5 of 9)
    gif_frame = np.asarray(video.convert("RGB")).astype(float)
    assert np.abs(tiles(frames, FRAMES)[1] - gif_frame).mean() < 8  # up to the GIF's palette
    assert np.abs(tiles(frames, FRAMES)[0] - gif_frame).mean() > np.abs(tiles(frames, FRAMES)[1] - gif_frame).mean()
    overlay = np.asarray(Image.open(out / "map_cat.png").convert("RGB"))
    assert overlay.shape == frames.shape and not np.array_equal(overlay, frames)
    assert Image.open(out / "map_cat.gif").n_frames == FRAMES
    assert Image.open(out / "grid.png").size == (FRAMES * W, 3 * H)  # frames, map, mask


def fake_folder(path, index):
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def test_bad_inputs_are_one_line_before_loading(wan_dir, tmp_path, monkeypatch, capsys):
    from vico import model

    def must_not_load(*a, **k):
        raise AssertionError("the pipeline was loaded before the inputs were checked")

    monkeypatch.setattr(model, "load_pipeline", must_not_load)
    assert maps(wan_dir, tmp_path / "o", "--words", "dog") == 2
    line = error_line(capsys)
    assert "--words" in line and "word 'dog' does not occur in the prompt" in line
    pixart = fake_folder(tmp_path / "pixart", {"_class_name": "PixArtAlphaPipeline",
                                               "transformer": ["diffusers", "PixArtTransformer2DModel"]})
    assert maps(pixart, tmp_path / "o", "--words", "cat") == 2
    line = error_line(capsys)
    assert "--model" in line and "PixArtTransformer2DModel" in line and "not a pipeline vico maps supports" in line
    i2v = fake_folder(tmp_path / "i2v", {"_class_name": "WanImageToVideoPipeline",
                                         "transformer": ["diffusers", "WanTransformer3DModel"]})
    assert maps(i2v, tmp_path / "o", "--words", "cat") == 2
    assert "--model" in (line := error_line(capsys)) and "needs an input image" in line
    sd = fake_folder(tmp_path / "sd", {"_class_name": "StableDiffusionPipeline",
                                       "unet": ["diffusers", "UNet2DConditionModel"]})
    assert maps(sd, tmp_path / "o", "--words", "cat") == 2  # ARGS pass --frames
    assert "--frames applies to video pipelines only" in error_line(capsys)
    assert maps(tmp_path, tmp_path / "o", "--words", "cat") == 2
    assert "no model_index.json" in error_line(capsys)
    assert maps(wan_dir, tmp_path / "o", "--words", "cat", "--frames", "0") == 2
    assert "--frames must be at least 1" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_token_level_errors_name_their_argument(wan_dir, tmp_path, capsys):
    # "ca" is in the prompt's text but is no token of it: trace refuses it after loading, before generating
    assert maps(wan_dir, tmp_path / "o", "--words", "ca") == 2
    assert error_line(capsys).startswith("vico: error: --words: word 'ca' does not occur")
    assert maps(wan_dir, tmp_path / "o", "--words", "cat", "--occurrence", "3") == 2
    assert "--occurrence: word 'cat' occurs 1 time(s)" in error_line(capsys)
    assert maps(wan_dir, tmp_path / "o", "--words", "cat", "--layers", "blocks.9") == 2
    assert "--layers: no attention layer matches ['blocks.9']" in error_line(capsys)


def test_the_cli_supports_the_video_transformers_trace_does():
    from fused.processors.video import _FAMILIES

    assert {k for k, v in cli.MAP_DENOISERS.items() if v == "video"} == set(_FAMILIES)


def test_image_pipelines_write_what_they_did(model_dir, tmp_path, capsys):
    out = tmp_path / "sd"
    assert cli.main(["maps", "--model", str(model_dir), "--prompt", "a photo of a red cat", "--words", "cat",
                     "--out", str(out), "--steps", "2"]) == 0
    assert {p.name for p in out.iterdir()} == {".vico-written", "image.png", "grid.png", "map_cat.png", "mask_cat.png"}
    assert "map frames" not in capsys.readouterr().out
    assert cli.main(["maps", "--model", str(model_dir), "--prompt", "a photo of a cat", "--words", "dog",
                     "--out", str(out), "--steps", "2"]) == 2
    assert "--words: word 'dog' does not occur in the prompt" in error_line(capsys)


def test_cogvideox_maps_are_strips_too(tmp_path):
    from tests.processors.test_video_processors import tiny_pipeline

    tiny_pipeline("cogvideox").to(torch.float32).save_pretrained(tmp_path / "cog")
    out = tmp_path / "maps"
    assert maps(tmp_path / "cog", out, "--words", "cat") == 0
    assert Image.open(out / "map_cat.png").size == (FRAMES * W, H)
    assert Image.open(out / "map_cat.gif").n_frames == FRAMES
