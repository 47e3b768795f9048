"""Metrics on tiny random CLIP/DINO models saved locally, and `vico eval`."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests import builders as tiny  # noqa: E402
from vico import cli, metrics  # noqa: E402



@pytest.fixture(scope="module")
def encoders_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return tiny.save_tiny_clip(root / "clip"), tiny.save_tiny_dino(root / "dino")


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_metrics_equal_hand_computed_cosines(encoders_dirs):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

    clip_dir, dino_dir = encoders_dirs
    enc = metrics.load_encoders(clip_dir, dino_dir)
    gen, real = _images(3, 0), _images(2, 1)
    prompts = ["a photo of cat", "a red cat", "a cat on the beach"]
    report = metrics.evaluate(enc, gen, real, prompts)

    model, proc, tok = CLIPModel.from_pretrained(clip_dir), AutoImageProcessor.from_pretrained(clip_dir), \
        AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        def img_emb(images):
            out = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        g, r = img_emb(gen), img_emb(real)
        ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        tfeat = model.get_text_features(input_ids=ids)
        tfeat = tfeat if isinstance(tfeat, torch.Tensor) else tfeat.pooler_output
        cos = torch.nn.functional.cosine_similarity
        clip_i = np.mean([float(cos(g[i], r[j], dim=0)) for i in range(3) for j in range(2)])
        clip_t = np.mean([float(cos(g[i], tfeat[i], dim=0)) for i in range(3)])
        dino, dproc = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False), AutoImageProcessor.from_pretrained(dino_dir)
        dg = dino(pixel_values=dproc(images=gen, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
        dr = dino(pixel_values=dproc(images=real, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
        dino_sim = np.mean([float(cos(dg[i], dr[j], dim=0)) for i in range(3) for j in range(2)])
    assert report["clip_i"] == pytest.approx(clip_i, abs=1e-5)
    assert report["clip_t"] == pytest.approx(clip_t, abs=1e-5)
    assert report["dino"] == pytest.approx(dino_sim, abs=1e-5)

    same = metrics.evaluate(enc, [gen[0]] * 2, [gen[0]] * 3, prompts[:2])
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)
    masked = metrics.evaluate(enc, gen[:1], real[:1], prompts[:1], [np.ones((4, 4), bool)], [np.ones((8, 8), bool)])
    assert masked["masked_clip_i"] == pytest.approx(masked["clip_i"], abs=1e-6)  # all-foreground masks change nothing


def test_apply_mask_blacks_out_background():
    img = np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    out = metrics.apply_mask(img, mask)
    assert (out[:4, :4] == 200).all() and (out[4:] == 0).all() and (out[:, 4:] == 0).all()


def test_shipped_prompt_set():
    prompts = metrics.load_eval_prompts()
    assert 24 <= len(prompts) <= 31 and all("{}" in p for p in prompts)


def test_vico_eval_end_to_end(encoders_dirs, model_dir, images_dir, tmp_path, capsys):  # noqa: F811
    clip_dir, dino_dir = encoders_dirs
    concept, samples = tmp_path / "concept", tmp_path / "samples"
    run = lambda *a: cli.main([str(x) for x in a])  # noqa: E731
    assert run("train", "--model", model_dir, "--images", images_dir, "--out", concept, "--init-word", "cat",
               "--steps", 1, "--quiet") == 0
    assert run("sample", "--concept", concept, "--prompt", "a photo of S* on the beach", "--out", samples,
               "--num-images", 2, "--steps", 2, "--save-maps", "--quiet") == 0
    capsys.readouterr()
    assert run("eval", "--generated", samples, "--concept", concept, "--clip", clip_dir, "--dino", dino_dir,
               "--out", tmp_path / "report.json") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompt"] == "a photo of cat on the beach"
    assert {"clip_i", "clip_t", "dino", "masked_clip_i"} <= set(report)
    assert report["masks"]["real"].startswith("Otsu mask of the S* map")
    assert report["masks"]["generated"].startswith("each generated image's own Otsu mask of its S* map")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}\na {} in the snow\n")
    assert run("eval", "--concept", concept, "--prompts", prompts, "--clip", clip_dir, "--out", tmp_path / "ev",
               "--num-images", 1, "--steps", 2, "--quiet") == 0
    table = capsys.readouterr().out
    assert "| a cat in the snow |" in table and "**mean**" in table
    summary = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert len(summary["per_prompt"]) == 2 and "clip_i" in summary["summary"]
